r"""The training loop: stochastic variational inference on the Pyro program (or the AE baseline).

One step on a minibatch $x_{1:B}$ of $N$ training points:

1. `loss = elbo.differentiable_loss(vae.model, vae.guide, x, N, beta) / N` — Pyro's own ELBO
   object (`pyrovae.objectives`) runs the model and guide; the plate scales the minibatch to
   the dataset, so this is the negative (β-)ELBO estimate in nats per datapoint;
2. `loss.backward()`, then one `torch.optim.Adam` step over `vae.parameters()` (encoder,
   decoder, prior and likelihood parameters together). This is the update
   `pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam(...), elbo).step` makes.

Around it: the epoch order and dynamic binarization from a seeded generator, β warm-up and the
learning-rate schedule as functions of the epoch, Pyro's validation on each epoch's first step,
a roll back to the epoch's start (with a lower learning rate) when the loss is not finite, and
SIGINT/SIGTERM turned into a clean stop between steps. The trainer writes no files:
`state_dict()` is everything a resume needs, and `Callback.on_epoch_end` is where a caller
(`pyrovae.workflow.fit`) writes it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.config import TrainConfig
from pyrovae.data import bernoulli
from pyrovae.errors import TrainingError
from pyrovae.objectives import kl_scale, make_loss
from pyrovae.progress import log

#: on CUDA the loss is read on the host once every this many steps (a read waits for the GPU)
CUDA_SYNC_EVERY = 50


class Callback:
    """Hooks into the loop; override what you need (the base class does nothing).

    `on_loss` may return a different loss tensor (e.g. to inject a fault in a test);
    `on_step_end` may raise (e.g. to simulate a crash) or call `trainer.request_stop()`.
    """

    def on_loss(self, trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer) -> None:
        pass


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.value = epoch, step, value


class Trainer:
    """Trains `model` on `x_train` as `config` (the `[train]` section) says.

    `sync_every`: steps between host reads of the loss (default: every step on CPU, where a read
    is free; `CUDA_SYNC_EVERY` on CUDA). A non-finite loss is caught at the next read.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        x_train: torch.Tensor,
        x_val: torch.Tensor | None = None,
        dynamic_binarize: bool = False,
        device: torch.device | str = "cpu",
        callbacks: Sequence[Callback] = (),
        progress: bool | None = None,
        sync_every: int | None = None,
        y_train: torch.Tensor | None = None,
        y_val: torch.Tensor | None = None,
    ) -> None:
        self.config, self.device = config, torch.device(device)
        self.model = model.to(self.device)
        self.x_train = x_train.to(self.device)
        self.x_val = x_val.to(self.device) if x_val is not None else self.x_train[:0]
        self.n, self.dynamic = self.x_train.shape[0], dynamic_binarize
        self.callbacks, self.progress = list(callbacks), progress
        self.sync_every = sync_every or (1 if self.device.type == "cpu" else CUDA_SYNC_EVERY)
        self.is_vae = hasattr(model, "guide")
        #: the training labels (-1: unlabelled), batched with `x` for models with `uses_labels`
        labels = getattr(model, "uses_labels", False) and y_train is not None
        self.y_train = y_train.to(self.device) if labels else None
        #: validation labels, for a model whose ELBO is conditional on them (a label CVAE)
        cond = getattr(model, "conditions_on_labels", False) and y_val is not None
        self.y_val = y_val.to(self.device) if cond else None
        self.loss_fn = make_loss(model, config.objective, config.num_particles)
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.Adam(model.parameters(), lr=config.lr, **fused)
        self.gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self.epoch, self.step_in_epoch, self.perm = 0, 0, None
        self.lr, self.retries, self.beta = config.lr, 0, config.beta
        self.history: list[dict[str, Any]] = []
        self.stop_requested: int | None = None

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: parameters, optimizer moments, position, RNG states."""
        return {
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; `ValueError` naming the entry that does not fit."""
        n_batches = math.ceil(self.n / self.config.batch_size)
        perm, step = state["perm"], state["step_in_epoch"]
        if perm is not None and (
            perm.dtype != torch.int64
            or perm.numel() != self.n
            or not torch.equal(perm.sort().values, torch.arange(self.n))
        ):
            raise ValueError(
                f"entry 'perm': expected a permutation of the {self.n} training points, got "
                f"{perm.numel()} {perm.dtype} values (did the data change since the checkpoint?)"
            )
        if step > n_batches or (perm is None and step != 0):
            raise ValueError(
                f"entry 'step_in_epoch': expected 0..{n_batches} (with an epoch order), got {step}"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"])
            self.gen.set_state(state["batch_rng"].to(self.gen.get_state().device))
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:2]
            raise ValueError(
                "the stored parameters, optimizer or RNG state do not fit the model the stored "
                f"config describes: {' '.join(lines)[:300]}"
            ) from None
        self.epoch, self.step_in_epoch = state["epoch"], step
        self.perm = perm.to(self.device) if perm is not None else None
        self.lr, self.retries, self.history = state["lr"], state["retries"], list(state["history"])

    def _snapshot(self) -> dict[str, Any]:
        return copy.deepcopy({**self.state_dict(), "perm": self.perm, "history": None})

    def _rollback(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.opt.load_state_dict(snap["optimizer"])
        torch.set_rng_state(snap["torch_rng"])
        self.gen.set_state(snap["batch_rng"].to(self.gen.get_state().device))
        self.perm, self.step_in_epoch = snap["perm"], snap["step_in_epoch"]

    # -- schedule --------------------------------------------------------------------------
    def scheduled_lr(self) -> float:
        """$\\max(l_{min}, l \\cdot d^e)$ for epoch $e$, times `lr_backoff` per retry so far."""
        t = self.config
        return max(t.lr_min, t.lr * t.lr_decay**self.epoch) * t.lr_backoff**self.retries

    def _set_lr(self, lr: float) -> None:
        self.lr = lr
        for g in self.opt.param_groups:
            g["lr"] = lr

    # -- one step --------------------------------------------------------------------------
    def batch(self, s: int) -> torch.Tensor:
        """Minibatch `s` of the current epoch order (binarized afresh when dynamic)."""
        b = self.config.batch_size
        x = self.x_train.index_select(0, self.perm[s * b : (s + 1) * b])
        return bernoulli(x, self.gen) if self.dynamic else x

    def batch_labels(self, s: int) -> torch.Tensor | None:
        """The labels of minibatch `s` (None unless the model uses labels)."""
        if self.y_train is None:
            return None
        b = self.config.batch_size
        return self.y_train.index_select(0, self.perm[s * b : (s + 1) * b])

    def step(
        self, x: torch.Tensor, check: bool = True, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One optimizer step on `x` (labels `y` for a model with `uses_labels`); returns the
        detached loss per datapoint. With `check` a non-finite loss (read on the host) skips
        the update."""
        self.opt.zero_grad(set_to_none=True)
        labels = {} if y is None else {"y": y}
        loss = self.loss_fn(x, self.n, self.beta, self.gen, **labels)
        for cb in self.callbacks:
            loss = cb.on_loss(self, loss)
        if loss.requires_grad:
            loss.backward()
        loss = loss.detach()
        if not check or math.isfinite(loss.item()):
            self.opt.step()
        return loss

    def _run_epoch(self) -> tuple[float, bool]:
        """Steps `step_in_epoch ..` of the epoch. Returns (mean loss, finished)."""
        t, sync = self.config, self.sync_every
        n_batches = math.ceil(self.n / t.batch_size)
        if self.perm is None:
            self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
        first, total, count, pending, n_pending = self.step_in_epoch, 0.0, 0, None, 0
        bar = tqdm(
            range(first, n_batches),
            desc=f"epoch {self.epoch + 1}/{t.epochs}",
            leave=False,
            disable=None if self.progress is None else not self.progress,
        )
        for s in bar:
            self.beta = kl_scale(t.beta, t.kl_warmup_epochs, self.epoch + s / n_batches)
            skip = s > first and not t.validate_every_step  # Pyro checks each epoch's first step
            with pyro.validation_enabled(False) if skip else contextlib.nullcontext():
                loss = self.step(self.batch(s), check=sync == 1, y=self.batch_labels(s))
            pending = loss if pending is None else pending + loss
            n_pending, self.step_in_epoch = n_pending + 1, s + 1
            for cb in self.callbacks:
                cb.on_step_end(self, loss)
            stopping = self.stop_requested is not None
            if n_pending >= sync or s == n_batches - 1 or stopping:
                value = pending.item()
                if not math.isfinite(value):
                    raise NonFiniteLoss(self.epoch, s, value)
                mean = value / n_pending
                total, count, pending, n_pending = total + value, count + n_pending, None, 0
                if bar.disable is False:  # redrawn at tqdm's own pace, not per step
                    post = {"elbo": f"{-mean:.2f}"} if self.is_vae else {"loss": f"{mean:.2f}"}
                    bar.set_postfix(post, refresh=False)
            if stopping:
                return total / max(count, 1), False
        return total / max(count, 1), True

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation ELBO (VAE; one sample, β = 1) or loss (AE) per datapoint; `None`
        without a validation split."""
        if len(self.x_val) == 0:
            return None
        from pyrovae.evaluate import elbo, evaluation_mode

        with evaluation_mode(self.model):
            if self.is_vae:
                m = self.model
                return float(elbo(m.model, m.guide, self.x_val, batch_size=1024, y=self.y_val).mean())
            losses = [float(self.model.loss(xb)) * len(xb) for xb in self.x_val.split(1024)]
            return sum(losses) / len(self.x_val)

    # -- epochs ----------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step (what SIGINT/SIGTERM do while `train` runs)."""
        self.stop_requested = signum

    def train(self) -> bool:
        """Run the remaining epochs. Returns False if stopped early (signal or `request_stop`)."""
        with self._signals():
            while self.epoch < self.config.epochs:
                self._set_lr(self.scheduled_lr())
                snap, start = self._snapshot(), time.perf_counter()
                try:
                    loss, finished = self._run_epoch()
                    val = self.validate() if finished else None
                    if val is not None and not math.isfinite(val):
                        raise NonFiniteLoss(self.epoch, -1, val)
                except NonFiniteLoss as e:
                    self._recover(e, snap)
                    continue
                if not finished:
                    if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                        self._rollback(snap)  # the last update went bad: keep the epoch start
                    return False
                row = {"epoch": self.epoch + 1, "epoch_seconds": time.perf_counter() - start}
                row["lr"] = self.lr
                if self.is_vae:
                    row.update(train_elbo=-loss, val_elbo=val, kl_scale=self.beta)
                else:
                    row.update(train_loss=loss, val_loss=val)
                self.history.append(row)
                self._log(row)
                self.epoch, self.step_in_epoch, self.perm = self.epoch + 1, 0, None
                for cb in self.callbacks:
                    cb.on_epoch_end(self)
                if self.stop_requested is not None:
                    return False
        return True

    def _log(self, row: dict[str, Any]) -> None:
        """One `logging` line per epoch (logger `"pyrovae"`, INFO)."""
        if not log.isEnabledFor(20):
            return
        name = "ELBO" if self.is_vae else "loss"
        train = row["train_elbo"] if self.is_vae else row["train_loss"]
        val = row["val_elbo"] if self.is_vae else row["val_loss"]
        log.info(
            "epoch %d/%d: train %s %.3f, val %s %s, %.2f s, lr %.3g%s",
            row["epoch"], self.config.epochs, name, train, name,
            "-" if val is None else f"{val:.3f}", row["epoch_seconds"], row["lr"],
            f", beta {row['kl_scale']:.3g}" if self.is_vae else "",
        )

    def _recover(self, e: NonFiniteLoss, snap: dict[str, Any]) -> None:
        """Roll back to the epoch's start and lower the learning rate, or give up."""
        self.retries += 1
        where = f"epoch {e.epoch + 1}" + (f", step {e.step + 1}" if e.step >= 0 else " (validation)")
        if self.retries > self.config.max_retries:
            raise TrainingError(
                f"the loss became non-finite ({e.value}) at {where} and stayed so after "
                f"{self.config.max_retries} retries (learning rate lowered to {self.lr:.3g}). "
                "Try a smaller train.lr, a different likelihood scale, or check the data."
            )
        self._rollback(snap)
        self._set_lr(self.lr * self.config.lr_backoff)
        log.warning(
            "non-finite loss at %s; restored the last good state, retrying with lr=%.3g (%d/%d)",
            where, self.lr, self.retries, self.config.max_retries,
        )

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM set `stop_requested` (a second one stops at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.stop_requested is not None:
                signal.signal(signum, old[signum])
                raise KeyboardInterrupt
            self.request_stop(signum)

        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
