"""Shared test setup: Pyro validation on, a clean param store, one thread, a tiny digits run,
fault-injection callbacks (the trainer's public `Callback` seams), a PNG check, the lesson
results shared by the teaching tests and the docs test, and the CLI fork server."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from pyrovae.train import Callback

torch.set_num_threads(1)  # small tensors: one thread is faster and robust to a loaded machine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory) -> Path:
    """The documentation built once with `mkdocs build --strict` (from another directory)."""
    work = tmp_path_factory.mktemp("docs")
    site = work / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=work,  # the config must not depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site
#: children run with one OpenMP thread: on a busy 2-core machine two make these tiny networks
#: ~30x slower, and all runs compared bit for bit must use the same thread count
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def tiny_config(**sections) -> dict:
    """A digits config that trains in about a second: 256 training, 64 validation and 64 test
    points; batch 64, so 4 steps per epoch."""
    cfg = {
        "data": {"dataset": "digits", "limit": 256},
        "model": {
            "latent_dim": 2,
            "encoder": {"kind": "mlp", "hidden": [32]},
            "decoder": {"kind": "mlp", "hidden": [32]},
        },
        "train": {"epochs": 2, "batch_size": 64, "seed": 0, "device": "cpu"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


#: training steps per epoch of `tiny_config` (256 points / batch 64)
TINY_STEPS = 4


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One trained tiny VAE run folder, shared by read-only tests."""
    import pyrovae

    out = tmp_path_factory.mktemp("runs") / "vae"
    pyro.enable_validation(True)
    return pyrovae.fit(tiny_config(train={"epochs": 3}), out, progress=False)


# ------------------------------------------------------------------------------ callbacks
class NaNAt(Callback):
    """Multiplies the loss of the `n`-th training step (counted from 1 over the callback's life,
    retries included) by `value` (NaN by default): a non-finite loss, injected through the
    trainer's `on_loss` seam. `n=None`: every step."""

    def __init__(self, n: int | None, value: float = float("nan")) -> None:
        self.n, self.value, self.calls = n, value, 0

    def on_loss(self, trainer, loss):
        self.calls += 1
        return loss * self.value if self.n is None or self.calls == self.n else loss


class StopAt(Callback):
    """Calls `trainer.request_stop()` (what SIGINT/SIGTERM do) at the end of the `n`-th step."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def on_step_end(self, trainer, loss):
        self.calls += 1
        if self.calls == self.n:
            trainer.request_stop()


def adam_steps(opt: torch.optim.Optimizer) -> list[float]:
    """Adam's per-parameter step counters."""
    return [float(s["step"]) for s in opt.state.values()]


class FirstStep(Callback):
    """Records where the trainer stands at the end of its first step: position, learning rate,
    Adam's step counters, and the history rows it holds (the very objects)."""

    def __init__(self) -> None:
        self.seen: dict | None = None

    def on_step_end(self, trainer, loss):
        if self.seen is None:
            self.seen = {
                "epoch": trainer.epoch,
                "step_in_epoch": trainer.step_in_epoch,
                "lr": trainer.lr,
                "optimizer_lr": [g["lr"] for g in trainer.opt.param_groups],
                "adam_steps": adam_steps(trainer.opt),
                "history": list(trainer.history),
            }


