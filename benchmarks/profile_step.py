"""Where one training step of pyrovae spends its time, next to the hand-written VAE's step.

Default (``--mode breakdown``): exclusive-time accounting. The functions that make up a step are
wrapped with timers (monkeypatched; nothing in pyrovae/ or pyro/ is edited), and each wrapped call
is charged only the time not spent in other wrapped calls nested inside it, so the components add up
to the step. Components:

==========================  =========================================================================
``data``                    ``Trainer._batch``: index slice of the permutation + ``torch.bernoulli``
``networks``                encoder and decoder ``forward`` (Linear, Softplus)
``model/guide code``        the rest of ``VAE.model``/``VAE.guide`` and the guide's ``encode``
                            (split, softplus, reshape, building the prior)
``dist: construct+args``    ``torch.distributions.Distribution.__init__`` (argument validation:
                            ``constraint.check`` + ``_is_all_true`` on logits, loc, scale) and
                            ``.to_event``/``Independent``
``dist: _validate_sample``  support/shape check of every scored value (x in {0,1}: 128x784)
``dist: log_prob math``     ``Bernoulli``/``Normal``/``Independent`` ``log_prob``
``pyro: tracing``           ``poutine.trace``/``replay``, ``pyro.sample``, ``pyro.plate`` (messenger
                            stack, ``Trace`` copies)
``pyro: ELBO bookkeeping``  ``Trace_ELBO.differentiable_loss``, ``get_importance_trace``,
                            ``compute_log_prob``, ``compute_score_parts``, ``prune_subsample_sites``,
                            ``scale_and_mask``, ``.item()`` calls
``pyro: validation checks`` ``check_model_guide_match``, ``check_site_shape``, ``check_if_enumerated``,
                            ``warn_if_nan``/``warn_if_inf`` (which also register backward hooks)
``backward``                ``loss.backward()`` (including those hooks)
``optimizer``               ``zero_grad`` + ``Adam.step``
``other``                   the remainder of ``Trainer._step`` (``.item()``, ``math.isfinite``)
==========================  =========================================================================

The same accounting runs on the hand-written step (``data``, ``networks``, ``loss math``,
``backward``, ``optimizer``). Steps alternate between the two, the statistic is the median per
component over ``--steps`` steps.

Other modes::

    .venv/bin/python benchmarks/profile_step.py                        # breakdown table (default)
    .venv/bin/python benchmarks/profile_step.py --variant lean         # the same for a proposed fix
    .venv/bin/python benchmarks/profile_step.py --mode pyinstrument    # call tree of 200 steps
    .venv/bin/python benchmarks/profile_step.py --mode torch           # torch.profiler op table
    .venv/bin/python benchmarks/profile_step.py --mode cprofile
    .venv/bin/python benchmarks/profile_step.py --json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import pyro  # noqa: E402
import pyro.infer.elbo  # noqa: E402
import pyro.infer.enum  # noqa: E402
import pyro.infer.trace_elbo  # noqa: E402
import pyro.infer.trace_mean_field_elbo  # noqa: E402
import pyro.poutine.messenger  # noqa: E402
import pyro.poutine.runtime  # noqa: E402
import pyro.poutine.subsample_messenger  # noqa: E402
import pyro.poutine.trace_messenger  # noqa: E402
import pyro.poutine.trace_struct  # noqa: E402
import pyro.primitives  # noqa: E402
import pyro.util  # noqa: E402
import torch  # noqa: E402
import torch.distributions as td  # noqa: E402
import train_speed as ts  # noqa: E402  (sets sys.path for pyrovae too)

import pyrovae  # noqa: E402


# ---------------------------------------------------------------------------------- accounting
class Accounting:
    """Exclusive wall time per component, per step."""

    def __init__(self) -> None:
        self.stack: list[list] = []  # [component, start, child_time]
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.enabled = False

    def wrap(self, component: str, fn):
        acc = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not acc.enabled:
                return fn(*args, **kwargs)
            frame = [component, time.perf_counter(), 0.0]
            acc.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                acc.stack.pop()
                total = end - frame[1]
                acc.current[component] += total - frame[2]
                if acc.stack:
                    acc.stack[-1][2] += total

        wrapper.__wrapped_by_profile_step__ = True
        return wrapper

    def step(self, fn) -> None:
        self.current = defaultdict(float)
        self.enabled = True
        t0 = time.perf_counter()
        try:
            self.wrap("other", fn)()
        finally:
            self.enabled = False
        self.current["total"] = time.perf_counter() - t0
        self.steps.append(dict(self.current))

    def medians(self, skip: int = 0) -> dict[str, float]:
        steps = self.steps[skip:]
        keys = {k for s in steps for k in s}
        return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys}


ACC = Accounting()
_PATCHED: list[tuple[object, str, object]] = []


def _patch(owner, name: str, component: str) -> None:
    fn = getattr(owner, name)
    if getattr(fn, "__wrapped_by_profile_step__", False):
        return
    _PATCHED.append((owner, name, fn))
    setattr(owner, name, ACC.wrap(component, fn))


def install_global_patches() -> None:
    """Wrap torch / pyro functions (class or module attributes) with exclusive timers."""
    # distributions
    _patch(td.Distribution, "__init__", "dist: construct+args")
    _patch(td.Independent, "__init__", "dist: construct+args")
    _patch(pyro.distributions.torch_distribution.TorchDistributionMixin, "to_event", "dist: construct+args")
    _patch(td.Distribution, "_validate_sample", "dist: _validate_sample")
    for cls in (td.Bernoulli, td.Normal, td.Independent):
        _patch(cls, "log_prob", "dist: log_prob math")
    # pyro tracing
    _patch(pyro.poutine.trace_messenger.TraceHandler, "get_trace", "pyro: tracing")
    _patch(pyro.poutine.trace_messenger.TraceHandler, "__call__", "pyro: tracing")
    _patch(pyro, "sample", "pyro: tracing")
    for mod in (pyro.poutine.runtime, pyro.primitives, pyro.poutine.subsample_messenger):
        _patch(mod, "apply_stack", "pyro: tracing")
    _patch(pyro.poutine.messenger.Messenger, "__enter__", "pyro: tracing")
    _patch(pyro.poutine.messenger.Messenger, "__exit__", "pyro: tracing")
    _patch(pyro.poutine.subsample_messenger.SubsampleMessenger, "__init__", "pyro: tracing")
    # ELBO bookkeeping
    _patch(pyro.poutine.trace_struct.Trace, "compute_log_prob", "pyro: ELBO bookkeeping")
    _patch(pyro.poutine.trace_struct.Trace, "compute_score_parts", "pyro: ELBO bookkeeping")
    _patch(pyro.poutine.trace_struct.Trace, "copy", "pyro: ELBO bookkeeping")
    for mod in (pyro.infer.enum, pyro.infer.elbo):
        _patch(mod, "prune_subsample_sites", "pyro: ELBO bookkeeping")
    _patch(pyro.infer.trace_elbo, "get_importance_trace", "pyro: ELBO bookkeeping")
    for cls in (pyro.infer.Trace_ELBO, pyro.infer.TraceMeanField_ELBO, ts.LeanTrace_ELBO):
        if "differentiable_loss" in vars(cls):
            _patch(cls, "differentiable_loss", "pyro: ELBO bookkeeping")
    _patch(pyro.infer.Trace_ELBO, "_differentiable_loss_particle", "pyro: ELBO bookkeeping")
    # validation checks (patched where they are looked up)
    for mod, names in (
        (pyro.infer.enum, ("check_model_guide_match", "check_site_shape")),
        (pyro.infer.elbo, ("check_site_shape",)),
        (pyro.infer.trace_elbo, ("check_if_enumerated", "warn_if_nan")),
        (pyro.poutine.trace_struct, ("warn_if_nan", "warn_if_inf")),
        (pyro.util, ("check_model_guide_match", "check_site_shape", "check_if_enumerated", "warn_if_nan", "warn_if_inf")),
    ):
        for n in names:
            _patch(mod, n, "pyro: validation checks")
    # backward / optimizer
    _patch(torch.autograd, "backward", "backward")
    _patch(torch.optim.Adam, "step", "optimizer")
    _patch(torch.optim.Optimizer, "zero_grad", "optimizer")


def instrument_vae(vae) -> None:
    """Per-instance wrappers: networks and the model/guide code of one VAE."""
    for net in (vae.posterior.encoder, vae.decoder):
        net.forward = ACC.wrap("networks", net.forward)
    vae.posterior.encode = ACC.wrap("model/guide code", vae.posterior.encode)
    vae.prior.forward = ACC.wrap("model/guide code", vae.prior.forward)
    vae.likelihood.forward = ACC.wrap("model/guide code", vae.likelihood.forward)
    for name in ("model", "guide"):
        setattr(vae, name, ACC.wrap("model/guide code", getattr(vae, name)))


def instrument_trainer(tr) -> None:
    tr._batch = ACC.wrap("data", tr._batch)
    instrument_vae(tr.model)


def instrument_handwritten(hw) -> None:
    m = hw.t.model
    hw.t.batch = ACC.wrap("data", hw.t.batch)
    for net in (m.encoder, m.decoder):
        net.forward = ACC.wrap("networks", net.forward)
    m.loss = ACC.wrap("loss math", m.loss)


ORDER = [
    "data", "networks", "model/guide code", "loss math", "dist: construct+args", "dist: _validate_sample",
    "dist: log_prob math", "pyro: tracing", "pyro: ELBO bookkeeping", "pyro: validation checks",
    "backward", "optimizer", "other", "total",
]


def breakdown(variant: str, steps: int, threads: int, root: str) -> dict:
    torch.set_num_threads(threads)
    pyro.enable_validation(True)
    data = pyrovae.load_data(ts.bench_config(root).data, seed=0)
    device = torch.device("cpu")
    cfg_for = lambda objective: ts.bench_config(root, objective=objective)  # noqa: E731
    hw = ts.make_runner("handwritten", data, cfg_for, device)
    pv = ts.make_runner(variant, data, cfg_for, device)
    install_global_patches()
    instrument_trainer(pv.tr)
    instrument_handwritten(hw)
    hw.new_epoch()
    pv.new_epoch()
    acc_hw, acc_pv = Accounting(), ACC
    warm = 10
    for i in range(steps + warm):
        s = i % pv.steps_per_epoch
        ACC.step(lambda s=s: pv.step(s))
        # the hand-written loop under the same wrapper mechanism (same overhead per call)
        ACC.step(lambda s=s: hw.step(s))
        acc_hw.steps.append(ACC.steps.pop())
    med_pv, med_hw = acc_pv.medians(warm), acc_hw.medians(warm)
    return {"variant": variant, "steps": steps, "threads": threads,
            "pyrovae_ms": {k: 1e3 * med_pv.get(k, 0.0) for k in ORDER},
            "handwritten_ms": {k: 1e3 * med_hw.get(k, 0.0) for k in ORDER}}


def print_breakdown(res: dict) -> None:
    pv, hw = res["pyrovae_ms"], res["handwritten_ms"]
    tot = pv["total"]
    print(f"one training step, median over {res['steps']} steps, {res['threads']} threads; variant {res['variant']!r}")
    print("(components are exclusive times; medians of components need not add up exactly to the median total)")
    print(f"{'component':28s} {'pyrovae ms':>10s} {'% of step':>9s} {'handwritten ms':>14s} {'extra ms':>9s}")
    for k in ORDER:
        if pv[k] == 0 and hw[k] == 0:
            continue
        print(f"{k:28s} {pv[k]:10.3f} {100 * pv[k] / tot:8.1f}% {hw[k]:14.3f} {pv[k] - hw[k]:9.3f}")
    print(f"{'ratio of totals':28s} {pv['total'] / hw['total']:10.3f}")


# ------------------------------------------------------------------------------ other profilers
def _setup_plain(variant: str, threads: int, root: str):
    torch.set_num_threads(threads)
    data = pyrovae.load_data(ts.bench_config(root).data, seed=0)
    cfg_for = lambda objective: ts.bench_config(root, objective=objective)  # noqa: E731
    r = ts.make_runner(variant, data, cfg_for, torch.device("cpu"))
    r.new_epoch()
    for s in range(10):
        r.step(s)
    return r


def run_pyinstrument(variant: str, steps: int, threads: int, root: str) -> None:
    from pyinstrument import Profiler

    r = _setup_plain(variant, threads, root)
    prof = Profiler(interval=0.0002)
    prof.start()
    for s in range(10, 10 + steps):
        r.step(s % r.steps_per_epoch)
    prof.stop()
    print(prof.output_text(unicode=False, color=False, show_all=False))


def run_cprofile(variant: str, steps: int, threads: int, root: str) -> None:
    import cProfile
    import pstats

    r = _setup_plain(variant, threads, root)
    pr = cProfile.Profile()
    pr.enable()
    for s in range(10, 10 + steps):
        r.step(s % r.steps_per_epoch)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(40)


def run_torch_profiler(variant: str, steps: int, threads: int, root: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    r = _setup_plain(variant, threads, root)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(10, 10 + steps):
            r.step(s % r.steps_per_epoch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="breakdown", choices=["breakdown", "pyinstrument", "cprofile", "torch"])
    p.add_argument("--variant", default="pyrovae", help="a train_speed.py variant: pyrovae, lean, mean_field, ...")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default=ts.DEFAULT_ROOT)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.mode == "breakdown":
        res = breakdown(a.variant, a.steps, a.threads, a.root)
        print(json.dumps(res) if a.json else "", end="\n" if a.json else "")
        if not a.json:
            print_breakdown(res)
    elif a.mode == "pyinstrument":
        run_pyinstrument(a.variant, min(a.steps, 200), a.threads, a.root)
    elif a.mode == "cprofile":
        run_cprofile(a.variant, a.steps, a.threads, a.root)
    else:
        run_torch_profiler(a.variant, min(a.steps, 100), a.threads, a.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
