"""Reliability and safety (issue 6): bad input through the CLI, faults during training,
untrusted checkpoints. Every case here is listed in docs/reliability.md.

CLI cases run as real child processes, but forked from a small *fork server* (`conftest.ForkServer`,
shared with test_cli.py) that has imported
torch/pyro/pyrovae once: starting ``python -m pyrovae.cli`` costs seconds of imports, which would
make "kill training 20 times" slow. A forked child runs exactly ``pyrovae.cli.main(argv)`` (what
``python -m pyrovae.cli`` runs), has its own pid, exit code, stdout and stderr, and is killed with
real signals. The SIGTERM test uses a plain ``python -m pyrovae.cli`` subprocess.

Children run with ``OMP_NUM_THREADS=1``: on a busy 2-core machine, two OpenMP threads make these
tiny networks ~30x slower, and all runs compared bit for bit must use the same thread count.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from conftest import ENV, ROOT, Result, tiny_config

import pyrovae
from pyrovae import CheckpointError, ConfigError, DataError, load_config
from pyrovae.runs import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    load_checkpoint,
    migrate_run,
    save_checkpoint,
    save_legacy_checkpoint,
)


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
    return (
        _npy(tmp_path, "nan.npy", x),
        "normal",
        ["nan.npy", "expected finite values", "NaN/inf", "(5, 2)"],
    )


def _inf_npz(tmp_path):
    x = _rand()
    x[7, 1] = -np.inf
    return _npy(tmp_path, "inf.npz", x), "normal", ["inf.npz", "expected finite values", "(7, 1)"]


def _grey_bernoulli(tmp_path):
    hints = [
        "grey.npy",
        "bernoulli likelihood needs values in {0, 1}",
        "binarize",
        "continuous_bernoulli",
    ]
    return _npy(tmp_path, "grey.npy", _rand()), "bernoulli", hints


def _negative_poisson(tmp_path):
    x = np.random.default_rng(0).integers(0, 5, (40, 4)).astype(np.int64)
    x[3, 1] = -2
    return (
        _npy(tmp_path, "neg.npy", x),
        "poisson",
        ["neg.npy", "non-negative integer counts", "e.g. -2 at index"],
    )


def _fractional_poisson(tmp_path):
    return (
        _npy(tmp_path, "frac.npy", _rand() * 5),
        "poisson",
        ["frac.npy", "non-negative integer counts"],
    )


def _empty_npy(tmp_path):
    return (
        _npy(tmp_path, "empty.npy", np.zeros((0, 4), np.float32)),
        "normal",
        ["empty.npy", "at least one", "(0, 4)"],
    )


def _empty_npz(tmp_path):
    return (
        _npy(tmp_path, "empty.npz", np.zeros((5, 0), np.float32)),
        "normal",
        ["empty.npz", "at least one", "(5, 0)"],
    )


def _one_point(tmp_path):
    return _npy(tmp_path, "one.npy", _rand(1)), "normal", ["one.npy", "empty training split"]


def _float32_overflow(tmp_path):
    x = _rand().astype(np.float64)
    x[0, 0] = 1e300
    return _npy(tmp_path, "huge.npy", x), "normal", ["huge.npy", "float32 range", "1e+300"]


@pytest.mark.parametrize(
    "make",
    [
        _nan_npy,
        _inf_npz,
        _grey_bernoulli,
        _negative_poisson,
        _fractional_poisson,
        _empty_npy,
        _empty_npz,
        _one_point,
        _float32_overflow,
    ],
)
def test_bad_data_is_a_clear_error_and_leaves_no_folder(server, tmp_path, make):
    dataset, likelihood, needles = make(tmp_path)
    cfg = write_config(
        tmp_path / "c.toml", data={"dataset": dataset}, model={"likelihood": {"kind": likelihood}}
    )
    out = tmp_path / "new" / "nested" / "run"  # parents created for it must go too
    assert_user_error(server.run("fit", cfg, "--out", out), *needles)
    assert not (tmp_path / "new").exists()


def _idx_folder(folder: Path) -> Path:
    """A tiny valid MNIST-layout folder: 12 train / 5 test images of 4x4."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, shape in (
        ("train-images-idx3-ubyte", (12, 4, 4)),
        ("train-labels-idx1-ubyte", (12,)),
        ("t10k-images-idx3-ubyte", (5, 4, 4)),
        ("t10k-labels-idx1-ubyte", (5,)),
    ):
        arr = rng.integers(0, 10 if len(shape) == 1 else 256, shape, dtype=np.uint8)
        head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in shape)
        (folder / stem).write_bytes(head + arr.tobytes())
    return folder


