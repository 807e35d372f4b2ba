"""Estimators of pyrovae.evaluate against closed forms on probabilistic PCA (float64)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import tiny_config
from pyro import poutine

from pyrovae import evaluate
from pyrovae.evaluate import elbo, log_likelihood, log_weights
from pyrovae.teaching import ppca as P
from pyrovae.workflow import evaluate_run


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


def test_log_likelihood_streams_in_bounded_chunks(ppca, x):
    """The guide records the (particles x datapoints) draws of every vectorized call: none
    exceeds max_rows, together they are exactly K per datapoint, and the streamed
    log-sum-exp still converges to log p(x)."""
    rows = []
    proposal = P.perturbed_guide(ppca, shift=0.2, scale_factor=1.2)

    def guide(xb):
        with poutine.trace() as tr:
            proposal(xb)
        z = tr.trace.nodes["z"]["value"]
        if z.dim() == 3:  # (particles, datapoints, k): a vectorized call
            rows.append(z.shape[0] * z.shape[1])

    x4 = x[:4]
    ll = log_likelihood(ppca.model, guide, x4, num_samples=3000, max_rows=1000)
    assert max(rows) <= 1000 and sum(rows) == 3000 * 4 and len(rows) > 1
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
    """On the trained 3-epoch digits run (64 test images; measured: 100-particle ELBO 4.80,
    IWAE(K=100) 5.12 nats; the untrained model: ELBO -0.22, IWAE 0.24): IWAE(K=100) lies above
    the ELBO by a gap between 0.1 and 1 nat, rises with K, and lies far above what the untrained
    model gets."""
    import pyrovae
    from pyrovae.runs import load_run

    run = load_run(digits_run.dir, data=True)
    plain = evaluate_run(run)
    assert "log_likelihood" not in plain and "history" not in plain
    assert plain["test_points"] == 64 and plain["kind"] == "vae"
    pyro.set_rng_seed(0)
    m = evaluate_run(run, iwae_samples=100)
    assert m["log_likelihood_samples"] == 100 and m["log_likelihood_split"] == "test"
    assert (
        "nats per datapoint" in m["log_likelihood_note"] and "binarize" in m["log_likelihood_note"]
    )
    x, v = run.data.x_test, run.model
    elbo_100 = float(elbo(v.model, v.guide, x, num_particles=100).mean())
    gap = m["log_likelihood"] - elbo_100
    assert 0.1 < gap < 1.0, (m["log_likelihood"], elbo_100)
    assert 0.05 < m["log_likelihood_se"] < 0.5  # s.d. over 64 points / 8; measured 0.126
    # the bound rises with K on average (each point 10 times; measured 4.81, 5.05, 5.12)
    pyro.set_rng_seed(0)
    ks = [float(log_likelihood(v.model, v.guide, x.repeat(10, 1), k).mean()) for k in (1, 10, 100)]
    assert ks[0] + 0.1 < ks[1] < ks[2], ks
    # what training bought: the untrained model of the same config
    cfg = pyrovae.load_config(tiny_config())
    pyro.set_rng_seed(0)
    untrained = pyrovae.build_model(cfg, run.data.shape)
    ll0 = log_likelihood(untrained.model, untrained.guide, x, 100).mean()
    assert m["log_likelihood"] > float(ll0) + 3  # measured 5.12 against 0.24
    assert not run.model.training  # evaluation leaves the model in eval mode


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


def test_evaluate_run_is_exported_and_needs_the_data(digits_run):
    import pyrovae
    from pyrovae import workflow

    assert pyrovae.evaluate_run is workflow.evaluate_run
    with pytest.raises(ValueError, match=r"load_run\(dir, data=True\)"):
        evaluate_run(pyrovae.load_run(digits_run.dir))


def test_evaluation_mode_sets_eval_and_restores_the_previous_mode():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with evaluate.evaluation_mode(net) as inner:
        assert inner is net and not net.training and not net[1].training
    assert net.training and net[1].training
    with pytest.raises(RuntimeError), evaluate.evaluation_mode(net):
        raise RuntimeError("inside")
    assert net.training  # restored on an exception too
    net.eval()
    with evaluate.evaluation_mode(net):
        pass
    assert not net.training  # an eval-mode net stays in eval mode
