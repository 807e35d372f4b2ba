"""Lesson 1: a linear autoencoder learns the PCA subspace (scikit-learn digits, 64-d).

Trains a tied (x̂ = UUᵀ(x − m) + m) and an untied (x̂ = W₂(W₁x + b₁) + b₂) linear autoencoder
with full-batch L-BFGS and compares them with scikit-learn's PCA.

    python examples/lesson1_linear_ae_pca.py [--k 8] [--out out/lesson1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyrovae.teaching.linear_ae import linear_ae_lesson, plot_linear_ae


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="code size (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/lesson1"), help="figure folder")
    args = parser.parse_args(argv)

    r = linear_ae_lesson(k=args.k, seed=args.seed)
    print(f"digits: N = {r.n}, D = 64, code size k = {r.k}")
    print("mean squared reconstruction error per image (summed over pixels):")
    print(f"  PCA residual (sum of discarded eigenvalues): {r.pca_residual:.6f}")
    print(f"  tied linear AE:   {r.tied_error:.6f}  (relative to PCA: {r.tied_rel_error:+.2e})")
    print(f"  untied linear AE: {r.untied_error:.6f}  (relative to PCA: {r.untied_rel_error:+.2e})")
    print("largest principal angle between decoder subspace and PCA's top-k subspace:")
    print(f"  tied:   {r.tied_max_angle_deg:.2e} degrees")
    print(f"  untied: {r.untied_max_angle_deg:.2e} degrees")
    ok = (
        max(r.tied_max_angle_deg, r.untied_max_angle_deg) < 1.0
        and max(abs(r.tied_rel_error), abs(r.untied_rel_error)) < 0.01
    )
    print(f"claim (angle < 1 degree, error within 1% of PCA): {'holds' if ok else 'FAILS'}")
    path = plot_linear_ae(r, args.out / "lesson1_linear_ae_pca.png")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
