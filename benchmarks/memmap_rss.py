"""Training on a float32 `.npy` larger than memory: peak RSS and throughput.

Writes a ~3 GB float32 `.npy` of grey levels in [0, 1] (shape (N, 784)) under `--dir`, trains a
VAE (784-400-50, Bernoulli likelihood, dynamic binarization, batch 128) for `--steps` steps
with the training split memory-mapped (`data.memory_map = "always"`), and reports the peak
resident set size (`ru_maxrss` of a fresh child process: loading, the streaming checks and
training together; `VmHWM` of the child, whose address space never held the writer's mapping)
and steps per second. For comparison, a smaller file (`--small-mb`) is
trained both ways: in memory and mapped. Validation and test splits are 1 % each (they are
read into memory). Every file written is deleted at the end.

    python benchmarks/memmap_rss.py --dir /path/with/space --out benchmarks/results/cpu/memmap_rss.json
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 784


def write_npy(path: Path, rows: int, seed: int = 0) -> float:
    """Write (rows, 784) float32 uniforms in chunks; return the file size in GB."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, DIM))
    rng = np.random.default_rng(seed)
    chunk = 65536
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        arr[start:stop] = rng.random((stop - start, DIM), dtype=np.float32)
    arr.flush()
    del arr
    return path.stat().st_size / 1e9


CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
import pyro
from pyrovae.build import build_model
from pyrovae.config import load_config
from pyrovae.data import load_data
from pyrovae.train import Callback, Trainer

path, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config({
    "data": {"dataset": path, "binarize": "dynamic", "memory_map": mode,
             "val_fraction": 0.01, "test_fraction": 0.01},
    "model": {"latent_dim": 50, "encoder": {"kind": "mlp", "hidden": [400]},
              "decoder": {"kind": "mlp", "hidden": [400]}, "likelihood": {"kind": "bernoulli"}},
    "train": {"epochs": 1, "batch_size": 128, "device": "cpu"},
})
t0 = time.perf_counter()
data = load_data(cfg.data, seed=0)
t_load = time.perf_counter() - t0
pyro.set_rng_seed(0)
model = build_model(cfg, data.shape)

class Stop(Callback):
    def __init__(self):
        self.n, self.t = 0, None
    def on_step_end(self, trainer, loss):
        self.n += 1
        self.loss = float(loss)
        if self.n == 20:
            self.t = time.perf_counter()  # after warm-up
        if self.n == steps:
            trainer.request_stop()

stop = Stop()
tr = Trainer(model, cfg.train, data.x_train, None, dynamic_binarize=True, callbacks=[stop],
             progress=False)
tr.train()
dt = time.perf_counter() - stop.t
# VmHWM: the peak of this program's own address space (ru_maxrss would also count the parent's
# peak, inherited through fork: the parent wrote the file through a mapping)
hwm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({
    "mode": mode, "train_points": len(data.x_train), "train_is_mapped": type(data.x_train).__name__ == "MappedRows",
    "load_and_check_seconds": t_load, "steps": steps, "steps_per_second": (steps - 20) / dt,
    "peak_rss_gb": hwm_kib * 1024 / 1e9,
    "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    "last_loss": stop.loss,
}))
"""


def child(path: Path, mode: str, steps: int, threads: int) -> dict:
    load = os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode, str(steps), str(threads)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    if out.returncode != 0:
        return {"mode": mode, "error": out.stderr.strip().splitlines()[-1:]}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_average_1min": load}


def summary(runs: list[dict]) -> dict:
    """Medians of steps/s, the largest peak RSS, and every run."""
    import statistics

    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"runs": runs}
    return {
        "steps_per_second_median": statistics.median(r["steps_per_second"] for r in ok),
        "peak_rss_gb_max": max(r["peak_rss_gb"] for r in ok),
        "train_is_mapped": ok[0]["train_is_mapped"],
        "train_points": ok[0]["train_points"],
        "runs": runs,
    }


def save_results(results: dict, out: str | None) -> None:
    """Print the results so far, and write them to `out` when given."""
    print(json.dumps(results, indent=2), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder for the temporary files (needs ~3.2 GB)")
    p.add_argument("--size-gb", type=float, default=3.0)
    p.add_argument("--small-mb", type=float, default=200.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each (interleaved); medians")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}

    def save() -> None:
        save_results(results, a.out)

    with tempfile.TemporaryDirectory(dir=a.dir, prefix="pyrovae-memmap-") as tmp:
        small = Path(tmp) / "small.npy"
        results["small_file_gb"] = write_npy(small, int(a.small_mb * 1e6 / (4 * DIM)), seed=1)
        runs: dict[str, list[dict]] = {"small_never": [], "small_always": [], "big_always": []}
        for _ in range(a.repeats):  # interleaved: a burst of load hits both alike
            for mode in ("never", "always"):
                runs[f"small_{mode}"].append(child(small, mode, a.steps, a.threads))
                results[f"small_{mode}"] = summary(runs[f"small_{mode}"])
                save()
        small.unlink()
        big = Path(tmp) / "big.npy"
        t0 = time.perf_counter()
        results["big_file_gb"] = write_npy(big, int(a.size_gb * 1e9 / (4 * DIM)), seed=2)
        results["big_write_seconds"] = time.perf_counter() - t0
        for _ in range(a.repeats):
            runs["big_always"].append(child(big, "always", a.steps, a.threads))
            results["big_always"] = summary(runs["big_always"])
            save()
    results["files_deleted"] = True
    save()


if __name__ == "__main__":
    main()
