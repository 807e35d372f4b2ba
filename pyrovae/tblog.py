r"""TensorBoard logs of a run (`RUN/tb/`), written by a `pyrovae.train.Callback`.

`TensorBoardLogger` writes with `torch.utils.tensorboard.SummaryWriter`; every event's step is
the optimizer step $t = e \cdot B + s$ (epoch $e$, $B$ minibatches per epoch, step $s$), so
step and epoch curves share one axis. Tags:

| tag | when | value |
|---|---|---|
| `step/elbo` (VAE) / `step/loss` (AE) | every `train.log_every` steps | minus the training loss of that minibatch, nats per datapoint ($\beta$-ELBO while $\beta \ne 1$) |
| `step/lr`, `step/beta` | every `train.log_every` steps | learning rate, KL weight $\beta$ |
| `epoch/train_elbo`, `epoch/val_elbo` (AE: `epoch/train_loss`, `epoch/val_loss`), `epoch/lr`, `epoch/beta`, `epoch/seconds`, `epoch/epoch` | every epoch | the row `metrics.json`'s `history` gets |
| `elbo/elbo`, `elbo/reconstruction`, `elbo/kl` | epoch ends, within the time budget (VAE) | $\mathrm{ELBO} = E_q[\log p(x\mid z)] - \mathrm{KL}(q(z\mid x)\,\|\,p(z))$ on the first `parts_points` validation points (training points without a validation split), one draw of $z$, $\beta = 1$ |
| `kl_per_dim/NN` | with the ELBO parts, where q and p have per-dimension marginals | $\mathrm{KL}(q(z_u\mid x)\,\|\,p(z_u))$ |
| `elbo/active_units`, `elbo/mutual_information` | with the ELBO parts (VAE) | see `pyrovae.diagnostics.elbo_decomposition` |
| `metrics/NAME` (`metrics/NAME/KEY` for a table) | with the ELBO parts, structured models (`pyrovae.structured`) | the model's own `metrics(x, y)` on the same points and their labels: `kl_z1`, `kl_z2`, `reconstruction` (hvae: the ELBO per layer), `cluster_accuracy` (gmvae), `test_accuracy` (m2: of the labelled ones among them), `conditional_nll/G` (cvae) |
| images `reconstructions`, `samples` | with the ELBO parts, image data | $E[x\mid z]$ at $z$ = the mean of $q(z\mid x)$, and at $z \sim p(z)$ (AE: decodes of $N(0, I)$ draws) |

**Time budget.** The ELBO parts and the images (a few forward passes on `parts_points`
points, PNG encoding) are computed at the first and the last epoch, and at any epoch end
where their total cost so far stays within `budget` (default 1 %) of the training time so far
(the `epoch_seconds` of the history). On MNIST-sized epochs that is every epoch; on tiny ones (the 8×8 digits: 11 steps,
0.14 s per epoch on 2 cores, about 30 ms for the parts and images) it is every few epochs, so
logging stays within its 2 % target whatever the epoch length
(`benchmarks/tensorboard_overhead.py`). Which epochs get them thus depends on timing; the
scalars of the other tags do not.

The ELBO parts come from the model's own Pyro traces (`elbo_decomposition`: one vectorized
run of `guide` and `model` under `poutine.trace`/`replay`), not from a second loss. All of it
runs under `pyro.util` RNG isolation (state saved and restored), so a run trains to the same
parameters with logging on or off. `train.log = false` turns logging off.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyro
import torch

from pyrovae.progress import log
from pyrovae.train import Callback, Trainer

#: datapoints the per-epoch ELBO parts and the reconstructions are computed on
PARTS_POINTS = 256
IMAGES = 16
TB = "tb"
#: the event writer's background thread writes pending events at least this often; the logger
#: also flushes after the ELBO parts and images, and on `close()` (a flush waits for the
#: thread, which on a busy machine costs milliseconds: not done after every epoch)
FLUSH_SECONDS = 30


class TensorBoardLogger(Callback):
    """Writes `folder/tb/` (see the module docstring). Call `close()` when training ends.

    `purge_step`: on resume, events at or after this optimizer step in earlier event files
    are hidden by TensorBoard (a killed run logged them; the resumed one logs them again).
    """

    def __init__(
        self,
        folder: str | Path,
        data_shape: tuple[int, ...],
        x_parts: torch.Tensor,
        log_every: int = 50,
        y_parts: torch.Tensor | None = None,
        parts_points: int = PARTS_POINTS,
        images: bool = True,
        budget: float = 0.01,
    ) -> None:
        self.dir = Path(folder) / TB
        self.data_shape, self.log_every = tuple(data_shape), log_every
        self.x_parts = x_parts[:parts_points]
        self.y_parts = None if y_parts is None else y_parts[:parts_points]
        self.images = images and len(self.data_shape) == 3 and self.data_shape[0] in (1, 3)
        self.writer = None
        self.budget, self.heavy_seconds, self.heavy_count = budget, 0.0, 0
        #: step scalars logged before the writer exists (it is created at the first epoch end,
        #: after the run's first checkpoint, so importing and starting it never delays that)
        self.pending: list[tuple[str, float, int]] = []
        self.first_step: int | None = None

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def global_step(trainer: Trainer) -> int:
        n_batches = math.ceil(trainer.n / trainer.config.batch_size)
        return trainer.epoch * n_batches + trainer.step_in_epoch

    def _writer(self, trainer: Trainer):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            step = self.first_step if self.first_step is not None else self.global_step(trainer)
            self.writer = SummaryWriter(
                str(self.dir), purge_step=step if step > 0 else None, flush_secs=FLUSH_SECONDS
            )
        return self.writer

    # -- hooks -----------------------------------------------------------------------------
    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        step = self.global_step(trainer)
        if self.first_step is None:
            self.first_step = step  # events of an earlier process from here on are purged
        if step % self.log_every:
            return
        value = float(loss)  # a host read: only every log_every steps
        rows = [
            ("step/elbo", -value) if trainer.is_vae else ("step/loss", value),
            ("step/lr", trainer.lr),
            ("step/beta", trainer.beta),
        ]
        if self.writer is None:  # the writer starts after the first checkpoint: keep them
            self.pending += [(tag, v, step) for tag, v in rows]
            return
        for tag, v in rows:
            self.writer.add_scalar(tag, v, step)

    def on_epoch_end(self, trainer: Trainer) -> None:
        w = self._writer(trainer)
        for tag, v, st in self.pending:
            w.add_scalar(tag, v, st)
        self.pending = []
        step, row = self.global_step(trainer), trainer.history[-1]
        for key in ("train_elbo", "val_elbo", "train_loss", "val_loss", "lr", "epoch_seconds"):
            if row.get(key) is not None:
                w.add_scalar(f"epoch/{key.replace('epoch_', '')}", row[key], step)
        if "kl_scale" in row:
            w.add_scalar("epoch/beta", row["kl_scale"], step)
        w.add_scalar("epoch/epoch", row["epoch"], step)
        now = time.perf_counter()
        trained = sum(h.get("epoch_seconds", 0.0) for h in trainer.history)  # this run's epochs
        last = trainer.epoch >= trainer.config.epochs
        if self.heavy_count and not last and self.heavy_seconds > self.budget * trained:
            return  # the writer's thread flushes every FLUSH_SECONDS, and on close
        self._heavy(w, trainer, step)
        self.heavy_seconds += time.perf_counter() - now
        self.heavy_count += 1
        w.flush()

    def _heavy(self, w, trainer: Trainer, step: int) -> None:
        """The ELBO parts, KL per dimension and images (RNG streams saved and restored)."""
        from pyrovae.evaluate import evaluation_mode

        dev = trainer.device
        rng = pyro.util.get_rng_state()  # torch CPU, Python and NumPy streams
        try:
            with (
                torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
                torch.no_grad(),
                evaluation_mode(trainer.model),
            ):
                x = self.x_parts.to(dev)
                if trainer.is_vae:
                    self._elbo_parts(w, trainer.model, x, step)
                if callable(getattr(trainer.model, "metrics", None)):
                    self._metrics(w, trainer.model, x, step)
                if self.images and len(x):
                    self._images(w, trainer.model, x[:IMAGES], step)
        finally:
            pyro.util.set_rng_state(rng)

    def _elbo_parts(self, w, vae, x: torch.Tensor, step: int) -> None:
        from pyrovae.diagnostics import elbo_decomposition

        try:
            d = elbo_decomposition(vae.model, vae.guide, x, num_particles=1, max_mi_points=len(x))
        except Exception as e:  # noqa: BLE001 - a plugin model may not fit the decomposition
            # a structured model (several latent sites, an enumerated one) logs its own
            # per-layer terms instead: `_metrics`
            if not getattr(self, "_warned", False) and not callable(getattr(vae, "metrics", None)):
                log.warning("TensorBoard: no ELBO parts for this model (%s)", str(e)[:200])
                self._warned = True
            return
        w.add_scalar("elbo/elbo", float(d.elbo.mean()), step)
        w.add_scalar("elbo/reconstruction", float(d.reconstruction.mean()), step)
        w.add_scalar("elbo/kl", float(d.kl.mean()), step)
        w.add_scalar("elbo/active_units", d.active_units, step)
        w.add_scalar("elbo/mutual_information", d.mutual_information, step)
        if d.kl_per_dim is not None:
            width = len(str(d.latent_dim - 1))
            for u, v in enumerate(d.kl_per_dim.mean(0).tolist()):
                w.add_scalar(f"kl_per_dim/{u:0{width}d}", v, step)

    def _metrics(self, w, model, x: torch.Tensor, step: int) -> None:
        """A structured model's `metrics(x, y)` as `metrics/...` scalars. Points whose label is
        unknown (-1, `[data] labels`) are left out when some are labelled."""
        y = None if self.y_parts is None else self.y_parts.to(x.device)
        if y is not None and bool((y < 0).any()):
            known = y >= 0
            x, y = (x[known], y[known]) if bool(known.any()) else (x, None)
        for tag, v in _flat(model.metrics(x, y), "metrics"):
            w.add_scalar(tag, v, step)

    def _images(self, w, model, x: torch.Tensor, step: int) -> None:
        shape = self.data_shape
        if hasattr(model, "reconstruct"):
            rec = model.reconstruct(x).reshape(-1, *shape)
            w.add_images("reconstructions", _pair(x.reshape(-1, *shape), rec), step)
        if hasattr(model, "guide") and callable(getattr(model, "sample", None)):
            try:
                s = model.sample(IMAGES)
            except ValueError:  # a structured model that draws only given a condition
                s = None
            if s is not None:
                w.add_images("samples", _unit(s.reshape(-1, *shape)), step)
        elif hasattr(model, "decode_prior_draws"):
            w.add_images("samples", _unit(model.decode_prior_draws(IMAGES).reshape(-1, *shape)), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def parts_data(data, seed: int = 0, n: int = PARTS_POINTS) -> torch.Tensor:
    """The points the ELBO parts and reconstructions are computed on: the first `n` of the
    validation split, or of the training split when there is none (binarized once, with a
    generator seeded by `seed`, when the run binarizes dynamically: the likelihood's support)."""
    from pyrovae.data import bernoulli

    if len(data.x_val):
        return data.x_val[:n]
    x = data.x_train[:n]
    if data.binarize == "dynamic":
        x = bernoulli(x, torch.Generator(device=x.device).manual_seed(seed))
    return x


def parts_labels(data, n: int = PARTS_POINTS) -> torch.Tensor | None:
    """The labels of the `parts_data` points (None without labels)."""
    y = data.y_val if len(data.x_val) else data.y_train
    return None if y is None else y[:n]


def _flat(metrics: dict, prefix: str):
    """(tag, value) for the numbers of a (nested) metrics dict; notes and other text skipped."""
    for key, v in metrics.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}/{key}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield f"{prefix}/{key}", float(v)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Images for TensorBoard: float in [0, 1], on the CPU."""
    x = x.detach().float().cpu()
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:  # e.g. a Normal likelihood's means: rescale for display
        x = (x - lo) / max(hi - lo, 1e-12)
    return x.clamp(0, 1)


def _pair(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Data and reconstruction side by side (data left), one image per datapoint."""
    return torch.cat([_unit(x), _unit(rec)], dim=-1)


def tb_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in `folder/tb/` (or `folder` itself) as tag -> [(step, value)], read with
    TensorBoard's `EventAccumulator` (what `pyrovae compare` and the tests use)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = Path(folder)
    d = d / TB if (d / TB).is_dir() else d
    acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
    }
