"""The command line end to end on digits, as a user runs it (subprocesses, exit codes, no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--set", "data.limit=256", "--set", "train.epochs=2", "--set", "train.device=\"cpu\"",
    "--set", "model.encoder={kind=\"mlp\", hidden=[32]}", "--set", "model.decoder={kind=\"mlp\", hidden=[32]}",
]  # fmt: skip


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pyrovae.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = cli("fit", "examples/configs/digits_vae.toml", "--out", str(out), *TINY)
    assert "test ELBO" in proc.stdout and "nats per datapoint" in proc.stdout
    return out


def test_fit_writes_run_folder(fitted):
    assert (fitted / "checkpoint.pt").exists() and (fitted / "figures" / "samples.png").exists()
    assert "epochs = 2" in (fitted / "config.toml").read_text()


def test_evaluate_json(fitted):
    m = json.loads(cli("evaluate", str(fitted), "--json").stdout)
    assert (
        m["test_elbo"] > 0 and m["test_reconstruction_error"] > 0
    )  # continuous Bernoulli density > 1


def test_sample_png_and_npy(fitted, tmp_path):
    cli("sample", str(fitted), "-n", "16", "--out", str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000
    cli("sample", str(fitted), "-n", "5", "--out", str(tmp_path / "s.npy"))
    import numpy as np

    assert np.load(tmp_path / "s.npy").shape == (5, 1, 8, 8)


def test_resume_extends_training(fitted):
    cli("fit", "--out", str(fitted), "--resume", "--set", "train.epochs=3")
    m = json.loads((fitted / "metrics.json").read_text())
    assert len(m["history"]) == 3


def test_compare_prints_table(tmp_path):
    proc = cli("compare", "examples/configs/digits_vae.toml", "--out", str(tmp_path / "cmp"), *TINY)
    assert "VAE" in proc.stdout and "AE (deep)" in proc.stdout and "test ELBO" in proc.stdout
    assert (tmp_path / "cmp" / "ae" / "figures" / "prior_decodes.png").exists()
    assert (tmp_path / "cmp" / "comparison.txt").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["fit", "examples/configs/digits_vae.toml", "--set", "train.epochs=-1"], "train.epochs"),
        (
            ["fit", "examples/configs/digits_vae.toml", "--set", "trian.epochs=1"],
            "trian: unknown key",
        ),
        (["fit", "missing.toml"], "config file not found: missing.toml"),
        (
            ["fit", "examples/configs/digits_vae.toml", "--set", "model.likelihood.kind=bernoulli"],
            "binarize",
        ),
        (
            [
                "fit",
                "examples/configs/digits_vae.toml",
                "--set",
                'data.dataset="/nonexistent/x.npz"',
            ],
            "/nonexistent/x.npz",
        ),
        (
            [
                "fit",
                "examples/configs/digits_vae.toml",
                "--set",
                "data.dataset=mnist",
                "--set",
                'data.root="/nonexistent"',
            ],
            "/nonexistent",
        ),
        (["evaluate", "/nonexistent/run"], "run folder not found"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, args, needle):
    if args[0] == "fit":
        args = [*args, "--out", str(tmp_path / "out")]
    proc = cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("pyrovae: error:")
    assert not (tmp_path / "out").exists()


def test_help_has_examples():
    for cmd in ([], ["fit"], ["evaluate"], ["sample"], ["compare"]):
        out = cli(*cmd, "--help").stdout
        assert "examples:" in out
