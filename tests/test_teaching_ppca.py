"""Probabilistic PCA closed forms, its Pyro model and guides, and lesson 6 (the VI identity)."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from conftest import assert_png, lesson_result
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch.distributions import MultivariateNormal, kl_divergence

from pyrovae.errors import ConfigError, DataError
from pyrovae.teaching.ppca import (
    PPCA,
    diagonal_guide,
    elbo_closed_form,
    elbo_terms,
    exact_guide,
    exact_kl_to_posterior,
    fixed_gaussian_guide,
    gaussian_guide,
    learnable_gaussian_guide,
    perturbed_guide,
    perturbed_posterior,
)
from pyrovae.teaching.vi_identity import (
    identity_check,
    mc_elbo,
    optimize_linear_guide,
    plot_vi_identity,
)

F64 = torch.float64


@pytest.fixture
def ppca():
    return PPCA.random(D=6, k=2, sigma=0.7, seed=3)


@pytest.fixture
def x(ppca):
    return ppca.sample(40, torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def lesson():
    return lesson_result("lesson6")  # as docs/gen_lessons.py runs it: vi_identity_lesson(seed=0)


# --- closed forms --------------------------------------------------------------------------------


def test_random_and_sample(ppca):
    assert ppca.W.dtype == F64 and ppca.W.shape == (6, 2) and ppca.mu.shape == (6,)
    assert torch.equal(PPCA.random(6, 2, 0.7, seed=3).W, ppca.W)  # reproducible
    x, z = ppca.sample(100_000, torch.Generator().manual_seed(0), return_z=True)
    assert x.shape == (100_000, 6) and z.shape == (100_000, 2) and x.dtype == F64
    cov = ppca.W @ ppca.W.T + ppca.sigma**2 * torch.eye(6, dtype=F64)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05)
    assert torch.allclose(x.mean(0), ppca.mu, atol=0.03)


def test_log_marginal_by_quadrature():
    """p(x) = ∫ p(x|z) p(z) dz by a fine 1-D grid, for k = 1."""
    ppca = PPCA.random(D=4, k=1, sigma=0.5, seed=1)
    x = ppca.sample(5, torch.Generator().manual_seed(2))
    z = torch.linspace(-10, 10, 200_001, dtype=F64)[:, None, None]  # [G, 1, 1]
    log_joint = ppca.log_joint(x, z.expand(-1, 5, 1))  # [G, N]
    log_px = torch.logsumexp(log_joint, 0) + math.log(float(z[1] - z[0]))
    assert torch.allclose(ppca.log_marginal(x), log_px, atol=1e-8)
    # posterior mean and variance by the same quadrature
    w = torch.softmax(log_joint, 0)
    mean_q = (w * z[:, :, 0]).sum(0)
    var_q = (w * z[:, :, 0] ** 2).sum(0) - mean_q**2
    mean, cov = ppca.posterior(x)
    assert torch.allclose(mean[:, 0], mean_q, atol=1e-8)
    assert torch.allclose(cov[0, 0].expand(5), var_q, atol=1e-8)


def test_bayes_rule_at_any_z(ppca, x):
    """log p(x) = log p(x, z) - log p(z|x) for every z."""
    mean, cov = ppca.posterior(x)
    post = MultivariateNormal(mean, covariance_matrix=cov)
    for z in (mean, mean + 1.3, torch.zeros_like(mean)):
        assert torch.allclose(
            ppca.log_joint(x, z) - post.log_prob(z), ppca.log_marginal(x), atol=1e-10
        )


def test_amortized_posterior_is_the_posterior(ppca, x):
    A, b, L = ppca.amortized_posterior()
    mean, cov = ppca.posterior(x)
    assert torch.allclose(x @ A + b, mean, atol=1e-12)
    assert torch.allclose(L @ L.T, cov, atol=1e-12)


def test_kl_to_posterior_closed_forms(ppca, x):
    mean, cov = ppca.posterior(x)
    assert torch.allclose(
        exact_kl_to_posterior(mean, cov, ppca, x), torch.zeros(40, dtype=F64), atol=1e-10
    )
    delta = torch.tensor([0.3, -0.2], dtype=F64)
    m, c = perturbed_posterior(ppca, x, delta, 1.0)
    expected = 0.5 * delta @ torch.linalg.solve(cov, delta)  # ½ δᵀΣ⁻¹δ
    assert torch.allclose(exact_kl_to_posterior(m, c, ppca, x), expected.expand(40), atol=1e-10)
    m, c = perturbed_posterior(ppca, x, 0.0, 1.5)
    expected = 0.5 * ppca.k * (1.5**2 - 1 - 2 * math.log(1.5))
    assert torch.allclose(
        exact_kl_to_posterior(m, c, ppca, x), torch.full((40,), expected, dtype=F64), atol=1e-10
    )


def test_elbo_terms(ppca, x):
    m, c = perturbed_posterior(ppca, x, 0.4, 0.8)
    t = elbo_terms(m, c, ppca, x)
    prior = MultivariateNormal(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    q = MultivariateNormal(m, covariance_matrix=c)
    assert torch.allclose(t.kl_to_prior, kl_divergence(q, prior), atol=1e-10)
    assert torch.allclose(t.entropy, q.entropy(), atol=1e-12)
    # E_q[log p(x|z)] by Monte Carlo
    z = q.sample((20_000,))
    lik = torch.distributions.Normal(z @ ppca.W.T + ppca.mu, ppca.sigma).log_prob(x).sum(-1)
    se = lik.std(0) / math.sqrt(20_000)
    assert torch.all((lik.mean(0) - t.expected_loglik).abs() < 4 * se + 1e-12)
    assert torch.allclose(t.elbo, elbo_closed_form(m, c, ppca, x))


def test_vi_identity_over_many_random_q(ppca, x):
    check = identity_check(ppca, x, n_q=60, seed=0)
    assert check.n_q >= 50
    assert check.max_abs_gap < 1e-6
    assert check.min_kl >= 0 and check.max_elbo_minus_logpx <= 0


def test_exact_posterior_elbo_equals_log_marginal(ppca, x):
    mean, cov = ppca.posterior(x)
    assert torch.allclose(
        elbo_closed_form(mean, cov, ppca, x), ppca.log_marginal(x), atol=1e-6, rtol=0
    )


# --- Pyro model and guides -------------------------------------------------------------------------


def _sites(fn, x):
    tr = poutine.trace(fn).get_trace(x)
    return {n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


@pytest.mark.parametrize(
    "make_guide",
    [
        lambda p, x: exact_guide(p),
        lambda p, x: gaussian_guide(*p.amortized_posterior()),
        lambda p, x: diagonal_guide(torch.ones(p.k), *p.amortized_posterior()[:2]),
        lambda p, x: diagonal_guide(torch.full((p.k,), 0.5), loc_fn=lambda x: p.posterior(x)[0]),
        lambda p, x: fixed_gaussian_guide(*p.posterior(x)),
        lambda p, x: perturbed_guide(p, 0.1, 1.2),
        lambda p, x: learnable_gaussian_guide(p.D, p.k),
    ],
    ids=["exact", "gaussian", "diagonal_linear", "diagonal_fn", "fixed", "perturbed", "learnable"],
)
def test_model_and_guides_structure(ppca, x, make_guide, request):
    model_sites = _sites(ppca.model, x)
    assert set(model_sites) == {"z", "x"}
    assert not model_sites["z"]["is_observed"] and model_sites["x"]["is_observed"]
    guide_sites = _sites(make_guide(ppca, x), x)
    assert set(guide_sites) == {"z"}
    for site in [*model_sites.values(), guide_sites["z"]]:
        frames = site["cond_indep_stack"]
        assert [f.name for f in frames] == ["data"] and frames[0].size == 40
        assert site["fn"].batch_shape == (40,)
    assert guide_sites["z"]["value"].shape == (40, 2) and guide_sites["z"]["value"].dtype == F64
    # the ELBO (200 particles) is log p(x) for the guides that are the exact posterior, and
    # below it by more than Monte Carlo noise for the others
    elbo = Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    mean_elbo = -elbo.loss(ppca.model, make_guide(ppca, x), x) / 40
    log_px = float(ppca.log_marginal(x).mean())
    if request.node.callspec.id in ("exact", "gaussian", "fixed"):
        assert mean_elbo == pytest.approx(log_px, abs=1e-8)
    else:
        assert mean_elbo < log_px - 0.01


def test_trace_elbo_exact_guide_is_log_marginal_per_datapoint(ppca, x):
    log_px = ppca.log_marginal(x)
    guide = exact_guide(ppca)
    for i in range(x.shape[0]):
        loss = Trace_ELBO().loss(ppca.model, guide, x[i : i + 1])
        assert loss == pytest.approx(-float(log_px[i]), abs=1e-6)
    # zero variance: whole batch, several particles, still exact
    loss = Trace_ELBO(num_particles=5, vectorize_particles=True).loss(ppca.model, guide, x)
    assert loss == pytest.approx(-float(log_px.sum()), abs=1e-6)


@pytest.mark.parametrize("shift, scale", [(0.3, 1.5), (0.0, 0.6)])
def test_trace_elbo_agrees_with_closed_form_within_mc_error(ppca, x, shift, scale):
    m, c = perturbed_posterior(ppca, x, shift, scale)
    est, se = mc_elbo(ppca, perturbed_guide(ppca, shift, scale), x, num_particles=32, repeats=20)
    closed = float(elbo_closed_form(m, c, ppca, x).mean())
    assert abs(est - closed) < 4 * se
    assert closed < float(ppca.log_marginal(x).mean())


def test_diagonal_guide_elbo(ppca, x):
    A, b, _ = ppca.amortized_posterior()
    scale = torch.tensor([0.3, 0.5], dtype=F64)
    est, se = mc_elbo(ppca, diagonal_guide(scale, A, b), x, num_particles=32, repeats=20)
    closed = float(elbo_closed_form(x @ A + b, torch.diag(scale**2), ppca, x).mean())
    assert abs(est - closed) < 4 * se


def test_svi_drives_kl_to_zero(ppca, x):
    run = optimize_linear_guide(ppca, x, steps=300, seed=0)
    assert run.kl_final < 0.05 and run.kl_final < 0.05 * run.kl_initial
    assert run.elbo_final == pytest.approx(run.log_px, abs=0.05)
    assert run.elbo_final + run.kl_final == pytest.approx(run.log_px, abs=1e-8)
    # ELBO + KL = log p(x) at every step
    assert np.allclose(run.elbo_exact + run.kl_exact, run.log_px, atol=1e-8)
    assert len(pyro.get_param_store()) == 0  # ran in its own param-store scope
    # svi.step's loss / N is an unbiased estimate of the closed-form ELBO per datapoint
    diff = run.elbo_mc - run.elbo_exact
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / np.sqrt(len(diff))


# --- lesson 6 --------------------------------------------------------------------------------------


def test_lesson_numbers(lesson):
    assert lesson.identity.n_q >= 50 and lesson.identity.max_abs_gap < 1e-6
    assert lesson.exact_elbo_gap < 1e-6
    assert lesson.exact_trace_elbo_gap < 1e-6
    assert lesson.mc.max_abs_z < 4
    assert lesson.svi.kl_final < 0.05
    assert lesson.svi.kl_final < 0.05 * lesson.svi.kl_initial


def test_figure(lesson, tmp_path):
    assert_png(plot_vi_identity(lesson, tmp_path / "fig.png"), min_size=(800, 300))


# --- errors ----------------------------------------------------------------------------------------


def test_errors(ppca, x):
    with pytest.raises(ConfigError):
        PPCA(W=torch.ones(3, 2), mu=torch.zeros(3), sigma=0.0)
    with pytest.raises(ConfigError):
        PPCA(W=torch.ones(3, 2), mu=torch.zeros(4), sigma=1.0)
    with pytest.raises(ConfigError):
        PPCA.random(0, 2)
    with pytest.raises(DataError):
        ppca.log_marginal(torch.zeros(5, 7, dtype=F64))
    with pytest.raises(DataError):
        ppca.model(torch.full((2, 6), float("nan"), dtype=F64))
    with pytest.raises(ConfigError):
        diagonal_guide(torch.ones(2))
    with pytest.raises(ConfigError):
        diagonal_guide(torch.ones(2), torch.zeros(6, 2), torch.zeros(2), loc_fn=lambda x: x)
    with pytest.raises(ConfigError):
        diagonal_guide(-torch.ones(2), loc_fn=lambda x: x)
    with pytest.raises(ConfigError):
        gaussian_guide(torch.zeros(6, 2), torch.zeros(2), torch.ones(2, 2))  # not lower-triangular
    with pytest.raises(ConfigError):
        perturbed_guide(ppca, 0.0, 0.0)
    with pytest.raises(DataError):
        exact_kl_to_posterior(torch.zeros(40, 2), -torch.eye(2), ppca, x)
    with pytest.raises(DataError):
        fixed_gaussian_guide(torch.zeros(3, 2), torch.eye(2))(x)
