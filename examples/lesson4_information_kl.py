"""Lesson 4: information, entropy and the KL divergence, with worked examples.

python examples/lesson4_information_kl.py [--out out/lesson4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pyrovae.teaching.information import information_lesson, plot_information


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/lesson4"), help="figure folder")
    args = parser.parse_args(argv)

    r = information_lesson(seed=args.seed)
    print(f"p = {r.p}, q = {r.q}")
    print(
        "information -log p_i: "
        + ", ".join(
            f"{n:.4f} nats = {b:.4f} bits"
            for n, b in zip(r.information_p_nats, r.information_p_bits, strict=True)
        )
    )
    print(
        f"entropy H(p) = {r.entropy_p_nats:.4f} nats = {r.entropy_p_bits:.4f} bits; H(q) = {r.entropy_q_bits:.4f} bits"
    )
    print(
        f"KL(p||q) = {r.kl_pq_nats:.6f} nats = {r.kl_pq_bits:.6f} bits  (torch: {r.kl_pq_torch:.6f} nats)"
    )
    print(f"KL(q||p) = {r.kl_qp_nats:.6f} nats = {r.kl_qp_bits:.6f} bits  -> KL is not symmetric")
    print(f"three outcomes p = {r.p3}, q = {r.q3}:")
    print(
        f"  KL(p||q) = {r.kl3_pq_nats:.6f} nats (torch {r.kl3_pq_torch:.6f}), KL(q||p) = {r.kl3_qp_nats:.6f} nats"
    )
    g = r.gibbs
    print(
        f"Gibbs' inequality on {g.n_pairs} random pairs ({g.n_outcomes} outcomes): min KL = {g.min_kl:.2e} >= 0, "
        f"{g.n_negative} negative; max |ours - torch| = {g.max_abs_diff_torch:.1e}; mean |KL(p||q) - KL(q||p)| = {g.mean_abs_asymmetry:.3f}"
    )
    m1, s1, m2, s2 = r.gauss_params
    print(
        f"KL(N({m1},{s1}^2) || N({m2},{s2}^2)) = {r.gauss_kl:.6f} nats (torch {r.gauss_kl_torch:.6f})"
    )
    print(f"diagonal 3-d Gaussian KL = {r.diag_kl:.6f} nats (torch {r.diag_kl_torch:.6f})")
    mc = r.mc
    z = np.abs(mc.estimates - mc.exact) / mc.stderrs
    print("Monte Carlo estimate of the diagonal KL (n, estimate, s.e., |error|/s.e.):")
    for n, e, s, zz in zip(mc.ns, mc.estimates, mc.stderrs, z, strict=True):
        print(f"  n = {n:>6d}: {e:.4f} ± {s:.4f}  ({zz:.2f} s.e.)")
    path = plot_information(r, args.out / "lesson4_information_kl.png")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
