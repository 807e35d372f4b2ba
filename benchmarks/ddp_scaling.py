"""Data-parallel scaling on one machine: 1 process x 2 threads, 2 processes x 1 thread, and the
one-core baseline 1 process x 1 thread.

Both train the same VAE on MNIST (784-400-50, Bernoulli likelihood, dynamic binarization,
global batch 128, Adam 1e-3, seed 0) for the same number of epochs through the CLI:
`pyrovae fit` and `pyrovae fit --nproc P`, with OMP_NUM_THREADS set per process (`--configs`).
On a machine whose cores other people also use, several threads per process can be much slower
than one (they wait for each other); the 1 x 1 row shows that part. Reported: training steps per second (global steps; epoch wall time from the run's
history, validation excluded), wall time of the whole command, and the test ELBO (nats per
datapoint, 1 sample per test image, the 10,000 official test images binarized once).

    python benchmarks/ddp_scaling.py --root PATH/TO/MNIST --epochs 3 --out benchmarks/results/cpu/ddp_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[data]
dataset = "mnist"
root = "{root}"
binarize = "dynamic"

[model]
latent_dim = 50
encoder = {{ kind = "mlp", hidden = [400] }}
decoder = {{ kind = "mlp", hidden = [400] }}
likelihood = {{ kind = "bernoulli" }}

[train]
epochs = {epochs}
batch_size = 128
lr = 1e-3
seed = 0
device = "cpu"
"""


def run(cfg: Path, out: Path, procs: int, threads: int, timeout: float) -> dict:
    """`threads` per process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-m", "pyrovae", "fit", str(cfg), "--out", str(out), "-q"]
    if procs > 1:
        argv += ["--nproc", str(procs)]
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-3:], "rc": p.returncode}
    m = json.loads((out / "metrics.json").read_text())
    steps = -(-54000 // 128)  # MNIST training split (60,000 - 10 % validation) / batch
    secs = [h["epoch_seconds"] for h in m["history"]]
    return {
        "processes": procs,
        "threads_per_process": threads,
        "epochs": len(secs),
        "epoch_seconds": secs,
        "steps_per_second": steps * len(secs) / sum(secs),
        "steps_per_second_after_first_epoch": steps * (len(secs) - 1) / sum(secs[1:]) if len(secs) > 1 else None,
        "command_wall_seconds": wall,
        "load_average_1min_before_after": [load, os.getloadavg()[0]],
        "test_elbo": m["test_elbo"],
        "val_elbo_last_epoch": m["history"][-1]["val_elbo"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder holding the four MNIST IDX files")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--configs", default="1x2,2x1,1x1",
        help="PROCESSESxTHREADS_PER_PROCESS, comma-separated (1x1: the one-core baseline)",
    )
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res: dict = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    with tempfile.TemporaryDirectory(prefix="pyrovae-ddp-") as tmp:
        cfg = Path(tmp) / "mnist.toml"
        cfg.write_text(CONFIG.format(root=a.root, epochs=a.epochs))
        for key in a.configs.split(","):
            procs, threads = (int(v) for v in key.split("x"))
            try:
                res[key] = run(cfg, Path(tmp) / key, procs, threads, a.timeout)
            except subprocess.TimeoutExpired:
                res[key] = {"error": f"timed out after {a.timeout} s"}
            print(json.dumps({key: res[key]}), flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    keys = [k for k in a.configs.split(",") if "steps_per_second" in res.get(k, {})]
    if len(keys) >= 2:
        base = res[keys[0]]
        res["speedup_vs_" + keys[0]] = {k: res[k]["steps_per_second"] / base["steps_per_second"] for k in keys[1:]}
        res["test_elbo_minus_" + keys[0]] = {k: res[k]["test_elbo"] - base["test_elbo"] for k in keys[1:]}
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
