"""Test NLL on dynamically binarized MNIST for the shipped configs, against wall-clock time.

Protocol (BRIEF §4): train on 50,000 of the 60,000 training images (10,000 held out for
validation), binarized afresh every time a batch is drawn; the 10,000 test images are binarized
once with a fixed seed. The reported number is the importance-sampled negative log-likelihood
-log p(x) ≈ -log (1/K) Σ_k p(x, z_k)/q(z_k|x) with K samples (the IWAE bound; an upper bound on
the true NLL that tightens as K grows), in nats per test image. ELBOs are reported separately and
labelled as such.

    python benchmarks/mnist_nll.py --configs vae --minutes 60 --eval-k 5000
    python benchmarks/mnist_nll.py --configs vae,mixture,vamp,iwae5 --minutes 60 --json

Every ``--chunk-epochs`` epochs the run is checkpointed (pyrovae's own ``--resume`` machinery)
and the test NLL is measured with ``--curve-k`` samples on ``--curve-points`` test images to draw
NLL against training time; the final figure uses ``--eval-k`` on ``--eval-points`` images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyrovae  # noqa: E402
from pyrovae import evaluate  # noqa: E402


def nll(run: pyrovae.Run, x: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean and standard error of -log p̂(x) (IWAE bound with K samples), nats per image."""
    m = run.model
    m.eval()
    m.kl_scale = 1.0
    ll = evaluate.log_likelihood(m.model, m.guide, x, num_samples=k, batch_size=100)
    return float(-ll.mean()), float(ll.std() / len(ll) ** 0.5)


def train_one(name: str, args: argparse.Namespace) -> dict:
    cfg = pyrovae.load_config(
        ROOT / "examples" / "configs" / f"mnist_{name}.toml", [f'data.root="{args.root}"']
    )
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    out = Path(args.out) / name
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a fresh run each time the benchmark is started
    x_curve = data.x_test[: args.curve_points]
    curve, epochs, start, spent = [], 0, time.perf_counter(), 0.0
    run = None
    while spent < args.minutes * 60:
        epochs += args.chunk_epochs
        cfg.train.epochs = epochs
        t0 = time.perf_counter()
        run = pyrovae.fit(
            cfg, out, resume=epochs > args.chunk_epochs, progress=False, data=data, figures=False
        )
        spent += time.perf_counter() - t0
        mean, se = nll(run, x_curve, args.curve_k)
        curve.append(
            {
                "epochs": epochs,
                "train_minutes": spent / 60,
                "test_nll": mean,
                "se": se,
                "k": args.curve_k,
                "points": len(x_curve),
                "val_elbo": run.history[-1]["val_elbo"],
            }
        )
        print(
            f"[{name}] {epochs} epochs, {spent / 60:.1f} min: test NLL (K={args.curve_k}, {len(x_curve)} pts) {mean:.2f} ± {se:.2f}; val ELBO {run.history[-1]['val_elbo']:.2f}",
            flush=True,
        )
    x_eval = data.x_test[: args.eval_points]
    t0 = time.perf_counter()
    mean, se = nll(run, x_eval, args.eval_k)
    elbo = float(-evaluate.elbo(run.model.model, run.model.guide, x_eval, batch_size=1000).mean())
    return {
        "config": f"examples/configs/mnist_{name}.toml",
        "epochs": epochs,
        "train_minutes": spent / 60,
        "test_nll": mean,
        "test_nll_se": se,
        "test_neg_elbo": elbo,
        "eval_k": args.eval_k,
        "eval_points": len(x_eval),
        "eval_seconds": time.perf_counter() - t0,
        "curve": curve,
        "started": start,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        c = r["curve"]
        ax.plot([p["train_minutes"] for p in c], [p["test_nll"] for p in c], marker="o", label=name)
    ax.set_xlabel("training time (minutes, 2 CPU cores)")
    ax.set_ylabel("test NLL, nats (IWAE bound)")
    ax.set_title("dynamically binarized MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default="vae,mixture,vamp,iwae5")
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--out", default="runs/mnist_nll")
    p.add_argument("--minutes", type=float, default=60.0, help="training budget per model")
    p.add_argument("--chunk-epochs", type=int, default=10)
    p.add_argument("--curve-k", type=int, default=100)
    p.add_argument("--curve-points", type=int, default=1000)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = {name: train_one(name, args) for name in args.configs.split(",")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, Path(args.out) / "nll_vs_time.png")
    if args.json:
        print(
            json.dumps(
                {k: {kk: v for kk, v in r.items() if kk != "curve"} for k, r in results.items()}
            )
        )
    for name, r in results.items():
        print(
            f"{name:8s} test NLL {r['test_nll']:.2f} ± {r['test_nll_se']:.2f} nats (IWAE K={r['eval_k']}, {r['eval_points']} test images); -ELBO {r['test_neg_elbo']:.2f}; {r['epochs']} epochs in {r['train_minutes']:.1f} min"
        )


if __name__ == "__main__":
    main()
