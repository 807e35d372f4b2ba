"""Lesson 2: a deep autoencoder beats the linear one at the same code size (scikit-learn digits).

Trains pyrovae autoencoders (model.kind = "ae") with variant = "linear" and variant = "deep"
through pyrovae.fit, squared-error loss, and compares their test reconstruction error with PCA's
(the best any linear autoencoder can do).

    python examples/lesson2_deep_vs_linear.py [--k 2 8] [--epochs 60] [--out out/lesson2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyrovae.teaching.deep_vs_linear import deep_vs_linear_lesson, plot_deep_vs_linear


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 8], help="code sizes (2 8)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/lesson2"), help="figure folder")
    args = parser.parse_args(argv)

    r = deep_vs_linear_lesson(code_sizes=args.k, epochs=args.epochs, seed=args.seed)
    print(f"digits: {r.n_train} training / {r.n_test} test images, D = 64")
    print(f"deep AE: MLP 64-{'-'.join(map(str, r.hidden))}-k and mirror; {r.epochs} epochs each")
    print("test reconstruction error, mean ||x - x_hat||^2 per image (summed over pixels):")
    print(f"  {'k':>3}  {'linear AE':>10}  {'PCA':>10}  {'deep AE':>10}  {'deep/linear':>11}")
    for c in r.results:
        print(
            f"  {c.k:>3}  {c.linear_error:>10.4f}  {c.pca_error:>10.4f}  {c.deep_error:>10.4f}"
            f"  {c.deep_vs_linear:>11.3f}"
        )
    ok = all(c.deep_error < min(c.linear_error, c.pca_error) for c in r.results)
    print(f"claim (deep < linear, and below PCA, at every k): {'holds' if ok else 'FAILS'}")
    path = plot_deep_vs_linear(r, args.out / "lesson2_deep_vs_linear.png")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
