"""Mixture VAE (`kind = "gmvae"`) on MNIST: unsupervised cluster accuracy against training time.

Protocol: `examples/configs/mnist_gmvae.toml` (10 clusters, all 60,000 training images as grey
levels under the Bernoulli cross-entropy, labels never used in training; figures before
`mnist_gmvae.toml` switched to grey levels used dynamically binarized images). Every `--chunk-epochs` epochs the run is
checkpointed (pyrovae's own `--resume` machinery) and the model's `metrics` are measured on all
10,000 test images: `cluster_accuracy`, each image assigned to argmax_c q(c|x) and the 10
clusters matched one-to-one to the 10 digits (Hungarian algorithm), and `clusters_used`. The
JSON result is rewritten after every chunk; `--resume` continues a stopped benchmark up to
`--minutes` of training in all. At the end the test ELBO (c summed exactly) is measured.

    python benchmarks/structured_gmvae.py --minutes 25 --root /path/with/the/four/idx/files
    python benchmarks/structured_gmvae.py --device cuda --minutes 2 --root /path/to/mnist
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyrovae  # noqa: E402
from pyrovae.runs import CHECKPOINT  # noqa: E402


def commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


@torch.no_grad()
def test_elbo(model, x: torch.Tensor, batch: int = 500) -> float:
    """Test ELBO per image with c summed out exactly (TraceEnum_ELBO, one z per cluster)."""
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    total = sum(-elbo.loss(model.model, model.guide, xb) for xb in x.split(batch))
    return total / len(x)


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
    p.add_argument("--config", default=str(ROOT / "examples/configs/mnist_gmvae.toml"))
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--chunk-epochs", type=int, default=1)
    p.add_argument("--out", default=None, help="run folder (default: runs/bench_gmvae_<device>)")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/...)")
    p.add_argument("--resume", action="store_true", help="continue a stopped benchmark")
    args = p.parse_args(argv)

    sets = [*args.set, f'train.device="{args.device}"']
    if args.root:
        sets.append(f"data.root={json.dumps(args.root)}")
    cfg = pyrovae.load_config(args.config, sets)
    out = Path(args.out or ROOT / "runs" / f"bench_gmvae_{args.device}")
    res_path = Path(
        args.json or ROOT / "benchmarks/results" / args.device / "structured_gmvae.json"
    )
    res_path.parent.mkdir(parents=True, exist_ok=True)
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    result = {
        "config": str(Path(args.config).relative_to(ROOT))
        if args.config.startswith(str(ROOT))
        else args.config,
        "overrides": args.set,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/structured_gmvae.py "
        + shown_args(sys.argv[1:] if argv is None else argv),
        "protocol": "cluster_accuracy: argmax_c q(c|x) on all 10,000 test images, one-to-one "
        "(Hungarian) matching of clusters to digits; test_elbo: nats per image, c summed exactly"
        + (
            " (grey levels under the Bernoulli cross-entropy: a bound on no normalized likelihood)"
            if cfg.model.likelihood.kind == "bernoulli_cross_entropy"
            else f" (data.binarize = {cfg.data.binarize}, likelihood {cfg.model.likelihood.kind})"
        ),
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
    x_test, y_test = data.x_test.to(device), data.y_test
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
        m = run.model.metrics(x_test, y_test)
        point = {
            "epochs": epochs,
            "train_minutes": round(spent / 60, 3),
            "train_elbo": run.history[-1]["train_elbo"],
            **m,
        }
        result["curve"].append(point)
        result.update(epochs=epochs, train_minutes=spent / 60, **m)
        res_path.write_text(json.dumps(result, indent=2))
        print(json.dumps(point), flush=True)
    if run is not None:
        run.model.to(device).eval()
        result["test_elbo"] = test_elbo(run.model, x_test)
        res_path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    return result


if __name__ == "__main__":
    main()
