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
                "20",
                "--max-points",
                "20",
                "--iwae-points",
                "20",
                "-q",
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["structured"] and d["latent_sites"]["z"]["dim"] == 4
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
