"""Data-parallel training (`pyrovae.distributed`): real processes on gloo, on the CPU.

The ranks are forked with `torch.multiprocessing` (each sets the environment `torchrun` would:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and run the public API or the CLI's
`main`; the launcher tests run `pyrovae fit --nproc 2`, i.e. `torch.distributed.run` itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ENV, ROOT, tiny_config
from pyro.poutine.messenger import Messenger

import pyrovae
from pyrovae import distributed
from pyrovae.build import build_model
from pyrovae.config import load_config
from pyrovae.data import load_data
from pyrovae.distributed import epoch_indices, step_seed, steps_per_epoch
from pyrovae.runs import CHECKPOINT, load_checkpoint
from pyrovae.train import Callback, Trainer

CTX = mp.get_context("fork")  # the children share this process's imports: no seconds of startup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, size: int, port: int, fn, args, log: Path | None, timeout: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYROVAE_DIST_TIMEOUT=timeout,
    )
    if log is not None:
        fd = os.open(log.with_suffix(f".{rank}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (pytest's is not fd 2)
    torch.set_num_threads(1)
    code = 0
    try:
        code = int(fn(rank, *args) or 0)
    except BaseException:  # noqa: BLE001 - a failed rank must say why in the test output
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        sys.stderr.flush()
        os._exit(code)


def run_ranks(
    fn, size: int, *args, log: Path | None = None, timeout: float = 60, world_size: int | None = None,
    dist_timeout: str = "20",
) -> list[int]:
    """Run `fn(rank, *args)` in `size` forked processes of a job of `world_size` (default
    `size`) processes; their exit codes."""
    port, world = free_port(), world_size or size
    procs = [
        CTX.Process(target=_child, args=(r, world, port, fn, args, log, dist_timeout))
        for r in range(size)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, end - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} rank(s) still running after {timeout} s"
    return [p.exitcode for p in procs]


# ------------------------------------------------------------------------------ the epoch order
def test_epoch_order_is_disjoint_equal_and_one_process_is_unchanged():
    n, b = 103, 20
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert steps_per_epoch(n, b, 1) == 6 and steps_per_epoch(n, b, 4) == 5  # 3 // 4 = 0
    for s in range(6):  # one process: exactly perm[s*B:(s+1)*B], the last batch kept
        assert torch.equal(epoch_indices(perm, s, b), perm[s * b : (s + 1) * b])
    for w in (2, 4):
        seen = []
        for s in range(steps_per_epoch(n, b, w)):
            parts = [epoch_indices(perm, s, b, r, w) for r in range(w)]
            assert len({len(p) for p in parts}) == 1  # equal counts on every rank
            seen += [i for p in parts for i in p.tolist()]
        assert len(seen) == len(set(seen)) and len(seen) >= n - (w - 1)  # disjoint, < W dropped
    seeds = {step_seed(0, e, s, r) for e in range(2) for s in range(3) for r in range(2)}
    assert len(seeds) == 12 and step_seed(0, 1, 2, 1) == step_seed(0, 1, 2, 1)


# ------------------------------------------------------------------------------ one step
class FixedNoise(Messenger):
    """The guide's reparameterized draw of `z` made `loc + scale * eps` with a given `eps`:
    the same noise for the single-process step and, sliced, for the ranks."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] == "z" and msg["value"] is None:
            d = msg["fn"]
            while hasattr(d, "base_dist"):
                d = d.base_dist
            msg["value"] = d.loc + d.scale * self.eps


class Grads(Callback):
    def on_step_end(self, trainer, loss):
        self.loss = float(loss)
        self.grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        trainer.request_stop()


def _one_step(rank, world_size, out, eps):
    cfg = load_config(tiny_config(train={"batch_size": 64}))
    data = load_data(cfg.data, seed=0)
    pyro.set_rng_seed(0)
    model = build_model(cfg, data.shape)
    world = distributed.init("gloo", "cpu") if world_size > 1 else None
    rec = Grads()
    trainer = Trainer(model, cfg.train, data.x_train, callbacks=[rec], progress=False, world=world)
    b = 64 // world_size
    with FixedNoise(eps[rank * b : (rank + 1) * b]):
        assert trainer.train() is False  # stopped after the first step
    torch.save({"loss": rec.loss, "grads": rec.grads}, out / f"step{world_size}.{rank}.pt")


