r"""Data-parallel training on `torch.distributed`: one process per device, launched by `torchrun`.

```bash
torchrun --nproc-per-node 2 -m pyrovae fit cfg.toml --out runs/x      # one machine, 2 processes
pyrovae fit cfg.toml --out runs/x --nproc 2                            # the same (runs torchrun)
torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint host:29400 \
    -m pyrovae fit cfg.toml --out /shared/runs/x                       # two machines
```

`torchrun` starts $W$ processes and tells each its `RANK`, `WORLD_SIZE`, `LOCAL_RANK` and where
to meet (`MASTER_ADDR`/`MASTER_PORT`); `init` joins them into a process group (gloo on CPU,
NCCL on CUDA) with a bounded timeout. The loss goes through
`torch.nn.parallel.DistributedDataParallel` (DDP) around `LossModule`, an `nn.Module` whose
`forward` is the Pyro ELBO's `differentiable_loss` on the model and guide, so DDP's
backward hooks average the gradients over the processes.

**The estimator stays exact.** `train.batch_size` is the *global* minibatch $B$; each of the
$W$ processes takes $b = B/W$ of its points. One global permutation per epoch (drawn from the
shared seed, identical on every rank) is cut into global batches as in a single process, and
batch $s$ is sliced per rank (`epoch_indices`). Each rank's loss is the Pyro ELBO of its $b$
points with the `"data"` plate still of size $N$ (the *global* training set), so the plate
scales by $N/b$ and rank $r$'s loss per datapoint is $\ell_r = \frac1b\sum_{i\in r}
\ell_i$. DDP averages gradients: $\frac1W\sum_r \nabla \ell_r = \frac1B \sum_{i}
\nabla \ell_i$, exactly the gradient of one process on the union of the batches. The last,
smaller global batch of an epoch ($R = N \bmod B$ points) gives each rank $\lfloor R/W \rfloor$
points: up to $W-1$ points of the epoch's order are skipped in that epoch (different ones
every epoch; none when $W$ divides $R$; with $W = 1$ this is the single-process loop).

**Noise.** Every rank's randomness of step $s$ of epoch $e$ (the latent draws $z \sim q$
through torch's global generator, dynamic binarization, an AE's corruption) is reseeded from
`(seed, e, s, rank)` (`step_seed`): different on each rank, reproducible, and independent of
where a run was stopped and resumed. β warm-up and the learning-rate schedule are functions of
the global step and epoch, as in one process.

**Control flow agrees on every rank.** The loss a rank reports is the mean over ranks (one
all-reduce), so a non-finite loss on any rank rolls back every rank; a stop request (SIGINT /
SIGTERM to any rank, or to the launcher, which forwards it) is OR-ed over the ranks every step
(on a small gloo group, also under NCCL), so all stop after the same step and rank 0 writes the
checkpoint. Only rank 0 touches the run folder. Setup errors (bad data, a locked folder) are
gathered (`all_or_none`): rank 0 reports the first, every rank exits with status 2.

Evaluation (`per_point`) gives each rank a contiguous shard of the datapoints and gathers the
per-point values; the padding that makes the shards the same size for `all_gather` is cut off,
so no datapoint counts twice.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pyrovae.errors import ConfigError, PyroVAEError

__all__ = [
    "LossModule",
    "World",
    "all_or_none",
    "current",
    "epoch_indices",
    "init",
    "launch",
    "launched",
    "launched_rank",
    "per_point",
    "rank",
    "shutdown",
    "step_seed",
    "steps_per_epoch",
]

#: environment variable: seconds a collective (and the rendezvous) may wait for the others
TIMEOUT_ENV = "PYROVAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
BACKENDS = ("auto", "gloo", "nccl")


class PeerError(PyroVAEError):
    """Another process of the job failed; its message says which and why."""


# ----------------------------------------------------------------------------- the epoch order
def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Global steps in an epoch of `n` points, global batch `batch_size`, `world_size` ranks:
    $\\lfloor N/B \\rfloor$ full batches, plus one if the remainder leaves each rank a point."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest // world_size > 0 else 0)


def epoch_indices(
    perm: torch.Tensor, s: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Rank `rank`'s indices of global batch `s` of the epoch order `perm`.

    Global batch $s$ is `perm[s*B : (s+1)*B]` (a single process takes all of it); each rank
    takes its contiguous $1/W$ share. The last global batch, of $R < B$ points, gives each
    rank $\\lfloor R/W \\rfloor$ (the rest of that epoch's order is skipped).
    """
    start = s * batch_size
    size = min(batch_size, perm.shape[0] - start) // world_size
    return perm[start + rank * size : start + (rank + 1) * size]


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed for rank `rank`'s noise in step `step` of epoch `epoch` (NumPy's
    `SeedSequence`: well-mixed, different streams for different tuples)."""
    key = [seed, epoch + 1, step, rank, 0x5EED]  # epoch -1: evaluation outside training
    state = np.random.SeedSequence(key).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


# ----------------------------------------------------------------------------- the process group
def launched() -> bool:
    """True in a process `torchrun` started (`WORLD_SIZE` and `RANK` are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launched_rank() -> int:
    """This process's `RANK` under `torchrun` (0 otherwise): rank 0 alone writes and reports."""
    try:
        return int(os.environ.get("RANK", "0")) if launched() else 0
    except ValueError:
        return 0


def timeout_s() -> float:
    """The bound on every wait for the other processes (`PYROVAE_DIST_TIMEOUT`, seconds)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}: expected a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {raw!r}")
    return value


@dataclass
class World:
    """This process's place in the job: rank, size, device, and the groups it talks on."""

    rank: int
    size: int
    local_rank: int
    backend: str
    device: torch.device
    #: a gloo group for host-side flags (the default group itself under gloo)
    control: Any = None

    # -- collectives -------------------------------------------------------------------------
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (an all-reduce; no host synchronization on CUDA)."""
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def seed_step(self, seed: int, epoch: int, step: int, gen: torch.Generator) -> None:
        """Reseed torch's global generator (Pyro's draws) and `gen` (binarization) for this
        rank's step `step` of epoch `epoch` (`step_seed`)."""
        s = step_seed(seed, epoch, step, self.rank)
        torch.manual_seed(s)
        gen.manual_seed(s ^ 0x2545F4914F6CDD1D)

    def wrap(
        self, model: torch.nn.Module, loss_fn: Callable, find_unused: bool = True
    ) -> torch.nn.Module:
        """`LossModule(model, loss_fn)` inside `DistributedDataParallel`.

        `find_unused`: a parameter may go unused in a step (a learned prior under β = 0 is
        masked out); DDP then leaves its gradient None on every rank, as a single process does.
        """
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            LossModule(model, loss_fn), device_ids=ids, find_unused_parameters=find_unused
        )


