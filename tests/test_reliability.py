"""Reliability and safety (issue 6): bad input through the CLI, faults during training,
untrusted checkpoints. Every case here is listed in docs/reliability.md.

CLI cases run as real child processes, but forked from a small *fork server* that has imported
torch/pyro/pyrovae once: starting ``python -m pyrovae.cli`` costs seconds of imports, which would
make "kill training 20 times" slow. A forked child runs exactly ``pyrovae.cli.main(argv)`` (what
``python -m pyrovae.cli`` runs), has its own pid, exit code, stdout and stderr, and is killed with
real signals. The SIGTERM/SIGINT tests use plain ``python -m pyrovae.cli`` subprocesses.

Children run with ``OMP_NUM_THREADS=1``: on a busy 2-core machine, two OpenMP threads make these
tiny networks ~30x slower, and all runs compared bit for bit must use the same thread count.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from conftest import tiny_config

import pyrovae
from pyrovae import CheckpointError, ConfigError, DataError, load_config
from pyrovae.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

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
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=ENV
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("forkserver-logs"))
    yield srv
    srv.close()


def write_config(path: Path, **sections) -> Path:
    """A tiny digits config file (see ``conftest.tiny_config``), with sections overridden."""
    path.write_text(tomli_w.dumps(tiny_config(**sections)))
    return path


def assert_user_error(res: Result, *needles: str) -> None:
    """Exit status 2, one ``pyrovae: error:`` message holding every needle, no traceback."""
    assert res.rc == 2, (res.rc, res.stderr)
    assert res.stderr.startswith("pyrovae: error:"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


# =============================================================================================
# Bad input: exit 2, a message naming field/file, expected and actual value; no run folder
# =============================================================================================
def _npy(tmp_path: Path, name: str, x: np.ndarray) -> str:
    path = tmp_path / name
    np.save(path, x) if name.endswith(".npy") else np.savez(path, x=x)
    return str(path)


def _rand(n: int = 40, d: int = 4) -> np.ndarray:
    return np.random.default_rng(0).random((n, d)).astype(np.float32)


def _nan_npy(tmp_path):
    x = _rand()
    x[5, 2] = np.nan
    return _npy(tmp_path, "nan.npy", x), "normal", ["nan.npy", "expected finite values", "NaN/inf", "(5, 2)"]


def _inf_npz(tmp_path):
    x = _rand()
    x[7, 1] = -np.inf
    return _npy(tmp_path, "inf.npz", x), "normal", ["inf.npz", "expected finite values", "(7, 1)"]


def _grey_bernoulli(tmp_path):
    hints = ["grey.npy", "bernoulli likelihood needs values in {0, 1}", "binarize", "continuous_bernoulli"]
    return _npy(tmp_path, "grey.npy", _rand()), "bernoulli", hints


def _negative_poisson(tmp_path):
    x = np.random.default_rng(0).integers(0, 5, (40, 4)).astype(np.int64)
    x[3, 1] = -2
    return _npy(tmp_path, "neg.npy", x), "poisson", ["neg.npy", "non-negative integer counts", "-2", "(3, 1)"]


def _fractional_poisson(tmp_path):
    return _npy(tmp_path, "frac.npy", _rand() * 5), "poisson", ["frac.npy", "non-negative integer counts"]


def _empty_npy(tmp_path):
    return _npy(tmp_path, "empty.npy", np.zeros((0, 4), np.float32)), "normal", ["empty.npy", "at least one", "(0, 4)"]


def _empty_npz(tmp_path):
    return _npy(tmp_path, "empty.npz", np.zeros((5, 0), np.float32)), "normal", ["empty.npz", "at least one", "(5, 0)"]


def _one_point(tmp_path):
    return _npy(tmp_path, "one.npy", _rand(1)), "normal", ["one.npy", "empty training split"]


def _float32_overflow(tmp_path):
    x = _rand().astype(np.float64)
    x[0, 0] = 1e300
    return _npy(tmp_path, "huge.npy", x), "normal", ["huge.npy", "float32 range", "1e+300"]


@pytest.mark.parametrize(
    "make",
    [_nan_npy, _inf_npz, _grey_bernoulli, _negative_poisson, _fractional_poisson, _empty_npy, _empty_npz, _one_point, _float32_overflow],
)
def test_bad_data_is_a_clear_error_and_leaves_no_folder(server, tmp_path, make):
    dataset, likelihood, needles = make(tmp_path)
    cfg = write_config(tmp_path / "c.toml", data={"dataset": dataset}, model={"likelihood": {"kind": likelihood}})
    out = tmp_path / "new" / "nested" / "run"  # parents created for it must go too
    assert_user_error(server.run("fit", cfg, "--out", out), *needles)
    assert not (tmp_path / "new").exists()


def _idx_folder(folder: Path) -> Path:
    """A tiny valid MNIST-layout folder: 12 train / 5 test images of 4x4."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, shape in (("train-images-idx3-ubyte", (12, 4, 4)), ("train-labels-idx1-ubyte", (12,)), ("t10k-images-idx3-ubyte", (5, 4, 4)), ("t10k-labels-idx1-ubyte", (5,))):
        arr = rng.integers(0, 10 if len(shape) == 1 else 256, shape, dtype=np.uint8)
        head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in shape)
        (folder / stem).write_bytes(head + arr.tobytes())
    return folder


