r"""The whole training step as one CUDA graph (`train.cuda_graph = true`).

On a GPU the eager step waits for Pyro's Python: every step runs the effect handlers, builds the
traces and launches some hundred small kernels from the host. `GraphedStep` runs the step once
under `torch.cuda.graph` — the Pyro model and guide through the ELBO's `differentiable_loss`,
`backward`, and the optimizer step — and afterwards *replays* the recorded kernels: one launch
per step, no Python. What is recorded:

* a static batch buffer: each step copies its minibatch (already gathered and binarized) into
  it, and the graph reads it;
* the latent noise: the guide's `torch.randn` draws from torch's default CUDA generator, which is
  graph-safe (each replay advances its Philox offset, so every replay draws fresh noise and the
  stream is the one an eager run would draw from the same state);
* `torch.optim.Adam(capturable=True)`: its step counters live on the device, so the bias
  corrections are computed inside the graph.

Before the capture three warm-up steps run on a side stream (as `torch.cuda.graph` requires);
the parameters, the optimizer moments and the CUDA RNG state are restored afterwards, so the
capture changes nothing a user can see. The learning rate, β and the batch size are constants
of the recording: a new value (the per-epoch schedule, a roll back with a lower rate) records
the step again; β warm-up steps, each epoch's validated first step and the last, smaller batch
of an epoch run eagerly, on the same parameters and optimizer state.

Pyro's own ELBO classes read values on the host, which a capture forbids: `Trace_ELBO` takes
`torch_item` of every site's log-density sum and `warn_if_nan` reads a boolean. The graph
therefore records the same estimator in a form with no host reads,
`pyrovae.objectives.CapturableELBO` (the same Pyro program through the same public handlers,
every value kept a tensor; value and gradient equal to `Trace_ELBO`'s / `TraceMeanField_ELBO`'s
on the same draws for reparameterized guides, which the graph requires: `has_rsample` is
checked before the capture; all of pyrovae's guides are). The `iwae` objective's `IWAE_ELBO`
has no host reads as it is. Pyro's validation is off during the capture
(`pyro.validation_enabled(False)`: its checks read values). `HostReads` lists the host reads a
step makes — on a CPU too, so the graph's requirement is tested without a GPU. NaNs are still
caught, by the trainer's read of the loss every `sync_every` steps, which rolls the epoch back
as without graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyro
import torch
from torch.overrides import TorchFunctionMode

from pyrovae.errors import ConfigError
from pyrovae.objectives import make_loss

if TYPE_CHECKING:
    from pyrovae.train import Trainer

#: eager warm-up steps on a side stream before the capture (restored afterwards)
WARMUP_STEPS = 3
GRAPH_OBJECTIVES = ("trace_elbo", "mean_field", "iwae")


def check_config(config, device: torch.device, world: Any = None) -> None:
    """`train.cuda_graph = true` needs CUDA, an objective without enumeration, one process.
    A one-line `ConfigError` otherwise."""
    if not getattr(config, "cuda_graph", False):
        return
    if device.type != "cuda":
        raise ConfigError(
            f"train.cuda_graph = true records the step as a CUDA graph, but the training device "
            f'is {device.type}; set train.device = "cuda" on a machine with a GPU, or '
            "train.cuda_graph = false"
        )
    if config.objective not in GRAPH_OBJECTIVES:
        raise ConfigError(
            f"train.cuda_graph = true: expected train.objective in {', '.join(GRAPH_OBJECTIVES)}, "
            f"got {config.objective!r} (enumeration sizes its tensors on the host)"
        )
    if world is not None:
        raise ConfigError(
            "train.cuda_graph = true is not combined with data-parallel training yet; run one "
            "process, or set train.cuda_graph = false"
        )


#: tensor methods and functions that read a value on the host (a device-to-host copy and a
#: synchronisation on a GPU; an error inside a CUDA graph capture)
HOST_READS = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
    "__complex__", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
})


class HostReads(TorchFunctionMode):
    """Records the host reads made inside it (`HOST_READS`, and indexing with a boolean
    tensor, whose result size is data-dependent) by name, in order, in `reads`.

    On a CPU nothing synchronises, but the same Python runs: a step that makes no host read
    here makes none on a GPU either, so `with HostReads() as h: step()` then `h.reads == []`
    checks what a CUDA graph capture needs without a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        bool_index = name in ("__getitem__", "__setitem__") and any(
            torch.is_tensor(a) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],))
        )
        if name in HOST_READS or bool_index:
            self.reads.append(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def capturable_pyro() -> Iterator[None]:
    """Pyro with its validation checks (which read values on the host) off."""
    with pyro.validation_enabled(False):
        yield


def check_reparameterized(model, x: torch.Tensor) -> None:
    """Every latent sample site of the guide must be reparameterized (`ConfigError` naming the
    site otherwise): the graphed loss differentiates the ELBO estimate pathwise."""
    from pyro import poutine
    from pyro.poutine.util import prune_subsample_sites

    from pyrovae.objectives import programs

    _, guide = programs(model)
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = prune_subsample_sites(poutine.trace(guide).get_trace(x))
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            if not getattr(site["fn"], "has_rsample", False):
                raise ConfigError(
                    f"train.cuda_graph = true: the guide's site {name!r} "
                    f"({type(site['fn']).__name__}) is not reparameterized; expected every "
                    "latent site to have rsample (or set train.cuda_graph = false)"
                )


class GraphedStep:
    """`trainer.step(x)` as a replayed CUDA graph (see the module docs); `None` from `__call__`
    when this step must run eagerly instead."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.x: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.captures = 0
        self.checked = False
        cfg = trainer.config  # the same estimator as trainer.loss_fn, with no host reads
        self.loss_fn = make_loss(trainer.model, cfg.objective, cfg.num_particles, capturable=True)

    def invalidate(self) -> None:
        """Forget the recording (after the optimizer's state tensors were replaced)."""
        self.graph, self.key, self.x, self.loss = None, None, None, None

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trainer
        return self.loss_fn(x, t.n, t.beta, t.noise_gen)

    def _eager_step(self, x: torch.Tensor) -> None:
        opt = self.trainer.opt
        opt.zero_grad(set_to_none=True)
        self._loss(x).backward()
        opt.step()

    def _capture(self, x: torch.Tensor) -> None:
        t, opt = self.trainer, self.trainer.opt
        self.invalidate()
        if not self.checked and t.config.objective != "iwae":
            check_reparameterized(t.model, x)
            self.checked = True
        params = [p for g in opt.param_groups for p in g["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                       for p in params if p in opt.state}
        rng = torch.cuda.get_rng_state(t.device)
        self.x = x.detach().clone()
        side = torch.cuda.Stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side), capturable_pyro():
            for _ in range(WARMUP_STEPS):
                self._eager_step(self.x)
        torch.cuda.current_stream(t.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with capturable_pyro(), torch.cuda.graph(graph):
            loss = self._loss(self.x)
            loss.backward()
            opt.step()
            self.loss = loss.detach()
        with torch.no_grad():  # undo the warm-up: same parameters, moments and noise as before
            for p, v in zip(params, saved_params, strict=True):
                p.copy_(v)
            for p in params:
                for k, v in opt.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        old = saved_state.get(id(p), {}).get(k)
                        v.copy_(old) if old is not None else v.zero_()
        torch.cuda.set_rng_state(rng, t.device)
        self.graph, self.captures = graph, self.captures + 1

    def __call__(self, x: torch.Tensor, eager: bool) -> torch.Tensor | None:
        """The loss of one graphed step on `x`, or None (the caller runs it eagerly) when
        `eager` (validation, β warm-up), or a callback rewrites the loss."""
        t = self.trainer
        if eager or any(type(cb).on_loss is not _base_on_loss() for cb in t.callbacks):
            return None
        key = (tuple(x.shape), x.dtype, float(t.beta), float(t.lr))
        if key != self.key or self.graph is None:
            full = x.shape[0] == t.config.batch_size
            if not full:  # the last, smaller batch of an epoch: eager, the graph stays
                return None
            self._capture(x)
            self.key = key
        self.x.copy_(x)
        self.graph.replay()
        return self.loss.clone()


def _base_on_loss():
    from pyrovae.train import Callback

    return Callback.on_loss
