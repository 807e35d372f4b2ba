"""Lesson 6: log p(x) = ELBO(q) + KL(q || p(z|x)), verified on probabilistic PCA with Pyro.

python examples/lesson6_vi_identity.py [--steps 600] [--out out/lesson6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro

from pyrovae.teaching.vi_identity import plot_vi_identity, vi_identity_lesson


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="SVI steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/lesson6"), help="figure folder")
    args = parser.parse_args(argv)

    pyro.enable_validation(True)
    r = vi_identity_lesson(steps=args.steps, seed=args.seed)
    print(
        f"pPCA: D = {r.D}, k = {r.k}, sigma = {r.sigma}, N = {r.n_data}; mean log p(x) = {r.log_px:.6f} nats"
    )
    i = r.identity
    print(
        f"identity over {i.n_q} random Gaussian q x {i.n_data} datapoints: "
        f"max |log p(x) - ELBO - KL| = {i.max_abs_gap:.1e} nats"
    )
    print(
        f"  mean KL per q ranged {i.kl_range[0]:.3g} .. {i.kl_range[1]:.3g} nats; max ELBO - log p(x) = {i.max_elbo_minus_logpx:.3g} (<= 0)"
    )
    print(f"exact posterior: max |ELBO - log p(x)| = {r.exact_elbo_gap:.1e}")
    print(
        f"exact guide, Trace_ELBO (1 particle): max |loss + log p(x)| per datapoint = {r.exact_trace_elbo_gap:.1e}"
    )
    mc = r.mc
    print(
        f"Trace_ELBO ({mc.num_particles} particles x {mc.repeats} repeats) vs closed form, nats per datapoint:"
    )
    for c, m, s in zip(mc.closed_form, mc.monte_carlo, mc.stderr, strict=True):
        print(f"  closed {c:.4f}   MC {m:.4f} ± {s:.4f}   ({(m - c) / s:+.2f} s.e.)")
    s = r.svi
    print(
        f"SVI, {len(s.kl_exact)} steps: mean KL(q||p(z|x)) {s.kl_initial:.4f} -> {s.kl_final:.2e} nats"
    )
    print(f"  final closed-form ELBO {s.elbo_final:.6f} vs log p(x) {s.log_px:.6f}")
    path = plot_vi_identity(r, args.out / "lesson6_vi_identity.png")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
