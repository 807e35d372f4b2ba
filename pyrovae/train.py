"""Training: ``fit(config, out_dir) -> Run`` for the VAE (SVI) and the autoencoder baseline.

The VAE step is one step of stochastic variational inference: Pyro's ELBO (``Trace_ELBO`` by
default, see :mod:`pyrovae.objectives`) gives a differentiable loss for the minibatch (scaled to
the dataset by ``pyro.plate``), and a single ``torch.optim.Adam`` over ``vae.parameters()``
updates encoder, decoder, prior and likelihood parameters together. This is numerically the
same update as ``pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam(...), elbo).step`` (tested),
without the param-store round trip per parameter.

Run folder::

    config.toml      the resolved, validated config
    checkpoint.pt    model + optimizer + RNG state, written atomically every epoch (and on SIGINT/SIGTERM)
    metrics.json     per-epoch train/val ELBO (nats per datapoint), epoch seconds; final test metrics
    figures/         reconstructions, samples, latent scatter, loss curves
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae import evaluate
from pyrovae.autoencoder import AutoEncoder
from pyrovae.checkpoint import (
    CHECKPOINT,
    atomic_write_json,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from pyrovae.config import Config, load_config
from pyrovae.data import Dataset, bernoulli, load_data
from pyrovae.errors import CheckpointError, ConfigError, DataError, PyroVAEError, TrainingError
from pyrovae.model import VAE
from pyrovae.objectives import direct_loss, direct_loss_applies, kl_scale, make_elbo

METRICS = "metrics.json"
#: on CUDA the trainer reads the loss on the host once every this many steps (``Trainer._run_steps``)
CUDA_SYNC_EVERY = 50
CONFIG = "config.toml"


@dataclass
class Run:
    """A trained (or loaded) run: its folder, config, network and metrics."""

    dir: Path
    config: Config
    model: VAE | AutoEncoder
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    data: Dataset | None = None
    interrupted: bool = False


def build_model(config: Config, data_shape: tuple[int, ...]) -> VAE | AutoEncoder:
    """The network the config describes, for data points of shape ``data_shape``."""
    for block in ("encoder", "decoder"):
        if getattr(config.model, block).kind == "conv" and len(data_shape) != 3:
            raise ConfigError(
                f'model.{block}.kind = "conv" needs image data: expected points of shape '
                f"(C, H, W), got shape {tuple(data_shape)} (data.dataset={config.data.dataset!r}); "
                'use kind = "mlp" for vector data'
            )
    cls = VAE if config.model.kind == "vae" else AutoEncoder
    return cls(config.model, data_shape)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            'train.device: "cuda" requested but no CUDA device is available; use "auto" or "cpu"'
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_data_for_model(model: VAE | AutoEncoder, data: Dataset, source: str) -> None:
    """Check the data's point shape against the model's, and every split against the
    likelihood's support, once, before any training or evaluation."""
    if tuple(model.data_shape) != tuple(data.shape):
        raise DataError(
            f"{source}: expected data points of shape {tuple(model.data_shape)} "
            f"({model.data_dim} values), as the model was built for; got shape {tuple(data.shape)} "
            f"({data.dim} values). Did the data file change since the model was trained?"
        )
    splits = {"validation": data.x_val, "test": data.x_test}
    if data.binarize != "dynamic":  # dynamic batches are Bernoulli draws, in {0,1} by construction
        splits = {"training": data.x_train, **splits}
    for split, x in splits.items():
        model.likelihood.check_data(x, f"{source} ({split} split)")


# --------------------------------------------------------------------------------------- state
def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
    }


