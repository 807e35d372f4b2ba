"""Lesson 7: -ELBO = ||x - x_hat||^2 / 2σ² + KL + const; VAE codes ≈ N(0, I), AE codes are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_png, lesson_result

import pyrovae
from pyrovae.errors import ConfigError
from pyrovae.teaching.ae_vs_vae import (
    ae_vs_vae_lesson,
    gaussian_elbo_identity,
    moment_kl_to_standard_normal,
    plot_ae_vs_vae,
)


@pytest.fixture(scope="module")
def lesson():
    return lesson_result(
        "lesson7"
    )  # as docs/gen_lessons.py runs it: ae_vs_vae_lesson(latent_dim=2, scale=0.3, seed=0)


def test_negative_elbo_is_scaled_squared_error_plus_kl(lesson):
    i = lesson.identity
    assert i.n == 128
    assert i.max_abs_diff < 1e-5  # per image, against Pyro's model trace + kl_divergence
    assert i.mean_field_diff < 1e-5 * max(1.0, abs(i.mean_field_loss))  # TraceMeanField_ELBO
    assert i.trace_elbo_diff < 1e-5 * max(1.0, abs(i.trace_elbo_loss))  # Trace_ELBO
    assert (i.kl >= 0).all()
    assert i.const == pytest.approx(32 * np.log(2 * np.pi * i.sigma**2))


def test_vae_aggregate_posterior_is_close_to_the_prior(lesson):
    s = lesson.vae_codes
    assert np.abs(s.mean).max() < 0.25
    assert np.abs(s.var - 1).max() < 0.25
    assert s.kl_to_prior < 0.1
    assert lesson.prior_mass_vae > 0.9


def test_autoencoder_codes_are_unconstrained(lesson):
    a = lesson.ae_codes
    assert a.kl_to_prior > 0.5
    assert a.kl_to_prior > 10 * lesson.vae_codes.kl_to_prior
    assert lesson.prior_mass_ae < lesson.prior_mass_vae


def test_reconstructions_comparable(lesson):
    # the VAE pays for its KL term with (slightly) worse reconstructions, not with garbage
    assert lesson.ae_error < lesson.vae_error < 1.5 * lesson.ae_error


def test_moment_kl():
    assert moment_kl_to_standard_normal(np.zeros(3), np.ones(3)) == 0.0
    assert moment_kl_to_standard_normal(np.array([1.0]), np.array([1.0])) == pytest.approx(0.5)


def test_identity_needs_gaussian_likelihood():
    cfg = pyrovae.load_config({"model": {"likelihood": {"kind": "continuous_bernoulli"}}})
    vae = pyrovae.build_model(cfg, (1, 8, 8))
    with pytest.raises(ConfigError):
        gaussian_elbo_identity(vae, torch.rand(4, 64))


def test_errors():
    with pytest.raises(ConfigError):
        ae_vs_vae_lesson(scale=0.0)


def test_figure(lesson, tmp_path):
    path = plot_ae_vs_vae(lesson, tmp_path / "fig.png")
    assert_png(path, min_size=(800, 300))