def test_two_processes_one_step_equals_one_process_on_the_union(tmp_path):
    """Loss and gradients of a 2-rank step (32 + 32 points, the plate at N = 256) equal one
    process's step on the 64 points, the latent noise fixed to the same values."""
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    _one_step(0, 1, tmp_path, eps)
    assert run_ranks(_one_step, 2, 2, tmp_path, eps, log=tmp_path / "log") == [0, 0]
    one = torch.load(tmp_path / "step1.0.pt")
    two = [torch.load(tmp_path / f"step2.{r}.pt") for r in range(2)]
    assert two[0]["loss"] == two[1]["loss"]  # every rank reports the mean over ranks
    assert two[0]["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for name, g in one["grads"].items():
        for r in range(2):
            torch.testing.assert_close(two[r]["grads"][name], g, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ whole runs
def _fit(rank, cfg, out):
    pyrovae.fit(cfg, out, progress=False, figures=False)


def test_two_process_run_is_reproducible_and_resumes_in_one(tmp_path):
    cfg = tiny_config(train={"epochs": 2}, data={"binarize": "dynamic"})
    for name in ("a", "b"):
        assert run_ranks(_fit, 2, cfg, tmp_path / name, log=tmp_path / name) == [0, 0]
    a, b = (load_checkpoint(tmp_path / n / CHECKPOINT) for n in "ab")
    assert a["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    single = pyrovae.fit(tiny_config(train={"epochs": 2}, data={"binarize": "dynamic"}),
                         tmp_path / "one", progress=False, figures=False)
    # the same estimator, other noise: close to the one-process run, not equal to it
    assert abs(a["history"][-1]["train_elbo"] - single.history[-1]["train_elbo"]) < 5.0
    one = single.model.state_dict()
    assert any(not torch.equal(v, one[k]) for k, v in a["model"].items())
    # started with 2 processes, continued with 1 (more epochs)
    more = tiny_config(train={"epochs": 3}, data={"binarize": "dynamic"})
    run = pyrovae.fit(more, tmp_path / "a", resume=True,
                      progress=False, figures=False)
    assert len(run.history) == 3 and run.history[:2] == a["history"]


# ------------------------------------------------------------------------------ evaluation
def _evaluate(rank, run_dir, out):
    from pyrovae.runs import load_run
    from pyrovae.workflow import evaluate_run

    world = distributed.init("gloo", "cpu")
    x = torch.arange(21.0).reshape(7, 3)
    parts = {n: distributed.per_point(lambda v: v.sum(1), x[:n]) for n in (7, 1)}
    torch.manual_seed(rank)
    m = evaluate_run(load_run(run_dir, data=True), iwae_samples=20)
    torch.save({"parts": parts, "metrics": m, "size": world.size}, out / f"eval.{rank}.pt")


def test_evaluation_is_sharded_without_duplicates(tmp_path, digits_run):
    assert run_ranks(_evaluate, 2, digits_run.dir, tmp_path, log=tmp_path / "e") == [0, 0]
    got = [torch.load(tmp_path / f"eval.{r}.pt", weights_only=False) for r in range(2)]
    x = torch.arange(21.0).reshape(7, 3)
    for g in got:  # 7 points: shards of 4 and 3 (one padded row cut off); 1 point: 1 and 0
        assert torch.equal(g["parts"][7], x.sum(1)) and torch.equal(g["parts"][1], x[:1].sum(1))
    a, b = (g["metrics"] for g in got)
    assert a == b and a["test_points"] == 64  # every rank holds the gathered result
    one = pyrovae.evaluate_run(pyrovae.load_run(digits_run.dir, data=True), iwae_samples=20)
    se = one["log_likelihood_se"]
    assert abs(a["log_likelihood"] - one["log_likelihood"]) < 4 * se
    assert abs(a["test_elbo"] - one["test_elbo"]) < 4 * max(se, 1.0)


def _khat(rank, run_dir, out):
    from pyrovae.diagnostics import psis_khat
    from pyrovae.runs import load_run

    distributed.init("gloo", "cpu")
    run = load_run(run_dir, data=True)
    torch.manual_seed(10 + rank)
    k = psis_khat(run.model.model, run.model.guide, run.data.x_test[:39], 30)
    torch.save(k, out / f"khat.{rank}.pt")


def test_khat_is_sharded_each_rank_computing_its_own_points(tmp_path, digits_run):
    """39 points over 2 ranks: rank 0 computes points 0-19 and rank 1 points 20-38, each with
    its own noise; both get all 39 values. Recomputing each shard in one process with that
    rank's seed gives the gathered values: nothing computed twice, nothing lost."""
    from pyrovae.diagnostics import psis_khat

    assert run_ranks(_khat, 2, digits_run.dir, tmp_path, log=tmp_path / "k") == [0, 0]
    a, b = (torch.load(tmp_path / f"khat.{r}.pt") for r in range(2))
    assert a.shape == (39,) and torch.equal(a, b)
    run = pyrovae.load_run(digits_run.dir, data=True)
    x, threads = run.data.x_test[:39], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r, rows in enumerate((slice(0, 20), slice(20, 39))):
            torch.manual_seed(10 + r)
            ref = psis_khat(run.model.model, run.model.guide, x[rows], 30)
            torch.testing.assert_close(a[rows], ref.double(), rtol=1e-6, atol=1e-9)
    finally:
        torch.set_num_threads(threads)


def _diagnose_cli(rank, argv, out):
    from pyrovae.cli import main

    fd = os.open(out / f"diag.{rank}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    code = main([str(a) for a in argv])
    sys.stdout.flush()
    return code


def test_diagnose_under_torchrun_shards_and_rank_zero_reports(tmp_path, digits_run):
    import json

    argv = ["diagnose", digits_run.dir, "--json", "--points", "0", "--gap-points", "0",
            "--max-points", "30", "--khat-samples", "30", "--iwae-samples", "30", "-q"]
    assert run_ranks(_diagnose_cli, 2, argv, tmp_path, log=tmp_path / "d", timeout=120) == [0, 0]
    got = json.loads((tmp_path / "diag.0.out").read_text())
    assert (tmp_path / "diag.1.out").read_text() == ""  # only rank 0 prints
    assert got["psis"]["n"] == 30 and got["psis"]["samples"] == 30
    shares = sum(got["psis"][k] for k in ("share_below_0.5", "share_0.5_to_0.7", "share_above_0.7"))
    assert shares == pytest.approx(1.0)
    assert got["log_likelihood"]["points"] == 64 and got["elbo"]["points"] == 64
    assert got["log_likelihood"]["mean"] >= got["elbo"]["mean"] - 3 * got["elbo"]["se"]
    assert "decomposition" in got  # rank 0's part


# ------------------------------------------------------------------------------ bad input
def _cli(rank, argv):
    from pyrovae.cli import main

    return main([str(a) for a in argv])


def _errors(log: Path) -> list[str]:
    return [p.read_text() for p in sorted(log.parent.glob(log.name + ".*.err"))]


def test_bad_jobs_are_one_line_errors_from_rank_zero(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(load_config(tiny_config(train={"batch_size": 63})).to_toml())
    out = tmp_path / "run"
    assert run_ranks(_cli, 2, ["fit", cfg, "--out", out, "-q"], log=tmp_path / "b") == [2, 2]
    rank0, rank1 = _errors(tmp_path / "b")
    assert rank0.count("\n") == 1 and "train.batch_size=63 is the global minibatch" in rank0
    assert "expected a multiple of 2" in rank0 and rank1 == ""
    assert not out.exists()

    cfg.write_text(load_config(tiny_config(data={"limit": 1})).to_toml())
    assert run_ranks(_cli, 2, ["fit", cfg, "--out", out, "-q"], log=tmp_path / "s") == [2, 2]
    rank0, rank1 = _errors(tmp_path / "s")
    assert "holds 1 point(s), fewer than the 2 processes" in rank0 and rank1 == ""
    assert not out.exists()

    argv = ["fit", cfg, "--out", out, "--backend", "nccl"]
    assert run_ranks(_cli, 2, argv, log=tmp_path / "n") == [2, 2]
    assert "--backend nccl: NCCL needs CUDA" in _errors(tmp_path / "n")[0]
    assert not out.exists()


def test_resuming_with_other_data_is_refused_on_every_rank(tmp_path):
    import numpy as np

    x = np.random.default_rng(0).random((80, 6), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    cfg = tiny_config(data={"dataset": str(tmp_path / "x.npy"), "limit": 0},
                      train={"epochs": 1, "batch_size": 16})
    out = tmp_path / "run"
    assert run_ranks(_fit, 2, cfg, out, log=tmp_path / "f") == [0, 0]
    before = (out / CHECKPOINT).read_bytes()
    x[3, 2] = 0.5
    np.save(tmp_path / "x.npy", x)
    assert run_ranks(_cli, 2, ["fit", "--out", out, "--resume", "--set", "train.epochs=2"],
                     log=tmp_path / "r") == [2, 2]
    rank0, rank1 = _errors(tmp_path / "r")
    assert "the data changed since the run" in rank0 and rank0.count("\n") == 1 and rank1 == ""
    assert (out / CHECKPOINT).read_bytes() == before


def test_unreachable_rendezvous_times_out(tmp_path):
    """Rank 0 of a job of 2 whose peer never comes: a one-line error within the bounded timeout."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(load_config(tiny_config()).to_toml())
    start = time.monotonic()
    argv = ["fit", cfg, "--out", tmp_path / "r", "-q"]
    codes = run_ranks(_cli, 1, argv, log=tmp_path / "u", world_size=2, dist_timeout="3")
    (err,) = _errors(tmp_path / "u")
    assert codes == [2], err
    assert err.count("\n") == 1 and "distributed rendezvous at 127.0.0.1" in err
    assert "did not all join within 3 s" in err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ the launcher
def _launch(tmp_path, *argv) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pyrovae", "fit", *map(str, argv)],
        cwd=ROOT, env={**ENV, "PYROVAE_DIST_TIMEOUT": "20"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.1)


def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(load_config(tiny_config(train={"epochs": 400})).to_toml())
    out = tmp_path / "run"
    proc = _launch(tmp_path, cfg, "--out", out, "--nproc", "2", "-q")
    _wait_for(out / CHECKPOINT, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted; checkpoint written" in err
    state = load_checkpoint(out / CHECKPOINT)
    assert state["epoch"] >= 1 and not (out / ".lock").exists()


def test_kill_9_of_a_rank_fails_the_job_cleanly_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    assert run_ranks(_fit, 2, tiny_config(train={"epochs": 1}), out, log=tmp_path / "f") == [0, 0]
    state = load_checkpoint(out / CHECKPOINT)
    (tmp_path / "more.toml").write_text(load_config(tiny_config(train={"epochs": 400})).to_toml())
    # resume with 2 processes; kill -9 one worker: the job ends (no hang), the checkpoint stays
    proc = _launch(tmp_path, tmp_path / "more.toml", "--out", out, "--resume", "--nproc", "2", "-q")
    _wait_for(out / ".lock", proc)
    time.sleep(1.5)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert pids, "no worker processes"
    os.kill(pids[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode not in (0, 130), err
    assert "pyrovae: error: the job stopped: " in err and "killed by signal 9" in err, err
    assert "is kept: pyrovae fit --out" in err
    after = load_checkpoint(out / CHECKPOINT)
    assert after["epoch"] >= state["epoch"]
    # and --resume (one process) continues from the last checkpoint
    run = pyrovae.fit(tiny_config(train={"epochs": after["epoch"] + 1}), out, resume=True,
                      progress=False, figures=False)
    assert len(run.history) == after["epoch"] + 1 and run.history[0] == state["history"][0]
