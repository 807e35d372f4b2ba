"""CVAE (label or quadrant condition) and the deterministic quadrant baseline: the condition
is respected, the baseline's ELBO is its exact likelihood, bad input is one line, and the CLI
runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pytest
import tomli_w
import torch

from pyrovae.build import build_model
from pyrovae.cli import main
from pyrovae.config import load_config
from pyrovae.data import load_data
from pyrovae.errors import ConfigError
from pyrovae.evaluate import elbo, log_likelihood
from pyrovae.structured.cvae import quadrant_mask
from pyrovae.train import Trainer

NETS = {
    "encoder": {"kind": "mlp", "hidden": [64]},
    "decoder": {"kind": "mlp", "hidden": [64]},
    "likelihood": {"kind": "continuous_bernoulli"},
}
QUADRANTS = {"model": {"kind": "cvae", "condition": "quadrants", "latent_dim": 4, **NETS}}
LABEL = {
    "model": {"kind": "cvae", "condition": "label", "latent_dim": 4, **NETS},
    "train": {"epochs": 60, "batch_size": 64, "lr": 3e-3, "device": "cpu"},
}


def _built(raw):
    cfg = load_config(raw)
    data = load_data(cfg.data)
    return cfg, data, build_model(cfg, data.shape)


def test_quadrant_masks():
    m1, m2, m3 = (quadrant_mask((1, 8, 8), g).reshape(8, 8) for g in (1, 2, 3))
    assert m1.sum() == 16 and m1[4:, :4].all()  # bottom-left
    assert m2.sum() == 32 and m2[:, :4].all()  # left half
    assert m3.sum() == 48 and not m3[4:, 4:].any()  # all but the bottom-right
    # Pyro's CVAE example (`MaskImages`): the input is where its target image is marked -1
    img = torch.zeros(8, 8)
    for g, m in zip((1, 2, 3), (m1, m2, m3), strict=True):
        out = img.clone()
        out[4:, :4] = -1
        if g == 2:
            out[:, :4] = -1
        if g == 3:
            out[:4, :] = -1
        assert torch.equal(m, out == -1), g


def test_completion_copies_the_given_quadrants():
    _, data, cvae = _built(QUADRANTS)
    x = data.x_test[:10]
    for g in (1, 2, 3):
        out = cvae.complete(x, g)
        mask = quadrant_mask((1, 8, 8), g)
        assert torch.equal(out[:, mask], x[:, mask])
        assert not torch.equal(out[:, ~mask], x[:, ~mask])
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 64\)"):
        cvae.complete(x[:, :10], 2)


def test_baseline_elbo_is_its_exact_conditional_likelihood():
    _, data, base = _built({**QUADRANTS, "model": {**QUADRANTS["model"], "kind": "cvae_baseline", "latent_dim": 2}})
    x = data.x_test[:12]
    from functools import partial

    for g in (1, 2, 3):
        mask = quadrant_mask((1, 8, 8), g)
        raw = base.net(torch.where(mask, x, torch.full_like(x, -1.0)))
        exact = torch.distributions.ContinuousBernoulli(logits=raw).log_prob(x)[:, ~mask].sum(-1)
        m, q = partial(base.model, given=g), partial(base.guide, given=g)
        assert torch.allclose(elbo(m, q, x), exact, atol=1e-4)
        assert torch.allclose(log_likelihood(m, q, x, 4), exact, atol=1e-4)


def test_cvae_conditional_bounds_are_ordered():
    cfg, data, cvae = _built({**QUADRANTS, "train": {"epochs": 3, "device": "cpu"}})
    Trainer(cvae, cfg.train, data.x_train, data.x_val, progress=False).train()
    m = cvae.metrics(data.x_test[:50])
    for g in ("1", "2", "3"):  # IWAE (K=32) is the tighter bound: NLL below the negative ELBO
        assert m["conditional_nll"][g] <= m["conditional_nll_elbo"][g] + 0.5
    one = _built({"model": {**QUADRANTS["model"], "given": [2]}})[2]
    one.load_state_dict(cvae.state_dict())  # scored only at the count it was trained for
    m2 = one.metrics(data.x_test[:20], samples=4)
    assert set(m2["conditional_nll"]) == set(m2["conditional_nll_elbo"]) == {"2"}
    assert "[2] given quadrants" in m2["conditional_nll_note"]


def test_label_conditioned_samples_are_classified_as_their_label(tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    cfg_path = tmp_path / "cvae.toml"
    cfg_path.write_text(tomli_w.dumps(LABEL))
    run = tmp_path / "run"
    assert main(["fit", str(cfg_path), "--out", str(run), "-q"]) == 0
    data = load_data(load_config(LABEL).data)
    clf = LogisticRegression(max_iter=2000).fit(data.x_train.numpy(), data.y_train.numpy())
    correct = 0
    for label in (0, 3, 6):
        out = tmp_path / f"s{label}.npy"
        assert main(["sample", str(run), "-n", "20", "--label", str(label), "--out", str(out), "-q"]) == 0
        s = np.load(out).reshape(20, -1)
        correct += int((clf.predict(s) == label).sum())
    assert correct >= 45, correct  # of 60 label-conditioned samples
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--iwae-samples", "8", "-q"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert "log p(x | y)" in m["log_likelihood_note"]
    assert main(["diagnose", str(run), "--json", "--iwae-samples", "8", "--khat-samples", "25",
                 "--max-points", "20", "--iwae-points", "20", "--points", "2",
                 "--nuts-samples", "30", "--nuts-warmup", "30", "-q"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["latent_sites"]["z"]["dim"] == 4 and d["psis"]["samples"] == 25
    nu = d["nuts"]  # p(z | x, y) at each point's own label
    assert nu["conditioned_on"] == "x and its label y" and nu["summed_out"] == []
    assert len(nu["sites"]["z"]["q_mean"]) == 2


def test_quadrant_cvae_cli(tmp_path, capsys):
    raw = {**QUADRANTS, "train": {"epochs": 2, "device": "cpu"}}
    cfg_path = tmp_path / "q.toml"
    cfg_path.write_text(tomli_w.dumps(raw))
    run = tmp_path / "run"
    assert main(["fit", str(cfg_path), "--out", str(run), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "-q"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m["conditional_nll"]) == {"1", "2", "3"}
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.npy"), "-q"]) == 2
    assert "CVAE.complete" in capsys.readouterr().err
    assert main(["diagnose", str(run), "--json", "--iwae-samples", "4", "--khat-samples", "25",
                 "--max-points", "10", "--iwae-points", "10", "--points", "2",
                 "--nuts-samples", "30", "--nuts-warmup", "30", "-q"]) == 0
    nu = json.loads(capsys.readouterr().out)["nuts"]  # p(z | x) given 2 quadrants
    assert nu["conditioned_on"].startswith("the 2 given quadrant(s)")
    assert set(nu["sites"]) == {"z"} and len(nu["sites"]["z"]["nuts_sd"][0]) == 4


def test_bad_input_one_line(tmp_path, capsys):
    arr = np.random.default_rng(0).random((60, 10)).astype("float32")
    np.save(tmp_path / "flat.npy", arr)
    with pytest.raises(ConfigError, match="needs image data"):
        _built({**QUADRANTS, "data": {"dataset": str(tmp_path / "flat.npy")}})
    with pytest.raises(ConfigError, match="model.condition applies to"):
        load_config({"model": {"kind": "m2", "condition": "label"}})
    with pytest.raises(ConfigError, match="model.classes applies to model.condition"):
        _built({"model": {**QUADRANTS["model"], "classes": 10}})
    cases = [  # (config, what the one-line error says)
        ({**LABEL, "data": {"dataset": "digits", "labels": 20}}, "needs every training label"),
        ({**QUADRANTS, "model": {**QUADRANTS["model"], "likelihood": {"kind": "bernoulli"}}},
         "bernoulli likelihood needs values in {0, 1}"),
        ({**LABEL, "data": {"dataset": str(tmp_path / "flat.npy")}}, "the data have none"),
    ]
    for i, (raw, says) in enumerate(cases):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(tomli_w.dumps(raw))
        assert main(["fit", str(path), "--out", str(tmp_path / f"run{i}"), "-q"]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not (tmp_path / f"run{i}").exists()
    pyro.clear_param_store()


def test_training_loss_is_the_negative_conditional_log_likelihood_per_point():
    """The trainer's loss for a structured model without labels: the baseline has no latent
    site, so the loss of a minibatch of B out of N is exactly -mean log p(x_missing | x_given)."""
    from pyrovae.objectives import make_loss

    _, data, base = _built({**QUADRANTS, "model": {**QUADRANTS["model"], "kind": "cvae_baseline", "latent_dim": 2}})
    x = data.x_train[:12]
    loss = make_loss(base, "trace_elbo")(x, 1000, 1.0, None)
    gmask = base.given_mask(x, None)
    raw = base.net(torch.where(gmask, x, torch.full_like(x, -1.0)))
    lp = torch.distributions.ContinuousBernoulli(logits=raw).log_prob(x)
    exact = -(lp * (~gmask)).sum(-1).mean()
    assert torch.allclose(loss, exact, rtol=1e-5)


def test_grey_level_cross_entropy_is_the_examples_masked_bce():
    """With `bernoulli_cross_entropy` on grey digits (the Pyro example's protocol), the
    baseline's loss is the example's masked BCE over the hidden pixels, per image."""
    from pyrovae.objectives import make_loss

    ce = {"kind": "bernoulli_cross_entropy"}
    _, data, base = _built({**QUADRANTS, "model": {**QUADRANTS["model"], "kind": "cvae_baseline",
                                                   "latent_dim": 2, "likelihood": ce}})
    x = data.x_train[:12]
    assert ((x > 0) & (x < 1)).any()  # grey levels, not binarized
    loss = make_loss(base, "trace_elbo")(x, 1000, 1.0, None)
    gmask = base.given_mask(x, None)
    raw = base.net(torch.where(gmask, x, torch.full_like(x, -1.0)))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(raw, x, reduction="none")
    torch.testing.assert_close(loss, (bce * (~gmask)).sum(-1).mean(), rtol=1e-5, atol=1e-4)


def test_baseline_run_feeds_the_prior_is_frozen_and_the_run_stands_alone(tmp_path, capsys):
    """`model.baseline_run` (Pyro's CVAE example): the trained baseline's network is copied
    into the new CVAE run, frozen; the prior net reads the given pixels plus the baseline's
    prediction in the hidden ones; the CVAE run loads and evaluates after the baseline folder
    is gone; a resumed run keeps its own copy."""
    import shutil

    from pyrovae.runs import load_run

    train = {"epochs": 2, "device": "cpu", "batch_size": 128}
    base_cfg = {"model": {**QUADRANTS["model"], "kind": "cvae_baseline"}, "train": train}
    (tmp_path / "b.toml").write_text(tomli_w.dumps(base_cfg))
    base_dir = tmp_path / "base"
    assert main(["fit", str(tmp_path / "b.toml"), "--out", str(base_dir), "-q"]) == 0
    capsys.readouterr()  # the baseline has no latent variable: diagnose says so, no traceback
    assert main(["diagnose", str(base_dir), "--json", "--iwae-samples", "4", "--khat-samples",
                 "25", "--max-points", "10", "--iwae-points", "10", "-q"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["psis"] is None and "no latent variable" in d["not_applicable"] and "nuts" not in d
    assert d["log_likelihood"]["mean"] == pytest.approx(d["elbo"]["mean"], abs=1e-4)
    base = load_run(base_dir)
    raw = {"model": {**QUADRANTS["model"], "baseline_run": str(base_dir)}, "train": train}
    (tmp_path / "c.toml").write_text(tomli_w.dumps(raw))
    run_dir = tmp_path / "cvae"
    assert main(["fit", str(tmp_path / "c.toml"), "--out", str(run_dir), "-q"]) == 0
    shutil.rmtree(base_dir)
    run = load_run(run_dir, data=True)
    cvae, want = run.model, base.model.net.state_dict()
    assert cvae.baseline.weights().keys() == want.keys()
    for k, v in cvae.baseline.weights().items():  # copied, and unchanged by training
        assert torch.equal(v, want[k]), k
    assert not any(n.startswith("baseline") for n, _ in cvae.named_parameters())
    x = run.data.x_test[:8]
    c, gmask = cvae._condition(x, None, 1)
    seen = cvae.prior_input(c, gmask)
    guess = base.model.complete(x, 1)  # the baseline's E[x_missing | x_given], given copied
    torch.testing.assert_close(seen, guess)
    assert not torch.equal(seen, c)  # not the -1 markers
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--json", "-q"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m["conditional_nll"]) == {"1", "2", "3"}
    more = tmp_path / "more.toml"
    more.write_text(tomli_w.dumps({**raw, "train": {**train, "epochs": 3}}))
    assert main(["fit", str(more), "--out", str(run_dir), "--resume", "-q"]) == 0
    again = load_run(run_dir).model.baseline.weights()
    assert all(torch.equal(v, want[k]) for k, v in again.items())


def test_baseline_run_bad_input_is_one_line(tmp_path, capsys, digits_run):
    train = {"epochs": 1, "device": "cpu"}
    other = {**QUADRANTS["model"], "kind": "cvae_baseline", "encoder": {"kind": "mlp", "hidden": [32]}}
    (tmp_path / "o.toml").write_text(tomli_w.dumps({"model": other, "train": train}))
    assert main(["fit", str(tmp_path / "o.toml"), "--out", str(tmp_path / "other"), "-q"]) == 0
    cases = [
        (str(tmp_path / "nowhere"), "expected a trained cvae_baseline run folder"),
        (str(digits_run.dir), "expected a run of model.kind = 'cvae_baseline'; got 'vae'"),
        (str(tmp_path / "other"), "expected the baseline's model.encoder to equal this model's"),
    ]
    for i, (where, says) in enumerate(cases):
        raw = {"model": {**QUADRANTS["model"], "baseline_run": where}, "train": train}
        path = tmp_path / f"bad{i}.toml"
        path.write_text(tomli_w.dumps(raw))
        capsys.readouterr()
        assert main(["fit", str(path), "--out", str(tmp_path / f"run{i}"), "-q"]) == 2
        err = capsys.readouterr().err
        assert says in err and "model.baseline_run" in err and err.count("\n") == 1, err
        assert not (tmp_path / f"run{i}").exists()
    with pytest.raises(ConfigError, match="model.baseline_run applies to model.kind = 'cvae'"):
        load_config({"model": {"kind": "vae", "baseline_run": "x"}})
    with pytest.raises(ConfigError, match='baseline_run applies to model.condition = "quadrants"'):
        load_config({"model": {**LABEL["model"], "baseline_run": "x"}})


def test_decoder_reading_z_alone_ignores_the_given_pixels_given_z():
    """`model.decoder_reads_condition = false` (the generation net of Pyro's CVAE example):
    p(x_missing | z) reads z alone, so with z fixed the likelihood's parameters do not change
    with the given pixels; the given pixels still move p(z | x_g), and the label CVAE refuses it."""
    raw = {"model": {**QUADRANTS["model"], "decoder_reads_condition": False}}
    _, data, cvae = _built(raw)
    first = next(m for m in cvae.decoder.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 4  # latent_dim: no condition columns
    x = data.x_test[:6]
    z = torch.randn(6, 4)
    c1, _ = cvae._condition(x, None, 1)
    c2, _ = cvae._condition(x.flip(0), None, 1)
    assert torch.equal(cvae.decode(z, c1), cvae.decode(z, c2))
    p1 = cvae.prior_net(cvae.prior_input(c1, cvae.given_mask(x, 1)))
    p2 = cvae.prior_net(cvae.prior_input(c2, cvae.given_mask(x, 1)))
    assert not torch.allclose(p1, p2)
    # the default decoder reads [z, c]: the same z gives different pixels under another condition
    _, _, default = _built(QUADRANTS)
    assert not torch.allclose(default.decode(z, c1), default.decode(z, c2))
    # the ELBO still trains and scores every count
    cfg, data, cvae = _built({**raw, "train": {"epochs": 2, "device": "cpu"}})
    Trainer(cvae, cfg.train, data.x_train, data.x_val, progress=False).train()
    m = cvae.metrics(data.x_test[:20], samples=4)
    assert set(m["conditional_nll"]) == {"1", "2", "3"}
    with pytest.raises(ConfigError, match="decoder_reads_condition applies to model.condition"):
        load_config({"model": {**LABEL["model"], "decoder_reads_condition": False}})
    with pytest.raises(ConfigError, match="decoder_reads_condition applies to model.kind"):
        load_config({"model": {"kind": "m2", "decoder_reads_condition": False}})
    # one config file serves the CVAE and its baseline (which has no z and ignores the field)
    base = _built({"model": {**raw["model"], "kind": "cvae_baseline"}})[2]
    assert base.metrics(data.x_test[:5])["conditional_nll"].keys() == {"1", "2", "3"}
