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

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from pyrovae.config import TrainConfig
from pyrovae.data import bernoulli
from pyrovae.distributed import World, epoch_indices, steps_per_epoch
from pyrovae.errors import ConfigError, TrainingError
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


def _builtin(model: torch.nn.Module) -> bool:
    from pyrovae.autoencoder import AutoEncoder
    from pyrovae.model import VAE

    return isinstance(model, VAE | AutoEncoder)


class LabelledBatches:
    r"""Minibatches of $k$ labelled and $B - k$ unlabelled points (`train.labelled_per_batch`).

    With $N_l$ labelled and $N_u$ unlabelled training points ($N_l \ll N_u$: 100 of 50,000 for
    semi-supervised MNIST) a plain random minibatch of $B = 200$ holds $B N_l / N \approx 0.4$
    labelled points, so the classifier term sees a label in few steps. Here every minibatch
    $s$ of an epoch holds

    * the unlabelled points at positions $s(B-k), \dots$ of the epoch order (the unlabelled
      points of the trainer's checkpointed permutation, in its order): one epoch is one pass
      over them, $\lceil N_u / (B-k) \rceil$ steps, the last with $B_u(s) \le B - k$;
    * the labelled points at positions $sk, \dots, sk + k - 1$ of a cyclic stream: cycle $c$
      of epoch $e$ is a permutation of the labelled points drawn from a generator seeded by
      `(train.seed, e, c)` (so a resume redraws the same stream).

    Each group is scaled to its size: a labelled point by $N_l/k$, an unlabelled one by
    $N_u/B_u(s)$. Every position of either stream is marginally uniform over its group, so the
    minibatch estimate is unbiased for the full-data objective,

    $$
    E_s\Big[\frac{N_l}{k}\sum_{b \in \text{lab}(s)} \ell_b + \frac{N_u}{B_u(s)}
    \sum_{b \in \text{unl}(s)} \ell_b\Big] = \sum_{n \le N_l} \ell_n + \sum_{n \le N_u} \ell_n ,
    $$

    as the plain schedule's $\frac{N}{B}\sum_b \ell_b$ is; only its variance changes. The
    weights reach the model as `poutine.scale(scale=w_b B / N)` around the loss: the model's
    data plate already scales every site by $N/B$, and every site of a semi-supervised model is
    per-datapoint (in that plate).
    """

    def __init__(self, y_train: torch.Tensor, batch_size: int, k: int, seed: int) -> None:
        labelled = y_train >= 0
        self.is_labelled, self.labelled = labelled, labelled.nonzero().flatten()
        self.n_l, self.n = int(labelled.sum()), int(y_train.numel())
        self.n_u, self.k, self.b_u, self.seed = self.n - self.n_l, k, batch_size - k, seed
        if self.n_l == 0 or self.n_u == 0:
            raise ConfigError(
                f"train.labelled_per_batch = {k}: expected training labels with both labelled and "
                f"unlabelled (-1) points; got {self.n_l} labelled of {self.n} (set data.labels)"
            )

    def steps(self) -> int:
        """Steps per epoch: $\\lceil N_u / (B - k) \\rceil$."""
        return math.ceil(self.n_u / self.b_u)

    def _cycle(self, epoch: int, c: int) -> torch.Tensor:
        key = np.random.SeedSequence([self.seed, epoch, c, 0x1AB]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
        return self.labelled[torch.randperm(self.n_l, generator=gen).to(self.labelled.device)]

    def indices(self, perm: torch.Tensor, epoch: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(idx, scale)` of minibatch `s`: its training indices (labelled first) and the
        per-point factor $w_b B_s / N$ that turns the model's $N/B_s$ into $w_b$."""
        unl = perm[~self.is_labelled[perm]][s * self.b_u : (s + 1) * self.b_u]
        pos = torch.arange(s * self.k, (s + 1) * self.k)
        first, last = int(pos[0]) // self.n_l, int(pos[-1]) // self.n_l
        stream = torch.cat([self._cycle(epoch, c) for c in range(first, last + 1)])
        lab = stream[(pos - first * self.n_l).to(stream.device)]
        idx = torch.cat([lab, unl])
        w_l = torch.full((self.k,), self.n_l / self.k)
        w = torch.cat([w_l, torch.full((len(unl),), self.n_u / max(len(unl), 1))])
        return idx, (w * len(idx) / self.n).to(perm.device)


class SeparateLabelledBatches:
    r"""Labelled and unlabelled points in minibatches of their own (`train.labelled_batches`),
    the schedule of Pyro's SS-VAE example.

    An epoch is $S = \lceil N_u/B \rceil + \lceil N_l/B \rceil$ steps: the unlabelled points
    in the trainer's checkpointed epoch order, $B$ at a time, and the labelled points (a
    permutation seeded by `(train.seed, e)`) in $\lceil N_l/B \rceil$ minibatches of their
    own at steps $1 + \lfloor jS/\lceil N_l/B \rceil \rfloor$, $j = 0, 1, \dots$ (with 100
    labels and $B = 200$: step 2 of 251, where the example puts its one labelled batch). A
    labelled minibatch's loss is $-\sum_b [\mathcal L(x_b, y_b) + \alpha \log q(y_b \mid x_b)]$
    alone, so the classifier term takes its own optimizer step, not summed with the unlabelled
    term's gradient.

    Every point is weighted $S$: each is seen once per epoch, so the mean of an epoch's $S$
    step losses is the full-data objective $\sum_n \ell_n$ (each single step is not an
    unbiased estimate of it, as a mixed minibatch is; the epoch is). The weights reach the
    model as `poutine.scale(scale=S B_s / N)` on top of its data plate's $N/B_s$.
    """

    def __init__(self, y_train: torch.Tensor, batch_size: int, seed: int) -> None:
        labelled = y_train >= 0
        self.is_labelled, self.labelled = labelled, labelled.nonzero().flatten()
        self.n_l, self.n = int(labelled.sum()), int(y_train.numel())
        self.n_u, self.b, self.seed = self.n - self.n_l, batch_size, seed
        if self.n_l == 0 or self.n_u == 0:
            raise ConfigError(
                "train.labelled_batches = true: expected training labels with both labelled and "
                f"unlabelled (-1) points; got {self.n_l} labelled of {self.n} (set data.labels)"
            )
        self.s_u, self.s_l = math.ceil(self.n_u / batch_size), math.ceil(self.n_l / batch_size)
        total = self.s_u + self.s_l
        #: the steps of an epoch that take a labelled minibatch
        self.positions = [1 + (j * total) // self.s_l for j in range(self.s_l)]

    def steps(self) -> int:
        """Steps per epoch: $\\lceil N_u/B \\rceil + \\lceil N_l/B \\rceil$."""
        return self.s_u + self.s_l

    def indices(self, perm: torch.Tensor, epoch: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(idx, scale)` of minibatch `s`: its training indices (all labelled or all
        unlabelled) and the per-point factor $S B_s / N$."""
        if s in self.positions:
            j = self.positions.index(s)
            key = np.random.SeedSequence([self.seed, epoch, 0x5E9]).generate_state(2, np.uint32)
            gen = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
            order = self.labelled[torch.randperm(self.n_l, generator=gen).to(self.labelled.device)]
            idx = order[j * self.b : (j + 1) * self.b]
        else:
            u = s - sum(p < s for p in self.positions)
            idx = perm[~self.is_labelled[perm]][u * self.b : (u + 1) * self.b]
        scale = torch.full((len(idx),), self.steps() * len(idx) / self.n)
        return idx, scale.to(perm.device)


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.value = epoch, step, value


class Trainer:
    """Trains `model` on `x_train` as `config` (the `[train]` section) says.

    `sync_every`: steps between host reads of the loss (default: every step on CPU, where a read
    is free; `CUDA_SYNC_EVERY` on CUDA). A non-finite loss is caught at the next read.

    `world` (`pyrovae.distributed.init`): train data-parallel, this process being one rank of
    it: the loss runs under `DistributedDataParallel`, `config.batch_size` is the global batch
    and each rank takes its share of it (`pyrovae.distributed.epoch_indices`), every step's noise
    is seeded per rank, and losses and stop requests agree over the ranks (module docs there).
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
        world: World | None = None,
        x_train_scale: torch.Tensor | None = None,
    ) -> None:
        self.config, self.device = config, torch.device(device)
        self.model = model.to(self.device)
        self.x_train = x_train.to(self.device)
        self.x_val = x_val.to(self.device) if x_val is not None else self.x_train[:0]
        self.n, self.dynamic = self.x_train.shape[0], dynamic_binarize
        #: codes drawn afresh per minibatch (`data.codes = "sample"`): x_train + scale * eps
        self.x_train_scale = None
        if x_train_scale is not None:
            if x_train_scale.shape != self.x_train.shape:
                raise ConfigError(
                    f"x_train_scale: expected the shape of x_train, {tuple(self.x_train.shape)}; "
                    f"got {tuple(x_train_scale.shape)}"
                )
            if dynamic_binarize:
                raise ConfigError("x_train_scale: codes cannot also be binarized (dynamic_binarize)")
            self.x_train_scale = x_train_scale.to(self.device)
        self.callbacks, self.progress = list(callbacks), progress
        self.sync_every = sync_every or (1 if self.device.type == "cpu" else CUDA_SYNC_EVERY)
        self.is_vae = hasattr(model, "guide")
        #: the training labels (-1: unlabelled), batched with `x` for models with `uses_labels`
        labels = getattr(model, "uses_labels", False) and y_train is not None
        self.y_train = y_train.to(self.device) if labels else None
        #: validation labels, for a model whose ELBO is conditional on them (a label CVAE)
        cond = getattr(model, "conditions_on_labels", False) and y_val is not None
        self.y_val = y_val.to(self.device) if cond else None
        #: `train.labelled_per_batch`: minibatches of k labelled + B - k unlabelled points
        self.schedule = None
        if config.labelled_per_batch:
            if self.y_train is None or not getattr(model, "partial_labels", False):
                raise ConfigError(
                    f"train.labelled_per_batch = {config.labelled_per_batch}: expected a "
                    "semi-supervised model (partial_labels) trained with labels y_train"
                )
            if world is not None and world.size > 1:
                raise ConfigError(
                    f"train.labelled_per_batch = {config.labelled_per_batch}: expected one "
                    f"process; got {world.size} (set it to 0 to train data-parallel)"
                )
            self.schedule = LabelledBatches(
                self.y_train, config.batch_size, config.labelled_per_batch, config.seed
            )
        if config.labelled_batches:
            if self.y_train is None or not getattr(model, "partial_labels", False):
                raise ConfigError(
                    "train.labelled_batches = true: expected a semi-supervised model "
                    "(partial_labels) trained with labels y_train"
                )
            if world is not None and world.size > 1:
                raise ConfigError(
                    f"train.labelled_batches = true: expected one process; got {world.size} "
                    "(set it to false to train data-parallel)"
                )
            self.schedule = SeparateLabelledBatches(self.y_train, config.batch_size, config.seed)
        self.loss_fn = make_loss(model, config.objective, config.num_particles)
        self.world, self.rank, self.world_size = world, 0, 1
        if world is not None:  # the loss under DDP's gradient averaging (one module per rank)
            # a parameter can go unused only where beta may be 0 (a masked learned prior) or in
            # a plugin program; elsewhere DDP is spared the search for unused parameters
            unused = config.beta == 0 or config.kl_warmup_epochs > 0 or not _builtin(model)
            self.loss_fn = world.wrap(model, self.loss_fn, find_unused=unused)
            self.rank, self.world_size = world.rank, world.size
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        #: `train.cuda_graph`: the step recorded once and replayed (`pyrovae.cuda_graph`)
        self.graph = None
        if config.cuda_graph:
            from pyrovae.cuda_graph import GraphedStep, check_config

            check_config(config, self.device, world)
            fused["capturable"] = True
            self.graph = GraphedStep(self)
        self.opt = torch.optim.Adam(model.parameters(), lr=config.lr, **fused)
        self.gen = torch.Generator(device=self.device).manual_seed(config.seed)
        #: per-step noise (binarization, an AE's corruption): `gen` itself in one process
        self.noise_gen = self.gen if world is None else torch.Generator(device=self.device)
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
        n_batches = self.steps_per_epoch()
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
        if self.graph is not None:  # new optimizer state tensors: record the step again
            self.graph.invalidate()
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
        if self.graph is not None:
            self.graph.invalidate()

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
    def steps_per_epoch(self) -> int:
        """Global steps per epoch: $\\lceil N/B \\rceil$ in one process (see
        `pyrovae.distributed.steps_per_epoch` for several); with `train.labelled_per_batch`
        one pass over the unlabelled points (`LabelledBatches.steps`)."""
        if self.schedule is not None:
            return self.schedule.steps()
        return steps_per_epoch(self.n, self.config.batch_size, self.world_size)

    def batch(self, s: int) -> torch.Tensor:
        """This rank's share of minibatch `s` of the current epoch order (binarized afresh when
        dynamic; codes drawn afresh, `x + x_train_scale * eps`, with `x_train_scale`); the
        whole minibatch in one process."""
        idx = self.batch_indices(s)
        x = self.x_train.index_select(0, idx)
        if self.x_train_scale is not None:
            eps = torch.randn(x.shape, generator=self.noise_gen, device=self.noise_gen.device)
            return x + self.x_train_scale.index_select(0, idx) * eps.to(x.device, x.dtype)
        return bernoulli(x, self.noise_gen) if self.dynamic else x

    def batch_labels(self, s: int) -> torch.Tensor | None:
        """This rank's labels of minibatch `s` (None unless the model uses labels)."""
        if self.y_train is None:
            return None
        return self.y_train.index_select(0, self.batch_indices(s))

    def batch_indices(self, s: int) -> torch.Tensor:
        """Training indices of this rank's share of minibatch `s` of the current epoch order
        (labelled points first under `train.labelled_per_batch`)."""
        if self.schedule is not None:
            return self.schedule.indices(self.perm, self.epoch, s)[0]
        return epoch_indices(self.perm, s, self.config.batch_size, self.rank, self.world_size)

    def batch_scale(self, s: int) -> torch.Tensor | None:
        """Per-point loss factors of minibatch `s` under `train.labelled_per_batch`
        (`LabelledBatches.indices`) or `train.labelled_batches`; None for plain minibatches."""
        if self.schedule is None:
            return None
        return self.schedule.indices(self.perm, self.epoch, s)[1]

    def step(
        self,
        x: torch.Tensor,
        check: bool = True,
        y: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One optimizer step on `x` (labels `y` for a model with `uses_labels`; per-point
        factors `scale` on every site, `batch_scale`); returns the detached loss per datapoint.
        With `check` a non-finite loss (read on the host) skips the update."""
        if self.graph is not None and y is None:  # replayed, unless validated / warming up β / a short batch
            eager = is_validation_enabled() or self.beta != self.config.beta
            loss = self.graph(x, eager)
            if loss is not None:
                return loss
        self.opt.zero_grad(set_to_none=True)
        labels = {} if y is None else {"y": y}
        with poutine.scale(scale=scale) if scale is not None else contextlib.nullcontext():
            loss = self.loss_fn(x, self.n, self.beta, self.noise_gen, **labels)
        for cb in self.callbacks:
            loss = cb.on_loss(self, loss)
        if loss.requires_grad:
            loss.backward()
        loss = loss.detach() if self.world is None else self.world.mean(loss)
        if not check or math.isfinite(loss.item()):
            self.opt.step()
        return loss

    def _run_epoch(self) -> tuple[float, bool]:
        """Steps `step_in_epoch ..` of the epoch. Returns (mean loss, finished)."""
        t, sync = self.config, self.sync_every
        n_batches = self.steps_per_epoch()
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
            if self.world is not None:  # this rank's noise for this step, whatever came before
                self.world.seed_step(t.seed, self.epoch, s, self.noise_gen)
            with pyro.validation_enabled(False) if skip else contextlib.nullcontext():
                x, y, scale = self.batch(s), self.batch_labels(s), self.batch_scale(s)
                loss = self.step(x, check=sync == 1, y=y, scale=scale)
            pending = loss if pending is None else pending + loss
            n_pending, self.step_in_epoch = n_pending + 1, s + 1
            for cb in self.callbacks:
                cb.on_step_end(self, loss)
            stopping = self.stop_requested is not None
            if self.world is not None and self.world.any(stopping):  # every rank stops here
                stopping, self.stop_requested = True, self.stop_requested or signal.SIGTERM
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
        from pyrovae.distributed import per_point
        from pyrovae.evaluate import elbo, evaluation_mode

        with evaluation_mode(self.model):
            if self.is_vae:
                m = self.model
                y_val = self.y_val

                def fn(i: torch.Tensor) -> torch.Tensor:
                    y = None if y_val is None else y_val[i]
                    return elbo(m.model, m.guide, self.x_val[i], batch_size=1024, y=y)

                # sharded over the ranks
                return float(per_point(fn, torch.arange(len(self.x_val))).mean())
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
                stop = self.stop_requested is not None
                if self.world is not None and self.world.any(stop):  # a signal since the last step
                    stop, self.stop_requested = True, self.stop_requested or signal.SIGTERM
                if stop:
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
            # several processes: the launcher forwards a Ctrl-C the ranks got already, and a
            # rank that stopped at once would leave the others waiting: always stop cleanly
            if self.stop_requested is not None and self.world is None:
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
