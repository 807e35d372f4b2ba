"""Test NLL on dynamically binarized MNIST for the shipped configs, against wall-clock time.

Protocol: train on the official training images — all 60,000 (``mnist_vae``,
``data.val_fraction = 0``) or 50,000 with 10,000 held out for validation (the other configs) —
binarized afresh every time a batch is drawn; the 10,000 test images are binarized
once with a fixed seed. The reported number is the importance-sampled negative log-likelihood
-log p(x) ≈ -log (1/K) Σ_k p(x, z_k)/q(z_k|x) with K samples (the IWAE bound; an upper bound on
the true NLL that tightens as K grows), in nats per test image. ELBOs are reported separately and
labelled as such.

    python benchmarks/mnist_nll.py --configs vae --minutes 60 --eval-k 5000
    python benchmarks/mnist_nll.py --configs vae,mixture,vamp,iwae5 --minutes 60 --json
    python benchmarks/mnist_nll.py --configs vae --root /path/with/the/four/idx/files   # offline

``--root`` is the folder holding the four MNIST IDX files (gzipped or not); left empty (the
default) the configs' own ``data.root`` applies, and with ``root = ""`` there torchvision
downloads MNIST into ``~/.cache/pyrovae/mnist`` on first use (online only).

Every ``--chunk-epochs`` epochs the run is checkpointed (pyrovae's own ``--resume`` machinery)
and the test NLL is measured with ``--curve-k`` samples on ``--curve-points`` test images to draw
NLL against training time; the final figure uses ``--eval-k`` on ``--eval-points`` images.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyrovae  # noqa: E402
from pyrovae import evaluate  # noqa: E402
from pyrovae.runs import CHECKPOINT  # noqa: E402


def nll(run: pyrovae.Run, x: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean and standard error of -log p̂(x) (IWAE bound with K samples), nats per image."""
    m = run.model
    m.eval()
    ll = evaluate.log_likelihood(m.model, m.guide, x, num_samples=k, batch_size=100)
    return float(-ll.mean()), float(ll.std() / len(ll) ** 0.5)


def root_override(root: str) -> list[str]:
    """``--set`` items pointing ``data.root`` at ``root``; none when ``root`` is empty."""
    return [f"data.root={json.dumps(root)}"] if root else []


def train_one(name: str, args: argparse.Namespace) -> dict:
    cfg = pyrovae.load_config(
        ROOT / "examples" / "configs" / f"mnist_{name}.toml",
        [*root_override(args.root), *args.set],
    )
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    out = Path(args.out) / name
    curve, epochs, spent, chunk = [], 0, 0.0, 0.0
    if args.resume and (out / "benchmark.json").is_file():
        # continue a run this benchmark stopped, up to --minutes of training in all
        prev = json.loads((out / "benchmark.json").read_text())
        curve, epochs, spent = prev["curve"], prev["epochs"], prev["train_minutes"] * 60
        chunk = spent / max(1, epochs) * args.chunk_epochs
    elif out.exists():
        import shutil

        shutil.rmtree(out)  # a fresh run each time the benchmark is started
    x_curve = data.x_test[: args.curve_points]
    run = None
    # stop before a chunk that would end past the budget (estimated from the last chunk)
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
        if run.interrupted:  # SIGINT/SIGTERM: fit wrote its checkpoint; stop the benchmark too
            raise SystemExit(f"[{name}] interrupted after {spent / 60:.1f} training minutes")
        point = {
            "epochs": epochs,
            "train_minutes": spent / 60,
            "val_elbo": run.history[-1]["val_elbo"],
        }
        if args.curve_k > 0:
            mean, se = nll(run, x_curve, args.curve_k)
            point.update(test_nll=mean, se=se, k=args.curve_k, points=len(x_curve))
        curve.append(point)
        print(
            f"[{name}] {epochs} epochs, {spent / 60:.1f} min: "
            + (
                f"test NLL (K={args.curve_k}, {len(x_curve)} pts) {point['test_nll']:.2f} ± {point['se']:.2f}; "
                if args.curve_k > 0
                else ""
            )
            + (f"val ELBO {point['val_elbo']:.2f}" if point["val_elbo"] is not None else "no validation split"),
            flush=True,
        )
    result = {
        "config": f"examples/configs/mnist_{name}.toml",
        "overrides": list(args.set),
        "epochs": epochs,
        "train_minutes": spent / 60,
        "threads": torch.get_num_threads(),
        "train_peak_rss_mib": peak_rss_mib(),
        "curve": curve,
    }
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    if args.eval_k > 0:
        result.update(final_eval(run, data.x_test[: args.eval_points], args.eval_k))
        (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    return result


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``getrusage`` ru_maxrss), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def final_eval(run: pyrovae.Run, x: torch.Tensor, k: int, device: str = "cpu") -> dict:
    """Test NLL (IWAE bound, K samples) and test -ELBO of a trained run, on ``device``."""
    run.model.to(device)
    x = x.to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    mean, se = nll(run, x, k)
    seconds = time.perf_counter() - t0
    elbo = float(-evaluate.elbo(run.model.model, run.model.guide, x, batch_size=1000).mean())
    return {
        "eval_peak_rss_mib": peak_rss_mib(),
        "eval_peak_rss_before_mib": rss0,
        "eval_cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "test_nll": mean,
        "test_nll_se": se,
        "test_neg_elbo": elbo,
        "eval_k": k,
        "eval_points": len(x),
        "eval_device": torch.cuda.get_device_name() if cuda else "cpu",
        "eval_threads": torch.get_num_threads(),
        "eval_seconds": seconds,
    }


