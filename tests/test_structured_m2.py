"""M2 (semi-supervised VAE): the enumerated loss is the explicit sum over labels, labelled
points use their label, conditional samples, the labels seam, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovae.cli import main
from pyrovae.config import load_config
from pyrovae.data import load_data
from pyrovae.errors import ConfigError, DataError
from pyrovae.objectives import make_elbo
from pyrovae.structured.m2 import M2

SMALL = {
    "data": {"dataset": "digits", "labels": 50},
    "model": {
        "kind": "m2",
        "latent_dim": 4,
        "encoder": {"kind": "mlp", "hidden": [32]},
        "decoder": {"kind": "mlp", "hidden": [32]},
        "alpha": 5.0,
    },
    "train": {
        "objective": "trace_enum",
        "epochs": 2,
        "batch_size": 64,
        "lr": 3e-3,
        "device": "cpu",
    },
}


def _m2(**model):
    cfg = load_config({**SMALL, "model": {**SMALL["model"], **model}})
    return M2(cfg.model, (1, 8, 8))


def _hand_sum(m2, x, y, z):
    """Per-point negative loss by hand: sum_c q(c|x) [log p(x,c,z_c) - log q(c|x) - log q(z_c|x,c)]
    with Trace_ELBO-free plain traces of the programs conditioned on y = c and z = z_c."""
    total = 0.0
    logits = m2.classifier(x)
    if y is not None:  # the guide's point mass on the label
        point = torch.full_like(logits, -1e4).scatter(-1, y.clamp(min=0)[:, None], 0.0)
        logits = torch.where((y >= 0)[:, None], point, logits)
    log_q = torch.log_softmax(logits, -1)
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        yb = None if y is None else y[b : b + 1]
        for c in range(m2.classes):
            data = {"y": torch.tensor([c]), "z": z[c, b : b + 1]}
            g = poutine.trace(poutine.condition(m2.guide, data)).get_trace(xb, yb)
            m = poutine.trace(poutine.condition(m2.model, data)).get_trace(xb, yb)
            elbo_c = m.log_prob_sum() - g.log_prob_sum()  # includes -log q(y=c|x)
            w = log_q[b, c].exp()
            if w > 0:
                total = total + w * elbo_c
    return total


@pytest.mark.parametrize("labelled", [False, True])
def test_enumerated_loss_is_the_sum_over_labels(labelled):
    torch.manual_seed(0)
    m2 = _m2()
    x = load_data(load_config(SMALL).data).x_train[:5]
    y = torch.tensor([3, -1, 7, 0, -1]) if labelled else None
    elbo = make_elbo("trace_enum")
    pyro.set_rng_seed(1)
    enum = poutine.trace(poutine.enum(m2.guide, first_available_dim=-2)).get_trace(x, y)
    z = enum.nodes["z"]["value"].detach()  # (10, 5, 4): one z per enumerated label
    assert z.shape == (10, 5, 4)
    pyro.set_rng_seed(1)
    loss = elbo.differentiable_loss(m2.model, m2.guide, x, y=y)
    hand = _hand_sum(m2, x, y, z)
    assert torch.allclose(loss, -hand, rtol=1e-5, atol=1e-3), (loss.item(), -hand.item())


def test_labelled_point_uses_its_label_and_the_classifier_term():
    torch.manual_seed(0)
    m2 = _m2(alpha=2.0)
    x = load_data(load_config(SMALL).data).x_train[:1]
    y = torch.tensor([4])
    pyro.set_rng_seed(2)
    enum = poutine.trace(poutine.enum(m2.guide, first_available_dim=-2)).get_trace(x, y)
    z = enum.nodes["z"]["value"][4].detach()
    pyro.set_rng_seed(2)
    loss = make_elbo("trace_enum").differentiable_loss(m2.model, m2.guide, x, y=y)
    # by hand: -(log p(x|y=4,z) + log p(y=4) + log p(z) - log q(z|x,y=4)) - alpha log q(y=4|x)
    h = m2.encoder_z(torch.cat([x, torch.nn.functional.one_hot(y, 10).float()], -1))
    q = dist.Normal(h[:, :4], torch.nn.functional.softplus(h[:, 4:]) + 1e-5).to_event(1)
    dec = m2.decoder(torch.cat([z, torch.nn.functional.one_hot(y, 10).float()], -1))
    log_px = m2.likelihood(dec.reshape(1, 1, 64)).log_prob(x)
    log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    aux = torch.log_softmax(m2.classifier(x), -1)[0, 4]
    expected = -(log_px + torch.log(torch.tensor(0.1)) + log_pz - q.log_prob(z)) - 2.0 * aux
    assert torch.allclose(loss, expected.sum(), rtol=1e-5, atol=1e-4)


def test_labelled_subset_is_balanced_and_seeded():
    cfg = load_config(SMALL)
    a, b = load_data(cfg.data, seed=0), load_data(cfg.data, seed=0)
    assert torch.equal(a.y_train, b.y_train)
    kept = a.y_train[a.y_train >= 0]
    assert len(kept) == 50 and torch.bincount(kept).tolist() == [5] * 10
    other = load_data(cfg.data, seed=1).y_train
    assert not torch.equal(other >= 0, a.y_train >= 0)


def test_bad_label_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="data.labels = 100000: expected at most the 1"):
        load_data(load_config({**SMALL, "data": {"dataset": "digits", "labels": 100000}}).data)
    import numpy as np

    arr = np.random.default_rng(0).random((40, 8, 8)).astype("float32")
    np.save(tmp_path / "nolabels.npy", arr)
    with pytest.raises(DataError, match="has no labels"):
        load_data(
            load_config(
                {**SMALL, "data": {"dataset": str(tmp_path / "nolabels.npy"), "labels": 10}}
            ).data
        )
    # unknown classes: labels 0..9 but model.classes = 5, through the CLI (exit 2, one line)
    cfg = tmp_path / "m2.toml"
    import tomli_w

    cfg.write_text(tomli_w.dumps({**SMALL, "model": {**SMALL["model"], "classes": 5}}))
    assert main(["fit", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "expected labels in 0..4" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model.alpha applies to"):
        load_config({"model": {"kind": "vae", "alpha": 1.0}})
    with pytest.raises(ConfigError, match='trains with "trace_enum"'):
        load_config({**SMALL, "train": {"objective": "iwae"}})


def test_m2_cli_fit_evaluate_sample_diagnose(tmp_path, capsys):
    import tomli_w

    cfg = tmp_path / "m2.toml"
    cfg.write_text(tomli_w.dumps(SMALL))
    run = tmp_path / "run"
    assert main(["fit", str(cfg), "--out", str(run), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--iwae-samples", "8", "-q"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert 0.0 <= m["test_accuracy"] <= 1.0 and math.isfinite(m["log_likelihood"])
    assert "y summed out exactly" in m["log_likelihood_note"]
    assert m["log_likelihood"] >= m["test_elbo"] - 5.0
    out = tmp_path / "s.npy"
    assert main(["sample", str(run), "-n", "4", "--label", "3", "--out", str(out), "-q"]) == 0
    assert main(["sample", str(run), "-n", "4", "--label", "12", "--out", str(out), "-q"]) == 2
    assert "expected a class in 0..9" in capsys.readouterr().err
    assert main(["sample", str(run), "-n", "4", "--cluster", "1", "--out", str(out), "-q"]) == 2
    assert "does not take this condition" in capsys.readouterr().err
    assert (
        main(
            [
                "diagnose",
                str(run),
                "--json",
                "--iwae-samples",
                "8",
                "--khat-samples",
                "25",
                "--max-points",
                "20",
                "--iwae-points",
                "20",
                "--points",
                "2",
                "--nuts-samples",
                "30",
                "--nuts-warmup",
                "30",
                "-q",
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["structured"] and d["latent_sites"]["z"]["dim"] == 4
    nu = d["nuts"]  # p(z | x) with y summed out, against q(z|x) = sum_y q(y|x) q(z|x,y)
    assert nu["summed_out"] == ["y"] and set(nu["sites"]) == {"z"} and len(nu["points"]) == 2
    z = nu["sites"]["z"]
    assert len(z["nuts_mean"]) == 2 and len(z["nuts_mean"][0]) == 4
    assert all(s > 0 for row in z["nuts_sd"] for s in row) and nu["max_rhat"] < 2.0
    assert set(nu["unconverged_points"]) <= set(nu["points"]) and "z: q is " in nu["verdict"]
    assert "not run for structured models" in d["not_applicable"]
    assert main(["diagnose", str(run), "--report", str(tmp_path / "r.html"), "-q"]) == 2


@pytest.mark.parametrize("name", ["mnist_m2", "digits_m2", "mnist_cvae", "digits_cvae"])
def test_example_configs_build(name):
    from pyrovae.build import build_model
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "examples" / "configs" / f"{name}.toml")
    shape = (1, 28, 28) if name.startswith("mnist") else (1, 8, 8)
    model = build_model(cfg, shape)
    assert model.kind == cfg.model.kind
    x = torch.rand(3, 784 if name.startswith("mnist") else 64).round()
    y = torch.tensor([1, -1, 2]) if cfg.model.kind == "m2" else torch.tensor([1, 0, 2])
    kw = {"y": y} if getattr(model, "uses_labels", False) else {}
    loss = make_elbo(cfg.train.objective).differentiable_loss(model.model, model.guide, x, **kw)
    assert torch.isfinite(loss)


# ---- train.labelled_per_batch: k labelled + (B - k) unlabelled points per minibatch ----------
def _trainer(k=4, batch_size=16, epochs=1, labels=12, limit=60, callbacks=(), particles=1, lr=3e-3,
             separate=False):
    from pyrovae.build import build_model
    from pyrovae.train import Trainer

    cfg = load_config(
        {
            **SMALL,
            "data": {"dataset": "digits", "labels": labels, "limit": limit},
            "train": {
                **SMALL["train"],
                "batch_size": batch_size,
                "labelled_per_batch": 0 if separate else k,
                "labelled_batches": separate,
                "epochs": epochs,
                "num_particles": particles,
                "lr": lr,
            },
        }
    )
    data = load_data(cfg.data)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = build_model(cfg, data.shape)
    trainer = Trainer(
        model, cfg.train, data.x_train, callbacks=callbacks, progress=False, y_train=data.y_train
    )
    return trainer, data


class _Record:
    """Records every step's (epoch, training indices, per-point scale)."""

    def __init__(self, stop_after=None):
        self.rows, self.stop_after = [], stop_after

    def on_loss(self, trainer, loss):
        return loss

    def on_step_end(self, trainer, loss):
        s = trainer.step_in_epoch - 1
        self.rows.append((trainer.epoch, trainer.batch_indices(s), trainer.batch_scale(s)))
        if self.stop_after is not None and len(self.rows) == self.stop_after:
            trainer.request_stop()

    def on_epoch_end(self, trainer):
        pass


