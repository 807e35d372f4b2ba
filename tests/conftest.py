"""Shared test setup: Pyro validation on, a clean param store, 2 threads, a tiny digits run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

torch.set_num_threads(1)  # small tensors: one thread is faster and robust to a loaded machine


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory) -> Path:
    """The documentation built once with ``mkdocs build --strict`` (from another directory)."""
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


def tiny_config(**sections) -> dict:
    """A digits config that trains in about a second."""
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


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One trained tiny VAE run folder, shared by read-only tests."""
    import pyrovae

    out = tmp_path_factory.mktemp("runs") / "vae"
    pyro.enable_validation(True)
    return pyrovae.fit(tiny_config(train={"epochs": 3}), out, progress=False)


def nan_loss_at(monkeypatch, n: int) -> None:
    """Make the trainer's ``n``-th loss NaN (for the non-finite recovery tests)."""
    from pyrovae import train as train_mod

    calls = {"n": 0}
    orig = train_mod.Trainer._loss

    def loss(self, x, *args, **kwargs):
        calls["n"] += 1
        out = orig(self, x, *args, **kwargs)
        return out * float("nan") if calls["n"] == n else out

    monkeypatch.setattr(train_mod.Trainer, "_loss", loss)


#: one case per kind of block (prior, likelihood, guide, β): analytic and Monte-Carlo KL, every
#: likelihood family, the flow guide, β-scaling and β = 0 (the lean / fast-path equality tests)
BLOCK_CASES = [
    ("normal", "bernoulli", "normal", 1.0),
    ("mixture", "bernoulli", "normal", 1.0),
    ("vamp", "continuous_bernoulli", "normal", 1.0),
    ("flow", "normal", "flow", 1.0),
    ("normal_learned", "poisson", "normal", 0.3),
    ("normal", "negative_binomial", "normal", 0.0),
    ("normal", "laplace", "normal", 1.0),
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