def evaluate_only(name: str, args: argparse.Namespace) -> dict:
    """Final evaluation of an already trained ``<out>/<name>`` run (for example on a GPU)."""
    out = Path(args.out) / name
    result = json.loads((out / "benchmark.json").read_text())
    run = pyrovae.load_run(out)
    cfg = run.config.model_copy(deep=True)
    if args.root:
        cfg.data.root = args.root
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    result.update(final_eval(run, data.x_test[: args.eval_points], args.eval_k, args.device))
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    return result


def load_results(out: Path) -> dict:
    """Every model's ``benchmark.json`` in ``out`` (models may be trained by separate processes),
    or, in a folder of saved results (``benchmarks/results/...``), every ``NAME.json`` with a curve."""
    runs = {f.parent.name: json.loads(f.read_text()) for f in sorted(out.glob("*/benchmark.json"))}
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        if isinstance(r, dict) and "curve" in r:
            runs.setdefault(f.stem, r)
    return runs


def markdown(results: dict) -> str:
    """The final numbers and the curves as Markdown tables."""
    rows = [
        "| model | config | epochs | training min | threads | test NLL (IWAE) | K | test images "
        "| test −ELBO | peak RSS training (MiB) | evaluated on | eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in results.items():
        if "test_nll" not in r:
            continue
        rss = r.get("train_peak_rss_mib")
        rows.append(
            f"| {name} | `{r['config']}` | {r['epochs']} | {r['train_minutes']:.1f} | "
            f"{r.get('threads', '')} | **{r['test_nll']:.2f} ± {r['test_nll_se']:.2f}** | "
            f"{r['eval_k']} | {r['eval_points']:,} | {r['test_neg_elbo']:.2f} | "
            f"{'' if rss is None else f'{rss:.0f}'} | {r.get('eval_device', '')} | "
            f"{r['eval_seconds']:.0f} |"
        )
    curves = [
        "",
        "| model | epochs | training min | test NLL, K = 100, first 1,000 test images | val ELBO |",
    ]
    curves.append("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        pts = [c for c in r["curve"] if "test_nll" in c]
        # the first point past every 10 training minutes, and the last
        keep, mark = [], 10.0
        for i, c in enumerate(pts):
            if c["train_minutes"] >= mark or i == len(pts) - 1:
                keep.append(c)
                while mark <= c["train_minutes"]:
                    mark += 10.0
        for c in keep:
            curves.append(
                f"| {name} | {c['epochs']} | {c['train_minutes']:.1f} | "
                f"{c['test_nll']:.2f} ± {c['se']:.2f} | "
                + (f"{c['val_elbo']:.2f} |" if c["val_elbo"] is not None else "– |")
            )
    return "\n".join(rows + curves)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in results.items():
        c = [p for p in r["curve"] if "test_nll" in p]
        style = "--" if "(" in name else "-"  # runs from an earlier results folder: dashed
        ax.plot([p["train_minutes"] for p in c], [p["test_nll"] for p in c], style, marker="o",
                markersize=3, label=name)
    ax.set_xlabel("training time (minutes, CPU)")
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
    p.add_argument(
        "--root",
        default="",
        help="folder with the four MNIST IDX files; '' (default): the config's data.root "
        "('' there = torchvision's download into ~/.cache/pyrovae/mnist, online only)",
    )
    p.add_argument("--out", default="runs/mnist_nll")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for training (TOML syntax, as `pyrovae fit --set`), "
        "e.g. --set train.objective='\"trace_elbo\"'; repeatable",
    )
    p.add_argument("--minutes", type=float, default=60.0, help="training budget per model")
    p.add_argument("--chunk-epochs", type=int, default=10)
    p.add_argument("--curve-k", type=int, default=100)
    p.add_argument("--curve-points", type=int, default=1000)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out (their training time counts) up to --minutes in all",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="skip training: evaluate the runs already in --out (see --device)",
    )
    p.add_argument("--device", default="cpu", help="device of the final evaluation (--eval-only)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="only print the results already in --out as Markdown tables (for docs/benchmarks.md)",
    )
    p.add_argument(
        "--figure",
        metavar="DIR[:LABEL],...",
        help="only draw NLL against time for the --configs runs in these results folders (the "
        "first one unlabelled, the others' as 'name (LABEL)', dashed) to --out/nll_vs_time.png",
    )
    args = p.parse_args()
    if args.figure:
        merged = {}
        for i, item in enumerate(args.figure.split(",")):
            folder, _, label = item.partition(":")
            for name, r in load_results(Path(folder)).items():
                if name not in args.configs.split(","):
                    continue
                merged[name if i == 0 else f"{name} ({label or Path(folder).name})"] = r
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot(merged, Path(args.out) / "nll_vs_time.png")
        return
    if args.markdown:
        print(markdown(load_results(Path(args.out))))
        return
    torch.set_num_threads(args.threads)
    step = evaluate_only if args.eval_only else train_one
    for name in args.configs.split(","):
        step(name, args)
    results = load_results(Path(args.out))
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, Path(args.out) / "nll_vs_time.png")
    if args.json:
        print(
            json.dumps(
                {k: {kk: v for kk, v in r.items() if kk != "curve"} for k, r in results.items()}
            )
        )
    for name, r in results.items():
        if "test_nll" not in r:
            print(
                f"{name:8s} not evaluated yet ({r['epochs']} epochs in {r['train_minutes']:.1f} min)"
            )
            continue
        print(
            f"{name:8s} test NLL {r['test_nll']:.2f} ± {r['test_nll_se']:.2f} nats (IWAE K={r['eval_k']}, {r['eval_points']} test images); -ELBO {r['test_neg_elbo']:.2f}; {r['epochs']} epochs in {r['train_minutes']:.1f} min"
        )


if __name__ == "__main__":
    main()