def test_labelled_batches_hold_k_labelled_points_with_group_weights():
    rec = _Record()
    trainer, data = _trainer(k=4, batch_size=16, callbacks=[rec])
    y = data.y_train
    n, n_l = len(y), int((y >= 0).sum())
    n_u = n - n_l
    assert trainer.steps_per_epoch() == math.ceil(n_u / 12)
    trainer.train()
    assert len(rec.rows) == trainer.steps_per_epoch()
    seen_unlabelled = []
    for _, idx, scale in rec.rows:
        lab = y[idx] >= 0
        assert lab[:4].all() and not lab[4:].any()  # exactly k labelled points, first
        w = scale * n / len(idx)  # times the model's own N/B: the per-point weight
        assert torch.allclose(w[:4], torch.full((4,), n_l / 4))
        assert torch.allclose(w[4:], torch.full((len(idx) - 4,), n_u / (len(idx) - 4)))
        seen_unlabelled += idx[4:].tolist()
    # an epoch is one pass over the unlabelled points
    assert sorted(seen_unlabelled) == (y < 0).nonzero().flatten().tolist()


def test_labelled_batches_estimate_is_unbiased():
    """E over epoch orders of sum_b w_b f(i_b) is sum_n f(n), for every step s (Monte Carlo,
    a tiny set: 3 labelled of 14, k = 2, B = 5, so the last step has 2 unlabelled points)."""
    from pyrovae.train import LabelledBatches

    y = torch.tensor([0, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, -1, -1, -1])
    sched = LabelledBatches(y, batch_size=5, k=2, seed=3)
    f = torch.linspace(0.0, 1.0, 14) ** 2 + torch.arange(14) % 3
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    totals = torch.zeros(sched.steps(), draws)
    for e in range(draws):
        perm = torch.randperm(14, generator=gen)
        for s in range(sched.steps()):
            idx, scale = sched.indices(perm, e, s)
            totals[s, e] = (scale * 14 / len(idx) * f[idx]).sum()
    mean, se = totals.mean(1), totals.std(1) / draws**0.5
    assert sched.steps() == 4
    assert ((mean - f.sum()).abs() < 4 * se + 1e-4).all(), (mean, f.sum(), se)


