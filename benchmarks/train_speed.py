"""Training speed: pyrovae (a real Pyro program + ``Trace_ELBO``) against a hand-written PyTorch VAE.

Both train the same VAE (784-400-50 softplus MLPs, Bernoulli likelihood, batch 128, dynamically
binarized MNIST from ``../shared/data/mnist``, one ``torch.optim.Adam``, lr 1e-3) in ONE process
with ``torch.set_num_threads(2)``. Measurements are interleaved: every repeat runs ``--steps``
steps of each variant, in blocks of ``--block`` steps taken round-robin (rotating the order), so
a burst of load from other processes hits every variant alike. Each step is the trainer's own
step (``pyrovae.train.Trainer._step(Trainer._batch(s))``: zero_grad, ELBO, backward, ``.item()``,
Adam), and epoch times are ms per step times the 422 steps of an epoch (54,000 training images).

Reported, per variant:

* ``ratio`` — the median over repeats of (variant time / hand-written time) in the same repeat:
  the headline number (``--json``: key ``ratio`` is pyrovae's);
* ``ratio_best`` — fastest block of the variant over fastest block of the hand-written loop. On a
  shared machine (other jobs running) this is the least contaminated estimate; when the two
  disagree, trust a quiet-machine run.

Variants (``--variants``, comma-separated; ``all`` for the main ones; default
``handwritten,pyrovae,mean_field,fast_path,handwritten_fastmath``):

=======================  ==========================================================================
``handwritten``          the reference (``handwritten_vae.py``), default ``torch.optim.Adam``
``handwritten_fused``    the reference with ``Adam(fused=True)`` (like-for-like with ``*_fused``)
``handwritten_foreach``  the reference with ``Adam(foreach=True)``
``handwritten_tuned``    the reference with fused Adam and pyrovae's binarization (``u < p``, the same
                         values as ``torch.bernoulli``): what pyrovae's own choices give plain code
``handwritten_fastmath`` ``handwritten_tuned`` + ``pyrovae.fastmath``'s softplus and Bernoulli
                         log-density: every kernel choice pyrovae makes, in plain code (the floor)
``pyrovae``              ``pyrovae.train.Trainer`` as it is, ``objective = "trace_elbo"``
``pyrovae_torch_kernels`` the same with torch's ``softplus``/``Bernoulli.log_prob`` (before fastmath)
``fast_path_torch_kernels`` ``fast_path`` (below) with torch's kernels
``mean_field``           the trainer with ``objective = "mean_field"`` (``TraceMeanField_ELBO``)
``jit``                  ``JitTrace_ELBO`` (parameters through the param store, as JIT requires)
``jit_mean_field``       ``JitTraceMeanField_ELBO``
``fast_path``            the trainer with ``objective = "mean_field"``, ``fast_path = true``: the
                         loss computed without Pyro's handlers on the steps that skip validation
``fast_path_trace``      the same with ``objective = "trace_elbo"``
``no_validation``        the trainer under ``pyro.enable_validation(False)`` (validation's cost)
``pyrovae_fused``        the trainer with ``Adam(fused=True)`` only
``pyrovae_foreach``      the trainer with ``Adam(foreach=True)`` only
``lean``                 PROPOSED, bit-identical: ``LeanTrace_ELBO`` (below) + the likelihood built
                         with ``validate_args=False`` (data checked once) + plate ``device=``
``lean_foreach``         ``lean`` + ``Adam(foreach=True)`` (bit-identical)
``lean_fused``           ``lean`` + ``Adam(fused=True)`` (same loss within float rounding)
``lean_plus``            ``lean_fused`` + ``index_select`` batches + the N(0, I) prior built once
``lean_compiled``        ``lean_fused`` + ``torch.compile`` of encoder and decoder (compile = setup)
``pure_trace``           no Pyro at all: the same networks and the same estimator as ``Trace_ELBO``
                         as plain tensor code (a floor for any Pyro-side fix)
=======================  ==========================================================================

Modes::

    .venv/bin/python benchmarks/train_speed.py                       # ~2-4 min: table
    .venv/bin/python benchmarks/train_speed.py --json                # one JSON object
    .venv/bin/python benchmarks/train_speed.py --variants all --repeats 9
    .venv/bin/python benchmarks/train_speed.py --epochs 1 --repeats 5   # whole epochs (Trainer._run_epoch)
    .venv/bin/python benchmarks/train_speed.py --batch-sizes 32,128,512,1024 --latent-dims 10,50,200
    .venv/bin/python benchmarks/train_speed.py --check               # losses over 20 steps, same seed
    .venv/bin/python benchmarks/train_speed.py --device cuda         # data and model on the GPU

The ``lean*`` variants prototype changes to ``pyrovae/`` by monkeypatching; see
``docs/benchmarks.md`` for the exact code changes they stand for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import pyro  # noqa: E402
import torch  # noqa: E402
from handwritten_vae import HandwrittenTrainer  # noqa: E402
from pyro.infer.util import is_validation_enabled  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import pyrovae  # noqa: E402
import pyrovae.fastmath  # noqa: E402
from pyrovae.objectives import kl_scale  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402

DEFAULT_ROOT = str((ROOT / ".." / "shared" / "data" / "mnist").resolve())
DEFAULT_VARIANTS = "handwritten,pyrovae,mean_field,fast_path,handwritten_fastmath"
ALL_VARIANTS = (
    "handwritten,handwritten_fused,pyrovae,mean_field,jit,jit_mean_field,no_validation,"
    "pyrovae_fused,lean,lean_fused,lean_plus,lean_compiled,pure_trace,fast_path,fast_path_trace,"
    "handwritten_fastmath,pyrovae_torch_kernels"
)


def bench_config(root: str, batch_size: int = 128, latent_dim: int = 50, objective: str = "trace_elbo",
                 seed: int = 0, device: str = "cpu"):
    return pyrovae.load_config({
        "data": {"dataset": "mnist", "root": root, "binarize": "dynamic"},
        "model": {
            "latent_dim": latent_dim,
            "encoder": {"kind": "mlp", "hidden": [400], "activation": "softplus"},
            "decoder": {"kind": "mlp", "hidden": [400], "activation": "softplus"},
            "likelihood": {"kind": "bernoulli"},
        },
        "train": {"batch_size": batch_size, "epochs": 1, "objective": objective, "seed": seed, "device": device},
    })


# =============================================================================================
# Prototypes of the proposed pyrovae changes (applied by monkeypatching, nothing in pyrovae/ edited)
# =============================================================================================
# LeanTrace_ELBO was prototyped here and now ships in pyrovae.objectives (the trainer's default).
from pyrovae.objectives import LeanTrace_ELBO  # noqa: E402


@contextlib.contextmanager
def _default_validate_args(flag: bool):
    old = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(flag)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(old)


def trust_checked_data(vae) -> None:
    """Prototype of "validate the data once": the likelihood p(x|z) is built with
    ``validate_args=False`` (no per-step support check of the observed batch, no per-step NaN scan
    of the decoder's logits), because the trainer has already checked every split against the
    likelihood's support (``check_data_for_model``; dynamic batches are Bernoulli draws, in {0, 1}
    by construction) and stops on a non-finite loss. Prior, guide and Pyro's own checks keep
    validation on."""
    lik = vae.likelihood
    orig = type(lik).forward

    def forward(raw):
        # = passing ``validate_args=False`` to the distribution's constructor: no argument check
        # now, and no support check when the ELBO scores the observed batch
        with _default_validate_args(False):
            d = orig(lik, raw)
        d._validate_args = False
        return d

    lik.forward = forward


def plate_with_device(vae) -> None:
    """Prototype: ``pyro.plate("data", n, subsample=idx, device=x.device)`` (Pyro otherwise builds
    ``torch.tensor(())`` on every plate entry just to find the default device)."""
    cache = vae._index_cache

    def _plate(x, n_data):
        b = x.shape[0]
        if n_data is None or n_data == b:
            return pyro.plate("data", b, device=x.device)
        key = (b, x.device)
        idx = cache.get(key)
        if idx is None:
            idx = cache[key] = torch.arange(b, device=x.device)
        return pyro.plate("data", n_data, subsample=idx, device=x.device)

    vae._plate = _plate


def batch_index_select(tr: Trainer) -> None:
    """Prototype: ``Trainer._batch`` with ``index_select`` instead of advanced indexing (same values)."""
    b = tr.config.train.batch_size
    dynamic = tr.data.binarize == "dynamic"

    def _batch(s):
        x = tr.x_train.index_select(0, tr.perm[s * b : (s + 1) * b])
        if dynamic:
            x = torch.bernoulli(x, generator=tr.gen)
        return x

    tr._batch = _batch


def cache_fixed_prior(vae) -> None:
    """Prototype: the ``normal`` prior N(0, I) has no parameters, so its distribution object is
    built once (per device/dtype of its buffers) instead of every step (no per-step argument
    validation of constant buffers)."""
    prior = vae.prior
    if type(prior).__name__ != "StandardNormal":
        return
    orig = type(prior).forward
    cache: dict = {}

    def forward():
        key = (prior.loc.data_ptr(), prior.loc._version, prior.scale.data_ptr(), prior.scale._version)
        d = cache.get(key)
        if d is None:
            cache.clear()
            d = cache[key] = orig(prior)
        return d

    prior.forward = forward


def pure_trace_loss(vae, x: torch.Tensor, n: int) -> torch.Tensor:
    """Trace_ELBO's estimator with no Pyro: -(log p(x|z) + log p(z) - log q(z|x)) * N/B / N."""
    loc, scale = vae.posterior.encode(x)
    z = loc + scale * torch.randn_like(loc)
    raw = vae.decoder(z)
    lpx = -F.binary_cross_entropy_with_logits(raw, x, reduction="none").sum(-1)
    c = 0.5 * math.log(2 * math.pi)
    lpz = (-0.5 * z * z - c).sum(-1)
    lqz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - c).sum(-1)
    return -(lpx + lpz - lqz).sum() * (n / x.shape[0]) / n


