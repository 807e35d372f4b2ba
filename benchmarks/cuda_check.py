"""The CUDA path, checked on a machine with a GPU: training runs on the device with no host
synchronization inside a step, the ELBO agrees with the CPU's, and the IWAE evaluation runs there.

    python benchmarks/cuda_check.py --root /path/to/mnist --json

What it does (one JSON object on stdout with ``--json``):

1. ``sync``: trains one epoch of the benchmark VAE (784-400-50, batch 128) through
   ``Trainer.train`` with ``torch.cuda.set_sync_debug_mode("warn")`` and counts the
   synchronizing CUDA calls. Expected: one host read of the loss every ``CUDA_SYNC_EVERY`` steps
   plus the first step of the epoch (which runs Pyro's argument checks), nothing per step.
2. ``agreement``: the same model (CPU initial weights) evaluated on CPU and on CUDA: the exact
   per-datapoint log-density of fixed (x, z) pairs, then the ELBO and IWAE (K=1000) estimates,
   which differ only by Monte Carlo noise.
3. ``fit``: ``pyrovae.fit`` with ``train.device = "cuda"`` for two epochs on 10,000 images, then
   ``load_run`` and an IWAE evaluation on the GPU: the whole user path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import bench_config  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae import evaluate  # noqa: E402
from pyrovae.train import CUDA_SYNC_EVERY, Trainer  # noqa: E402


def count_syncs(root: str) -> dict:
    cfg = bench_config(root, 128)
    cfg.train.device = "cuda"
    data = pyrovae.load_data(cfg.data, seed=0)
    pyro.set_rng_seed(0)
    model = pyrovae.build_model(cfg, data.shape)
    tr = Trainer(model, cfg.train, data.x_train, dynamic_binarize=True, device="cuda", progress=False)
    tr.perm = torch.randperm(tr.n, generator=tr.gen, device=tr.device)
    tr.step(tr.batch(0), check=False)  # warm-up (cuBLAS handles, allocator)
    torch.cuda.synchronize()
    tr.perm, tr.step_in_epoch = None, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            t0 = time.perf_counter()
            tr.train()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    steps = math.ceil(tr.n / cfg.train.batch_size)
    return {
        "steps": steps,
        "sync_every": CUDA_SYNC_EVERY,
        "expected_reads": math.ceil(steps / CUDA_SYNC_EVERY),
        "synchronizing_calls": len(syncs),
        "kinds": sorted(set(syncs))[:10],
        "epoch_seconds": seconds,
        "train_elbo": tr.history[-1]["train_elbo"],
    }


def agreement(root: str) -> dict:
    cfg = bench_config(root, 128)
    data = pyrovae.load_data(cfg.data, seed=0)
    pyro.set_rng_seed(0)
    vae = pyrovae.build_model(cfg, data.shape)
    x = data.x_test[:500]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(len(x), cfg.model.latent_dim, generator=g)
    out = {}
    for dev in ("cpu", "cuda"):
        m = vae.to(dev)
        xd, zd = x.to(dev), z.to(dev)
        with torch.no_grad():
            cond = pyro.poutine.condition(m.model, data={"z": zd})
            tr = pyro.poutine.trace(cond).get_trace(xd)
            tr.compute_log_prob()
            exact = sum(s["log_prob"] for s in tr.nodes.values() if s["type"] == "sample")
        pyro.set_rng_seed(1)
        elbo = evaluate.elbo(m.model, m.guide, xd, num_particles=10).mean().item()
        ll = evaluate.log_likelihood(m.model, m.guide, xd, num_samples=1000).mean().item()
        out[dev] = {"log_joint": exact.double().cpu(), "elbo": elbo, "iwae_1000": ll}
    diff = (out["cpu"]["log_joint"] - out["cuda"]["log_joint"]).abs().max().item()
    return {
        "points": len(x),
        "log_joint_max_abs_diff": diff,
        "elbo_cpu": out["cpu"]["elbo"],
        "elbo_cuda": out["cuda"]["elbo"],
        "iwae_1000_cpu": out["cpu"]["iwae_1000"],
        "iwae_1000_cuda": out["cuda"]["iwae_1000"],
    }


def fit_on_cuda(root: str) -> dict:
    cfg = pyrovae.load_config(
        {
            "data": {"dataset": "mnist", "root": root, "binarize": "dynamic", "limit": 10000},
            "model": {
                "latent_dim": 20,
                "encoder": {"kind": "mlp", "hidden": [400]},
                "decoder": {"kind": "mlp", "hidden": [400]},
            },
            "train": {"epochs": 2, "batch_size": 128, "device": "cuda", "seed": 0},
        }
    )
    out = Path(tempfile.mkdtemp()) / "run"
    t0 = time.perf_counter()
    run = pyrovae.fit(cfg, out, progress=False, figures=False)
    fit_s = time.perf_counter() - t0
    loaded = pyrovae.load_run(out, data=True)
    m = loaded.model.to("cuda")
    x = loaded.data.x_test[:1000].to("cuda")
    t0 = time.perf_counter()
    ll = evaluate.log_likelihood(m.model, m.guide, x, num_samples=5000)
    return {
        "fit_seconds": fit_s,
        "history": run.history,
        "test_elbo": run.metrics.get("test_elbo"),
        "iwae_5000_1000_points": float(ll.mean()),
        "iwae_seconds": time.perf_counter() - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", default="", help="folder with the four MNIST IDX files ('' = download cache)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    pyro.enable_validation(True)
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
    }
    ok = True
    for name, fn in (("sync", count_syncs), ("agreement", agreement), ("fit", fit_on_cuda)):
        try:
            res[name] = fn(a.root)
        except Exception:  # report every section, even when one fails
            import traceback

            res[name] = {"error": traceback.format_exc()}
            ok = False
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(json.dumps(res, indent=None if a.json else 2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