def test_labelled_batches_loss_is_the_full_data_loss_over_an_epoch():
    """N_l = 4 labelled (k = 2) and N_u = 24 unlabelled (B - k = 6) points: an epoch is four
    steps that see every unlabelled point once and every labelled point twice, so the mean of
    their loss estimates is the full-data loss per datapoint only with the group weights
    N_l/k = 2 and N_u/(B - k) = 4 (uniform N/B = 3.5 gives about a third more here). TraceEnum
    with many particles, so both sides are close to their expectations."""
    losses = []

    class Keep(_Record):
        def on_loss(self, trainer, loss):
            losses.append(float(loss.detach()))
            return loss

    trainer, data = _trainer(
        k=2, batch_size=8, labels=4, limit=28, callbacks=[Keep()], particles=400, lr=1e-9
    )
    y, x = data.y_train, data.x_train
    assert len(y) == 28 and int((y >= 0).sum()) == 4 and trainer.steps_per_epoch() == 4
    trainer.train()
    m2 = trainer.model
    elbo = make_elbo("trace_enum", num_particles=400)
    per_point = []  # the explicit sum over the 28 points, one point at a time
    for i in range(28):
        per_point.append(elbo.differentiable_loss(m2.model, m2.guide, x[i : i + 1], y=y[i : i + 1]).item())
    full = sum(per_point) / 28
    assert abs(sum(losses) / 4 - full) < 0.02 * abs(full), (losses, full)
    lab = sum(p for p, yi in zip(per_point, y.tolist(), strict=True) if yi >= 0) / 28
    uniform = 3.5 * (2 * lab + (full - lab)) / 4  # every point weighted N/B: not the objective
    assert abs(uniform - full) > 0.1 * abs(full)