def _all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _Stop:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint can be written."""

    def __init__(self) -> None:
        self.requested: int | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested is not None:  # second signal: stop now
                signal.signal(signum, old[signum])
                raise KeyboardInterrupt
            self.requested = signum

        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# ------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the optimizer, RNG, batching, checkpoints and metrics of one run folder."""

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        data: Dataset,
        model: VAE | AutoEncoder,
        progress: bool | None,
    ):
        self.config, self.dir, self.data, self.model = config, out_dir, data, model
        t = config.train
        self.device = resolve_device(t.device)
        self.model.to(self.device)
        self.x_train = data.x_train.to(self.device)
        self.x_val = data.x_val.to(self.device)
        self.n = self.x_train.shape[0]
        self.lr = t.lr
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=self.lr, **_adam_kwargs(self.device)
        )
        #: fit() sets this once every split passed ``likelihood.check_data``: the per-step
        #: support check of observed x is then skipped (``VAE.trusted_data``)
        self.data_checked = False
        self.gen = torch.Generator(device=self.device).manual_seed(t.seed)
        self.history: list[dict[str, Any]] = []
        self.epoch, self.step_in_epoch, self.perm = 0, 0, None
        self.retries = 0
        self.progress = progress
        self.is_vae = isinstance(model, VAE)
        if self.is_vae:
            self.elbo = make_elbo(t.objective, t.num_particles)
            self.model.register_params = (
                t.objective == "iwae"
            )  # RenyiELBO backprops through param sites
        self.stop = _Stop()
        #: steps between host reads of the loss: every step on CPU (free there), every
        #: ``CUDA_SYNC_EVERY`` steps elsewhere (``_run_steps``)
        self.sync_every = 1 if self.device.type == "cpu" else CUDA_SYNC_EVERY
        #: Pyro's validation (model/guide structure, distribution arguments and supports) runs
        #: on the first step of every epoch; the other steps skip it, since they run the same
        #: program on new values and a bad value (NaN, inf) shows up as a non-finite loss, which
        #: is read every step on CPU (every ``sync_every`` steps elsewhere) and rolled back.
        #: ``train.validate_every_step = true``: every step, as a bare ``SVI.step`` loop does
        self.validate_every_step = t.validate_every_step
        #: whether ``train.fast_path`` applies to this model (decided on first use)
        self._direct_ok: bool | None = None
        if self.is_vae and hasattr(self.elbo, "sync_free"):
            self.elbo.sync_free = self.sync_every > 1

    # -- checkpoint ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "kind": self.config.model.kind,
            "config": self.config.to_dict(),
            "data_shape": list(self.data.shape),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "perm": self.perm.cpu() if self.perm is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "batch_rng": self.gen.get_state().cpu(),
            "lr": self.lr,
            "retries": self.retries,
            "history": self.history,
        }

    def save(self) -> None:
        if not _all_finite(self.model):
            raise TrainingError("refusing to write a checkpoint with non-finite parameters")
        save_checkpoint(self.dir / CHECKPOINT, self.state())

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint read by :func:`~pyrovae.checkpoint.load_checkpoint`.

        Raises :class:`CheckpointError` (naming ``path``) if it does not fit this run: a different
        network, optimizer or number of training points.
        """
        n_batches = math.ceil(self.n / self.config.train.batch_size)
        perm, step = state["perm"], state["step_in_epoch"]
        if perm is not None and (
            perm.dtype != torch.int64
            or perm.numel() != self.n
            or not torch.equal(perm.sort().values, torch.arange(self.n))
        ):
            raise CheckpointError(
                f"{path}: entry 'perm': expected a permutation of the {self.n} training points, got "
                f"{perm.numel()} {perm.dtype} values (did the data change since the checkpoint?)"
            )
        if step > n_batches or (perm is None and step != 0):
            raise CheckpointError(
                f"{path}: entry 'step_in_epoch': expected 0..{n_batches} (with an epoch order), "
                f"got {step}"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"])
            self.gen.set_state(state["batch_rng"].to(self.gen.get_state().device))
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            detail = _first_lines(e)
            raise CheckpointError(
                f"{path}: the stored parameters, optimizer or RNG state do not fit the model "
                f"the stored config describes: {detail}"
            ) from None
        self.epoch, self.step_in_epoch = state["epoch"], step
        self.perm = perm.to(self.device) if perm is not None else None
        self.lr, self.retries, self.history = state["lr"], state["retries"], list(state["history"])
        self._set_lr(self.lr)

    def scheduled_lr(self) -> float:
        """Learning rate for the current epoch e: max(lr_min, lr * lr_decay**e), times
        lr_backoff for every non-finite-loss retry so far."""
        t = self.config.train
        return max(t.lr_min, t.lr * t.lr_decay**self.epoch) * t.lr_backoff**self.retries

    def _set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    # -- one step --------------------------------------------------------------------------
    def _batch(self, s: int) -> torch.Tensor:
        b = self.config.train.batch_size
        x = self.x_train.index_select(0, self.perm[s * b : (s + 1) * b])
        if self.data.binarize == "dynamic":
            # torch.bernoulli's draws bit for bit, a little faster on CPU
            x = bernoulli(x, self.gen)
        return x

    def _loss(self, x: torch.Tensor, direct: bool = False) -> torch.Tensor:
        """Loss per datapoint for the batch (the negative (β-)ELBO estimate / N, or the AE loss).
        ``direct``: the same loss without Pyro's effect handlers (``objectives.direct_loss``)."""
        if not self.is_vae:
            return self.model.loss(x, self.gen if self.device.type == "cpu" else None)
        if self.config.train.objective == "iwae":
            # RenyiELBO has no differentiable_loss: it runs backward itself on the param sites
            return torch.as_tensor(
                self.elbo.loss_and_grads(self.model.model, self.model.guide, x, self.n) / self.n
            )
        if direct and self._direct_applies(x):
            sync_free = getattr(self.elbo, "sync_free", False)
            loss = direct_loss(self.model, x, self.n, self.config.train.objective, sync_free)
            if loss is not None:
                return loss / self.n
        return self.elbo.differentiable_loss(self.model.model, self.model.guide, x, self.n) / self.n

    def _direct_applies(self, x: torch.Tensor) -> bool:
        """``train.fast_path`` applies to this model (checked once: ``direct_loss_applies``)."""
        if self._direct_ok is None:
            self._direct_ok = self.elbo.num_particles == 1 and direct_loss_applies(
                self.model, x, self.n
            )
            if not self._direct_ok:
                tqdm.write(
                    "pyrovae: train.fast_path does not apply to this model (its Pyro program has "
                    "sites beyond z and x, or several particles); every step runs through Pyro"
                )
        return self._direct_ok

    def _step(self, x: torch.Tensor, check: bool = True, direct: bool = False) -> torch.Tensor:
        """One optimizer step on batch ``x``; returns the detached loss (a 0-dim tensor).

        With ``check`` the loss is read on the host first and a non-finite value skips the
        update (on CPU the read costs nothing). Without it the update always runs and the caller
        reads the accumulated losses every ``sync_every`` steps: on CUDA a read is a host
        synchronization, and a bad value is caught there and rolled back (see ``_run_steps``).
        """
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(x, direct)
        if loss.requires_grad:
            loss.backward()
        loss = loss.detach()
        if not check or math.isfinite(loss.item()):
            self.opt.step()
        return loss

    # -- epochs ----------------------------------------------------------------------------
    def _run_epoch(self) -> tuple[float, bool]:
        """Train one epoch (from ``step_in_epoch`` if resuming). Returns (mean loss, finished)."""
        t = self.config.train
        n_batches = math.ceil(self.n / t.batch_size)
        if self.perm is None:
            self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
        trusted = self.is_vae and self.data_checked
        with self.model.trusted_data() if trusted else contextlib.nullcontext():
            return self._run_steps(n_batches)

    def _run_steps(self, n_batches: int) -> tuple[float, bool]:
        """Steps ``step_in_epoch .. n_batches-1``. The losses are read on the host every
        ``sync_every`` steps (1 on CPU; on CUDA less often, so that the GPU is never waited for
        within a step). Pyro's validation runs on the first step of the call only (unless
        ``validate_every_step``): a bad value shows up as a non-finite loss at the next read and
        the epoch is rolled back."""
        t = self.config.train
        sync = self.sync_every
        first = self.step_in_epoch
        total, count = 0.0, 0
        pending: torch.Tensor | None = None  # losses since the last host read
        n_pending = 0
        bar = tqdm(
            range(first, n_batches),
            desc=f"epoch {self.epoch + 1}/{t.epochs}",
            leave=False,
            disable=None if self.progress is None else not self.progress,
        )
        for s in bar:
            if self.is_vae:
                self.model.kl_scale = kl_scale(
                    t.beta, t.kl_warmup_epochs, self.epoch + s / n_batches
                )
            skip_checks = s > first and not self.validate_every_step
            with pyro.validation_enabled(False) if skip_checks else contextlib.nullcontext():
                loss = self._step(
                    self._batch(s), check=sync == 1, direct=skip_checks and t.fast_path
                )
            pending = loss if pending is None else pending + loss
            n_pending += 1
            self.step_in_epoch = s + 1
            stopping = self.stop.requested is not None
            if n_pending >= sync or s == n_batches - 1 or stopping:
                value = pending.item()  # the host read
                if not math.isfinite(value):
                    raise _NonFinite(self.epoch, s, value)
                total, count = total + value, count + n_pending
                if s % 10 == 0 or sync > 1:
                    label = "elbo" if self.is_vae else "loss"
                    mean = value / n_pending
                    bar.set_postfix({label: f"{(-mean if self.is_vae else mean):.2f}"})
                pending, n_pending = None, 0
            if stopping:
                return total / max(count, 1), False
        return total / max(count, 1), True

    def validate(self) -> float | None:
        """Mean validation ELBO (VAE) or loss (AE) per datapoint; ``None`` when no validation
        split is held out (``data.val_fraction = 0``: train on every training point)."""
        if len(self.x_val) == 0:
            return None
        self.model.eval()
        try:
            if self.is_vae:
                self.model.kl_scale = 1.0
                return float(
                    evaluate.elbo(
                        self.model.model, self.model.guide, self.x_val, batch_size=1024
                    ).mean()
                )
            with torch.no_grad():
                return sum(
                    float(self.model.loss(xb)) * len(xb) for xb in self.x_val.split(1024)
                ) / len(self.x_val)
        finally:
            self.model.train()

    def train(self) -> bool:
        """Run the remaining epochs. Returns False if stopped by a signal (checkpoint written)."""
        t = self.config.train
        with self.stop.installed():
            while self.epoch < t.epochs:
                self.lr = self.scheduled_lr()
                self._set_lr(self.lr)
                good = _snapshot(self.model, self.opt)
                good_rng = (
                    torch.get_rng_state(),
                    self.gen.get_state(),
                    self.perm,
                    self.step_in_epoch,
                )
                start = time.perf_counter()
                try:
                    loss, finished = self._run_epoch()
                except _NonFinite as e:
                    self._recover(e, good, good_rng)
                    continue
                if not finished:
                    if not _all_finite(
                        self.model
                    ):  # the last update went bad: keep the epoch start
                        self._rollback(good, good_rng)
                    self.save()
                    return False
                seconds = time.perf_counter() - start
                scale = self.model.kl_scale if self.is_vae else None
                val = self.validate()
                if val is not None and not math.isfinite(val):
                    self._recover(_NonFinite(self.epoch, -1, val), good, good_rng)
                    continue
                row = {"epoch": self.epoch + 1, "epoch_seconds": seconds, "lr": self.lr}
                if self.is_vae:
                    row.update(train_elbo=-loss, val_elbo=val, kl_scale=scale)
                else:
                    row.update(train_loss=loss, val_loss=val)
                self.history.append(row)
                self.epoch, self.step_in_epoch, self.perm = self.epoch + 1, 0, None
                self.save()
                atomic_write_json(self.dir / METRICS, {"history": self.history, "units": _UNITS})
                if self.stop.requested is not None:
                    return False
        return True

    def _rollback(self, good: dict, good_rng: tuple) -> None:
        """Return to the in-memory snapshot taken at the start of the epoch."""
        self.model.load_state_dict(good["model"])
        self.opt.load_state_dict(good["optimizer"])
        rng, gen, perm, step = good_rng
        torch.set_rng_state(rng)
        self.gen.set_state(gen)
        self.perm, self.step_in_epoch = perm, step

    def _recover(self, e: _NonFinite, good: dict, good_rng: tuple) -> None:
        """Handle a non-finite loss: roll back, lower the learning rate, or give up."""
        self.retries += 1
        where = f"epoch {e.epoch + 1}" + (
            f", step {e.step + 1}" if e.step >= 0 else " (validation)"
        )
        if self.retries > self.config.train.max_retries:
            raise TrainingError(
                f"the loss became non-finite ({e.value}) at {where} and stayed so after "
                f"{self.config.train.max_retries} retries (learning rate lowered to {self.lr:.3g}). "
                + (
                    f"The last good checkpoint is {self.dir / CHECKPOINT}. "
                    if (self.dir / CHECKPOINT).exists()
                    else ""
                )
                + "Try a smaller train.lr, a different likelihood scale, or check the data."
            )
        self._rollback(good, good_rng)
        self.lr *= self.config.train.lr_backoff
        self._set_lr(self.lr)
        tqdm.write(
            f"pyrovae: non-finite loss at {where}; restored the last good state, retrying with lr={self.lr:.3g} ({self.retries}/{self.config.train.max_retries})"
        )