@pytest.mark.parametrize(
    "damage,needles",
    [
        (
            "missing",
            ["missing IDX file t10k-labels-idx1-ubyte", "expected the four files", "found"],
        ),
        (
            "truncated",
            [
                "train-images-idx3-ubyte",
                "truncated IDX file",
                "expected 208 bytes",
                "got 150 bytes",
            ],
        ),
        (
            "too_long",
            ["t10k-images-idx3-ubyte", "too long IDX file", "expected 96 bytes", "got 97 bytes"],
        ),
        (
            "bad_magic",
            ["train-labels-idx1-ubyte", "bad IDX magic number", "expected 2049", "got 2051"],
        ),
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
    cfg = write_config(
        tmp_path / "c.toml", data={"dataset": "mnist", "root": str(root), "limit": 0}
    )
    out = tmp_path / "run"
    assert_user_error(server.run("fit", cfg, "--out", out), *needles)
    assert not out.exists()


def test_valid_tiny_idx_folder_trains(server, tmp_path):
    """The IDX fixture above is valid, so the errors really come from the damage."""
    root = _idx_folder(tmp_path / "mnist")
    cfg = write_config(
        tmp_path / "c.toml",
        data={"dataset": "mnist", "root": str(root), "limit": 0},
        train={"epochs": 1},
    )
    res = server.run("fit", cfg, "--out", tmp_path / "run")
    assert res.rc == 0, res.stderr
    assert pyrovae.load_run(tmp_path / "run").model.data_shape == (1, 4, 4)


@pytest.mark.parametrize(
    "sets,needles",
    [
        (["model.prior.kind=gauss"], ["model.prior", "'gauss'", "normal", "mixture", "vamp"]),
        (["model.encoder={hidden=[8]}"], ["model.encoder", "missing 'kind'", "mlp, linear, conv"]),
        (['train.epochs="many"'], ["train.epochs", "valid integer", "'many'"]),
        (["train.epochs=2.5"], ["train.epochs", "2.5"]),
        (["train.epochs=-3"], ["train.epochs", "greater than or equal to 1", "got -3"]),
        (["model.latent_dim=0"], ["model.latent_dim", "greater than or equal to 1", "got 0"]),
        (["train.lr=0"], ["train.lr", "greater than 0", "got 0"]),
        (["train.lr=-0.001"], ["train.lr", "greater than 0", "got -0.001"]),
        (["train.lr=inf"], ["train.lr", "expected a finite number", "got inf"]),
        (["train.batch_size=0"], ["train.batch_size", "greater than or equal to 1"]),
        (["train.lr_decay=1.5"], ["train.lr_decay", "less than or equal to 1", "1.5"]),
        (["train.lr_min=0.1"], ["train", "lr_min (0.1) must not exceed lr (0.001)"]),
        (["data.val_fraction=0.7"], ["data.val_fraction", "less than 0.5", "0.7"]),
        (['model.likelihood={kind="normal", scale=-1}'], ["model.likelihood.scale", "-1"]),
        (['train.device="tpu"'], ["train.device", "'auto', 'cpu' or 'cuda'", "'tpu'"]),
        (["train.epochs"], ["--set expects KEY=VALUE"]),
        (['data.dataset="data.csv"'], ["data.dataset", "data.csv"]),
        (
            ['model.encoder={kind="conv"}', 'model.decoder={kind="conv"}', 'data.dataset="VEC"'],
            ["model.encoder: ", 'kind = "conv" needs image data', "(C, H, W)", "input shape (4,)"],
        ),
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
    assert_user_error(
        server.run("fit", "--out", tmp_path / "none", "--resume"), "none", "no checkpoint.json"
    )
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def vector_run(server, tmp_path_factory):
    """A finished 1-epoch run trained on a (40, 4) .npy file (normal likelihood)."""
    tmp = tmp_path_factory.mktemp("vector")
    data = tmp / "x.npy"
    np.save(data, _rand())
    cfg = write_config(
        tmp / "c.toml",
        data={"dataset": str(data)},
        model={"likelihood": {"kind": "normal"}},
        train={"epochs": 1},
    )
    res = server.run("fit", cfg, "--out", tmp / "run")
    assert res.rc == 0, res.stderr
    return tmp / "run", data


def test_data_changed_shape_after_training(server, vector_run):
    """evaluate / diagnose / --resume on data whose shape no longer matches the trained model."""
    run, data = vector_run
    np.save(data, _rand(40, 6))
    try:
        assert_user_error(
            server.run("evaluate", run),
            "x.npy",
            "expected data points of shape (4,)",
            "got shape (6,)",
        )
        res = server.run("fit", "--out", run, "--resume", "--set", "train.epochs=2")
        assert_user_error(
            res, "--resume", "x.npy", "expected data points of shape (4,)", "got shape (6,)"
        )
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
    res = server.run(
        "fit", cfg, "--out", tmp_path / "run", "--resume", "--set", "model.latent_dim=3"
    )
    assert_user_error(res, "--resume", "config differs", "only train.epochs may change")


# =============================================================================================
# Faults during training
# =============================================================================================
def _wait_for(cond, timeout: float, poll: float = 0.0005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(poll)
    return False


def test_loss_that_stays_infinite_stops_with_a_clear_error(server, tmp_path):
    """Finite data whose Gaussian log-density overflows: retries with lower lr, then exit 2."""
    x = _rand()
    x[:, 0] = 1e30  # finite in float32, but (x - mu)^2 overflows
    cfg = write_config(
        tmp_path / "c.toml",
        data={"dataset": _npy(tmp_path, "big.npy", x)},
        model={"likelihood": {"kind": "normal"}},
        train={"max_retries": 2},
    )
    res = server.run("fit", cfg, "--out", tmp_path / "run")
    assert res.rc == 2 and "Traceback" not in res.stderr, res.stderr
    assert (
        "pyrovae: error: the loss became non-finite" in res.stderr
        and "after 2 retries" in res.stderr
    )
    assert "learning rate lowered to 0.00025" in res.stderr
    assert res.stderr.count("restored the last good state") == 2  # log lines go to stderr
    assert not (tmp_path / "run").exists()  # no checkpoint was ever good: no folder at all


def test_stop_after_a_bad_update_saves_the_last_good_state(tmp_path):
    """A signal right after an update that made the parameters NaN (with a finite loss): the
    checkpoint holds the epoch's starting state, never the NaN parameters."""
    from pyrovae.train import Callback

    class PoisonThenStop(Callback):
        def __init__(self) -> None:
            self.calls = 0

        def on_step_end(self, trainer, loss):
            self.calls += 1
            if self.calls == 6:  # epoch 2, second step
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))
                trainer.request_stop(signal.SIGTERM)

    run = pyrovae.fit(
        tiny_config(), tmp_path / "r", progress=False, figures=False, callbacks=[PoisonThenStop()]
    )
    assert run.interrupted
    state = load_checkpoint(tmp_path / "r" / CHECKPOINT)  # refuses NaN parameters, so: finite
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0 and state["perm"] is None
    resumed = pyrovae.fit(None, tmp_path / "r", resume=True, progress=False, figures=False)
    full = pyrovae.fit(tiny_config(), tmp_path / "full", progress=False, figures=False)
    assert_same_params(resumed.model, full.model)


def test_save_refuses_nonfinite_parameters(tmp_path):
    from pyrovae.runs import save_run_checkpoint
    from pyrovae.train import Trainer
    from pyrovae.workflow import RunWriter

    cfg = load_config(tiny_config())
    data = pyrovae.load_data(cfg.data)
    trainer = Trainer(pyrovae.build_model(cfg, data.shape), cfg.train, data.x_train, progress=False)
    save_run_checkpoint(tmp_path, cfg, data.shape, trainer.state_dict())  # finite: written
    assert load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 0
    for p in tmp_path.iterdir():  # checkpoint.json and its .safetensors
        p.unlink()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    with pytest.raises(pyrovae.TrainingError, match="non-finite parameters"):
        save_run_checkpoint(tmp_path, cfg, data.shape, trainer.state_dict())
    with pytest.raises(pyrovae.TrainingError, match="non-finite parameters"):
        RunWriter(tmp_path, cfg, data.shape).on_epoch_end(trainer)
    assert not list(tmp_path.iterdir())  # no checkpoint, no metrics, no temporary file


def _kill_config(path: Path, epochs: int) -> Path:
    """Tiny digits, 4 steps per epoch; 256-unit layers make each checkpoint ~2 MB, so writing
    it takes long enough for kills to land inside the write."""
    net = {"kind": "mlp", "hidden": [256, 256]}
    return write_config(
        path,
        data={"limit": 128},
        model={"encoder": net, "decoder": net},
        train={"epochs": epochs, "batch_size": 32},
    )


def test_sigkill_at_random_moments_never_breaks_the_run(server, tmp_path):
    """SIGKILL a training process 20 times (at random moments, and right inside checkpoint
    writes); after every kill the checkpoint loads and progress never goes back; the run then
    resumes to the end with parameters and metrics identical to an uninterrupted run."""
    cfg = _kill_config(tmp_path / "c.toml", epochs=100_000)
    out = tmp_path / "run"
    rng = random.Random(6)
    seen = {"mid_write": 0, "no_checkpoint_yet": 0, "checkpoint": 0}
    last = 0
    for i in range(20):
        fresh = not (out / "config.toml").exists()
        pid = server.start(
            *(("fit", cfg, "--out", out) if fresh else ("fit", "--out", out, "--resume"))
        )
        if i == 0:  # while loading data / during the first epoch: before any checkpoint
            time.sleep(0.05)
        elif i % 2:  # aim at a checkpoint write: kill as soon as its temporary file appears
            _wait_for(lambda: any(out.glob(".checkpoint*.tmp")), timeout=20)
        else:  # anywhere: steps, validation, checkpoint or metrics writes
            time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
        res = server.wait()
        assert res.rc == -signal.SIGKILL, res.stderr
        seen["mid_write"] += any(out.glob(".checkpoint*.tmp"))
        if (out / CHECKPOINT).exists():
            seen["checkpoint"] += 1
            run = pyrovae.load_run(out)  # never fails
            assert len(run.history) >= last  # resumed from the last complete epoch, not earlier
            last = len(run.history)
        else:
            seen["no_checkpoint_yet"] += 1
    print("SIGKILL outcomes:", seen)
    assert seen["mid_write"] >= 1, seen
    assert last >= 1, seen

    final = last + 2
    res = server.run("fit", "--out", out, "--resume", "--set", f"train.epochs={final}")
    assert res.rc == 0, res.stderr
    assert not list(out.glob(".*.tmp"))  # what the kills left behind was cleaned up
    ref = server.run(
        "fit", _kill_config(tmp_path / "ref.toml", epochs=final), "--out", tmp_path / "ref"
    )
    assert ref.rc == 0, ref.stderr
    assert_same_params(pyrovae.load_run(out).model, pyrovae.load_run(tmp_path / "ref").model)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "ref"))
    assert strip_times(got["history"]) == strip_times(want["history"])
    assert got["test_elbo"] == want["test_elbo"]


def test_cli_same_config_and_seed_give_identical_metrics(server, tmp_path):
    cfg = write_config(tmp_path / "c.toml")
    for name in ("a", "b"):
        assert server.run("fit", cfg, "--out", tmp_path / name).rc == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    timing = {"history", "train_seconds"}
    assert strip_times(a["history"]) == strip_times(b["history"])
    assert {k: v for k, v in a.items() if k not in timing} == {
        k: v for k, v in b.items() if k not in timing
    }


@pytest.mark.parametrize("how", ["SIGTERM-python-m", "SIGINT-forked"])
def test_signal_writes_a_checkpoint_exits_130_and_resume_continues(server, tmp_path, how):
    """SIGTERM to a real ``python -m pyrovae.cli fit`` process / SIGINT (Ctrl-C) to a forked
    one, mid-training: a checkpoint is written (mid-epoch if need be), the exit status is 130,
    and ``--resume`` ends with parameters identical to an uninterrupted run."""
    cfg = _kill_config(tmp_path / "c.toml", epochs=100_000)
    out = tmp_path / "run"
    if how.endswith("python-m"):
        cmd = [sys.executable, "-m", "pyrovae.cli", "fit", str(cfg), "--out", str(out)]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert _wait_for(lambda: (out / CHECKPOINT).exists(), timeout=120, poll=0.01)
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        rc = proc.returncode
    else:
        pid = server.start("fit", cfg, "--out", out)
        assert _wait_for(lambda: (out / CHECKPOINT).exists(), timeout=120, poll=0.01)
        time.sleep(0.17)
        os.kill(pid, signal.SIGINT)
        res = server.wait()
        rc, stderr = res.rc, res.stderr
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    assert "pyrovae: interrupted; checkpoint written to" in stderr
    assert f"pyrovae fit --out {out} --resume" in stderr
    state = load_checkpoint(out / CHECKPOINT)
    pyrovae.load_run(out)
    final = state["epoch"] + 2
    res = server.run("fit", "--out", out, "--resume", "--set", f"train.epochs={final}")
    assert res.rc == 0, res.stderr
    ref_cfg = _kill_config(tmp_path / "ref.toml", epochs=final)
    assert server.run("fit", ref_cfg, "--out", tmp_path / "ref").rc == 0
    assert_same_params(pyrovae.load_run(out).model, pyrovae.load_run(tmp_path / "ref").model)


def test_resume_after_a_kill_before_the_first_checkpoint_starts_over(server, tmp_path):
    """A folder holding only config.toml (killed during epoch 1): --resume starts from scratch."""
    cfg = write_config(tmp_path / "c.toml", train={"epochs": 1})
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(cfg.read_text())
    (out / ".checkpoint.json.abc123.tmp").write_bytes(b"half a checkpoint")
    res = server.run("fit", "--out", out, "--resume")
    assert res.rc == 0, res.stderr
    assert len(pyrovae.load_run(out).history) == 1
    assert not (out / ".checkpoint.json.abc123.tmp").exists()


# =============================================================================================
# Untrusted files
# =============================================================================================
class _ShellPayload:
    """Unpickling this runs ``touch MARKER`` through the shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenPayload:
    """Unpickling this calls ``open(MARKER, "w")``, which creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _copy_run(src: Path, dst: Path) -> Path:
    """Copy a run folder's files (config, checkpoint set, metrics; not the figures)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _rewrite(run: Path, edit) -> Path:
    """Load the run's checkpoint, apply ``edit(state)``, save it back (as pyrovae would)."""
    state = load_checkpoint(run / CHECKPOINT)
    edit(state)
    state.pop("format_version", None)
    save_checkpoint(run / CHECKPOINT, state)
    return run / CHECKPOINT


def _make_legacy(run: Path) -> Path:
    """Turn a run folder into one of an older pyrovae: the same state as a torch.save'd
    checkpoint.pt, no checkpoint.json / .safetensors."""
    state = load_checkpoint(run / CHECKPOINT)
    for p in [run / CHECKPOINT, *run.glob("checkpoint-*.safetensors")]:
        p.unlink()
    save_legacy_checkpoint(run / LEGACY_CHECKPOINT, state)
    return run / LEGACY_CHECKPOINT


@pytest.mark.parametrize("payload", [_ShellPayload, _OpenPayload])
@pytest.mark.parametrize("how", ["inside_a_checkpoint", "bare_pickle"])
def test_crafted_pickle_checkpoint_is_refused_without_running_code(
    digits_run, tmp_path, payload, how
):
    """A pickled checkpoint.pt (an older pyrovae's format) is never unpickled by `load_run` or
    `fit --resume` (they name `pyrovae migrate`); `migrate_run` reads it with
    `weights_only=True` and refuses the payload without running it."""
    run = _copy_run(digits_run.dir, tmp_path / "run")
    legacy = _make_legacy(run)
    marker = tmp_path / "pwned"
    if how == "inside_a_checkpoint":
        state = torch.load(legacy, weights_only=True)
        state["history"] = payload(marker)
        torch.save(state, legacy)
    else:
        legacy.write_bytes(pickle.dumps(payload(marker), protocol=2))
    # the payload is live: an unsafe load would create the file
    try:
        torch.load(legacy, weights_only=False)
    except RuntimeError:  # a bare pickle: torch unpickles it first, then finds no magic number
        pass
    assert marker.exists()
    marker.unlink()

    for load in (pyrovae.load_run, lambda d: pyrovae.fit(None, d, resume=True, progress=False)):
        with pytest.raises(CheckpointError) as e:
            load(run)
        msg = str(e.value)
        assert str(legacy) in msg and f"pyrovae migrate {run}" in msg
    with pytest.raises(CheckpointError) as e:
        migrate_run(run)
    msg = str(e.value)
    assert str(legacy) in msg and "refused to load" in msg
    assert "asks to import the Python object" in msg and "nothing in it was executed" in msg
    assert ("system" if payload is _ShellPayload else "open") in msg.split("Python object")[1]
    assert not marker.exists() and legacy.is_file() and not (run / CHECKPOINT).exists()


def test_crafted_pickle_checkpoint_via_cli(server, digits_run, tmp_path):
    run = _copy_run(digits_run.dir, tmp_path / "run")
    legacy = _make_legacy(run)
    marker = tmp_path / "pwned"
    legacy.write_bytes(pickle.dumps(_ShellPayload(marker)))
    for argv in (
        ["evaluate", run],
        ["sample", run, "--out", tmp_path / "s.png"],
        ["fit", "--out", run, "--resume"],
    ):
        assert_user_error(server.run(*argv), str(legacy), f"pyrovae migrate {run}")
    assert_user_error(server.run("migrate", run), str(legacy), "refused to load")
    assert not marker.exists() and not (tmp_path / "s.png").exists()


def test_migrate_converts_an_old_run_folder_in_place(server, digits_run, tmp_path):
    """`pyrovae migrate RUN` turns checkpoint.pt into checkpoint.json + .safetensors with the
    same state (parameters, optimizer, RNG states, history); the run then loads and resumes;
    a second migrate says it is current; a crash after the new set was written (both formats
    present) is finished by the next migrate."""
    run = _copy_run(digits_run.dir, tmp_path / "run")
    want = load_checkpoint(run / CHECKPOINT)
    legacy = _make_legacy(run)
    res = server.run("migrate", run)
    assert res.rc == 0, res.stderr
    assert "converted" in res.stdout and not legacy.exists()
    got = load_checkpoint(run / CHECKPOINT)
    for key in ("model", "torch_rng", "batch_rng", "history", "config", "epoch", "lr"):
        a, b = want[key], got[key]
        if isinstance(a, dict) and key == "model":
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    sa, sb = want["optimizer"]["state"], got["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]
    )
    assert not list(run.glob("*.pt")) and not list(run.glob(".*"))
    assert_same_params(pyrovae.load_run(run).model, digits_run.model)
    res = server.run("migrate", run)
    assert res.rc == 0 and "already in the current format" in res.stdout
    save_legacy_checkpoint(legacy, want)  # killed between the new set and deleting the old file
    assert migrate_run(run) == (run / CHECKPOINT, True) and not legacy.exists()
    assert_user_error(server.run("migrate", tmp_path / "nothing"), "run folder not found")


# ----------------------------------------------------------------- damaged checkpoint sets
def _tensor_file(run: Path) -> Path:
    return run / json.loads((run / CHECKPOINT).read_text())["tensors"]["file"]


def _truncate(path: Path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _zero_head(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:16] = b"\x00" * 16
    path.write_bytes(bytes(raw))


def _edit_json(run: Path, edit) -> None:
    """Apply ``edit(manifest)`` to checkpoint.json as a hand edit would (no re-save)."""
    m = json.loads((run / CHECKPOINT).read_text())
    edit(m)
    (run / CHECKPOINT).write_text(json.dumps(m))


def _craft_tensors(run: Path, header=None, raw=None, size_ok: bool = True) -> None:
    """Rewrite the safetensors file: ``header(h)`` edits its JSON header (data kept), ``raw(b)``
    edits the whole byte string; then make checkpoint.json's recorded size agree (so the
    safetensors reader, not the size check, meets the damage)."""
    import struct

    path = _tensor_file(run)
    blob = path.read_bytes()
    if header is not None:
        (n,) = struct.unpack("<Q", blob[:8])
        h = json.loads(blob[8 : 8 + n])
        header(h)
        text = json.dumps(h).encode()
        blob = struct.pack("<Q", len(text)) + text + blob[8 + n :]
    if raw is not None:
        blob = raw(blob)
    path.write_bytes(blob)
    if size_ok:
        _edit_json(run, lambda m: m["tensors"].__setitem__("bytes", len(blob)))


def _first(h: dict, prefix: str) -> dict:
    return next(v for k, v in h.items() if k.startswith(prefix))


@pytest.mark.parametrize(
    "damage,needles",
    [
        # checkpoint.json damaged
        (lambda r: _truncate(r / CHECKPOINT, 0.0), ["checkpoint.json: refused to load", "not valid JSON"]),
        (lambda r: _truncate(r / CHECKPOINT, 0.5), ["checkpoint.json: refused to load", "truncated or corrupt"]),
        (lambda r: _truncate(r / CHECKPOINT, 0.999), ["checkpoint.json: refused to load"]),
        (lambda r: _zero_head(r / CHECKPOINT), ["checkpoint.json: refused to load"]),
        (lambda r: (r / CHECKPOINT).write_text("just text"), ["checkpoint.json: refused to load"]),
        (lambda r: _edit_json(r, lambda m: m.__setitem__("format_version", 99)), ["expected format_version 2, got 99"]),
        (lambda r: (r / CHECKPOINT).write_text('{"model": {}}'), ["expected format_version 2, got None"]),
        (lambda r: (r / CHECKPOINT).write_text("[1, 2]"), ["expected format_version 2, got 'list'"]),
        (lambda r: _rewrite(r, lambda s: s["config"]["model"].__setitem__("latent_dim", 3)), ["parameters do not match the stored config", "size mismatch"]),
        (lambda r: _rewrite(r, lambda s: s["config"]["model"]["encoder"].__setitem__("hidden", [16, 16])), ["parameters do not match the stored config"]),
        (lambda r: _rewrite(r, lambda s: s.__setitem__("data_shape", [1, 8, 9])), ["parameters do not match the stored config"]),
        (lambda r: _rewrite(r, lambda s: s.__setitem__("data_shape", [0])), ["entry 'data_shape'", "positive integers", "got [0]"]),
        (lambda r: _rewrite(r, lambda s: s.pop("history")), ["incomplete checkpoint", "missing history"]),
        (lambda r: _edit_json(r, lambda m: m.pop("history")), ["incomplete checkpoint", "missing history"]),
        (lambda r: _rewrite(r, lambda s: s.__setitem__("epoch", "3")), ["entry 'epoch'", "expected an integer >= 0", "got '3'"]),
        (lambda r: _edit_json(r, lambda m: m.__setitem__("lr", "fast")), ["entry 'lr'", "finite number", "got 'fast'"]),
        (lambda r: _edit_json(r, lambda m: m.__setitem__("history", {"epoch": 1})), ["entry 'history'", "got a dict"]),
        (lambda r: _edit_json(r, lambda m: m.__setitem__("torch_rng", [1, 2, 3])), ["entry 'torch_rng'", "uint8 RNG-state tensor", "got [1, 2, 3]"]),
        (lambda r: _edit_json(r, lambda m: m.__setitem__("perm", {"__tensor__": "nope"})), ["entry 'perm'", "does not hold"]),
        (lambda r: _edit_json(r, lambda m: m["optimizer"].__setitem__("state", {"__items__": "x"})), ["entry 'optimizer.state'", "[key, value] pairs"]),
        (lambda r: _edit_json(r, lambda m: m.pop("tensors")), ["entry 'tensors'", "expected {file"]),
        (lambda r: _edit_json(r, lambda m: m["tensors"].__setitem__("file", "../../etc/passwd")), ["entry 'tensors'", "in the same folder"]),
        (lambda r: _edit_json(r, lambda m: m["tensors"].__setitem__("bytes", "many")), ["entry 'tensors'"]),
        (lambda r: _rewrite(r, lambda s: s["config"]["train"].__setitem__("lr", -1)), ["config stored in the checkpoint is invalid", "train.lr"]),
        (lambda r: _rewrite(r, lambda s: s.__setitem__("kind", "ae")), ["entry 'kind' is 'ae'", "model.kind = 'vae'"]),
        (lambda r: _rewrite(r, lambda s: next(iter(s["model"].values())).fill_(float("nan"))), ["holds NaN/inf values"]),
        (lambda r: ((r / CHECKPOINT).unlink(), (r / CHECKPOINT).mkdir()), ["expected a checkpoint file"]),
        (lambda r: (r / CHECKPOINT).unlink(), ["checkpoint not found"]),
        (lambda r: (r / "metrics.json").write_text("{not json"), ["metrics.json: not valid JSON"]),
        # the .safetensors file damaged
        (lambda r: _tensor_file(r).unlink(), [".safetensors: missing", "copy the whole run folder"]),
        (lambda r: _truncate(_tensor_file(r), 0.5), [".safetensors: refused to load", "bytes (as checkpoint.json says)", "truncated or corrupt"]),
        (lambda r: _craft_tensors(r, raw=lambda b: b[:-1]), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, raw=lambda b: b"\x00" * 8 + b[8:]), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, raw=lambda b: (2**62).to_bytes(8, "little") + b[8:]), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, raw=lambda b: (len(b) + 10).to_bytes(8, "little") + b[8:]), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, header=lambda h: _first(h, "model.").__setitem__("dtype", "Q9")), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, header=lambda h: _first(h, "model.").__setitem__("dtype", "F64")), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, header=lambda h: h["torch_rng"].__setitem__("dtype", "I8")), ["entry 'torch_rng'", "uint8 RNG-state tensor", "torch.int8"]),
        (lambda r: _craft_tensors(r, header=lambda h: _first(h, "model.").__setitem__("data_offsets", [0, 10**12])), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, header=lambda h: _first(h, "model.").__setitem__("shape", [10**9])), [".safetensors: refused to load", "not a valid safetensors file"]),
        (lambda r: _craft_tensors(r, header=lambda h: h.__setitem__("extra", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})), ["holds tensors extra", "does not name"]),
        (lambda r: _craft_tensors(r, raw=lambda b: b"\xff" * len(b)), [".safetensors: refused to load"]),
    ],
    ids=[
        "empty", "half", "last-byte-missing", "zeroed-header", "text", "format-99", "no-format",
        "not-a-dict", "latent-dim-changed", "hidden-changed", "data-shape-changed", "data-shape-zero",
        "missing-entry", "json-missing-entry", "wrong-type", "json-lr-string", "json-history-dict",
        "json-rng-list", "json-dangling-tensor-ref", "json-bad-items", "json-no-tensors-entry",
        "json-tensors-file-outside", "json-tensors-bytes-string", "invalid-config", "kind-mismatch",
        "nan-parameter", "is-a-folder", "missing", "metrics-json-corrupt",
        "st-missing", "st-half", "st-last-byte-missing", "st-zeroed-header-length",
        "st-oversized-header-length", "st-header-length-past-end", "st-unknown-dtype",
        "st-dtype-size-mismatch", "st-wrong-dtype-same-size", "st-offsets-out-of-range",
        "st-shape-too-large", "st-extra-tensor", "st-all-ff",
    ],
)  # fmt: skip
def test_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(
    digits_run, tmp_path, damage, needles
):
    run = _copy_run(digits_run.dir, tmp_path / "run")
    damage(run)
    with pytest.raises(CheckpointError) as e:
        pyrovae.load_run(run)
    msg = str(e.value)
    assert str(run) in msg and "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize(
    "edit,needles",
    [
        (
            lambda s: s.__setitem__("perm", torch.arange(7)),
            ["entry 'perm'", "permutation of the 256 training points", "got 7 torch.int64"],
        ),
        (  # the right length and dtype, but index 0 twice and index 255 never
            lambda s: s.__setitem__(
                "perm", torch.cat([torch.arange(255), torch.zeros(1, dtype=torch.int64)])
            ),
            ["entry 'perm'", "permutation of the 256 training points", "got 256 torch.int64"],
        ),
        (  # a permutation, of the wrong dtype
            lambda s: s.__setitem__("perm", torch.randperm(256).to(torch.int32)),
            ["entry 'perm'", "got 256 torch.int32"],
        ),
        (lambda s: s.__setitem__("step_in_epoch", 3), ["entry 'step_in_epoch'", "got 3"]),
        (
            lambda s: (
                s.__setitem__("perm", torch.randperm(256)),
                s.__setitem__("step_in_epoch", 5),
            ),
            ["entry 'step_in_epoch'", "expected 0..4", "got 5"],
        ),
        (lambda s: s.__setitem__("torch_rng", torch.zeros(3, dtype=torch.uint8)), ["do not fit"]),
        (lambda s: s["optimizer"].__setitem__("param_groups", []), ["do not fit"]),
    ],
    ids=[
        "perm-too-short",
        "perm-not-a-permutation",
        "perm-int32",
        "step-without-perm",
        "step-past-the-epoch",
        "rng-state",
        "optimizer",
    ],
)
def test_damaged_training_state_is_refused_on_resume(digits_run, tmp_path, edit, needles):
    run = _copy_run(digits_run.dir, tmp_path / "run")
    _rewrite(run, edit)
    with pytest.raises(CheckpointError) as e:
        pyrovae.fit(None, run, resume=True, progress=False, figures=False)
    assert str(run / CHECKPOINT) in str(e.value)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_config_is_data_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    (tmp_path / "c.toml").write_text(f'[data]\ndataset = "{code}"\n')
    cfg = load_config(tmp_path / "c.toml", [f'data.root="{code}"'])
    assert cfg.data.dataset == code and cfg.data.root == code  # plain strings
    with pytest.raises(DataError, match="no such file or folder"):
        pyrovae.load_data(cfg.data)
    with pytest.raises(ConfigError, match="model.prior"):
        load_config(None, [f"model.prior.kind={code}"])
    assert not marker.exists()


