"""Run folders shared between processes and faults: the folder lock, the data fingerprint, and
write errors that name what survived. Every case here is listed in docs/reliability.md.

CLI cases call `pyrovae.cli.main(argv)` in this process (exit code and stderr are what the
command gives), except the lock test, which needs two real processes.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from conftest import tiny_config

import pyrovae
from pyrovae import DataError, RunLockedError, RunWriteError
from pyrovae.cli import main
from pyrovae.data import DataConfig, data_changes, fingerprint, load_data
from pyrovae.runs import (
    CHECKPOINT,
    LOCK,
    RunLock,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_bytes(tomli_w.dumps(cfg).encode())
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `folder` (hidden files included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(capsys, *argv: str | Path) -> tuple[int, str]:
    """Run `pyrovae ARGV` in this process; return (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    log = logging.getLogger("pyrovae")  # leave no handler on capsys's stderr behind
    for h in [h for h in log.handlers if getattr(h, "_pyrovae", False)]:
        log.removeHandler(h)
    return rc, capsys.readouterr().err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("pyrovae: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


# ------------------------------------------------------------------------------ the lock
def _wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_second_fit_on_a_running_folder_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    """Two real processes: the second `fit` (new or --resume) on a folder the first is training
    into exits 2 naming the folder and the first one's pid, and changes nothing in it. After
    `kill -9` of the first, its `.lock` is left behind but `--resume` continues."""
    cfg = write_config(tmp_path / "c.toml", tiny_config(train={"epochs": 100000}))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyrovae.cli"]
    first = subprocess.Popen(
        [*cmd, "fit", str(cfg), "--out", str(run), "-q"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert _wait_for(lambda: (run / CHECKPOINT).is_file(), 180), "the first fit never wrote"
        assert (run / LOCK).read_text().strip() == str(first.pid)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, writes nothing while we look
        before = snapshot(run)
        for extra in ([str(cfg)], ["--resume"]):
            second = subprocess.run(
                [*cmd, "fit", *extra, "--out", str(run)],
                cwd=ROOT,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert second.returncode == 2, second.stderr
            assert_one_line_error(second.stderr, str(run), f"pid {first.pid}", "in use")
            assert snapshot(run) == before
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    assert first.returncode == -signal.SIGKILL
    assert (run / LOCK).is_file()  # stale: its holder is dead, the OS dropped the lock
    done = load_checkpoint(run / CHECKPOINT)["epoch"]
    resumed = subprocess.run(
        [*cmd, "fit", "--out", str(run), "--resume", "--set", f"train.epochs={done + 1}", "-q"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == done + 1
    assert not (run / LOCK).exists()  # released (and deleted) by the process that finished


def test_lock_in_one_process(tmp_path):
    """`RunLock` conflicts between two opens in one process too; `fit` refuses a locked folder
    (new and --resume) before it reads or writes anything, and the lock goes with `fit`."""
    run = tmp_path / "run"
    pyrovae.fit(tiny_config(train={"epochs": 1}), run, progress=False, figures=False)
    assert not (run / LOCK).exists()
    before = snapshot(run)
    with RunLock(run):
        assert (run / LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()
        with pytest.raises(RunLockedError, match=str(run)):
            pyrovae.fit(None, run, resume=True, progress=False)
        with pytest.raises(RunLockedError, match="in use by another pyrovae process"):
            pyrovae.fit(tiny_config(), run, progress=False)
        assert {k: v for k, v in snapshot(run).items() if k != LOCK} == before
    assert not (run / LOCK).exists()
    (run / LOCK).write_text("999999999\n")  # stale, as a killed holder leaves it
    r = pyrovae.fit(None, run, resume=True, progress=False, figures=False)
    assert len(r.history) == 1 and not (run / LOCK).exists()


# ------------------------------------------------------------------------- fingerprints
def test_fingerprint_covers_each_split_and_is_deterministic():
    cfg = DataConfig(dataset="digits", limit=64, binarize="static")
    a, b = fingerprint(load_data(cfg, seed=3)), fingerprint(load_data(cfg, seed=3))
    assert a == b  # static binarization: the data as loaded, deterministic for a seed
    assert set(a) == {"x_train", "x_val", "x_test", "y_train", "y_val", "y_test"}
    assert a["x_train"]["shape"] == [64, 64] and a["x_train"]["dtype"] == "float32"
    assert a["y_test"]["dtype"] == "int64"
    ds = load_data(cfg, seed=3)
    assert a["x_train"]["sha256"] == hashlib.sha256(ds.x_train.numpy().tobytes()).hexdigest()
    other = fingerprint(load_data(cfg, seed=4))
    assert data_changes(a, other)[0].startswith("x_train content (SHA-256 ")
    ds.x_val = ds.x_val[:-1]
    ds.y_val = None
    changes = data_changes(a, fingerprint(ds))
    assert changes == ["x_val shape ([16, 64] then, [15, 64] now)", "y_val removed"]
    ds.x_test = ds.x_test.double()
    assert "x_test dtype (float32 then, float64 now)" in data_changes(a, fingerprint(ds))


@pytest.fixture
def npy_run(tmp_path, capsys):
    """A finished 1-epoch run trained through the CLI on a (40, 4) .npy file."""
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).random((40, 4)).astype(np.float32))
    cfg = tiny_config(
        data={"dataset": str(data), "limit": 0},
        model={"likelihood": {"kind": "normal"}},
        train={"epochs": 1},
    )
    run = tmp_path / "run"
    rc, err = cli(capsys, "fit", write_config(tmp_path / "c.toml", cfg), "--out", run, "-q")
    assert rc == 0, err
    return run, data


def test_changed_data_content_is_refused_unless_accepted(npy_run, capsys):
    """One value changed, same shape: resume / evaluate / diagnose exit 2 naming the file and
    "content", and the run is untouched; with --accept-data-changes they proceed."""
    run, data = npy_run
    x = np.load(data)
    x[7, 2] += 0.25
    np.save(data, x)
    before = snapshot(run)
    for argv in (
        ("fit", "--out", run, "--resume", "--set", "train.epochs=2"),
        ("evaluate", run),
        ("diagnose", run, "--points", "0", "--iwae-samples", "2"),
    ):
        rc, err = cli(capsys, *argv, "-q")
        assert rc == 2, err
        assert_one_line_error(
            err, f"data.dataset='{data}'", "content (SHA-256", "--accept-data-changes"
        )
        assert snapshot(run) == before
    with pytest.raises(DataError, match="x_(train|val|test) content"):
        pyrovae.load_run(run, data=True)
    assert pyrovae.load_run(run, data=True, accept_data_changes=True).data is not None
    rc, err = cli(capsys, "evaluate", run, "--accept-data-changes", "-q")
    assert rc == 0, err
    rc, err = cli(
        capsys, "fit", "--out", run, "--resume", "--set", "train.epochs=2",
        "--accept-data-changes", "-q",
    )
    assert rc == 0, err
    # the run continued on the new data and now holds its fingerprint
    assert cli(capsys, "evaluate", run, "-q")[0] == 0


def test_changed_data_shape_is_named(npy_run, capsys):
    run, data = npy_run
    np.save(data, np.random.default_rng(1).random((48, 4)).astype(np.float32))
    rc, err = cli(capsys, "evaluate", run, "-q")
    assert rc == 2, err
    assert_one_line_error(err, f"data.dataset='{data}'", "x_train shape ([29, 4] then, [34, 4] now)", "x_test shape")


def test_checkpoint_without_fingerprint_still_loads(npy_run, capsys):
    """Checkpoints written before fingerprints existed are loaded without the check; a
    malformed fingerprint is a `CheckpointError`."""
    run, data = npy_run
    state = load_checkpoint(run / CHECKPOINT)
    del state["data_fingerprint"], state["format_version"]
    save_checkpoint(run / CHECKPOINT, state)
    x = np.load(data)
    x[0, 0] += 1
    np.save(data, x)
    assert cli(capsys, "evaluate", run, "-q")[0] == 0
    state["data_fingerprint"] = {"x_train": {"shape": "(28, 4)"}}
    save_checkpoint(run / CHECKPOINT, state)
    rc, err = cli(capsys, "evaluate", run, "-q")
    assert rc == 2
    assert_one_line_error(err, "entry 'data_fingerprint': expected a table of split")


# ------------------------------------------------------------------- faults while writing
def _fail_replace(monkeypatch, name: str, after: int, code: int) -> None:
    """Make `os.replace` onto a file whose name matches the pattern `name` fail with `code`
    from its `after`+1-th call."""
    real, calls = os.replace, {"n": 0}

    def replace(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(Path(dst).name, name):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(code, os.strerror(code), str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(
    ("name", "after", "code", "survived"),
    [
        ("checkpoint.json", 1, errno.ENOSPC, "the last complete checkpoint is epoch 1, step 0"),
        ("checkpoint-*.safetensors", 1, errno.ENOSPC, "the last complete checkpoint is epoch 1, step 0"),
        ("metrics.json", 1, errno.ENOSPC, "the last complete checkpoint is epoch 2, step 0"),
        ("samples.png", 0, errno.EACCES, "the last complete checkpoint is epoch 2, step 0"),
        ("config.toml", 0, errno.ENOSPC, "no checkpoint was written yet"),
    ],
)
def test_a_failed_write_names_the_file_and_what_survived(
    tmp_path, capsys, monkeypatch, name, after, code, survived
):
    """Disk full / permission denied while writing a run folder's file: exit 1, one line naming
    the file and the checkpoint `--resume` continues from; no temporary file is left; the
    resume then finishes the run."""
    cfg = write_config(tmp_path / "c.toml", tiny_config(train={"epochs": 2}))
    run = tmp_path / "run"
    _fail_replace(monkeypatch, name, after, code)
    rc, err = cli(capsys, "fit", cfg, "--out", run, "-q")
    assert rc == 1, err
    target = run / "figures" / name if name.endswith(".png") else run / name
    target = run / "checkpoint-000002.safetensors" if "*" in name else target
    assert_one_line_error(err, f"could not write {target}: {os.strerror(code)}", survived)
    monkeypatch.undo()
    if name == "config.toml":
        assert not run.exists()  # nothing resumable: the folder it created is gone
        assert cli(capsys, "fit", cfg, "--out", run, "-q")[0] == 0
        return
    assert f"pyrovae fit --out {run} --resume continues from it" in err
    assert not [p for p in run.rglob(".*") if p.is_file()]  # no temporary file, no lock
    rc, err = cli(capsys, "fit", "--out", run, "--resume", "-q")
    assert rc == 0, err
    assert len(pyrovae.load_run(run).history) == 2
    assert (run / "figures" / "samples.png").is_file()


def test_write_error_is_an_oserror_from_the_api(tmp_path, monkeypatch):
    _fail_replace(monkeypatch, "checkpoint-*.safetensors", 0, errno.ENOSPC)
    with pytest.raises(RunWriteError) as e:
        pyrovae.fit(tiny_config(train={"epochs": 1}), tmp_path / "r", progress=False)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert e.value.filename == str(tmp_path / "r" / "checkpoint-000001.safetensors")
    assert "no checkpoint was written yet" in str(e.value)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------- SIGKILL inside a set write
_WRITER = """
import sys, torch
from pyrovae.runs import CHECKPOINT, load_checkpoint, save_checkpoint
from pathlib import Path
run = Path(sys.argv[1])
state = load_checkpoint(run / CHECKPOINT)
state["ballast"] = torch.zeros(2_000_000)  # 8 MB more per save: kills land inside writes
name = next(iter(state["model"]))
start = state["epoch"] + 1
print("ready", flush=True)
for k in range(start, start + 100_000):
    state["epoch"] = k
    state["model"][name].fill_(float(k))  # the tensors file says which save it belongs to
    state["history"] = [{"epoch": i} for i in range(k)]  # and so does the JSON
    save_checkpoint(run / CHECKPOINT, state)
"""


def test_sigkill_during_a_set_write_leaves_a_complete_set(npy_run):
    """A real process saving checkpoint sets in a loop is killed with SIGKILL (kill -9) while
    a temporary file of the set is on disk, and at other moments: every time, the checkpoint
    loads, its JSON and tensors come from the same save (epoch == the parameter's value ==
    the history's length), progress never goes back, and the next save's clean-up removes
    the temporary and orphan files."""
    run, _ = npy_run
    seen = {"inside_a_write": 0, "orphan_tensors": 0}
    last = load_checkpoint(run / CHECKPOINT)["epoch"]
    for i in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(run)],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            if i % 2 == 0:  # the moment a temporary file of the set exists
                _wait_for(lambda: any(run.glob(".checkpoint*.tmp")), 30)
            else:
                time.sleep(0.05 * i)
            subprocess.run(["kill", "-9", str(proc.pid)], check=True)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        seen["inside_a_write"] += any(run.glob(".checkpoint*.tmp"))
        files = sorted(run.glob("checkpoint-*.safetensors"))
        seen["orphan_tensors"] += len(files) > 1
        state = load_checkpoint(run / CHECKPOINT)
        value = next(iter(state["model"].values()))
        epoch = state["epoch"]
        if epoch > 1:  # a set the writer made, not the run's own checkpoint
            assert bool((value == epoch).all()) and len(state["history"]) == epoch
        assert epoch >= last
        last = epoch
    print("SIGKILL outcomes:", seen, "last epoch", last)
    assert seen["inside_a_write"] >= 1, seen
    assert last > 1
    removed = remove_stale_temp_files(run)
    assert not list(run.glob(".checkpoint*.tmp"))
    assert len(list(run.glob("checkpoint-*.safetensors"))) == 1
    assert all(p.name.startswith((".checkpoint", "checkpoint-")) for p in removed)
    load_checkpoint(run / CHECKPOINT)


# ------------------------------------------------------- any module, any torch optimizer
class _Tied(torch.nn.Module):
    """Tied weights (one storage, two names), a BatchNorm (int64 and float buffers), float16 and
    bfloat16 parameters, a non-contiguous buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(6, 6)
        self.dec = torch.nn.Linear(6, 6)
        self.dec.weight = self.enc.weight  # tied: one tensor under two names
        self.norm = torch.nn.BatchNorm1d(6)
        self.f16 = torch.nn.Parameter(torch.randn(3, dtype=torch.float16))
        self.brain = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.bfloat16))
        self.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())

    def forward(self, x):
        err = self.norm(self.dec(torch.tanh(self.enc(x)))) - x
        return (err**2).mean() + (self.f16.float() ** 2).sum() + (self.brain.float() ** 2).sum()


def _same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b), where  # tuples come back as lists
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}.{i}")
    else:
        assert a == b and type(a) is type(b), (where, a, b)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
        lambda p: torch.optim.LBFGS(p, lr=0.5, history_size=3),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
    ],
    ids=["adam-amsgrad", "sgd-nesterov", "adamw", "lbfgs", "adagrad"],
)
def test_any_module_and_optimizer_round_trip_through_a_run_folder(npy_run, tmp_path, make_opt):
    """The checkpoint set stores any `nn.Module.state_dict()` and any torch optimizer's
    `state_dict()` (nested per-parameter state, int keys, lists of tensors (L-BFGS), tuples,
    bools, None): what comes back is equal entry by entry (tuples as lists), and an
    optimizer loaded from it takes the same next step as the original."""
    run, _ = npy_run
    state = load_checkpoint(run / CHECKPOINT)
    torch.manual_seed(0)
    net = _Tied()
    params = [p for p in net.parameters() if p.dtype == torch.float32]
    opt = make_opt(params)
    x = torch.randn(5, 6)

    def closure():
        opt.zero_grad()
        loss = net(x)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    state["model"], state["optimizer"] = net.state_dict(), opt.state_dict()
    state.pop("format_version")
    save_checkpoint(tmp_path / CHECKPOINT, state)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    got = load_checkpoint(tmp_path / CHECKPOINT)
    _same(net.state_dict(), got["model"], "model")
    _same(opt.state_dict(), got["optimizer"], "optimizer")

    twin = _Tied()
    twin.load_state_dict(got["model"])
    twin_opt = make_opt([p for p in twin.parameters() if p.dtype == torch.float32])
    twin_opt.load_state_dict(got["optimizer"])
    assert twin.dec.weight is twin.enc.weight
    for model, o in ((net, opt), (twin, twin_opt)):
        o.step(lambda model=model, o=o: (o.zero_grad(), model(x).backward(), model(x))[-1])
    _same(net.state_dict(), twin.state_dict(), "after one more step")