@pytest.mark.parametrize(
    "damage,needles",
    [
        ("missing", ["missing IDX file t10k-labels-idx1-ubyte", "expected the four files", "found"]),
        ("truncated", ["train-images-idx3-ubyte", "truncated IDX file", "expected 208 bytes", "got 150 bytes"]),
        ("too_long", ["t10k-images-idx3-ubyte", "too long IDX file", "expected 96 bytes", "got 97 bytes"]),
        ("bad_magic", ["train-labels-idx1-ubyte", "bad IDX magic number", "expected 2049", "got 2051"]),
        ("no_folder", ["data.root", "does not exist"]),
        ("empty_folder", ["no IDX files found", "found nothing"]),
    ],
)
def test_bad_idx_files_are_a_clear_error(server, tmp_path, damage, needles):
    root = _idx_folder(tmp_path / "mnist")
    if damage == "missing":
        (root / "t10k-labels-idx1-ubyte").unlink()
    elif damage == "truncated":
        p = root / "train-images-idx3-ubyte"
        p.write_bytes(p.read_bytes()[:150])
    elif damage == "too_long":
        p = root / "t10k-images-idx3-ubyte"
        p.write_bytes(p.read_bytes() + b"\0")
    elif damage == "bad_magic":
        p = root / "train-labels-idx1-ubyte"
        p.write_bytes((2051).to_bytes(4, "big") + p.read_bytes()[4:])
    elif damage == "no_folder":
        root = tmp_path / "nowhere"
    else:
        root = tmp_path / "empty"
        root.mkdir()
    cfg = write_config(tmp_path / "c.toml", data={"dataset": "mnist", "root": str(root), "limit": 0})
    out = tmp_path / "run"
    assert_user_error(server.run("fit", cfg, "--out", out), *needles)
    assert not out.exists()


def test_valid_tiny_idx_folder_trains(server, tmp_path):
    """The IDX fixture above is valid, so the errors really come from the damage."""
    root = _idx_folder(tmp_path / "mnist")
    cfg = write_config(tmp_path / "c.toml", data={"dataset": "mnist", "root": str(root), "limit": 0}, train={"epochs": 1})
    res = server.run("fit", cfg, "--out", tmp_path / "run")
    assert res.rc == 0, res.stderr
    assert pyrovae.load_run(tmp_path / "run").model.data_shape == (1, 4, 4)


@pytest.mark.parametrize(
    "sets,needles",
    [
        (["model.prior.kind=gauss"], ["model.prior", "'gauss'", "normal", "mixture", "vamp"]),
        (["model.encoder={hidden=[8]}"], ["model.encoder", "missing 'kind'", "mlp, linear, conv"]),
        (["train.epochs=\"many\""], ["train.epochs", "valid integer", "'many'"]),
        (["train.epochs=2.5"], ["train.epochs", "2.5"]),
        (["train.epochs=-3"], ["train.epochs", "greater than or equal to 1", "got -3"]),
        (["model.latent_dim=0"], ["model.latent_dim", "greater than or equal to 1", "got 0"]),
        (["train.lr=0"], ["train.lr", "greater than 0", "got 0"]),
        (["train.lr=-0.001"], ["train.lr", "greater than 0", "got -0.001"]),
        (["train.lr=inf"], ["train.lr", "expected a finite number", "got inf"]),
        (["train.batch_size=0"], ["train.batch_size", "greater than or equal to 1"]),
        (["data.val_fraction=0.7"], ["data.val_fraction", "less than 0.5", "0.7"]),
        (["model.likelihood={kind=\"normal\", scale=-1}"], ["model.likelihood.scale", "-1"]),
        (["train.device=\"tpu\""], ["train.device", "'auto', 'cpu' or 'cuda'", "'tpu'"]),
        (["train.epochs"], ["--set expects KEY=VALUE"]),
        (["data.dataset=\"data.csv\""], ["data.dataset", "data.csv"]),
        (["model.encoder={kind=\"conv\"}", "model.decoder={kind=\"conv\"}", "data.dataset=\"VEC\""], ["model.encoder.kind", "(C, H, W)", "got shape (4,)"]),
    ],
)
def test_bad_config_values_exit_2(server, tmp_path, sets, needles):
    sets = [s.replace("VEC", _npy(tmp_path, "vec.npy", _rand())) for s in sets]
    cfg = write_config(tmp_path / "c.toml", model={"likelihood": {"kind": "normal"}})
    args = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "run"
    assert_user_error(server.run("fit", cfg, "--out", out, *args), *needles)
    assert not out.exists()