# =============================================================================================
# Runners: one object per variant with new_epoch() / step(s) / steps_per_epoch
# =============================================================================================
class Runner:
    name: str
    steps_per_epoch: int
    setup_seconds: float = 0.0

    def new_epoch(self) -> None: ...
    def step(self, s: int) -> float: ...
    def epoch(self) -> float:
        self.new_epoch()
        return float(sum(self.step(s) for s in range(self.steps_per_epoch))) / self.steps_per_epoch


class HandwrittenRunner(Runner):
    def __init__(self, name, data, cfg, device, fused=False, fast_bin=False, fast_math=False):
        self.name = name
        torch.manual_seed(cfg.train.seed)  # same initial weights as pyrovae's build (same layer order)
        self.t = HandwrittenTrainer(data.x_train.to(device), batch_size=cfg.train.batch_size,
                                    latent_dim=cfg.model.latent_dim, seed=cfg.train.seed)
        if fused:
            self.t.opt = torch.optim.Adam(self.t.model.parameters(), lr=1e-3, fused=True)
        if fast_bin:  # pyrovae's binarization (u < p: torch.bernoulli's values, faster on CPU)
            t, b = self.t, self.t.batch_size
            t.batch = lambda s: pyrovae.data.bernoulli(t.x_train[t.perm[s * b : (s + 1) * b]], t.gen)
        if fast_math:  # pyrovae.fastmath's softplus and Bernoulli log-density (same values to 2 ulp)
            use_fastmath(self.t.model)
        self.steps_per_epoch = self.t.steps_per_epoch

    def new_epoch(self):
        self.t.new_epoch()

    def step(self, s):
        return self.t.step(self.t.batch(s))