def test_labelled_batches_resume_reproduces_the_schedule():
    full = _Record()
    _trainer(epochs=2, callbacks=[full])[0].train()
    part = _Record(stop_after=7)
    trainer, _ = _trainer(epochs=2, callbacks=[part])
    assert trainer.train() is False
    state = trainer.state_dict()
    rest = _Record()
    resumed, _ = _trainer(epochs=2, callbacks=[rest])
    resumed.load_state_dict(state)
    assert resumed.train() is True
    rows = part.rows + rest.rows
    assert len(rows) == len(full.rows) == 2 * trainer.steps_per_epoch()
    for (e1, i1, s1), (e2, i2, s2) in zip(rows, full.rows, strict=True):
        assert e1 == e2 and torch.equal(i1, i2) and torch.equal(s1, s2)
    assert not torch.equal(full.rows[0][1][:4], full.rows[1][1][:4])  # the stream moves on


def test_labelled_per_batch_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"labelled_per_batch \(64\) must be smaller than batch_size \(64\)"):
        load_config({**SMALL, "train": {**SMALL["train"], "labelled_per_batch": 64}})
    with pytest.raises(ConfigError, match="train.labelled_per_batch: Input should be greater"):
        load_config({**SMALL, "train": {**SMALL["train"], "labelled_per_batch": -1}})
    with pytest.raises(ConfigError, match='applies to semi-supervised models .*got model.kind = .vae.'):
        load_config({"train": {"labelled_per_batch": 4}})
    from pyrovae.train import LabelledBatches

    with pytest.raises(ConfigError, match="both labelled and unlabelled .-1. points; got 3 labelled of 3"):
        LabelledBatches(torch.tensor([0, 1, 2]), batch_size=2, k=1, seed=0)


