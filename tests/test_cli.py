"""The command line end to end on digits, as a user runs it (child processes, exit codes, no
tracebacks). The children are forked from the shared fork server (`conftest.ForkServer`: each
runs exactly `pyrovae.cli.main(argv)` in its own process, without seconds of imports each);
one real ``python -m pyrovae.cli`` checks the entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, Result, assert_png

TINY = [
    "--set", "data.limit=256", "--set", "train.epochs=2", "--set", "train.device=\"cpu\"",
    "--set", "model.encoder={kind=\"mlp\", hidden=[32]}", "--set", "model.decoder={kind=\"mlp\", hidden=[32]}",
]  # fmt: skip


@pytest.fixture(scope="module")
def cli(server):
    """`cli(*argv)`: run `pyrovae ARGV` in a child process; its exit code, stdout, stderr."""

    def run(*args: str, check: bool = True) -> Result:
        res = server.run(*args, timeout=300)
        if check and res.rc != 0:
            raise AssertionError(f"exit {res.rc}\n{res.stdout}\n{res.stderr}")
        return res

    return run


@pytest.fixture(scope="module")
def fitted(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = cli("fit", "examples/configs/digits_vae.toml", "--out", str(out), *TINY)
    assert "test ELBO" in proc.stdout and "nats per datapoint" in proc.stdout
    return out


def test_fit_writes_run_folder(fitted):
    assert (fitted / "checkpoint.json").exists()
    for name in ("samples", "reconstructions", "latent_scatter", "loss_curves"):
        assert_png(fitted / "figures" / f"{name}.png")
    assert "epochs = 2" in (fitted / "config.toml").read_text()


def test_evaluate_json(cli, fitted):
    """`evaluate` recomputes the test metrics `fit` stored: the deterministic ones exactly, the
    1-sample ELBO up to its noise."""
    m = json.loads(cli("evaluate", str(fitted), "--json").stdout)
    stored = json.loads((fitted / "metrics.json").read_text())
    for key in ("test_reconstruction_error", "num_parameters", "test_points", "binarize", "kind"):
        assert m[key] == stored[key], key
    assert m["test_points"] == 64 and m["test_reconstruction_error"] > 0
    assert m["test_elbo"] == pytest.approx(stored["test_elbo"], abs=0.5)
    assert m["test_elbo"] > 0  # a continuous Bernoulli density exceeds 1 on these images


def test_sample_png_and_npy(cli, fitted, tmp_path):
    cli("sample", str(fitted), "-n", "16", "--out", str(tmp_path / "s.png"))
    assert_png(tmp_path / "s.png")
    cli("sample", str(fitted), "-n", "5", "--out", str(tmp_path / "s.npy"))
    import numpy as np

    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (5, 1, 8, 8)
    assert samples.min() >= 0 and samples.max() <= 1  # means of a continuous Bernoulli
    assert samples.std(axis=0).max() > 1e-3  # five different draws of z


def test_resume_extends_training(cli, fitted):
    """--resume continues the stored run: the two stored history rows come back as they were
    (their measured epoch_seconds, which a retrained run could not reproduce), one epoch is
    added, and Adam's step counters go on from 2 epochs of 2 steps (256 points, batch 128)."""
    from pyrovae.runs import load_checkpoint

    before = json.loads((fitted / "metrics.json").read_text())["history"]
    steps = [
        float(s["step"])
        for s in load_checkpoint(fitted / "checkpoint.json")["optimizer"]["state"].values()
    ]
    assert len(before) == 2 and set(steps) == {4.0}
    cli("fit", "--out", str(fitted), "--resume", "--set", "train.epochs=3")
    m = json.loads((fitted / "metrics.json").read_text())
    assert len(m["history"]) == 3 and m["history"][:2] == before
    state = load_checkpoint(fitted / "checkpoint.json")
    assert state["epoch"] == 3 and {
        float(s["step"]) for s in state["optimizer"]["state"].values()
    } == {6.0}
    assert state["config"]["train"]["epochs"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_compare_prints_table(cli, tmp_path):
    proc = cli("compare", "examples/configs/digits_vae.toml", "--out", str(tmp_path / "cmp"), *TINY)
    assert "VAE" in proc.stdout and "AE (deep)" in proc.stdout and "test ELBO" in proc.stdout
    assert_png(tmp_path / "cmp" / "ae" / "figures" / "prior_decodes.png")
    table = (tmp_path / "cmp" / "comparison.txt").read_text().strip()
    assert table and table.splitlines()[0] in proc.stdout


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
def test_user_errors_exit_2_without_traceback(cli, tmp_path, args, needle):
    if args[0] == "fit":
        args = [*args, "--out", str(tmp_path / "out")]
    proc = cli(*args, check=False)
    assert proc.rc == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("pyrovae: error:")
    assert not (tmp_path / "out").exists()


def test_help_has_examples(capsys):
    """Every command's --help shows examples (in this process: a subprocess per command costs
    seconds of imports each); one real ``python -m pyrovae.cli --help`` checks the entry point."""
    from pyrovae import cli as cli_module

    for cmd in (["fit"], ["evaluate"], ["sample"], ["compare"]):
        with pytest.raises(SystemExit) as e:
            cli_module.main([*cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"pyrovae {cmd[0]}" in out
    proc = subprocess.run(
        [sys.executable, "-m", "pyrovae.cli", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "examples:" in out and all(c in out for c in ("fit", "evaluate", "sample", "compare"))