def use_fastmath(m) -> None:
    """The hand-written VAE with ``pyrovae.fastmath``'s kernels in place of ``F.softplus`` and
    ``binary_cross_entropy_with_logits``: the same code otherwise (what pyrovae's kernels give plain code)."""
    m.encoder[1] = m.decoder[1] = pyrovae.fastmath.Softplus()
    L = m.latent_dim

    def loss(x):
        h = m.encoder(x)
        loc, scale = h[:, :L], pyrovae.fastmath.softplus(h[:, L:]) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        rec = -pyrovae.fastmath.bernoulli_log_prob(m.decoder(z), x).sum()
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0).sum() - scale.log().sum()
        return (rec + kl) / x.shape[0]

    m.loss = loss


def use_torch_kernels(tr: Trainer) -> None:
    """The trainer with torch's own ``softplus`` and ``Bernoulli.log_prob`` (pyrovae before
    ``pyrovae.fastmath``): swaps the activation modules, the guide's scale and the likelihood."""
    vae = tr.model
    for net in (vae.posterior.encoder, vae.decoder):
        for i, layer in enumerate(net):
            if isinstance(layer, pyrovae.fastmath.Softplus):
                net[i] = torch.nn.Softplus()
    guide, L = vae.posterior, vae.latent_dim

    def encode(x):
        h = guide.encoder(x)
        return h[..., :L], F.softplus(h[..., L:]) + 1e-5

    guide.encode = encode
    lik = vae.likelihood
    lik.forward = lambda raw: pyro.distributions.Bernoulli(logits=raw[..., 0, :], validate_args=lik.validate_args).to_event(1)