def _adam_kwargs(device: torch.device) -> dict[str, Any]:
    """Fused Adam (one kernel for all parameters) on CPU and CUDA: the same update up to float
    rounding, ~0.7 ms less per step for the 784-400-50 VAE (docs/benchmarks.md)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


class _NonFinite(Exception):
    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.value = epoch, step, value


_UNITS = "nats per datapoint; *_elbo are ELBO estimates (1 sample per datapoint), higher is better; *_loss (AE) are reconstruction losses, lower is better"


# --------------------------------------------------------------------------------- public API
def _first_lines(e: BaseException, n: int = 2, limit: int = 300) -> str:
    """The first ``n`` non-empty lines of an exception's message, on one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:n]
    return (" ".join(lines) or type(e).__name__)[:limit]


def _stored_config(state: dict[str, Any], path: Path) -> Config:
    """The config a checkpoint holds, validated; :class:`CheckpointError` naming ``path`` if not."""
    try:
        cfg = load_config(state["config"])
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: the config stored in the checkpoint is invalid: {e}"
        ) from None
    if cfg.model.kind != state["kind"]:
        raise CheckpointError(
            f"{path}: entry 'kind' is {state['kind']!r} but the stored config says "
            f"model.kind = {cfg.model.kind!r}; expected the same"
        )
    return cfg