def test_fit_writes_only_inside_its_run_folder(tmp_path, monkeypatch):
    """No config value is an output path: a run writes config.toml, checkpoint.json + its
    .safetensors, metrics.json
    and figures/*.png (fixed names) inside --out, and nothing else around it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    pyrovae.fit(tiny_config(train={"epochs": 1}), work / "runs" / "r", progress=False)
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("runs/r/tb/events.out.tfevents.")]
    assert len(events) == 1  # TensorBoard's event file (train.log = true, the default)
    files = [f for f in files if f not in events]
    figures = ["latent_scatter.png", "loss_curves.png", "reconstructions.png", "samples.png"]
    want = [
        "runs/r/checkpoint-000001.safetensors",
        "runs/r/checkpoint.json",
        "runs/r/config.toml",
        *(f"runs/r/figures/{f}" for f in figures),
        "runs/r/metrics.json",
    ]
    assert files == sorted(want)


def test_sample_out_is_the_users_explicit_path(server, digits_run, tmp_path):
    out = tmp_path / "deep" / "er" / "s.npy"  # missing folders are created, as for .png
    res = server.run("sample", digits_run.dir, "-n", "3", "--out", out)
    assert res.rc == 0, res.stderr
    assert np.load(out).shape == (3, 1, 8, 8)
    assert_user_error(
        server.run("sample", digits_run.dir, "-n", "0", "--out", out),
        "-n must be at least 1; got 0",
    )