class PyroVAERunner(Runner):
    """Drives ``pyrovae.train.Trainer`` exactly as ``Trainer._run_epoch`` does (minus tqdm)."""

    def __init__(self, name, data, cfg, device, patch: Callable | None = None, no_validation=False):
        self.name = name
        pyro.set_rng_seed(cfg.train.seed)
        model = pyrovae.build_model(cfg, data.shape)
        self.tr = Trainer(cfg, Path(tempfile.mkdtemp(prefix="pyrovae-bench-")), data, model, progress=False)
        self.no_validation = no_validation
        self.steps_per_epoch = math.ceil(self.tr.n / cfg.train.batch_size)
        t0 = time.perf_counter()
        if patch is not None:
            patch(self.tr)
        self.setup_seconds = time.perf_counter() - t0

    def new_epoch(self):
        self.tr.perm = torch.randperm(self.tr.n, generator=self.tr.gen, device=self.tr.device)

    def step(self, s):
        tr, t = self.tr, self.tr.config.train
        tr.model.kl_scale = kl_scale(t.beta, t.kl_warmup_epochs, tr.epoch + s / self.steps_per_epoch)
        check = tr.sync_every == 1  # CUDA: no per-step host read (Trainer._run_steps)
        # Pyro's validation on each epoch's first step only, unless validate_every_step
        if self.no_validation or (s > 0 and not tr.validate_every_step):
            pyro.enable_validation(False)
            try:  # train.fast_path: these steps compute the loss without Pyro's handlers
                return tr._step(tr._batch(s), check=check, direct=t.fast_path)
            finally:
                pyro.enable_validation(True)
        return tr._step(tr._batch(s), check=check)

    def epoch(self):
        """One real epoch through ``Trainer._run_epoch`` (the code ``pyrovae fit`` runs)."""
        self.tr.perm, self.tr.step_in_epoch = None, 0
        if self.no_validation:
            pyro.enable_validation(False)
        try:
            loss, _ = self.tr._run_epoch()
        finally:
            pyro.enable_validation(True)
        self.tr.perm, self.tr.step_in_epoch = None, 0
        return loss


# --- patches (each returns nothing; applied to a fresh Trainer) -------------------------------
def patch_lean(tr: Trainer) -> None:
    tr.elbo = LeanTrace_ELBO(max_plate_nesting=1)
    trust_checked_data(tr.model)
    plate_with_device(tr.model)


def patch_lean_plus(tr: Trainer) -> None:
    """Everything proposed: lean ELBO, validate-once likelihood, plate device, cached N(0, I)
    prior, index_select batches, fused Adam."""
    patch_lean_fused(tr)
    batch_index_select(tr)
    cache_fixed_prior(tr.model)


def patch_foreach(tr: Trainer) -> None:
    tr.opt = torch.optim.Adam(tr.model.parameters(), lr=tr.lr, foreach=True)


def patch_fused(tr: Trainer) -> None:
    tr.opt = torch.optim.Adam(tr.model.parameters(), lr=tr.lr, fused=True)


def patch_lean_fused(tr: Trainer) -> None:
    patch_lean(tr)
    patch_fused(tr)


def patch_compiled(tr: Trainer) -> None:
    """torch.compile of the two networks; the compile happens on the first steps, timed here."""
    patch_lean_fused(tr)
    vae = tr.model
    vae.posterior.encoder = torch.compile(vae.posterior.encoder, dynamic=False)
    vae.decoder = torch.compile(vae.decoder, dynamic=False)
    tr.opt = torch.optim.Adam(vae.parameters(), lr=tr.lr, fused=True)
    tr.perm = torch.randperm(tr.n, generator=tr.gen, device=tr.device)
    n_batches = math.ceil(tr.n / tr.config.train.batch_size)
    for s in (0, 1, n_batches - 1):  # compile forward+backward for the full and the last, smaller batch
        tr._loss(tr._batch(s)).backward()
    tr.opt.zero_grad(set_to_none=True)