def test_bad_config_file_exit_2(server, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = = 3\n")
    assert_user_error(server.run("fit", bad, "--out", tmp_path / "r"), "bad.toml", "not valid TOML")
    bad.write_bytes(b"\xff\xfe[train]")
    assert_user_error(server.run("fit", bad, "--out", tmp_path / "r"), "bad.toml", "not a UTF-8")
    assert not (tmp_path / "r").exists()


def test_out_is_a_file_or_resume_from_nothing(server, tmp_path):
    cfg = write_config(tmp_path / "c.toml")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert_user_error(server.run("fit", cfg, "--out", afile), "afile", "expected a run folder")
    assert afile.read_text() == "keep me"
    assert_user_error(server.run("fit", "--out", tmp_path / "none", "--resume"), "none", "no checkpoint.pt")
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def vector_run(server, tmp_path_factory):
    """A finished 1-epoch run trained on a (40, 4) .npy file (normal likelihood)."""
    tmp = tmp_path_factory.mktemp("vector")
    data = tmp / "x.npy"
    np.save(data, _rand())
    cfg = write_config(tmp / "c.toml", data={"dataset": str(data)}, model={"likelihood": {"kind": "normal"}}, train={"epochs": 1})
    res = server.run("fit", cfg, "--out", tmp / "run")
    assert res.rc == 0, res.stderr
    return tmp / "run", data


def test_data_changed_shape_after_training(server, vector_run):
    """evaluate / diagnose / --resume on data whose shape no longer matches the trained model."""
    run, data = vector_run
    np.save(data, _rand(40, 6))
    try:
        assert_user_error(server.run("evaluate", run), "x.npy", "expected data points of shape (4,)", "got shape (6,)")
        res = server.run("fit", "--out", run, "--resume", "--set", "train.epochs=2")
        assert_user_error(res, "--resume", "x.npy", "expected data points of shape (4,)", "got shape (6,)")
        assert len(load_checkpoint(run / CHECKPOINT)["history"]) == 1  # the run is untouched
    finally:
        np.save(data, _rand())
    assert server.run("evaluate", run, "--json").rc == 0


def test_data_changed_support_after_training(server, vector_run):
    """The same file now holds NaN: evaluate names the file instead of printing NaN metrics."""
    run, data = vector_run
    x = _rand()
    x[1, 1] = np.nan
    np.save(data, x)
    try:
        assert_user_error(server.run("evaluate", run), "x.npy", "NaN/inf")
    finally:
        np.save(data, _rand())


def test_resume_cannot_go_below_completed_epochs(server, tmp_path):
    cfg = write_config(tmp_path / "c.toml", train={"epochs": 2})
    assert server.run("fit", cfg, "--out", tmp_path / "run").rc == 0
    res = server.run("fit", "--out", tmp_path / "run", "--resume", "--set", "train.epochs=1")
    assert_user_error(res, "train.epochs must be at least the 2 epochs already completed", "got 1")


def test_resume_with_a_changed_config_is_refused(server, tmp_path):
    cfg = write_config(tmp_path / "c.toml", train={"epochs": 1})
    assert server.run("fit", cfg, "--out", tmp_path / "run").rc == 0
    res = server.run("fit", cfg, "--out", tmp_path / "run", "--resume", "--set", "model.latent_dim=3")
    assert_user_error(res, "--resume", "config differs", "only train.epochs may change")
