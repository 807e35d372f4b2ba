"""fit / resume / load_run on real digits: run folders, metrics, determinism, AE variants."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import nan_loss_at, tiny_config

import pyrovae
from pyrovae import ConfigError, DataError
from pyrovae.autoencoder import AutoEncoder


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_digits_run_folder_and_metrics(digits_run):
    d = digits_run.dir
    assert {p.name for p in d.iterdir()} >= {
        "config.toml",
        "checkpoint.pt",
        "metrics.json",
        "figures",
    }
    assert {p.name for p in (d / "figures").iterdir()} == {
        "loss_curves.png",
        "latent_scatter.png",
        "reconstructions.png",
        "samples.png",
    }
    m = json.loads((d / "metrics.json").read_text())
    assert len(m["history"]) == 3
    for row in m["history"]:
        assert {"train_elbo", "val_elbo", "epoch_seconds"} <= row.keys()
    assert m["test_elbo"] == pytest.approx(digits_run.metrics["test_elbo"])
    assert m["test_reconstruction_error"] > 0 and "nats per datapoint" in m["units"]
    # the validation ELBO improves over training on real data
    assert m["history"][-1]["val_elbo"] > m["history"][0]["val_elbo"]


def test_load_run_restores_the_same_model(digits_run):
    run = pyrovae.load_run(digits_run.dir, data=True)
    x = run.data.x_test[:10]
    torch.testing.assert_close(
        run.model.reconstruct(x), digits_run.model.cpu().eval().reconstruct(x)
    )
    assert run.config == digits_run.config


def test_same_seed_same_metrics(tmp_path):
    a = pyrovae.fit(tiny_config(), tmp_path / "a", progress=False, figures=False)
    b = pyrovae.fit(tiny_config(), tmp_path / "b", progress=False, figures=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)


def test_resume_equals_uninterrupted(tmp_path):
    full = pyrovae.fit(
        tiny_config(train={"epochs": 4}), tmp_path / "full", progress=False, figures=False
    )
    pyrovae.fit(tiny_config(train={"epochs": 2}), tmp_path / "part", progress=False, figures=False)
    resumed = pyrovae.fit(
        tiny_config(train={"epochs": 4}),
        tmp_path / "part",
        resume=True,
        progress=False,
        figures=False,
    )
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k


def test_resume_mid_epoch_after_stop_request(tmp_path, monkeypatch):
    """A stop request (what SIGINT/SIGTERM sets) mid-epoch writes a checkpoint; resuming matches."""
    from pyrovae import train as train_mod

    full = pyrovae.fit(tiny_config(), tmp_path / "full", progress=False, figures=False)
    calls = {"n": 0}
    orig = train_mod.Trainer._step

    def step(self, x, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2 (3 steps per epoch with 205 points / 64), mid-way
            self.stop.requested = 15
        return orig(self, x, **kw)

    monkeypatch.setattr(train_mod.Trainer, "_step", step)
    part = pyrovae.fit(tiny_config(), tmp_path / "part", progress=False, figures=False)
    assert part.interrupted
    monkeypatch.setattr(train_mod.Trainer, "_step", orig)
    resumed = pyrovae.fit(None, tmp_path / "part", resume=True, progress=False, figures=False)
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k


def test_existing_run_needs_resume(digits_run):
    with pytest.raises(ConfigError, match="--resume"):
        pyrovae.fit(tiny_config(), digits_run.dir, progress=False)


def test_resume_rejects_changed_config(tmp_path):
    pyrovae.fit(tiny_config(train={"epochs": 1}), tmp_path / "r", progress=False, figures=False)
    with pytest.raises(ConfigError, match="differs"):
        pyrovae.fit(
            tiny_config(model={"latent_dim": 3}), tmp_path / "r", resume=True, progress=False
        )


def test_bad_input_leaves_no_run_folder(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(DataError, match="binarize"):
        pyrovae.fit(tiny_config(model={"likelihood": {"kind": "bernoulli"}}), out, progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError):
        pyrovae.fit({"train": {"epochs": 0}}, out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_no_validation_split_trains_on_every_training_point(tmp_path, kind):
    """``data.val_fraction = 0`` (the MNIST benchmark trains on all 60,000 images): no
    validation metric (None, JSON null), the curves figure and the test metrics still there."""
    run = pyrovae.fit(
        tiny_config(data={"val_fraction": 0.0}, model={"kind": kind}, train={"epochs": 2}),
        tmp_path / kind,
        progress=False,
    )
    assert len(run.data.x_val) == 0
    key = "val_elbo" if kind == "vae" else "val_loss"
    saved = json.loads((tmp_path / kind / "metrics.json").read_text())["history"]
    assert [h[key] for h in saved] == [None, None]
    assert all(h["train_" + ("elbo" if kind == "vae" else "loss")] is not None for h in saved)
    assert list((tmp_path / kind / "figures").glob("*.png"))


def test_dynamic_binarization_with_bernoulli_trains(tmp_path):
    run = pyrovae.fit(
        tiny_config(data={"binarize": "dynamic"}, model={"likelihood": {"kind": "bernoulli"}}),
        tmp_path / "b",
        progress=False,
        figures=False,
    )
    assert run.metrics["test_elbo"] < 0  # a log-probability of binary data


@pytest.mark.parametrize("beta,warmup", [(0.5, 0), (1.0, 2)])
def test_beta_and_warmup_recorded(tmp_path, beta, warmup):
    run = pyrovae.fit(
        tiny_config(train={"beta": beta, "kl_warmup_epochs": warmup}),
        tmp_path / "r",
        progress=False,
        figures=False,
    )
    scales = [h["kl_scale"] for h in run.history]  # the scale at each epoch's last step
    if warmup == 0:
        assert scales == [beta, beta]
    else:  # 205 training points / batch 64 = 4 steps: last steps at t = 0.75 and 1.75 epochs
        assert scales == pytest.approx([0.75 / 2, 1.75 / 2])


@pytest.mark.parametrize("objective", ["mean_field", "iwae"])
def test_other_objectives_fit(tmp_path, objective):
    run = pyrovae.fit(
        tiny_config(train={"objective": objective, "num_particles": 2}),
        tmp_path / objective,
        progress=False,
        figures=False,
    )
    assert run.history[-1]["val_elbo"] > run.history[0]["val_elbo"] - 1


@pytest.mark.parametrize(
    "variant,extra",
    [
        ("deep", {}),
        ("linear", {}),
        ("overcomplete", {"latent_dim": 100}),
        ("denoising", {"noise": 0.3}),
    ],
)
def test_autoencoder_variants_train(tmp_path, variant, extra):
    cfg = tiny_config(model={"kind": "ae", "variant": variant, **extra}, train={"epochs": 3})
    run = pyrovae.fit(cfg, tmp_path / variant, progress=False)
    assert isinstance(run.model, AutoEncoder)
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]
    assert run.metrics["test_elbo"] is None
    assert (tmp_path / variant / "figures" / "prior_decodes.png").exists()


def test_overcomplete_needs_more_codes_than_inputs(tmp_path):
    with pytest.raises(ConfigError, match="latent_dim must exceed.*64.*got 2"):
        pyrovae.fit(
            tiny_config(model={"kind": "ae", "variant": "overcomplete"}),
            tmp_path / "o",
            progress=False,
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("every", [False, True])
def test_pyro_validation_on_the_first_step_of_each_epoch(tmp_path, monkeypatch, every):
    """Validation runs on each epoch's first step (every step with train.validate_every_step);
    it never changes a number: both settings train to the same parameters."""
    from pyro.infer.util import is_validation_enabled

    from pyrovae import train as train_mod

    seen = []
    orig = train_mod.Trainer._step

    def step(self, x, **kw):
        seen.append((self.epoch, self.step_in_epoch, is_validation_enabled()))
        return orig(self, x, **kw)

    monkeypatch.setattr(train_mod.Trainer, "_step", step)
    run = pyrovae.fit(
        tiny_config(train={"validate_every_step": every}),
        tmp_path / "r",
        progress=False,
        figures=False,
    )
    assert [v for _, s, v in seen] == [every or s == 0 for _, s, _ in seen]
    assert {e for e, _, _ in seen} == {0, 1} and len(seen) > 4
    assert is_validation_enabled()  # the global switch is restored
    monkeypatch.setattr(train_mod.Trainer, "_step", orig)
    other = pyrovae.fit(
        tiny_config(train={"validate_every_step": not every}),
        tmp_path / "o",
        progress=False,
        figures=False,
    )
    for k, v in params(run.model).items():
        assert torch.equal(v, params(other.model)[k]), k


def test_lr_schedule_is_exponential_with_a_floor_and_survives_resume(tmp_path):
    """lr_e = max(lr_min, lr * lr_decay**e); a run stopped and resumed (as the MNIST benchmark
    trains, in chunks) sees the same rates and ends with the same parameters."""
    sched = {"lr": 1e-2, "lr_decay": 0.5, "lr_min": 2e-3}
    full = pyrovae.fit(
        tiny_config(train={"epochs": 5, **sched}), tmp_path / "full", progress=False, figures=False
    )
    assert [r["lr"] for r in full.history] == pytest.approx([1e-2, 5e-3, 2.5e-3, 2e-3, 2e-3])
    pyrovae.fit(
        tiny_config(train={"epochs": 2, **sched}), tmp_path / "part", progress=False, figures=False
    )
    resumed = pyrovae.fit(
        tiny_config(train={"epochs": 5, **sched}),
        tmp_path / "part",
        resume=True,
        progress=False,
        figures=False,
    )
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k
    # the schedule really reaches the optimizer: a constant-rate run ends elsewhere
    const = pyrovae.fit(
        tiny_config(train={"epochs": 5, "lr": 1e-2}), tmp_path / "c", progress=False, figures=False
    )
    assert [r["lr"] for r in const.history] == [1e-2] * 5
    assert any(not torch.equal(v, params(const.model)[k]) for k, v in params(full.model).items())


def test_nonfinite_loss_restores_and_lowers_lr(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, 2)
    run = pyrovae.fit(tiny_config(), tmp_path / "r", progress=False, figures=False)
    assert run.history[-1]["lr"] == pytest.approx(5e-4)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_nonfinite_loss_gives_up_with_clear_error(tmp_path, monkeypatch):
    from pyrovae import TrainingError
    from pyrovae import train as train_mod

    orig = train_mod.Trainer._loss
    monkeypatch.setattr(
        train_mod.Trainer, "_loss", lambda self, x, *a: orig(self, x, *a) * float("inf")
    )
    with pytest.raises(TrainingError, match="non-finite.*3 retries"):
        pyrovae.fit(tiny_config(train={"max_retries": 3}), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()  # nothing resumable was written
