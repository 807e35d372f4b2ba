"""Hierarchical VAE (`kind = "hvae"`) on MNIST: test NLL (IWAE) and KL per layer against training time.

Protocol: `examples/configs/mnist_hvae.toml` (two stochastic layers z1: 64, z2: 32), trained on
all 60,000 training images, binarized afresh every time a batch is drawn; the 10,000 test
images are binarized once with a fixed seed. Every `--chunk-epochs` epochs the run is
checkpointed (pyrovae's own `--resume` machinery) and measured on the first `--curve-points`
test images: the importance-sampled negative log-likelihood (IWAE bound with `--curve-k`
samples, proposal q(z1|x) q(z2|z1); an upper bound on the NLL that tightens with K) and the
ELBO's terms per layer (`kl_z1`, `kl_z2`, `reconstruction`, one draw per image). The JSON
result is rewritten after every chunk; `--resume` continues a stopped benchmark up to
`--minutes` of training in all. At the end: the IWAE NLL with `--eval-k` samples on
`--eval-points` test images and the test -ELBO. The published anchors (Burda et al. 2016,
two stochastic layers, 3,280 epochs): VAE 85.33, IWAE k=50 82.90 nats (K=5000, all test images).

    python benchmarks/structured_hvae.py --minutes 25 --eval-k 1000 --eval-points 1000 --root /path/to/mnist
    python benchmarks/structured_hvae.py --device cuda --minutes 1.5 --root /path/to/mnist
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyrovae  # noqa: E402
from pyrovae import evaluate  # noqa: E402
from pyrovae.runs import CHECKPOINT  # noqa: E402


def commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def nll(model, x: torch.Tensor, k: int, max_rows: int) -> tuple[float, float]:
    """Mean and standard error of -log p̂(x) (IWAE bound with K samples), nats per image."""
    ll = evaluate.log_likelihood(model.model, model.guide, x, num_samples=k, max_rows=max_rows)
    return float(-ll.mean()), float(ll.std() / len(ll) ** 0.5)


def shown_args(argv: list[str]) -> str:
    """The command line as recorded in the result: machine-specific folders as placeholders."""
    out, hide = [], {"--root": "<mnist-root>", "--out": "<run-folder>"}
    for i, a in enumerate(argv):
        out.append(hide[argv[i - 1]] if i and argv[i - 1] in hide else a)
    return " ".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=25.0, help="training budget (wall clock)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--root", default="", help="folder with the four MNIST IDX files")
    p.add_argument("--config", default=str(ROOT / "examples/configs/mnist_hvae.toml"))
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--chunk-epochs", type=int, default=2)
    p.add_argument("--curve-k", type=int, default=100)
    p.add_argument("--curve-points", type=int, default=1000)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--out", default=None, help="run folder (default: runs/bench_hvae_<device>)")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/...)")
    p.add_argument("--resume", action="store_true", help="continue a stopped benchmark")
    args = p.parse_args(argv)

    sets = [*args.set, f'train.device="{args.device}"']
    if args.root:
        sets.append(f"data.root={json.dumps(args.root)}")
    cfg = pyrovae.load_config(args.config, sets)
    out = Path(args.out or ROOT / "runs" / f"bench_hvae_{args.device}")
    res_path = Path(args.json or ROOT / "benchmarks/results" / args.device / "structured_hvae.json")
    res_path.parent.mkdir(parents=True, exist_ok=True)
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    cuda = args.device == "cuda"
    max_rows = 1 << 17 if cuda else evaluate.MAX_ROWS
    result = {
        "config": args.config.replace(str(ROOT) + "/", ""),
        "overrides": args.set,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/structured_hvae.py "
        + shown_args(sys.argv[1:] if argv is None else argv),
        "protocol": "test NLL = -IWAE bound (K samples, proposal q(z1|x) q(z2|z1)) on dynamically "
        "binarized MNIST test images (binarized once, fixed seed), nats per image; kl_z*: "
        "per-layer KL terms of the ELBO, one draw per image",
        "curve": [],
        "epochs": 0,
        "train_minutes": 0.0,
    }
    if args.resume and res_path.is_file() and (out / CHECKPOINT).is_file():
        result = {**json.loads(res_path.read_text()), "commit": result["commit"]}
    elif out.exists():
        shutil.rmtree(out)
    epochs, spent, chunk = result["epochs"], result["train_minutes"] * 60, 0.0
    device = torch.device(args.device)
    x_curve = data.x_test[: args.curve_points].to(device)
    run = None
    while spent + chunk <= args.minutes * 60:
        epochs += args.chunk_epochs
        cfg.train.epochs = epochs
        t0 = time.perf_counter()
        run = pyrovae.fit(
            cfg,
            out,
            resume=(out / CHECKPOINT).exists(),
            progress=False,
            data=data,
            figures=False,
        )
        chunk = time.perf_counter() - t0
        spent += chunk
        if run.interrupted:  # fit saved a mid-epoch checkpoint; --resume continues it
            result["train_minutes"] = spent / 60
            res_path.write_text(json.dumps(result, indent=2))
            raise SystemExit("interrupted; continue with --resume")
        run.model.to(device).eval()
        mean, se = nll(run.model, x_curve, args.curve_k, max_rows)
        point = {
            "epochs": epochs,
            "train_minutes": round(spent / 60, 3),
            "train_elbo": run.history[-1]["train_elbo"],
            "test_nll": mean,
            "se": se,
            "k": args.curve_k,
            "points": len(x_curve),
            **run.model.metrics(x_curve),
        }
        result["curve"].append(point)
        result.update(epochs=epochs, train_minutes=spent / 60)
        res_path.write_text(json.dumps(result, indent=2))
        print(json.dumps(point), flush=True)
    if run is None:  # resumed with the budget already spent
        run = pyrovae.load_run(out)
    run.model.to(device).eval()
    x = data.x_test[: args.eval_points].to(device)
    t0 = time.perf_counter()
    mean, se = nll(run.model, x, args.eval_k, max_rows)
    elbo = float(evaluate.elbo(run.model.model, run.model.guide, x, batch_size=1000).mean())
    result.update(
        test_nll=mean,
        test_nll_se=se,
        test_neg_elbo=-elbo,
        eval_k=args.eval_k,
        eval_points=len(x),
        eval_seconds=time.perf_counter() - t0,
        evaluated_epochs=len(run.history),  # complete epochs in the evaluated checkpoint
        **{f"test_{k}": v for k, v in run.model.metrics(x).items()},
    )
    res_path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    return result


if __name__ == "__main__":
    main()