def _jit(elbo_cls):
    def patch(tr: Trainer) -> None:
        vae, n = tr.model, tr.n
        vae.register_params = True  # JIT reads parameters from the param store
        tr.elbo = elbo_cls(max_plate_nesting=1, ignore_jit_warnings=True)
        tr._loss = lambda x, *_: tr.elbo.differentiable_loss(vae.model, vae.guide, x, n_data=n) / n
        tr.perm = torch.randperm(tr.n, generator=tr.gen, device=tr.device)
        tr._loss(tr._batch(0)).backward()  # trace once (timed as setup); no optimizer step
        tr.opt.zero_grad(set_to_none=True)

    return patch


def patch_pure_trace(tr: Trainer) -> None:
    vae, n = tr.model, tr.n
    tr._loss = lambda x, *_: pure_trace_loss(vae, x, n)


def make_runner(name: str, data, cfg_for: Callable, device) -> Runner:
    if name == "handwritten":
        return HandwrittenRunner(name, data, cfg_for("trace_elbo"), device)
    if name == "handwritten_fused":
        return HandwrittenRunner(name, data, cfg_for("trace_elbo"), device, fused=True)
    if name == "handwritten_tuned":  # fused Adam + pyrovae's faster binarization: the like-for-like floor
        return HandwrittenRunner(name, data, cfg_for("trace_elbo"), device, fused=True, fast_bin=True)
    if name == "handwritten_fastmath":  # handwritten_tuned + pyrovae.fastmath's kernels: the like-for-like floor
        return HandwrittenRunner(name, data, cfg_for("trace_elbo"), device, fused=True, fast_bin=True, fast_math=True)
    if name == "pyrovae":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device)
    if name == "pyrovae_torch_kernels":  # the shipped trainer with torch's softplus / Bernoulli log_prob
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=use_torch_kernels)
    if name == "fast_path_torch_kernels":
        cfg = cfg_for("mean_field")
        cfg.train.fast_path = True
        return PyroVAERunner(name, data, cfg, device, patch=use_torch_kernels)
    if name == "validate_every_step":  # the shipped trainer with Pyro's validation on every step
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=lambda tr: setattr(tr, "validate_every_step", True))
    if name == "mean_field":
        return PyroVAERunner(name, data, cfg_for("mean_field"), device)
    if name in ("fast_path", "fast_path_trace"):  # train.fast_path = true (objectives.direct_loss)
        cfg = cfg_for("mean_field" if name == "fast_path" else "trace_elbo")
        cfg.train.fast_path = True
        return PyroVAERunner(name, data, cfg, device)
    if name == "no_validation":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, no_validation=True)
    if name == "jit":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=_jit(pyro.infer.JitTrace_ELBO))
    if name == "jit_mean_field":
        return PyroVAERunner(name, data, cfg_for("mean_field"), device, patch=_jit(pyro.infer.JitTraceMeanField_ELBO))
    if name == "lean":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=patch_lean)
    if name == "lean_fused":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=patch_lean_fused)
    if name == "lean_compiled":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=patch_compiled)
    if name == "pure_trace":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=patch_pure_trace)
    if name == "lean_plus":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=patch_lean_plus)
    if name == "lean_foreach":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=lambda tr: (patch_lean(tr), patch_foreach(tr)))
    if name == "pyrovae_foreach":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=patch_foreach)
    if name == "handwritten_foreach":
        r = HandwrittenRunner(name, data, cfg_for("trace_elbo"), device)
        r.t.opt = torch.optim.Adam(r.t.model.parameters(), lr=1e-3, foreach=True)
        return r
    if name == "pyrovae_fused":
        return PyroVAERunner(name, data, cfg_for("trace_elbo"), device, patch=patch_fused)
    raise SystemExit(f"unknown variant {name!r}; choose from {ALL_VARIANTS},handwritten_foreach,pyrovae_foreach,lean_foreach")


