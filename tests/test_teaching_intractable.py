"""Lesson 5: log p(x) by quadrature; naive MC, importance sampling and the ELBO against it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_png, lesson_result

import pyrovae
from pyrovae.errors import ConfigError
from pyrovae.teaching.intractable import (
    ess_fraction,
    estimates_from_weights,
    grid_cost,
    intractable_lesson,
    log_weight_matrix,
    plot_intractable,
    quadrature,
    refine_quadrature,
    trapezoid_grid,
)


@pytest.fixture(scope="module")
def lesson():
    return lesson_result(
        "lesson5"
    )  # as docs/gen_lessons.py runs it: intractable_lesson(latent_dims=(1, 2), n_images=6, seed=0)


@pytest.mark.parametrize("d", [1, 2])
def test_quadrature_is_stable_to_1e3_between_resolutions(lesson, d):
    r = lesson.at(d)
    ref = r.refinement
    assert ref.converged
    assert ref.changes[-1] < 1e-3 and ref.elbo_changes[-1] < 1e-3
    assert r.boundary_change < 1e-3  # a larger box changes nothing
    np.testing.assert_allclose(ref.final.q_mass.numpy(), 1.0, atol=1e-6)  # the grid covers q


@pytest.mark.parametrize("d", [1, 2])
def test_importance_sampling_converges_to_quadrature(lesson, d):
    r = lesson.at(d)
    assert r.ks[-1] == 10_000
    assert r.is_max_error[-1] < 0.05  # every image, every repeat
    assert np.abs(r.is_library - r.log_px).max() < 0.05  # pyrovae.evaluate.log_likelihood
    # the bias of log-mean-exp shrinks with K (Burda et al. 2016)
    assert abs(r.is_bias[-1]) < abs(r.is_bias[0])
    assert r.is_max_error[-1] < r.is_max_error[0]


@pytest.mark.parametrize("d", [1, 2])
def test_elbo_is_below_log_px(lesson, d):
    r = lesson.at(d)
    assert (r.elbo <= r.log_px).all()
    assert (r.gap > 0).all()  # = KL(q(z|x) || p(z|x))
    assert np.abs(r.elbo_mc - r.elbo).max() < 0.15  # Monte Carlo ELBO agrees (1000 particles)


def test_naive_monte_carlo_degrades_with_latent_size(lesson):
    one, two = lesson.at(1), lesson.at(2)
    assert two.ess_prior.mean() < one.ess_prior.mean()
    assert two.prior_bias[0] < one.prior_bias[0] < 0
    for r in (one, two):
        assert r.ess_q.mean() > r.ess_prior.mean()  # q is the better proposal


def test_grid_cost_grows_as_n_to_the_d(lesson):
    n = lesson.grid_n
    assert list(lesson.grid_evaluations) == [float(n**d) for d in range(1, 7)]
    assert grid_cost(3, 4) == 81
    with pytest.raises(ConfigError):
        grid_cost(1, 2)


def test_trapezoid_grid():
    z, lw = trapezoid_grid(2.0, 5, 2)
    assert z.shape == (25, 2)
    assert float(lw.exp().sum()) == pytest.approx(16.0)  # area of [-2, 2]^2
    # exact for a linear function, and exponentially accurate for a Gaussian
    z1, lw1 = trapezoid_grid(8.0, 65, 1)
    dens = torch.exp(-0.5 * z1[:, 0] ** 2) / math.sqrt(2 * math.pi)
    assert float((dens * lw1.exp()).sum()) == pytest.approx(1.0, abs=1e-12)


def _linear_gaussian_vae(sigma: float = 0.5):
    cfg = pyrovae.load_config(
        {
            "model": {
                "latent_dim": 1,
                "encoder": {"kind": "mlp", "hidden": [8]},
                "decoder": {"kind": "linear"},
                "likelihood": {"kind": "normal", "scale": sigma},
            }
        }
    )
    torch.manual_seed(0)
    return copy.deepcopy(pyrovae.build_model(cfg, (4,))).double().eval()


def test_quadrature_matches_closed_form_of_a_linear_gaussian_model():
    # decoder x = W z + b, p(z) = N(0, 1): p(x) = N(b, W W^T + σ² I) exactly
    vae = _linear_gaussian_vae(0.5)
    W, b = vae.decoder.weight.detach(), vae.decoder.bias.detach()
    sigma = float(vae.likelihood.scale()[0])
    cov = W @ W.T + sigma**2 * torch.eye(4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    q = quadrature(vae, x, L=8.0, n=129)
    torch.testing.assert_close(q.log_px, exact, atol=1e-9, rtol=0)
    assert (q.elbo <= q.log_px + 1e-12).all()
    ref = refine_quadrature(vae, x, L=8.0, tol=1e-6)
    assert ref.converged
    lw = log_weight_matrix(vae, x, 20_000, "prior", seed=0)
    est = estimates_from_weights(lw, 20_000)[0]
    assert (est - exact).abs().max() < 0.05
    assert ((ess_fraction(lw) > 0) & (ess_fraction(lw) <= 1)).all()


def test_estimates_from_weights_groups():
    lw = torch.log(torch.tensor([[1.0], [3.0], [2.0], [2.0]], dtype=torch.float64))
    est = estimates_from_weights(lw, 2)
    torch.testing.assert_close(est, torch.log(torch.tensor([[2.0], [2.0]], dtype=torch.float64)))
    assert float(ess_fraction(torch.zeros(10, 1))) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        estimates_from_weights(lw, 5)


def test_errors():
    with pytest.raises(ConfigError):
        intractable_lesson(latent_dims=(4,))
    with pytest.raises(ConfigError):
        trapezoid_grid(0.0, 5, 1)
    cfg = pyrovae.load_config({"model": {"guide": {"kind": "flow"}}})
    flow_vae = pyrovae.build_model(cfg, (4,)).double()
    with pytest.raises(ConfigError):
        quadrature(flow_vae, torch.rand(2, 4, dtype=torch.float64), n=5)


def test_figure(lesson, tmp_path):
    path = plot_intractable(lesson, tmp_path / "fig.png")
    assert_png(path, min_size=(800, 300))
