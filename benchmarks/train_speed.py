"""Training speed: the default `pyrovae fit` step against a hand-written PyTorch VAE, like for like.

Both sides train the same VAE (784-400-50 softplus MLPs, Bernoulli likelihood, batch 128,
dynamically binarized MNIST) in ONE process with `torch.set_num_threads(2)`, with the same torch
kernels (`nn.Softplus`, `F.softplus`, the Bernoulli log-density, `torch.randn`) and the same
optimizer (`torch.optim.Adam(fused=True)`) and batching (an index-select of a seeded epoch
permutation, binarized with pyrovae's `data.bernoulli`). Measurements are interleaved: every
repeat runs `--steps` steps of each variant in blocks of `--block` steps taken round-robin
(rotating the order), so a burst of load from other processes hits every variant alike.

Variants:

| name | what runs each step |
|---|---|
| `handwritten` | plain PyTorch, Monte Carlo KL (`log q(z|x) - log p(z)` at the sampled z): the estimator `Trace_ELBO` computes |
| `handwritten_analytic` | plain PyTorch, closed-form Gaussian KL: the estimator `TraceMeanField_ELBO` computes |
| `pyrovae` | `pyrovae.train.Trainer.step`: `Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, N)` (the default `pyrovae fit` path) |
| `mean_field` | the same trainer with `objective = "mean_field"` (`TraceMeanField_ELBO`) |
| `svi` | the Pyro tutorial loop: `pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam, Trace_ELBO()).step` |

Pyro's validation is off during the timed steps, as in the trainer (it validates each epoch's
first step only). Reported: `ratio` = median over repeats of (variant time / `handwritten` time)
in the same repeat (`--json`: key `ratio` is `pyrovae`'s against `handwritten`; `ratio_mean_field`
is `mean_field` against `handwritten_analytic`); `ratio_best` = fastest block over fastest block.

`--profile` adds where the pyrovae step's time goes (cProfile, per component: the networks and
densities that the hand-written loop also runs, Pyro's effect handlers and traces, `pyro.module`,
the ELBO's per-site bookkeeping, autograd and Adam).

Usage:

```bash
python benchmarks/train_speed.py --root /path/to/mnist --json
python benchmarks/train_speed.py --root /path/to/mnist --profile
```

`--root`: a folder with the four MNIST IDX files; empty = torchvision's download cache.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae.data import bernoulli  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402

VARIANTS = "handwritten,handwritten_analytic,pyrovae,mean_field,svi"


def bench_config(root: str, batch_size: int, objective: str = "trace_elbo"):
    return pyrovae.load_config({
        "data": {"dataset": "mnist", "root": root, "binarize": "dynamic"},
        "model": {
            "latent_dim": 50,
            "encoder": {"kind": "mlp", "hidden": [400], "activation": "softplus"},
            "decoder": {"kind": "mlp", "hidden": [400], "activation": "softplus"},
            "likelihood": {"kind": "bernoulli"},
        },
        "train": {"batch_size": batch_size, "epochs": 1, "objective": objective, "device": "cpu"},
    })


class Handwritten(nn.Module):
    """The same networks; negative ELBO per datapoint with the MC or the analytic KL."""

    def __init__(self, analytic: bool, d: int = 784, h: int = 400, latent: int = 50) -> None:
        super().__init__()
        self.analytic, self.latent = analytic, latent
        self.encoder = nn.Sequential(nn.Linear(d, h), nn.Softplus(), nn.Linear(h, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, h), nn.Softplus(), nn.Linear(h, d))

    def loss(self, x: torch.Tensor, n: int) -> torch.Tensor:
        hid = self.encoder(x)
        loc, scale = hid[:, : self.latent], F.softplus(hid[:, self.latent :]) + 1e-5
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        rec = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        if self.analytic:
            kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0).sum() - scale.log().sum()
        else:  # log q(z|x) - log p(z) at the sample, as Trace_ELBO scores the site z
            kl = (0.5 * (z.pow(2) - eps.pow(2)) - scale.log()).sum()
        return (rec + kl) * (n / x.shape[0]) / n


class Runner:
    """One variant: `new_epoch()`, `step(s)` on batch `s` of the epoch."""

    def __init__(self, name: str, data, root: str, batch_size: int) -> None:
        self.name, self.b = name, batch_size
        self.x, self.n = data.x_train, data.x_train.shape[0]
        self.gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        objective = "mean_field" if name == "mean_field" else "trace_elbo"
        cfg = bench_config(root, batch_size, objective)
        if name.startswith("handwritten"):
            self.net = Handwritten(analytic=name == "handwritten_analytic")
            self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, fused=True)
        elif name == "svi":
            self.vae = pyrovae.build_model(cfg, data.shape)
            elbo = pyro.infer.Trace_ELBO(max_plate_nesting=1)
            optim = pyro.optim.Adam({"lr": 1e-3, "fused": True})
            self.svi = pyro.infer.SVI(self.vae.model, self.vae.guide, optim, elbo)
        else:
            vae = pyrovae.build_model(cfg, data.shape)
            self.trainer = Trainer(vae, cfg.train, data.x_train, dynamic_binarize=True)
        self.perm = None

    def new_epoch(self) -> None:
        self.perm = torch.randperm(self.n, generator=self.gen)

    def step(self, s: int) -> float:
        if hasattr(self, "trainer"):
            self.trainer.perm = self.perm
            return self.trainer.step(self.trainer.batch(s)).item()
        x = bernoulli(self.x.index_select(0, self.perm[s * self.b : (s + 1) * self.b]), self.gen)
        if hasattr(self, "svi"):
            return self.svi.step(x, self.n) / self.n
        self.opt.zero_grad(set_to_none=True)
        loss = self.net.loss(x, self.n)
        loss.backward()
        value = loss.item()
        if math.isfinite(value):
            self.opt.step()
        return value


def measure(runners: list[Runner], steps: int, repeats: int, block: int, warmup: int):
    """Per repeat and variant: total seconds over `steps` steps and the fastest block."""
    per_epoch = math.ceil(runners[0].n / runners[0].b)
    for r in runners:
        r.new_epoch()
        for s in range(warmup):
            r.step(s)
    out = {r.name: {"seconds": [], "best_block": math.inf} for r in runners}
    pos = warmup
    for rep in range(repeats):
        order = runners[rep % len(runners):] + runners[: rep % len(runners)]
        totals = {r.name: 0.0 for r in runners}
        for start in range(0, steps, block):
            for r in order:
                t0 = time.perf_counter()
                for k in range(block):
                    s = (pos + start + k) % per_epoch
                    r.step(s)
                dt = time.perf_counter() - t0
                totals[r.name] += dt
                out[r.name]["best_block"] = min(out[r.name]["best_block"], dt / block)
        pos += steps
        for name, v in totals.items():
            out[name]["seconds"].append(v)
    return out


def summarize(res: dict, steps: int, per_epoch: int) -> dict:
    ref_for = {"mean_field": "handwritten_analytic"}
    summary = {}
    for name, v in res.items():
        ref = res[ref_for.get(name, "handwritten")]
        ratios = [a / b for a, b in zip(v["seconds"], ref["seconds"], strict=True)]
        summary[name] = {
            "ms_per_step_median": 1e3 * statistics.median(v["seconds"]) / steps,
            "epoch_seconds_median": statistics.median(v["seconds"]) / steps * per_epoch,
            "reference": ref_for.get(name, "handwritten"),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_best": v["best_block"] / ref["best_block"],
        }
    return summary


def profile(runner: Runner, steps: int) -> dict:
    """Share of the pyrovae step's time per component (cProfile, self time by source file)."""
    prof = cProfile.Profile()
    runner.new_epoch()
    prof.enable()
    for s in range(steps):
        runner.step(s)
    prof.disable()
    st = pstats.Stats(prof)
    groups: dict[str, float] = {}

    def group(file: str, func: str) -> str:
        if "pyro/poutine" in file or "pyro/primitives" in file or "pyro/params" in file:
            return "pyro handlers, traces, pyro.module"
        if "pyro/infer" in file or "pyro/util" in file or "pyro/ops" in file:
            return "pyro ELBO bookkeeping (per-site scores, checks)"
        if "pyro/distributions" in file or "torch/distributions" in file:
            return "distribution objects (Python side)"
        if "torch/optim" in file or "step" in func and "optim" in file:
            return "Adam"
        if "torch/autograd" in file or "backward" in func or "run_backward" in func:
            return "autograd backward"
        if "torch/nn" in file or func.startswith("<built-in method torch") or file == "~":
            return "torch kernels and modules"
        if "pyrovae" in file:
            return "pyrovae (model, guide, trainer)"
        return "other Python"

    total = 0.0
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in st.stats.items():
        groups[group(file, func)] = groups.get(group(file, func), 0.0) + tt
        total += tt
    return {k: {"ms_per_step": 1e3 * v / steps, "share": v / total}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


def environment() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "torch": torch.__version__, "pyro": pyro.__version__,
            "threads": torch.get_num_threads(), "git_commit": commit,
            "date": time.strftime("%Y-%m-%d"), "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="", help="folder with the four MNIST IDX files ('' = download cache)")
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--steps", type=int, default=150, help="steps per variant per repeat")
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also break the pyrovae step down by component")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = pyrovae.load_data(bench_config(a.root, a.batch_size).data, seed=0)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    for ref in ("handwritten", "handwritten_analytic"):
        if ref not in names:
            names.insert(0, ref)
    runners = [Runner(v, data, a.root, a.batch_size) for v in names]
    env = environment()
    with pyro.validation_enabled(False):
        res = measure(runners, a.steps, a.repeats, a.block, a.warmup)
        prof = profile(next(r for r in runners if r.name == "pyrovae"), 100) if a.profile else None
    summary = summarize(res, a.steps, math.ceil(runners[0].n / a.batch_size))
    env["loadavg_end"] = os.getloadavg()
    out = {"ratio": summary["pyrovae"]["ratio"] if "pyrovae" in summary else None,
           "ratio_mean_field": summary["mean_field"]["ratio"] if "mean_field" in summary else None,
           "variants": summary, "profile": prof,
           "protocol": f"{a.steps} steps per repeat in blocks of {a.block}, {a.repeats} repeats, "
                       f"batch {a.batch_size}", **env}
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{'variant':22s} {'ms/step':>8s} {'epoch s':>8s} {'vs':>22s} {'ratio':>6s} {'range':>13s} {'best':>6s}")
    for name, s in summary.items():
        print(f"{name:22s} {s['ms_per_step_median']:8.2f} {s['epoch_seconds_median']:8.2f} {s['reference']:>22s} "
              f"{s['ratio']:6.3f} {s['ratio_min']:6.3f}-{s['ratio_max']:.3f} {s['ratio_best']:6.3f}")
    if prof:
        print("\nwhere the pyrovae step's time goes (cProfile self time; profiling inflates Python):")
        for k, v in prof.items():
            print(f"  {k:48s} {v['ms_per_step']:6.2f} ms  {100 * v['share']:5.1f} %")
    print(f"\n{env['cpu']}, torch {env['torch']}, pyro {env['pyro']}, commit {env['git_commit']}, "
          f"load {env['loadavg_start']} -> {env['loadavg_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