def _first_missing_ancestor(path: Path) -> Path | None:
    """The outermost folder ``path.mkdir(parents=True)`` would create (None if ``path`` exists)."""
    path = path.absolute()
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def fit(
    config: Config | dict | str | Path | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | None = None,
    data: Dataset | None = None,
    figures: bool = True,
) -> Run:
    """Train the model a config describes and write the run folder ``out_dir``.

    Everything the user can get wrong (config, data files, data support, shapes) is checked
    before ``out_dir`` is created, so a bad input leaves no folder behind (nor any parent folder
    created for it). With ``resume=True`` the run continues from ``out_dir/checkpoint.pt`` (the
    stored config is used; its ``train.epochs`` may be raised by the given config); if the run
    was killed before its first checkpoint, it starts over from ``out_dir/config.toml``.
    Temporary files a killed process left in ``out_dir`` are removed.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: expected a run folder, got an existing file")
    ckpt = out / CHECKPOINT
    state = None
    if resume:
        if ckpt.exists():
            state = load_checkpoint(ckpt)
            stored = _stored_config(state, ckpt)
        elif (out / CONFIG).is_file():  # killed before the first checkpoint: start over
            stored = load_config(out / CONFIG)
        else:
            raise CheckpointError(
                f"--resume: {out} holds no {CHECKPOINT} (nor {CONFIG}) to continue; expected a "
                "run folder written by `pyrovae fit`. Start a new run with a CONFIG instead"
            )
        if config is not None:
            new = load_config(config)
            same = {"train": {"epochs"}}
            if new.model_dump(exclude=same) != stored.model_dump(exclude=same):
                raise ConfigError(
                    f"--resume: the config differs from the one stored in {out / CONFIG} "
                    "(only train.epochs may change)"
                )
            if state is not None and new.train.epochs < state["epoch"]:
                raise ConfigError(
                    f"--resume: train.epochs must be at least the {state['epoch']} epochs already "
                    f"completed in {ckpt}; got {new.train.epochs}"
                )
            stored.train.epochs = new.train.epochs
        cfg = stored
    else:
        cfg = load_config(config)
        if ckpt.exists():
            raise ConfigError(
                f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or "
                "choose another --out"
            )
    pyro.set_rng_seed(cfg.train.seed)
    data = data if data is not None else load_data(cfg.data, seed=cfg.train.seed)
    if state is not None and tuple(state["data_shape"]) != tuple(data.shape):
        raise DataError(
            f"--resume: data.dataset={cfg.data.dataset!r}: expected data points of shape "
            f"{tuple(state['data_shape'])}, as the model in {ckpt} was trained on; got shape "
            f"{tuple(data.shape)}. Did the data file change since? Restore it or start a new run."
        )
    model = build_model(cfg, data.shape)
    check_data_for_model(model, data, f"dataset {cfg.data.dataset!r}")
    resolve_device(cfg.train.device)

    created = _first_missing_ancestor(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    trainer = Trainer(cfg, out, data, model, progress)
    trainer.data_checked = True
    try:
        if state is not None:
            trainer.restore(state, ckpt)
        else:
            cfg.save(out / CONFIG)
        finished = trainer.train()
    except BaseException:
        if created is not None and not ckpt.exists():
            shutil.rmtree(
                created, ignore_errors=True
            )  # nothing resumable was written: leave nothing
        raise
    run = Run(
        dir=out,
        config=cfg,
        model=model,
        history=trainer.history,
        data=data,
        interrupted=not finished,
    )
    if finished:
        run.metrics = final_metrics(run)
        atomic_write_json(out / METRICS, run.metrics)
        if figures:
            from pyrovae import plots

            plots.run_figures(run, out / "figures")
    return run


def final_metrics(run: Run) -> dict[str, Any]:
    """Test-set metrics (nats per datapoint for ELBOs) plus the per-epoch history."""
    model, data = run.model, run.data
    device = next(model.parameters()).device
    x_test = data.x_test.to(device)
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"history": run.history, "units": _UNITS, "kind": run.config.model.kind}
    out["test_reconstruction_error"] = float(evaluate.reconstruction_error(model, x_test).mean())
    out["num_parameters"] = sum(p.numel() for p in model.parameters())
    out["train_seconds"] = sum(h["epoch_seconds"] for h in run.history)
    out["test_points"] = int(x_test.shape[0])
    out["binarize"] = run.config.data.binarize
    if isinstance(model, VAE):
        model.kl_scale = 1.0
        out["test_elbo"] = float(
            evaluate.elbo(model.model, model.guide, x_test, batch_size=1024).mean()
        )
    else:
        out["test_elbo"] = None
        with torch.no_grad():
            out["test_loss"] = sum(
                float(model.loss(xb)) * len(xb) for xb in x_test.split(1024)
            ) / len(x_test)
    model.train(was_training)
    return out


def load_run(run_dir: str | Path, data: bool = False) -> Run:
    """Load a run folder (checkpoint read with ``weights_only=True``: no code is executed).

    With ``data=True`` the dataset of the stored config is loaded too and checked against the
    model (point shape, likelihood support). Every problem is a :class:`CheckpointError` or a
    :class:`DataError` naming the file.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise CheckpointError(f"run folder not found: {d}")
    path = d / CHECKPOINT
    state = load_checkpoint(path)
    cfg = _stored_config(state, path)
    shape = tuple(state["data_shape"])
    try:
        model = build_model(cfg, shape)
    except PyroVAEError as e:
        raise CheckpointError(
            f"{path}: the stored config cannot build a model for data of shape {shape}: {e}"
        ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: parameters do not match the stored config: {_first_lines(e)}"
        ) from None
    model.eval()
    metrics: dict[str, Any] = {}
    if (d / METRICS).is_file():
        import json

        try:
            metrics = json.loads((d / METRICS).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{d / METRICS}: not valid JSON ({e})") from None
    ds = None
    if data:
        ds = load_data(cfg.data, seed=cfg.train.seed)
        check_data_for_model(model, ds, f"data.dataset={cfg.data.dataset!r} (the run {d})")
    return Run(
        dir=d, config=cfg, model=model, history=list(state["history"]), metrics=metrics, data=ds
    )