class LossModule(torch.nn.Module):
    """The training loss as an `nn.Module`, so that `DistributedDataParallel` sees the forward.

    `forward(x, n_data, beta, generator)` is `loss_fn(...)`, i.e. the Pyro ELBO's
    `differentiable_loss(model, guide, x, n_data, beta) / n_data` from
    `pyrovae.objectives.make_loss` (or the autoencoder's loss): the same Pyro program, run
    under DDP's hooks.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, n_data, beta, generator=None):  # noqa: D102
        return self.loss_fn(x, n_data, beta, generator)


_WORLD: World | None = None


def current() -> World | None:
    """The `World` `init` joined (None in a plain single process)."""
    return _WORLD


def init(backend: str = "auto", device: str = "auto") -> World | None:
    """Join the job `torchrun` started (None when not launched by it; the same `World` when
    already joined).

    `backend`: `"auto"` (NCCL when the training device is CUDA, else gloo), `"gloo"` or
    `"nccl"`. `device` is `train.device`; on CUDA each process takes `cuda:LOCAL_RANK`. The
    rendezvous and every later collective wait at most `PYROVAE_DIST_TIMEOUT` seconds
    (default 120). Errors are one-line `ConfigError`s.
    """
    global _WORLD
    if _WORLD is not None or not launched():
        return _WORLD
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK: expected integers ({e})") from None
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ConfigError(
            "--backend nccl: NCCL needs CUDA, and no CUDA device is available on this machine; "
            "use --backend gloo (or auto)"
        )
    if backend == "nccl" and device == "cpu":
        raise ConfigError(
            '--backend nccl: NCCL reduces CUDA tensors, but train.device = "cpu"; use '
            '--backend gloo or train.device = "cuda"'
        )
    if device == "cuda" and not cuda:
        raise ConfigError(
            'train.device: "cuda" requested but no CUDA device is available; use "auto" or "cpu"'
        )
    on_cuda = cuda and device != "cpu" and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s); expected at most one process per device (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s())
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        dist.barrier(group=control)  # everyone is here, within the timeout
    except (RuntimeError, ValueError, OSError) as e:  # DistStoreError/DistNetworkError too
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"distributed rendezvous at {where} (rank {rank} of {size}, backend {backend}): "
            f"the processes did not all join within {timeout_s():g} s ({first}); check "
            f"MASTER_ADDR/MASTER_PORT or --rdzv-endpoint, or raise {TIMEOUT_ENV}"
        ) from None
    _WORLD = World(rank, size, local, backend, dev, control)
    return _WORLD


def shutdown() -> None:
    """Leave the process group (if `init` joined one)."""
    global _WORLD
    if _WORLD is not None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _WORLD = None


@contextlib.contextmanager
def all_or_none(world: World | None) -> Iterator[None]:
    """Run a setup block on every rank; if it fails on any, it fails on all.

    The first error (in rank order) is raised on rank 0 (a peer's as `PeerError`, naming its
    rank); the other ranks raise theirs, or `PeerError`. Without a world: a plain block.
    """
    if world is None or world.size == 1:
        yield
        return
    err: BaseException | None = None
    try:
        yield
    except Exception as e:
        err = e
    msgs: list[Any] = [None] * world.size
    mine = None if err is None else (type(err).__name__, " ".join(str(err).split()))
    dist.all_gather_object(msgs, mine, group=world.control)
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if err is not None and (world.rank != 0 or failed[0][0] == 0):
        raise err
    if failed:
        r, (_, msg) = failed[0]
        raise PeerError(f"process {r} of {world.size} failed: {msg}")


def check_job(batch_size: int, n_train: int, world: World | None) -> None:
    """The global batch must split evenly, and every rank needs a training point."""
    if world is None:
        return
    if batch_size % world.size:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global minibatch, split evenly over the "
            f"{world.size} processes: expected a multiple of {world.size} (e.g. "
            f"{max(world.size, batch_size // world.size * world.size)})"
        )
    if n_train < world.size:
        raise ConfigError(
            f"the training split holds {n_train} point(s), fewer than the {world.size} "
            "processes: expected at least one point per process (more data, or fewer processes)"
        )


# ----------------------------------------------------------------------------- evaluation
def per_point(fn: Callable[[Any], torch.Tensor], x: Any) -> torch.Tensor:
    """`fn(x)` (one value per datapoint), computed shard by shard over the ranks.

    Rank $r$ evaluates rows $[r\\lceil n/W \\rceil, (r+1)\\lceil n/W \\rceil)$; the shards are
    padded to one size for `all_gather` and the padding is cut off again, so each datapoint
    appears exactly once, in order, on every rank (as float64: a rank with an empty shard
    cannot know `fn`'s dtype). Without a world (or with one rank): `fn(x)`. Pass an index
    tensor `torch.arange(n)` to shard several per-point arrays at once (`fn(idx)`).
    """
    world = current()
    if world is None or world.size == 1:
        return fn(x)
    n = len(x)
    per = math.ceil(n / world.size)
    counts = [max(0, min(n, (r + 1) * per) - r * per) for r in range(world.size)]
    lo = min(world.rank * per, n)
    mine = fn(x[lo : lo + counts[world.rank]]) if counts[world.rank] else None
    local = torch.zeros(per, dtype=torch.float64, device=world.device)
    if mine is not None:
        local[: len(mine)] = mine.to(world.device, torch.float64)
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).cpu()


def rank() -> int:
    """This process's rank in the job (0 without one)."""
    world = current()
    return 0 if world is None else world.rank


# ----------------------------------------------------------------------------- launching
def launch(nproc: int, argv: list[str]) -> tuple[int, str | None]:
    """`torchrun --standalone --nproc-per-node nproc -m pyrovae *argv` in this process
    (`torch.distributed.run`). Returns the job's exit status — rank 0's if it failed, else the
    first failed rank's (128 + k for a rank killed by signal k); 130 when stopped by SIGINT /
    SIGTERM — and, when a rank died without reporting (a signal, a crash), a one-line account of
    which ranks ended how."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ConfigError(f"--nproc: expected at least 1 process, got {nproc}")
    for name in list(logging.root.manager.loggerDict):  # torchrun's info and warning lines
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "--monitor-interval", "0.2", "-m", "pyrovae", *argv]
    )
    try:
        run(args)
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        code = codes.get(0, next(iter(codes.values())))
        if code in (2, 130):  # rank 0 said what happened
            return code, None
        how = ", ".join(
            f"rank {r} " + (f"killed by signal {-c}" if c < 0 else f"exit status {c}")
            for r, c in sorted(codes.items())
        )
        return (code if code > 0 else 128 - code), f"the job stopped: {how}"
    except SignalException:
        return 130, None
    return 0, None
