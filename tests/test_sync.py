"""The trainer's CUDA policy (read the loss on the host every ``sync_every`` steps, Pyro's checks on
the first step of an epoch only, ``LeanTrace_ELBO.sync_free``), exercised on CPU: it must give the
same parameters as the every-step policy, and still catch and roll back a non-finite loss."""

from __future__ import annotations

import pyro
import pytest
import torch
from conftest import nan_loss_at, tiny_config

import pyrovae
from pyrovae import train as train_mod
from pyrovae.objectives import LeanTrace_ELBO, LeanTraceMeanField_ELBO


def deferred(monkeypatch, every: int) -> None:
    """Make every Trainer use the non-CPU policy with ``sync_every = every``."""
    orig = train_mod.Trainer.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        self.sync_every = every
        if self.is_vae and hasattr(self.elbo, "sync_free"):
            self.elbo.sync_free = every > 1

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)


def test_cpu_reads_every_step_and_cuda_policy_is_deferred(tmp_path):
    cfg = pyrovae.load_config(tiny_config())
    data = pyrovae.load_data(cfg.data, seed=0)
    tr = train_mod.Trainer(cfg, tmp_path, data, pyrovae.build_model(cfg, data.shape), False)
    assert tr.sync_every == 1 and tr.elbo.sync_free is False
    assert train_mod.CUDA_SYNC_EVERY > 1


def test_deferred_reads_give_the_same_parameters(tmp_path, monkeypatch):
    """Same seed, same data: the deferred policy changes when losses are read, not the updates,
    so the parameters are bit-identical; the logged ELBO agrees to float32 rounding."""
    eager = pyrovae.fit(tiny_config(), tmp_path / "eager", progress=False, figures=False)
    deferred(monkeypatch, 3)
    lazy = pyrovae.fit(tiny_config(), tmp_path / "lazy", progress=False, figures=False)
    for a, b in zip(eager.model.parameters(), lazy.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for ra, rb in zip(eager.history, lazy.history, strict=True):
        assert rb["train_elbo"] == pytest.approx(ra["train_elbo"], rel=1e-5)
        assert rb["val_elbo"] == ra["val_elbo"]


def test_deferred_reads_still_roll_back_a_nonfinite_loss(tmp_path, monkeypatch):
    """A NaN loss at step 2 is applied (no per-step read) and seen at the read after step 3: the
    epoch is rolled back, the learning rate halved, and no NaN reaches the parameters."""
    deferred(monkeypatch, 3)
    nan_loss_at(monkeypatch, 2)
    run = pyrovae.fit(tiny_config(), tmp_path / "r", progress=False, figures=False)
    assert run.history[-1]["lr"] == pytest.approx(5e-4)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.parametrize(
    "pyro_cls,lean_cls",
    [
        (pyro.infer.Trace_ELBO, LeanTrace_ELBO),
        (pyro.infer.TraceMeanField_ELBO, LeanTraceMeanField_ELBO),
    ],
)
def test_sync_free_lean_elbo_matches_pyro_s(pyro_cls, lean_cls):
    """``sync_free`` returns the surrogate: the gradient is bit-identical, the value equal up to
    float32 rounding (it is summed on the device rather than in Python floats)."""
    cfg = pyrovae.load_config(tiny_config())
    data = pyrovae.load_data(cfg.data, seed=0)
    vae = pyrovae.build_model(cfg, data.shape)
    vae.register_params = False
    x = data.x_train[:32]
    out = []
    for elbo in (pyro_cls(), lean_cls()):
        if isinstance(elbo, lean_cls):
            elbo.sync_free = True
        pyro.set_rng_seed(1)
        vae.zero_grad()
        loss = elbo.differentiable_loss(vae.model, vae.guide, x, len(data.x_train))
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in vae.parameters()]))
    (l0, g0), (l1, g1) = out
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field"])
def test_deferred_reads_with_the_fast_path(tmp_path, monkeypatch, objective):
    """train.fast_path under the CUDA policy (direct_loss returns the surrogate, no .item()):
    the same parameters as the eager Pyro path, and a NaN is still caught and rolled back."""
    train = {"objective": objective}
    eager = pyrovae.fit(tiny_config(train=train), tmp_path / "eager", progress=False, figures=False)
    deferred(monkeypatch, 3)
    fast = {**train, "fast_path": True}
    lazy = pyrovae.fit(tiny_config(train=fast), tmp_path / "lazy", progress=False, figures=False)
    for a, b in zip(eager.model.parameters(), lazy.model.parameters(), strict=True):
        assert torch.equal(a, b)
    nan_loss_at(monkeypatch, 2)
    run = pyrovae.fit(tiny_config(train=fast), tmp_path / "nan", progress=False, figures=False)
    assert run.history[-1]["lr"] == pytest.approx(5e-4)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