class Record(Callback):
    """Records `(epoch, step_in_epoch, loss)` at every step end."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float]] = []

    def on_step_end(self, trainer, loss):
        self.steps.append((trainer.epoch, trainer.step_in_epoch, float(loss)))


# ------------------------------------------------------------------------------ figures
def assert_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> np.ndarray:
    """`path` is a PNG of at least `min_size` (width, height) pixels with a drawing on it: many
    grey levels, ink over a good part of the page and in each of its four quadrants (a blank or
    half-empty figure fails). Returns the grey-level pixels."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG", im.format
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = np.median(border)  # the page: matplotlib leaves a margin round the axes
    ink = np.abs(grey - background) > 30
    assert len(np.unique(grey)) > 16, "a figure of a few flat colours"
    assert 0.03 < ink.mean() < 0.95, ink.mean()  # empty axes: 0.012; real figures: > 0.04
    h, w = ink.shape
    for quadrant in (
        ink[: h // 2, : w // 2],
        ink[: h // 2, w // 2 :],
        ink[h // 2 :, : w // 2],
        ink[h // 2 :, w // 2 :],
    ):
        assert quadrant.mean() > 0.01, "an empty quadrant"  # real figures: > 0.025
    return grey


# ------------------------------------------------------------------------------ lessons
#: the arguments docs/gen_lessons.py runs every lesson with (the docs test checks it does)
LESSON_ARGS = {
    "lesson1": ("linear_ae", "linear_ae_lesson", {"k": 8, "seed": 0}),
    "lesson2": ("deep_vs_linear", "deep_vs_linear_lesson", {"code_sizes": (2, 8), "seed": 0}),
    "lesson3": ("overcomplete", "overcomplete_lesson", {"code_size": 100, "noise": 0.3, "seed": 0}),
    "lesson4": ("information", "information_lesson", {"seed": 0}),
    "lesson5": (
        "intractable",
        "intractable_lesson",
        {"latent_dims": (1, 2), "n_images": 6, "seed": 0},
    ),
    "lesson6": ("vi_identity", "vi_identity_lesson", {"seed": 0}),
    "lesson7": ("ae_vs_vae", "ae_vs_vae_lesson", {"latent_dim": 2, "scale": 0.3, "seed": 0}),
}
_LESSONS: dict[str, object] = {}


def lesson_result(name: str):
    """The result of lesson `name` as docs/gen_lessons.py computes it (computed once per session)."""
    import importlib

    if name not in _LESSONS:
        module, fn, kwargs = LESSON_ARGS[name]
        pyro.enable_validation(True)
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        _LESSONS[name] = getattr(importlib.import_module(f"pyrovae.teaching.{module}"), fn)(
            **kwargs
        )
    return _LESSONS[name]


# ------------------------------------------------------------------------------ small VAEs
#: one case per kind of block (prior, likelihood, guide, β): analytic and Monte-Carlo KL, every
#: likelihood family, the flow guide, β-scaling and β = 0
BLOCK_CASES = [
    ("normal", "bernoulli", "normal", 1.0),
    ("mixture", "bernoulli", "normal", 1.0),
    ("vamp", "continuous_bernoulli", "normal", 1.0),
    ("flow", "normal", "flow", 1.0),
    ("normal_learned", "poisson", "normal", 0.3),
    ("normal", "negative_binomial", "normal", 0.0),
    ("normal", "laplace", "normal", 2.0),
]


def small_vae(**model):
    """A tiny VAE for 8x8 digits (latent 3, one hidden layer of 16); ``model`` overrides blocks."""
    from pyrovae import VAE, load_config

    base = {
        "latent_dim": 3,
        "encoder": {"kind": "mlp", "hidden": [16]},
        "decoder": {"kind": "mlp", "hidden": [16]},
    }
    return VAE(load_config({"model": {**base, **model}}).model, (1, 8, 8))


def digits(n: int = 20, binary: bool = False) -> torch.Tensor:
    """Real 8x8 digits scaled to [0, 1] (rounded to {0, 1} for binary likelihoods)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:n], dtype=torch.float32) / 16
    return x.round() if binary else x


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------ the CLI
# Real child processes, but forked from a small *fork server* that has imported
# torch/pyro/pyrovae once: starting ``python -m pyrovae.cli`` costs seconds of imports. A forked
# child runs exactly ``pyrovae.cli.main(argv)`` (what ``python -m pyrovae.cli`` runs), has its
# own pid, exit code, stdout and stderr, and can be killed with real signals.
_SERVER = r"""
import json, os, sys, traceback
import pyrovae.cli, pyrovae.cli_diagnose, pyrovae.plots, pyrovae.train, sklearn.datasets  # once
proto = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        try:
            code = pyrovae.cli.main(req["argv"])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, file=proto, flush=True)
    print(os.waitpid(pid, 0)[1], file=proto, flush=True)
"""


@dataclass
class Result:
    rc: int  # exit code; -N if killed by signal N
    stdout: str
    stderr: str


class ForkServer:
    """Runs ``pyrovae.cli.main(argv)`` in forked children of one pre-imported Python process."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.n, self.buf = logs, 0, b""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=ENV,
        )

    def _line(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError("fork server did not answer")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError("fork server died")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return int(line)

    def start(self, *argv: str | Path) -> int:
        """Fork a child running the CLI with ``argv``; return its pid."""
        self.n += 1
        self.out, self.err = self.logs / f"{self.n}.out", self.logs / f"{self.n}.err"
        self.out.touch(), self.err.touch()  # the child may be killed before it opens them
        req = {"argv": [str(a) for a in argv], "stdout": str(self.out), "stderr": str(self.err)}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        self.pid = self._line(60)
        return self.pid

    def wait(self, timeout: float = 180) -> Result:
        """Wait for the child; on timeout kill it and fail."""
        try:
            status = self._line(timeout)
        except TimeoutError:
            os.kill(self.pid, signal.SIGKILL)
            self._line(30)
            raise
        return Result(os.waitstatus_to_exitcode(status), self.out.read_text(), self.err.read_text())

    def run(self, *argv: str | Path, timeout: float = 180) -> Result:
        self.start(*argv)
        return self.wait(timeout)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("forkserver-logs"))
    yield srv
    srv.close()


# ------------------------------------------------------------------ a small pPCA (closed forms)
@pytest.fixture(scope="module")
def ppca():
    """pPCA with D = 5, k = 2, sigma = 0.5: log p(x) and p(z|x) in closed form."""
    from pyrovae.teaching import ppca as P

    return P.PPCA.random(D=5, k=2, sigma=0.5, seed=1)


@pytest.fixture(scope="module")
def x(ppca):
    """20 draws from `ppca`."""
    return ppca.sample(20, generator=torch.Generator().manual_seed(0))


#: the seven lesson pages of the docs site (`docs/lessons/<name>.md`)
LESSON_PAGES = (
    "lesson1-linear-ae-pca",
    "lesson2-deep-vs-linear",
    "lesson3-overcomplete",
    "lesson4-information-kl",
    "lesson5-intractable",
    "lesson6-vi-identity",
    "lesson7-ae-vs-vae",
)
