"""Estimators of pyrovae.evaluate against closed forms on probabilistic PCA (float64)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import tiny_config

from pyrovae import evaluate
from pyrovae.evaluate import elbo, evaluate_run, log_likelihood, log_weights
from pyrovae.teaching import ppca as P


@pytest.fixture(scope="module")
def ppca():
    return P.PPCA.random(D=5, k=2, sigma=0.5, seed=1)


@pytest.fixture(scope="module")
def x(ppca):
    return ppca.sample(20, generator=torch.Generator().manual_seed(0))


def test_exact_posterior_guide_gives_log_marginal(ppca, x):
    lp = ppca.log_marginal(x)
    guide = P.exact_guide(ppca)
    assert torch.allclose(elbo(ppca.model, guide, x, num_particles=3), lp, atol=1e-4, rtol=0)
    assert torch.allclose(
        log_likelihood(ppca.model, guide, x, num_samples=50), lp, atol=1e-4, rtol=0
    )
    assert elbo(ppca.model, guide, x).dtype == torch.float64


def test_iwae_with_perturbed_guide_is_within_005_nats(ppca, x):
    guide = P.perturbed_guide(ppca, shift=0.2, scale_factor=1.2)
    ll = log_likelihood(ppca.model, guide, x, num_samples=5000)
    assert (ll - ppca.log_marginal(x)).abs().max() < 0.05


def test_elbo_gap_equals_exact_kl_to_posterior(ppca, x):
    shift, c = 0.3, 1.3
    lw = log_weights(ppca.model, P.perturbed_guide(ppca, shift, c), x, 20000)
    est, se = lw.mean(0), lw.std(0) / math.sqrt(lw.shape[0])
    mean, cov = P.perturbed_posterior(ppca, x, shift, c)
    kl = P.exact_kl_to_posterior(mean, cov, ppca, x)
    gap = ppca.log_marginal(x) - est
    assert ((gap - kl).abs() < 4 * se + 1e-3).all()
    assert kl.min() > 0.1  # the test has teeth: the bound is visibly loose


def test_iwae_tightens_with_k(ppca, x):
    guide = P.perturbed_guide(ppca, shift=0.5, scale_factor=0.8)
    lp = ppca.log_marginal(x)
    gaps = [float((lp - log_likelihood(ppca.model, guide, x, k)).mean()) for k in (1, 10, 1000)]
    assert gaps[0] > gaps[1] > gaps[2] > -0.02


def test_log_likelihood_streams_in_bounded_chunks(ppca, x, monkeypatch):
    rows = []
    real = evaluate.log_weights

    def spy(model, guide, xb, k, *a, **kw):
        rows.append(k * xb.shape[0])
        return real(model, guide, xb, k, *a, **kw)

    monkeypatch.setattr(evaluate, "log_weights", spy)
    guide = P.perturbed_guide(ppca, shift=0.2, scale_factor=1.2)
    x4 = x[:4]
    ll = log_likelihood(ppca.model, guide, x4, num_samples=3000, max_rows=1000)
    assert max(rows) <= 1000 and sum(rows) == 3000 * 4
    assert (ll - ppca.log_marginal(x4)).abs().max() < 0.05
    rows.clear()
    log_likelihood(ppca.model, guide, x, num_samples=300, batch_size=7, max_rows=100)
    assert max(rows) <= 100 and sum(rows) == 300 * x.shape[0]


def test_sites_outside_the_data_plate_are_rejected():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="not inside pyro.plate"):
        elbo(model, guide, torch.zeros(3))


def test_evaluate_run_adds_iwae_log_likelihood(digits_run):
    from pyrovae.train import load_run

    run = load_run(digits_run.dir, data=True)
    plain = evaluate_run(run)
    assert "log_likelihood" not in plain and plain["test_elbo"] is not None
    m = evaluate_run(run, iwae_samples=100)
    assert m["log_likelihood_samples"] == 100 and m["log_likelihood_split"] == "test"
    assert (
        m["log_likelihood"] > m["test_elbo"] - 1.0
    )  # IWAE-100 is a tighter bound than a 1-sample ELBO
    assert 0 < m["log_likelihood_se"] < 10
    assert (
        "nats per datapoint" in m["log_likelihood_note"] and "binarize" in m["log_likelihood_note"]
    )
    assert run.model.kl_scale == 1.0 and run.model.register_params


def test_evaluate_run_on_an_autoencoder(tmp_path):
    import pyrovae

    run = pyrovae.fit(
        tiny_config(model={"kind": "ae"}, train={"epochs": 1}),
        tmp_path / "ae",
        progress=False,
        figures=False,
    )
    m = evaluate_run(run, iwae_samples=10)
    assert m["log_likelihood"] is None and "autoencoder" in m["log_likelihood_note"]
    with pytest.raises(pyrovae.PyroVAEError, match="iwae-samples"):
        evaluate_run(run, iwae_samples=0)
