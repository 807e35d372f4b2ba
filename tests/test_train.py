"""fit / resume / load_run on real digits: run folders, metrics, determinism, AE variants."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from conftest import (
    TINY_STEPS,
    FirstStep,
    NaNAt,
    Record,
    StopAt,
    adam_steps,
    assert_png,
    tiny_config,
)

import pyrovae
from pyrovae import ConfigError, DataError, evaluate
from pyrovae.autoencoder import AutoEncoder
from pyrovae.runs import CHECKPOINT, load_checkpoint


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def strip_times(history):
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in history]


def untrained_test_elbo(config: dict) -> float:
    """Mean test ELBO (20 particles) of the model `fit(config)` starts from, before any step."""
    cfg = pyrovae.load_config(config)
    pyro.set_rng_seed(cfg.train.seed)
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    model = pyrovae.build_model(cfg, data.shape)
    with evaluate.evaluation_mode(model):
        return float(evaluate.elbo(model.model, model.guide, data.x_test, 20).mean())


#: what 2 epochs of `tiny_config` gain on the test split over the untrained model, at least
#: (measured: 3.4 nats for the continuous Bernoulli objectives, 3.2 for dynamic Bernoulli)
TRAINED_GAIN = 2.5


def test_digits_run_folder_and_metrics(digits_run):
    d = digits_run.dir
    assert {p.name for p in d.iterdir()} >= {
        "config.toml",
        "checkpoint.json",
        "metrics.json",
        "figures",
    }
    assert {p.name for p in (d / "figures").iterdir()} == {
        "loss_curves.png",
        "latent_scatter.png",
        "reconstructions.png",
        "samples.png",
    }
    for png in (d / "figures").iterdir():
        assert_png(png)
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
    assert strip_times(a.history) == strip_times(b.history)
    assert a.metrics["test_elbo"] == b.metrics["test_elbo"]
    c = pyrovae.fit(tiny_config(train={"seed": 1}), tmp_path / "c", progress=False, figures=False)
    assert strip_times(c.history) != strip_times(a.history)  # the seed is what fixes them


def _stored_history(folder):
    return json.loads((folder / "metrics.json").read_text())["history"]


def test_resume_at_an_epoch_boundary_continues_from_the_checkpoint(tmp_path):
    """2 epochs, then --resume to 4: the resumed trainer starts at epoch 3 with Adam's counters
    at 2 epochs of steps, keeps the stored history rows (their measured epoch_seconds, which a
    retrained run could not reproduce), and ends bit for bit where an uninterrupted run ends."""
    full = pyrovae.fit(
        tiny_config(train={"epochs": 4}), tmp_path / "full", progress=False, figures=False
    )
    part = pyrovae.fit(
        tiny_config(train={"epochs": 2}), tmp_path / "part", progress=False, figures=False
    )
    stored = _stored_history(tmp_path / "part")
    assert stored == part.history and len(stored) == 2
    first = FirstStep()
    resumed = pyrovae.fit(
        tiny_config(train={"epochs": 4}),
        tmp_path / "part",
        resume=True,
        progress=False,
        figures=False,
        callbacks=[first],
    )
    seen = first.seen
    assert (seen["epoch"], seen["step_in_epoch"]) == (2, 1)
    assert seen["adam_steps"] == [2.0 * TINY_STEPS + 1] * len(seen["adam_steps"])
    assert seen["history"] == stored  # epoch_seconds included: read back, not recomputed
    assert resumed.history[:2] == stored and len(resumed.history) == 4
    assert [h["epoch_seconds"] for h in resumed.history[:2]] != [
        h["epoch_seconds"] for h in full.history[:2]
    ]
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k
    assert strip_times(resumed.history) == strip_times(full.history)


def test_resume_mid_epoch_after_stop_request(tmp_path):
    """A stop request (what SIGINT/SIGTERM sets) after step 2 of epoch 2 writes a checkpoint
    there; the resumed run goes on with step 3 of epoch 2 (Adam's counters at 4 + 2 + 1), with
    the same epoch order, and ends with the uninterrupted run's parameters."""
    full = pyrovae.fit(tiny_config(), tmp_path / "full", progress=False, figures=False)
    stop_at = TINY_STEPS + 2  # epoch 2, step 2
    part = pyrovae.fit(
        tiny_config(),
        tmp_path / "part",
        progress=False,
        figures=False,
        callbacks=[StopAt(stop_at)],
    )
    assert part.interrupted and part.metrics == {}
    state = load_checkpoint(tmp_path / "part" / CHECKPOINT)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    assert len(state["history"]) == 1 and sorted(state["perm"].tolist()) == list(range(256))
    first = FirstStep()
    resumed = pyrovae.fit(
        None, tmp_path / "part", resume=True, progress=False, figures=False, callbacks=[first]
    )
    seen = first.seen
    assert (seen["epoch"], seen["step_in_epoch"]) == (1, 3)
    assert seen["adam_steps"] == [float(stop_at + 1)] * len(seen["adam_steps"])
    assert seen["history"] == state["history"] == resumed.history[:1]
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k
    # every number of the history agrees, except the interrupted epoch's train_elbo: the
    # checkpoint holds no running sum, so it averages the steps after the resume only
    got, want = strip_times(resumed.history), strip_times(full.history)
    for row in (got[1], want[1]):
        row.pop("train_elbo")
    assert got == want


def test_trainer_state_dict_round_trip_continues_mid_epoch():
    """`Trainer.load_state_dict(state_dict())` into a fresh trainer continues exactly: the same
    remaining losses and the same final parameters as the trainer that never stopped."""
    from pyrovae.train import Trainer

    def trainer(callbacks=()):
        cfg = pyrovae.load_config(tiny_config())
        data = pyrovae.load_data(cfg.data, seed=0)
        torch.manual_seed(0)
        model = pyrovae.build_model(cfg, data.shape)
        return Trainer(model, cfg.train, data.x_train, data.x_val, callbacks=callbacks,
                       progress=False)  # fmt: skip

    ref_rec = Record()
    ref = trainer([ref_rec])
    assert ref.train()
    rec = Record()
    a = trainer([StopAt(3), rec])
    assert a.train() is False and (a.epoch, a.step_in_epoch) == (0, 3)
    state = a.state_dict()
    torch.manual_seed(123)  # the state carries the RNG: what happens in between does not matter
    b = trainer([rec])
    b.load_state_dict(state)
    assert b.train()
    assert rec.steps == ref_rec.steps  # (epoch, step, loss) of every step, in order
    for p, q in zip(ref.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


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
    figures = sorted(p.name for p in (tmp_path / kind / "figures").glob("*.png"))
    assert "loss_curves.png" in figures and len(figures) == 4, figures
    assert_png(tmp_path / kind / "figures" / "loss_curves.png")


def test_dynamic_binarization_with_bernoulli_trains(tmp_path):
    """Every epoch draws fresh {0, 1} images (so the training ELBO differs between two epochs
    orders), the model learns them, and the run is still reproducible."""
    cfg = tiny_config(data={"binarize": "dynamic"}, model={"likelihood": {"kind": "bernoulli"}})
    run = pyrovae.fit(
        cfg,
        tmp_path / "b",
        progress=False,
        figures=False,
    )
    test_elbo = run.metrics["test_elbo"]
    assert test_elbo < 0  # a log-probability of binary data
    # 2 epochs of training: measured -42.2 against -45.4 for the untrained model
    assert test_elbo > untrained_test_elbo(cfg) + TRAINED_GAIN


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


@pytest.mark.parametrize("objective", ["mean_field", "iwae", "trace_enum"])
def test_other_objectives_fit(tmp_path, objective):
    """Each objective trains: the test ELBO gains what training gains (measured 3.4 nats over
    the untrained model in 2 epochs), and the validation ELBO rises epoch on epoch."""
    cfg = tiny_config(train={"objective": objective, "num_particles": 2})
    run = pyrovae.fit(cfg, tmp_path / objective, progress=False, figures=False)
    assert run.history[-1]["val_elbo"] > run.history[0]["val_elbo"] + 1  # measured 1.5 -> 3.25
    assert run.metrics["test_elbo"] > untrained_test_elbo(cfg) + TRAINED_GAIN


def test_trace_enum_trains_exactly_as_trace_elbo(tmp_path):
    """Without discrete sites TraceEnum_ELBO is Trace_ELBO: the same seed gives the same losses
    and the same parameters (to float32 rounding)."""
    runs = {
        obj: pyrovae.fit(
            tiny_config(train={"objective": obj}), tmp_path / obj, progress=False, figures=False
        )
        for obj in ("trace_elbo", "trace_enum")
    }
    a, b = runs["trace_elbo"], runs["trace_enum"]
    for ra, rb in zip(a.history, b.history, strict=True):
        assert rb["train_elbo"] == pytest.approx(ra["train_elbo"], rel=1e-5, abs=1e-5)
        assert rb["val_elbo"] == pytest.approx(ra["val_elbo"], rel=1e-5, abs=1e-5)
    for k, v in params(a.model).items():
        torch.testing.assert_close(params(b.model)[k], v, rtol=1e-4, atol=1e-6)


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
    assert_png(tmp_path / variant / "figures" / "prior_decodes.png")


def test_overcomplete_needs_more_codes_than_inputs(tmp_path):
    with pytest.raises(ConfigError, match="latent_dim must exceed.*64.*got 2"):
        pyrovae.fit(
            tiny_config(model={"kind": "ae", "variant": "overcomplete"}),
            tmp_path / "o",
            progress=False,
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("every", [False, True])
def test_pyro_validation_on_the_first_step_of_each_epoch(tmp_path, every):
    """Validation runs on each epoch's first step (every step with train.validate_every_step);
    it never changes a number: both settings train to the same parameters."""
    from pyro.infer.util import is_validation_enabled

    class Seen(Record):
        def on_loss(self, trainer, loss):  # inside the step, where the switch is set
            self.steps.append((trainer.epoch, trainer.step_in_epoch, is_validation_enabled()))
            return loss

        def on_step_end(self, trainer, loss):
            pass

    seen = Seen()
    run = pyrovae.fit(
        tiny_config(train={"validate_every_step": every}),
        tmp_path / "r",
        progress=False,
        figures=False,
        callbacks=[seen],
    )
    # on_loss sees the step index before it is advanced: 0 is the epoch's first step
    assert [(e, s) for e, s, _ in seen.steps] == [(e, s) for e in (0, 1) for s in range(4)]
    assert [v for _, _, v in seen.steps] == [every or s == 0 for _, s, _ in seen.steps]
    assert is_validation_enabled()  # the global switch is restored
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
    stored = json.loads((tmp_path / "part" / "metrics.json").read_text())["history"]
    first = FirstStep()
    resumed = pyrovae.fit(
        tiny_config(train={"epochs": 5, **sched}),
        tmp_path / "part",
        resume=True,
        progress=False,
        figures=False,
        callbacks=[first],
    )
    # the resumed trainer starts in epoch 3 at epoch 3's rate, with the optimizer's moments
    assert (first.seen["epoch"], first.seen["step_in_epoch"]) == (2, 1)
    assert first.seen["lr"] == pytest.approx(2.5e-3)
    assert first.seen["optimizer_lr"] == pytest.approx([2.5e-3])
    assert first.seen["adam_steps"] == [2.0 * TINY_STEPS + 1] * len(first.seen["adam_steps"])
    assert resumed.history[:2] == stored  # the stored rows, epoch_seconds included
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k
    # the schedule really reaches the optimizer: a constant-rate run ends elsewhere
    const = pyrovae.fit(
        tiny_config(train={"epochs": 5, "lr": 1e-2}), tmp_path / "c", progress=False, figures=False
    )
    assert [r["lr"] for r in const.history] == [1e-2] * 5
    assert any(not torch.equal(v, params(const.model)[k]) for k, v in params(full.model).items())


def test_nonfinite_loss_restores_and_lowers_lr(tmp_path, caplog):
    """A NaN loss at step 2: the update is skipped, the epoch restarts from its snapshot at half
    the rate, and the run ends as a clean run at that rate does (the retry is a true restart)."""
    record = Record()
    run = pyrovae.fit(
        tiny_config(), tmp_path / "r", progress=False, figures=False,
        callbacks=[NaNAt(2), record],
    )  # fmt: skip
    warned = [r for r in caplog.records if r.name == "pyrovae" and r.levelname == "WARNING"]
    assert [r.getMessage()[:64] for r in warned] == [
        "non-finite loss at epoch 1, step 2; restored the last good state"
    ]
    assert [h["lr"] for h in run.history] == pytest.approx([5e-4, 5e-4])
    assert [(e, s) for e, s, _ in record.steps[:3]] == [(0, 1), (0, 2), (0, 1)]
    assert len(record.steps) == 2 + 2 * TINY_STEPS
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    state = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    assert state["retries"] == 1 and state["lr"] == pytest.approx(5e-4)
    clean = pyrovae.fit(
        tiny_config(train={"lr": 5e-4}), tmp_path / "c", progress=False, figures=False
    )
    for k, v in params(clean.model).items():
        assert torch.equal(v, params(run.model)[k]), k


def test_nonfinite_loss_gives_up_with_clear_error(tmp_path):
    from pyrovae import TrainingError

    nan = NaNAt(None, float("inf"))
    with pytest.raises(TrainingError, match=r"non-finite \(inf\) at epoch 1, step 1.*3 retries"):
        pyrovae.fit(
            tiny_config(train={"max_retries": 3}), tmp_path / "r", progress=False,
            callbacks=[nan],
        )  # fmt: skip
    assert nan.calls == 4  # one step per try: the first loss is already non-finite
    assert not (tmp_path / "r" / CHECKPOINT).exists()


def test_nonfinite_loss_that_never_recovers_leaves_no_folder(tmp_path):
    from pyrovae import TrainingError

    with pytest.raises(TrainingError):
        pyrovae.fit(
            tiny_config(train={"max_retries": 1}), tmp_path / "r", progress=False,
            callbacks=[NaNAt(None)],
        )  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_every_training_step_runs_the_pyro_program():
    """A VAE whose `model`/`guide` count their calls: over 2 epochs of 4 batches (no
    validation split, so no evaluation calls) each runs exactly once per step, for every
    objective, and the trainer's loss is a `pyro.infer.ELBO`."""
    import warnings

    from pyrovae.model import VAE
    from pyrovae.train import Trainer

    class CountingVAE(VAE):
        def __init__(self, *args):
            super().__init__(*args)
            self.calls = {"model": 0, "guide": 0}

        def model(self, *args, **kwargs):
            self.calls["model"] += 1
            return super().model(*args, **kwargs)

        def guide(self, *args, **kwargs):
            self.calls["guide"] += 1
            return super().guide(*args, **kwargs)

    for objective in ("trace_elbo", "mean_field", "trace_enum", "iwae"):
        cfg = pyrovae.load_config(tiny_config(train={"objective": objective, "num_particles": 2}))
        data = pyrovae.load_data(cfg.data, seed=0)
        vae = CountingVAE(cfg.model, data.shape)
        trainer = Trainer(vae, cfg.train, data.x_train, progress=False)
        assert isinstance(trainer.loss_fn.elbo, pyro.infer.ELBO)
        assert trainer.loss_fn.elbo.num_particles == 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TraceEnum_ELBO: "no sites configured to enumerate"
            assert trainer.train()
        n_steps = 2 * TINY_STEPS
        assert vae.calls == {"model": n_steps, "guide": n_steps}, objective
        assert adam_steps(trainer.opt) == [float(n_steps)] * len(trainer.opt.state)


def test_trainer_load_state_dict_names_the_entry_that_does_not_fit():
    """`load_state_dict` checks the position before touching anything: a perm of the right
    length and dtype that is not a permutation, or a step past the epoch, is a ValueError
    naming the entry, and the trainer keeps its own state."""
    from pyrovae.train import Trainer

    cfg = pyrovae.load_config(tiny_config())
    data = pyrovae.load_data(cfg.data, seed=0)
    trainer = Trainer(pyrovae.build_model(cfg, data.shape), cfg.train, data.x_train, progress=False)
    good = trainer.state_dict()
    before = params(trainer.model)
    dup = torch.arange(256)
    dup[7] = 3  # 3 twice, 7 never
    bad = {**good, "perm": dup, "step_in_epoch": 1}
    with pytest.raises(ValueError, match=r"^entry 'perm': expected a permutation of the 256"):
        trainer.load_state_dict(bad)
    bad = {**good, "perm": torch.randperm(256), "step_in_epoch": 5}
    with pytest.raises(ValueError, match=r"^entry 'step_in_epoch': expected 0\.\.4.*got 5"):
        trainer.load_state_dict(bad)
    assert trainer.perm is None and trainer.step_in_epoch == 0
    assert all(torch.equal(v, params(trainer.model)[k]) for k, v in before.items())
    ok = {**good, "perm": torch.randperm(256), "step_in_epoch": 4, "lr": 0.5, "retries": 2}
    trainer.load_state_dict(ok)
    assert (trainer.step_in_epoch, trainer.lr, trainer.retries) == (4, 0.5, 2)


def test_scheduled_lr_decays_per_epoch_and_backs_off_per_retry():
    from pyrovae.train import Trainer

    cfg = pyrovae.load_config(
        tiny_config(train={"lr": 1e-2, "lr_decay": 0.5, "lr_min": 2e-3, "lr_backoff": 0.1})
    )
    data = pyrovae.load_data(cfg.data, seed=0)
    trainer = Trainer(pyrovae.build_model(cfg, data.shape), cfg.train, data.x_train, progress=False)
    got = []
    for epoch, retries in ((0, 0), (1, 0), (3, 0), (1, 1), (5, 2)):
        trainer.epoch, trainer.retries = epoch, retries
        got.append(trainer.scheduled_lr())
    assert got == pytest.approx([1e-2, 5e-3, 2e-3, 5e-4, 2e-5])
