"""Lesson 1: a linear autoencoder (tied or untied) learns PCA's principal subspace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_png, lesson_result

from pyrovae.errors import ConfigError, DataError
from pyrovae.teaching.linear_ae import (
    _principal_angles_svd,
    linear_ae_lesson,
    pca_fit,
    plot_linear_ae,
    principal_angles,
)


@pytest.fixture(scope="module")
def lesson():
    return lesson_result("lesson1")  # as docs/gen_lessons.py runs it: linear_ae_lesson(k=8, seed=0)


def test_decoder_subspaces_match_pca_within_one_degree(lesson):
    assert lesson.tied_angles_deg.shape == (8,)
    assert lesson.tied_max_angle_deg < 1.0
    assert lesson.untied_max_angle_deg < 1.0


def test_reconstruction_error_matches_pca_residual_within_one_percent(lesson):
    # PCA is the optimal rank-k affine reconstruction, so the AEs cannot beat it.
    for rel in (lesson.tied_rel_error, lesson.untied_rel_error):
        assert -1e-9 <= rel < 0.01


def test_pca_residual_is_sum_of_discarded_eigenvalues():
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(300, 6)) * [3, 2, 1.5, 1, 0.5, 0.2])
    fit = pca_fit(x, 2)
    eig = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    assert fit.residual == pytest.approx(float(eig[2:].sum()), rel=1e-10)


def test_principal_angles_of_known_rotation():
    t = math.radians(30.0)
    a = np.array([[1.0, 0], [0, 1], [0, 0]])
    b = np.array([[1.0, 0], [0, math.cos(t)], [0, math.sin(t)]])
    np.testing.assert_allclose(principal_angles(a, b), [30.0, 0.0], atol=1e-10)
    # basis-independent: any invertible recombination of the columns spans the same subspace
    np.testing.assert_allclose(principal_angles(a @ [[2.0, 1], [0, 3]], b), [30.0, 0.0], atol=1e-10)


def test_svd_fallback_agrees_with_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    np.testing.assert_allclose(_principal_angles_svd(a, b), principal_angles(a, b), atol=1e-8)
    tiny = a + 1e-9 * rng.normal(size=a.shape)
    np.testing.assert_allclose(_principal_angles_svd(a, tiny), principal_angles(a, tiny), atol=1e-9)


def test_errors():
    x = torch.rand(50, 10, dtype=torch.float64)
    with pytest.raises(ConfigError):
        linear_ae_lesson(k=10, x=x)
    with pytest.raises(ConfigError):
        linear_ae_lesson(k=0, x=x)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError):
        linear_ae_lesson(k=2, x=bad)
    with pytest.raises(DataError):
        principal_angles(np.ones((3, 2)), np.ones((4, 2)))


def test_figure(lesson, tmp_path):
    path = plot_linear_ae(lesson, tmp_path / "fig.png")
    assert_png(path, min_size=(800, 300))