# =============================================================================================
# Measurement
# =============================================================================================
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quantile(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def measure_steps(runners: list[Runner], steps: int, repeats: int, block: int, warmup: int, device) -> dict:
    """Interleaved: per repeat, ``steps`` steps of every runner in round-robin blocks of ``block``."""
    pos = {r.name: 0 for r in runners}
    for r in runners:
        r.new_epoch()

    def run(r: Runner, k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            if pos[r.name] >= r.steps_per_epoch:
                r.new_epoch()
                pos[r.name] = 0
            r.step(pos[r.name])
            pos[r.name] += 1
        _sync(device)
        return time.perf_counter() - t0

    for r in runners:
        run(r, warmup)
    totals = {r.name: [0.0] * repeats for r in runners}
    blocks: dict[str, list[float]] = {r.name: [] for r in runners}
    nblocks = max(1, steps // block)
    turn = 0
    for rep in range(repeats):
        for _ in range(nblocks):
            order = runners[turn % len(runners):] + runners[: turn % len(runners)]
            turn += 1
            for r in order:
                dt = run(r, block)
                totals[r.name][rep] += dt
                blocks[r.name].append(dt / block)
    per_step = {k: [t / (nblocks * block) for t in v] for k, v in totals.items()}
    return {"per_step_s": per_step, "block_step_s": blocks}


def measure_epochs(runners: list[Runner], epochs: int, repeats: int, device) -> dict:
    """Interleaved whole epochs (``Trainer._run_epoch`` for pyrovae variants)."""
    for r in runners:  # warm-up: a few steps each
        r.new_epoch()
        for s in range(5):
            r.step(s)
    per_epoch = {r.name: [] for r in runners}
    for rep in range(repeats):
        order = runners[rep % len(runners):] + runners[: rep % len(runners)]
        for r in order:
            t0 = time.perf_counter()
            for _ in range(epochs):
                r.epoch()
            _sync(device)
            per_epoch[r.name].append((time.perf_counter() - t0) / epochs)
    per_step = {k: [t / runners[0].steps_per_epoch for t in v] for k, v in per_epoch.items()}
    return {"per_step_s": per_step, "block_step_s": per_step}


def summarize(res: dict, runners: list[Runner], ref: str = "handwritten") -> dict:
    per_step, blocks = res["per_step_s"], res["block_step_s"]
    out = {}
    for r in runners:
        ps = per_step[r.name]
        ratios = [a / b for a, b in zip(ps, per_step[ref], strict=True)]
        out[r.name] = {
            "epoch_seconds_median": statistics.median(ps) * r.steps_per_epoch,
            "epoch_seconds_best": min(blocks[r.name]) * r.steps_per_epoch,
            "ms_per_step_median": 1e3 * statistics.median(ps),
            "ms_per_step_best_block": 1e3 * min(blocks[r.name]),
            "ms_per_step_p25_block": 1e3 * _quantile(blocks[r.name], 0.25),
            "ratio": statistics.median(ratios),
            "ratio_per_repeat": [round(x, 4) for x in ratios],
            "ratio_best": min(blocks[r.name]) / min(blocks[ref]),
            "ratio_p25": _quantile(blocks[r.name], 0.25) / _quantile(blocks[ref], 0.25),
            "setup_seconds": r.setup_seconds,
        }
    return out


# =============================================================================================
# Loss check: same seed, 20 steps, each variant alone
# =============================================================================================
def check_losses(variants: list[str], data, cfg_for, device, steps: int = 20) -> dict:
    seqs = {}
    for name in variants:
        r = make_runner(name, data, cfg_for, device)
        torch.manual_seed(1234)  # same sampling noise for every variant from here on
        gen_seed = 99
        if isinstance(r, PyroVAERunner):
            r.tr.gen.manual_seed(gen_seed)
        else:
            r.t.gen.manual_seed(gen_seed)
        r.new_epoch()
        seqs[name] = [float(r.step(s)) for s in range(steps)]
    ref = seqs.get("pyrovae")
    out = {}
    for name, seq in seqs.items():
        row = {"losses": seq}
        if ref is not None:
            row["max_abs_diff_vs_pyrovae"] = max(abs(a - b) for a, b in zip(seq, ref, strict=True))
            row["identical_to_pyrovae"] = seq == ref
        out[name] = row
    return out


def check_lean_equivalence() -> list[dict]:
    """``LeanTrace_ELBO`` (+ validate-once likelihood) against ``Trace_ELBO`` on every prior,
    likelihood and guide kind, with β-scaling and β = 0 (mask): loss and every gradient compared
    bit for bit, same seed, on random 8x8 data."""
    cases = [("normal", "bernoulli", "normal", 1.0)]
    cases += [(p, "bernoulli", "normal", 1.0) for p in ("normal_learned", "mixture", "vamp", "flow")]
    cases += [("normal", lik, "normal", 1.0) for lik in ("continuous_bernoulli", "normal", "laplace", "poisson", "negative_binomial")]
    cases += [("normal", "bernoulli", "flow", 1.0), ("normal", "bernoulli", "normal", 0.3), ("normal", "bernoulli", "normal", 0.0)]
    rows = []
    for prior, lik, guide, beta in cases:
        cfg = pyrovae.load_config({"model": {"latent_dim": 3, "prior": {"kind": prior}, "likelihood": {"kind": lik},
                                             "guide": {"kind": guide}, "encoder": {"kind": "mlp", "hidden": [16]},
                                             "decoder": {"kind": "mlp", "hidden": [16]}}})
        g = torch.Generator().manual_seed(0)
        x = torch.rand(20, 64, generator=g)
        if lik == "bernoulli":
            x = x.round()
        elif lik in ("poisson", "negative_binomial"):
            x = (x * 5).floor()
        results = []
        for lean in (False, True):
            pyro.set_rng_seed(0)
            vae = pyrovae.build_model(cfg, (1, 8, 8))
            vae.register_params = False
            vae.kl_scale = beta
            elbo = pyro.infer.Trace_ELBO(max_plate_nesting=1)
            if lean:
                elbo = LeanTrace_ELBO(max_plate_nesting=1)
                trust_checked_data(vae)
            pyro.set_rng_seed(1)
            losses, grads = [], []
            for _ in range(2):  # second call: validation already done once
                vae.zero_grad(set_to_none=True)
                loss = elbo.differentiable_loss(vae.model, vae.guide, x[:8], 20) / 20
                loss.backward()
                losses.append(loss.item())
                grads.append([None if p.grad is None else p.grad.clone() for p in vae.parameters()])
            results.append((losses, grads))
        (l0, g0), (l1, g1) = results
        same_grads = all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                         for ga, gb in zip(g0, g1, strict=True) for a, b in zip(ga, gb, strict=True))
        rows.append({"prior": prior, "likelihood": lik, "guide": guide, "beta": beta,
                     "loss_identical": l0 == l1, "grads_identical": same_grads, "losses": l0})
    return rows


# =============================================================================================
# Environment
# =============================================================================================
def environment(device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "pyrovae"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    env = {
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
        "git_commit": commit, "pyrovae_dirty": dirty, "device": str(device),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "pyro_validation": is_validation_enabled(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def print_table(summary: dict, title: str, unit_epoch: bool = True) -> None:
    print(title)
    print(f"{'variant':18s} {'epoch s (med)':>13s} {'ms/step (med)':>13s} {'ms/step best':>12s} {'ratio':>7s} {'ratio best':>10s} {'ratio p25':>9s}")
    for name, s in summary.items():
        print(f"{name:18s} {s['epoch_seconds_median']:13.2f} {s['ms_per_step_median']:13.2f} {s['ms_per_step_best_block']:12.2f} "
              f"{s['ratio']:7.3f} {s['ratio_best']:10.3f} {s['ratio_p25']:9.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=DEFAULT_ROOT, help="folder with the four MNIST IDX files")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, or 'all' ({ALL_VARIANTS})")
    p.add_argument("--steps", type=int, default=150, help="steps per variant per repeat (default 150)")
    p.add_argument("--block", type=int, default=5, help="steps per interleaved block (default 5)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--epochs", type=int, default=0, help="time whole epochs instead of --steps (Trainer._run_epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument("--batch-sizes", default="", help="sweep mode, e.g. 32,128,512,1024")
    p.add_argument("--latent-dims", default="", help="sweep mode, e.g. 10,50,200")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--check", action="store_true", help="compare losses over 20 steps (same seed) instead of timing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated")
    pyro.enable_validation(True)  # the default (``__debug__``), made explicit
    device = torch.device(a.device)
    variants = ALL_VARIANTS.split(",") if a.variants == "all" else [v.strip() for v in a.variants.split(",") if v.strip()]
    if "handwritten" not in variants:
        variants.insert(0, "handwritten")
    env = environment(device)
    t_load = time.perf_counter()
    data = pyrovae.load_data(bench_config(a.root).data, seed=0)
    env["data_load_seconds"] = time.perf_counter() - t_load
    env["train_points"] = int(data.x_train.shape[0])

    def cfg_factory(batch_size, latent_dim):
        return lambda objective: bench_config(a.root, batch_size, latent_dim, objective, device=a.device)

    if a.check:
        res = check_losses(variants, data, cfg_factory(a.batch_size, a.latent_dim), device)
        eq = check_lean_equivalence()
        if a.json:
            print(json.dumps({"check": res, "lean_equivalence": eq, **env}))
        else:
            print("losses over 20 steps from the same seed (nats per datapoint)")
            for name, row in res.items():
                extra = f"  max |diff| vs pyrovae {row['max_abs_diff_vs_pyrovae']:.3g}  identical={row['identical_to_pyrovae']}" if "max_abs_diff_vs_pyrovae" in row else ""
                print(f"{name:18s} first {row['losses'][0]:.4f} last {row['losses'][-1]:.4f}{extra}")
            print("LeanTrace_ELBO vs Trace_ELBO (loss and all gradients, bit for bit, two steps):")
            for row in eq:
                print(f"  prior {row['prior']:15s} likelihood {row['likelihood']:20s} guide {row['guide']:7s} beta {row['beta']:.1f}: "
                      f"loss identical {row['loss_identical']}, gradients identical {row['grads_identical']}")
        return 0

    if a.batch_sizes or a.latent_dims:
        bss = [int(b) for b in (a.batch_sizes or str(a.batch_size)).split(",")]
        lds = [int(d) for d in (a.latent_dims or str(a.latent_dim)).split(",")]
        rows = []
        for ld in lds:
            for bs in bss:
                cfg_for = cfg_factory(bs, ld)
                runners = [make_runner(v, data, cfg_for, device) for v in variants]
                steps = max(a.block, round(a.steps * 128 / bs / a.block) * a.block)  # same data per measurement
                res = measure_steps(runners, steps, a.repeats, min(a.block, steps), a.warmup, device)
                summ = summarize(res, runners)
                row = {"batch_size": bs, "latent_dim": ld, "steps": steps,
                       **{f"{k}_epoch_s": round(v["epoch_seconds_median"], 3) for k, v in summ.items()},
                       **{f"{k}_epoch_s_best": round(v["epoch_seconds_best"], 3) for k, v in summ.items()},
                       **{f"{k}_ratio": round(v["ratio"], 3) for k, v in summ.items() if k != "handwritten"},
                       **{f"{k}_ratio_best": round(v["ratio_best"], 3) for k, v in summ.items() if k != "handwritten"}}
                rows.append(row)
                if not a.json:
                    cols = " ".join(f"{k}={v['epoch_seconds_median']:.2f}s (best {v['epoch_seconds_best']:.2f}s, x{v['ratio']:.3f}/{v['ratio_best']:.3f})" for k, v in summ.items())
                    print(f"batch {bs:5d} latent {ld:4d}: {cols}", flush=True)
        env["loadavg_end"] = os.getloadavg()
        if a.json:
            print(json.dumps({"sweep": rows, "variants": variants, "repeats": a.repeats, **env}))
        return 0

    cfg_for = cfg_factory(a.batch_size, a.latent_dim)
    runners = [make_runner(v, data, cfg_for, device) for v in variants]
    if a.epochs:
        res = measure_epochs(runners, a.epochs, a.repeats, device)
        how = f"{a.epochs} epoch(s) per measurement, {a.repeats} repeats"
    else:
        res = measure_steps(runners, a.steps, a.repeats, a.block, a.warmup, device)
        how = f"{a.steps} steps per measurement in blocks of {a.block}, {a.repeats} repeats"
    summary = summarize(res, runners)
    env["loadavg_end"] = os.getloadavg()
    main_variant = "pyrovae" if "pyrovae" in summary else next(k for k in summary if k != "handwritten")
    if a.json:
        print(json.dumps({
            "ratio": summary[main_variant]["ratio"],
            "ratio_variant": main_variant,
            "ratios": {k: v["ratio"] for k, v in summary.items()},
            "ratios_best": {k: v["ratio_best"] for k, v in summary.items()},
            "variants": summary,
            "protocol": how, "batch_size": a.batch_size, "latent_dim": a.latent_dim,
            **env,
        }))
    else:
        print_table(summary, f"pyrovae vs hand-written VAE, {how}; {env['cpu']}, {a.threads} threads, torch {env['torch']}, pyro {env['pyro']}, commit {env['git_commit']}")
        print(f"load average start {env['loadavg_start']}, end {env['loadavg_end']} (more than ~{a.threads} means a shared, noisy machine: prefer 'ratio best')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
