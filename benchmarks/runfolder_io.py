"""Saving and loading a run folder's checkpoint: the safetensors + JSON set against
`torch.save` / `torch.load` of the same state, in one process, interleaved.

    python benchmarks/runfolder_io.py --json
    python benchmarks/runfolder_io.py --hidden 400 --repeats 30   # the 784-400-50 MLP

The state is a real `Trainer.state_dict()` (model parameters, Adam's moments and step
counters after a few steps, RNG states, history) of an MLP VAE on MNIST-shaped data
(784-512-512-50 by default: 1.41 M parameters), plus what `save_run_checkpoint` adds. Compared:

* `torch`: `torch.save` into a buffer written with the same atomic helper (temp file, fsync,
  rename, fsync of the folder) — what pyrovae did before format 2 — and
  `torch.load(weights_only=True)` + the same entry checks (`load_legacy_checkpoint`);
* `torch_plain`: bare `torch.save(state, file)` / `torch.load(file, weights_only=True)` (no
  fsync, no checks): the floor of the pickle format;
* `safetensors`: `save_checkpoint` (tensors file + checkpoint.json, each atomic, SHA-256) and
  `load_checkpoint` (size and SHA-256 checked, `safetensors.torch.load`, the same entry checks).

Each repeat times every variant once, in rotating order; the result is the median seconds of
each and the median of the per-repeat ratios safetensors / torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae.runs import (  # noqa: E402
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    load_checkpoint,
    load_legacy_checkpoint,
    save_checkpoint,
    save_legacy_checkpoint,
)
from pyrovae.train import Trainer  # noqa: E402


def make_state(hidden: list[int], latent: int) -> tuple[dict, int]:
    cfg = pyrovae.load_config(
        {
            "data": {"dataset": "digits"},
            "model": {
                "latent_dim": latent,
                "encoder": {"kind": "mlp", "hidden": hidden},
                "decoder": {"kind": "mlp", "hidden": hidden[::-1]},
                "likelihood": {"kind": "bernoulli"},
            },
            "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        }
    )
    shape = (1, 28, 28)
    model = pyrovae.build_model(cfg, shape)
    x = torch.rand(256, 784).round()
    tr = Trainer(model, cfg.train, x, progress=False)
    tr.train()  # 4 steps: Adam's moments exist
    n = sum(p.numel() for p in model.parameters())
    state = {
        "kind": cfg.model.kind,
        "config": cfg.to_dict(),
        "data_shape": list(shape),
        "plugins": [],
        **tr.state_dict(),
    }
    return state, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    p.add_argument("--latent", type=int, default=50)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--dir", default=None, help="folder to write in (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    state, n = make_state(a.hidden, a.latent)
    root = Path(tempfile.mkdtemp(prefix="runfolder_io.", dir=a.dir))
    try:
        folder = {k: root / k for k in ("torch", "torch_plain", "safetensors")}
        for f in folder.values():
            f.mkdir()

        def save(kind: str) -> None:
            if kind == "torch":
                save_legacy_checkpoint(folder[kind] / LEGACY_CHECKPOINT, state)
            elif kind == "torch_plain":
                torch.save(state, folder[kind] / LEGACY_CHECKPOINT)
            else:
                save_checkpoint(folder[kind] / CHECKPOINT, state)

        def load(kind: str) -> dict:
            if kind == "torch":
                return load_legacy_checkpoint(folder[kind] / LEGACY_CHECKPOINT)
            if kind == "torch_plain":
                return torch.load(folder[kind] / LEGACY_CHECKPOINT, weights_only=True)
            return load_checkpoint(folder[kind] / CHECKPOINT)

        kinds = list(folder)
        times = {f"{op}_{k}": [] for op in ("save", "load") for k in kinds}
        for k in kinds:  # warm-up
            save(k)
            load(k)
        for rep in range(a.repeats):
            order = kinds[rep % 3 :] + kinds[: rep % 3]
            for k in order:
                t0 = time.perf_counter()
                save(k)
                times[f"save_{k}"].append(time.perf_counter() - t0)
            for k in order:
                t0 = time.perf_counter()
                got = load(k)
                times[f"load_{k}"].append(time.perf_counter() - t0)
                assert torch.equal(got["model"][next(iter(state["model"]))], next(iter(state["model"].values())))
        sizes = {
            "torch": (folder["torch"] / LEGACY_CHECKPOINT).stat().st_size,
            "safetensors": sum(p.stat().st_size for p in folder["safetensors"].iterdir()),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def ratio(op: str, base: str) -> float:
        return statistics.median(
            s / t for s, t in zip(times[f"{op}_safetensors"], times[f"{op}_{base}"], strict=True)
        )

    res = {
        "parameters": n,
        "network": f"784-{'-'.join(map(str, a.hidden))}-{a.latent} MLP VAE, Adam state",
        "bytes": sizes,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_save_vs_torch": ratio("save", "torch"),
        "ratio_load_vs_torch": ratio("load", "torch"),
        "ratio_save_vs_torch_plain": ratio("save", "torch_plain"),
        "ratio_load_vs_torch_plain": ratio("load", "torch_plain"),
        "repeats": a.repeats,
        "torch": torch.__version__,
    }
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
