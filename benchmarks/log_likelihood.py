"""Benchmark: ``pyrovae.evaluate.log_likelihood`` (IWAE, K=5000) vs a hand-written PyTorch loop.

Same 784-400-50 softplus MLP VAE (Bernoulli likelihood, dynamically binarized MNIST), same
chunking (at most ``MAX_ROWS`` (particle, image) pairs per network call), same process for the
timings (interleaved, best of ``--repeats``, wall and process CPU time, for each of
``--threads``). Peak memory is measured in a fresh subprocess per
(implementation, K): the peak resident set size during the run minus the RSS before it
(tracemalloc does not see torch's allocator): VmHWM from /proc/self/status, reset just before the
run, minus VmRSS then. The time for the 10,000 test images is
extrapolated linearly from ``--points`` images (cost is linear in images x K).

    python benchmarks/log_likelihood.py                       # train 1 epoch, 500 images
    python benchmarks/log_likelihood.py --run runs/mnist_vae --points 200 --repeats 1

``--root DIR``: the folder with the four MNIST IDX files (gzipped or not). Left empty (the
default), torchvision downloads MNIST into ``~/.cache/pyrovae/mnist`` on first use (online
only); with ``--run``, the run's own ``data.root`` applies unless ``--root`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

import pyrovae
from pyrovae.evaluate import MAX_ROWS, _chunks, evaluation_mode, log_likelihood

LOG_2PI = math.log(2 * math.pi)


def config(root: str, epochs: int) -> dict:
    mlp = lambda h: {"kind": "mlp", "hidden": h, "activation": "softplus"}  # noqa: E731
    return {
        "data": {"dataset": "mnist", "root": root, "binarize": "dynamic"},
        "model": {
            "latent_dim": 50,
            "encoder": mlp([400]),
            "decoder": mlp([400]),
            "likelihood": {"kind": "bernoulli"},
        },
        "train": {"epochs": epochs, "batch_size": 128, "device": "cpu", "seed": 0},
    }


@torch.no_grad()
def iwae_by_hand(vae, x: torch.Tensor, num_samples: int, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """The same estimator written directly in PyTorch (no Pyro): per-datapoint log p̂_K(x)."""
    d = vae.latent_dim
    b, k = _chunks(num_samples, x.shape[0], None, max_rows)
    out = []
    for xb in x.split(b):
        h = vae.posterior.encoder(xb)
        loc, scale = h[:, :d], softplus(h[:, d:]) + 1e-5
        acc = torch.full((xb.shape[0],), -math.inf, dtype=torch.float64)
        for start in range(0, num_samples, k):
            kc = min(k, num_samples - start)
            eps = torch.randn(kc, *loc.shape)
            z = loc + scale * eps
            logits = vae.decoder(z)
            log_px_z = -binary_cross_entropy_with_logits(
                logits, xb.expand_as(logits), reduction="none"
            ).sum(-1)
            log_pz = -0.5 * (z.pow(2).sum(-1) + d * LOG_2PI)
            log_qz = -0.5 * (eps.pow(2).sum(-1) + d * LOG_2PI) - scale.log().sum(-1)
            acc = torch.logaddexp(acc, (log_px_z + log_pz - log_qz).double().logsumexp(0))
        out.append(acc - math.log(num_samples))
    return torch.cat(out)


def pyrovae_iwae(vae, x: torch.Tensor, k: int) -> torch.Tensor:
    return log_likelihood(vae.model, vae.guide, x, num_samples=k)


IMPLEMENTATIONS = {"pyrovae": pyrovae_iwae, "hand-written": iwae_by_hand}


def load(run_dir: str, points: int, root: str = ""):
    """The run's model and its first ``points`` test images (from ``root`` when given)."""
    if not root:
        run = pyrovae.load_run(run_dir, data=True)
        return run.model, run.data.x_test[:points]
    run = pyrovae.load_run(run_dir)
    data_cfg = run.config.data.model_copy(update={"root": root})
    return run.model, pyrovae.load_data(data_cfg, seed=run.config.train.seed).x_test[:points]


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Current resident set size."""
    v = _status_mib("VmRSS")
    return v if v is not None else maxrss_mib()


def maxrss_mib() -> float:
    """Peak resident set size of this process image.

    ``/proc/self/status`` VmHWM where available: ``getrusage`` ru_maxrss carries the parent's
    peak across fork+exec on Linux, which would hide the child's own peak.
    """
    v = _status_mib("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(impl: str, k: int, run_dir: str, points: int, threads: int) -> None:
    """Subprocess body: peak-RSS growth of one (implementation, K) run, printed as JSON.

    The images come from ``x_test.pt`` (saved by the parent), not from MNIST itself: loading
    the 60,000 training images would set a peak RSS that hides the estimator's own.
    """
    torch.set_num_threads(threads)
    vae = pyrovae.load_run(run_dir).model
    x = torch.load(Path(run_dir) / "x_test.pt")[:points]
    with evaluation_mode(vae):
        IMPLEMENTATIONS[impl](vae, x[:1], 2)  # warm up lazily allocated state
        reset_peak()
        before = rss_mib()
        start = time.perf_counter()
        IMPLEMENTATIONS[impl](vae, x, k)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "impl": impl,
                "k": k,
                "before_mib": before,
                "peak_mib": maxrss_mib(),
                "seconds": seconds,
            }
        )
    )


def timings(vae, x: torch.Tensor, k: int, repeats: int, threads: int) -> dict:
    """Best-of-``repeats`` wall and CPU (process) seconds per implementation, interleaved."""
    torch.set_num_threads(threads)
    wall = {name: math.inf for name in IMPLEMENTATIONS}
    cpu = dict(wall)
    means = {}
    with evaluation_mode(vae):
        for f in IMPLEMENTATIONS.values():  # warm-up (lazy initialization, kernel selection)
            f(vae, x[:4], 64)
        for r in range(repeats):
            order = list(IMPLEMENTATIONS) if r % 2 == 0 else list(reversed(IMPLEMENTATIONS))
            for name in order:
                torch.manual_seed(r)
                w, c = time.perf_counter(), time.process_time()
                ll = IMPLEMENTATIONS[name](vae, x, k)
                wall[name] = min(wall[name], time.perf_counter() - w)
                cpu[name] = min(cpu[name], time.process_time() - c)
                means[name] = (float(ll.mean()), float(ll.std() / math.sqrt(len(ll))))
    return {"threads": threads, "wall": wall, "cpu": cpu, "log_likelihood": means}


def memory(run_dir: str, ks: list[int], points: int, threads: int) -> list[dict]:
    rows = []
    for k in ks:
        for impl in IMPLEMENTATIONS:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                impl,
                str(k),
                "--run",
                run_dir,
                "--points",
                str(points),
                "--threads",
                str(threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def report(ts: list[dict], mem: list[dict], args, load_before: tuple) -> str:
    scale = 10_000 / args.points
    lines = [
        f"log_likelihood, K={args.k}, {args.points} MNIST test images (dynamically binarized, "
        "fixed seed), 784-400-50 softplus MLP, Bernoulli likelihood, CPU; load average before: "
        + ", ".join(f"{v:.1f}" for v in load_before),
        "",
        "| implementation | torch threads | wall s | CPU s | wall, extrapolated to 10,000 images "
        "| log p̂(x), nats/image (± s.e.) |",
        "|---|---|---|---|---|---|",
    ]
    for t in ts:
        for name in IMPLEMENTATIONS:
            m, se = t["log_likelihood"][name]
            w = t["wall"][name]
            lines.append(
                f"| {name} | {t['threads']} | {w:.1f} | {t['cpu'][name]:.1f} | "
                f"{w * scale / 60:.1f} min | {m:.2f} ± {se:.2f} |"
            )
    lines.append("")
    for t in ts:
        w, c = t["wall"], t["cpu"]
        lines.append(
            f"ratio pyrovae / hand-written, {t['threads']} thread(s): wall "
            f"{w['pyrovae'] / w['hand-written']:.2f}x, CPU {c['pyrovae'] / c['hand-written']:.2f}x"
        )
    lines.append("")
    lines += [
        f"Peak memory (RSS peak during the run − RSS before it; fresh process per row; "
        f"{args.mem_points} images):",
        "",
        "| implementation | K | peak growth (MiB) | process peak RSS (MiB) | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in mem:
        grow = r["peak_mib"] - r["before_mib"]
        lines.append(
            f"| {r['impl']} | {r['k']} | {grow:.0f} | {r['peak_mib']:.0f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run", help="a trained run folder (default: train a 784-400-50 VAE for --epochs)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--root",
        "--mnist",
        dest="root",
        default="",
        help="folder with the four MNIST IDX files ('' = download cache, or the run's data.root)",
    )
    p.add_argument("--points", type=int, default=500, help="test images for the timing")
    p.add_argument(
        "--mem-points", type=int, default=50, help="test images for each memory subprocess"
    )
    p.add_argument("-k", type=int, default=5000)
    p.add_argument("--ks", default="500,2000,5000", help="K values for the memory table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", default="1,2", help="torch thread counts to time (first one for memory)"
    )
    p.add_argument("--child", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.run, args.points, int(args.threads))
        return
    threads = [int(v) for v in args.threads.split(",")]
    load_before = os.getloadavg()
    run_dir = args.run
    if run_dir is None:
        run_dir = str(Path(tempfile.mkdtemp(prefix="pyrovae-bench-")) / "run")
        print(
            f"training the 784-400-50 VAE for {args.epochs} epoch(s) into {run_dir} ...",
            file=sys.stderr,
        )
        pyrovae.fit(config(args.root, args.epochs), run_dir, progress=False, figures=False)
    vae, x = load(run_dir, max(args.points, args.mem_points), args.root)
    torch.save(x.clone(), Path(run_dir) / "x_test.pt")
    x = x[: args.points]
    ts = [timings(vae, x, args.k, args.repeats, n) for n in threads]
    mem = memory(run_dir, [int(v) for v in args.ks.split(",")], args.mem_points, threads[0])
    print(report(ts, mem, args, load_before))
    print(
        f"\nload average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}; run folder: {run_dir}"
    )


if __name__ == "__main__":
    main()
