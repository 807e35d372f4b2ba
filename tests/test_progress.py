"""Long commands say where they are: one log line per epoch (fit) and per stage (evaluate,
diagnose) on stderr when not on a terminal, nothing with --quiet, and stdout stays clean JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pyrovae.cli import main

FAST = ["--set", "data.limit=300", "--set", 'train.device="cpu"']


def run_cli(*args, quiet=False) -> subprocess.CompletedProcess:
    """The real command in a child process: stderr is a pipe, not a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "pyrovae", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "run"
    p = run_cli("fit", "examples/configs/digits_vae.toml", "--out", out, "--set", "train.epochs=4", *FAST)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pyrovae: epoch ")]
    assert [int(re.match(r"pyrovae: epoch (\d+)/4:", ln)[1]) for ln in lines] == [1, 2, 3, 4]
    for ln in lines:  # every field the issue names: ELBOs, seconds, lr, beta
        assert re.search(r"train ELBO -?\d+\.\d{3}, val ELBO -?\d+\.\d{3}, \d+\.\d+ s, lr 0\.001, beta 1", ln), ln
    assert "\r" not in p.stderr  # no progress bar redraws in a log file
    return out


def test_evaluate_logs_stages_and_json_stays_parseable(run_dir):
    p = run_cli("evaluate", run_dir, "--iwae-samples", "20", "--json")
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)  # stdout is exactly the JSON
    assert m["log_likelihood_samples"] == 20
    stages = [ln for ln in p.stderr.splitlines() if ln.startswith("pyrovae: ")]
    assert any(ln.startswith("pyrovae: IWAE log p(x), K=20: done in ") for ln in stages)
    assert any(ln.startswith("pyrovae: test ELBO and reconstruction error: done in ") for ln in stages)


def test_diagnose_states_its_plan_then_one_line_per_stage(run_dir):
    p = run_cli(
        "diagnose", run_dir, "--json", "--points", "1", "--iwae-samples", "20",
        "--khat-samples", "50", "--gap-points", "1", "--chains", "2",
    )
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)
    err = p.stderr
    plan = err.index("pyrovae: diagnose will run (about ")
    assert "IWAE log p(x) with K=20" in err and "--iwae-samples" in err  # how to go further
    for stage in ("decomposition", "psis", "log likelihood", "nuts", "amortization gap"):
        i = err.index(f"pyrovae: {stage}: done in ")
        assert i > plan


def test_quiet_says_nothing_but_errors(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--quiet", "--json"]) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)
    assert cap.err == ""
    assert main(["evaluate", str(run_dir / "nope"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("pyrovae: error:")