# ---- train.labelled_batches: labelled points in minibatches of their own ------------------
def test_separate_labelled_batches_cover_every_point_once_with_weight_s():
    """12 labelled and 48 unlabelled points, B = 10: an epoch is 5 unlabelled + 2 labelled
    minibatches (the labelled ones at steps 1 and 4, counting from 0), each all-labelled or
    all-unlabelled, every point once, each weighted S = 7."""
    rec = _Record()
    trainer, data = _trainer(batch_size=10, labels=12, limit=60, callbacks=[rec], separate=True)
    y = data.y_train
    assert trainer.steps_per_epoch() == 7 and trainer.schedule.positions == [1, 4]
    trainer.train()
    assert len(rec.rows) == 7
    seen = []
    for s, (_, idx, scale) in enumerate(rec.rows):
        lab = y[idx] >= 0
        assert lab.all() if s in (1, 4) else not lab.any(), s
        torch.testing.assert_close(scale * len(y) / len(idx), torch.full((len(idx),), 7.0))
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(y)))


def test_separate_labelled_batches_epoch_loss_is_the_full_data_loss():
    """The mean of an epoch's step losses is the full-data loss per datapoint (TraceEnum with
    many particles so both sides are near their expectations); the plain N/B weights would
    count the 4 labelled points, alone in their minibatch, 28/4 / (28/8) = 2 times over."""
    losses = []

    class Keep(_Record):
        def on_loss(self, trainer, loss):
            losses.append(float(loss.detach()))
            return loss

    trainer, data = _trainer(batch_size=8, labels=4, limit=28, callbacks=[Keep()], particles=400,
                             lr=1e-9, separate=True)
    y, x = data.y_train, data.x_train
    assert trainer.steps_per_epoch() == 4  # 3 unlabelled minibatches (8, 8, 8) + 1 labelled (4)
    trainer.train()
    m2 = trainer.model
    elbo = make_elbo("trace_enum", num_particles=400)
    per_point = [elbo.differentiable_loss(m2.model, m2.guide, x[i : i + 1], y=y[i : i + 1]).item()
                 for i in range(28)]
    full = sum(per_point) / 28
    assert abs(sum(losses) / 4 - full) < 0.02 * abs(full), (losses, full)
    lab = sum(p for p, yi in zip(per_point, y.tolist(), strict=True) if yi >= 0) / 28
    assert abs(lab) > 0.1 * abs(full)  # the labelled term is not negligible: the test can fail


def test_separate_labelled_batches_resume_and_bad_values():
    full = _Record()
    _trainer(epochs=2, callbacks=[full], batch_size=10, separate=True)[0].train()
    part = _Record(stop_after=3)
    trainer, _ = _trainer(epochs=2, callbacks=[part], batch_size=10, separate=True)
    assert trainer.train() is False
    resumed, _ = _trainer(epochs=2, callbacks=[rest := _Record()], batch_size=10, separate=True)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.train() is True
    rows = part.rows + rest.rows
    assert len(rows) == len(full.rows) == 14
    for (e1, i1, s1), (e2, i2, s2) in zip(rows, full.rows, strict=True):
        assert e1 == e2 and torch.equal(i1, i2) and torch.equal(s1, s2)
    assert not torch.equal(full.rows[1][1], full.rows[8][1])  # a new labelled order per epoch
    with pytest.raises(ConfigError, match="labelled_batches = true puts the labelled points"):
        load_config({**SMALL, "train": {**SMALL["train"], "labelled_per_batch": 4, "labelled_batches": True}})
    with pytest.raises(ConfigError, match="train.labelled_batches: applies to semi-supervised"):
        load_config({"train": {"labelled_batches": True}})
    from pyrovae.train import SeparateLabelledBatches

    with pytest.raises(ConfigError, match="both labelled and unlabelled .-1. points; got 0 labelled of 3"):
        SeparateLabelledBatches(torch.tensor([-1, -1, -1]), batch_size=2, seed=0)
