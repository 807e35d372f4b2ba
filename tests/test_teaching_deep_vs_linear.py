"""Lesson 2: a deep autoencoder reconstructs better than a linear one at the same code size."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_png, lesson_result

from pyrovae.errors import ConfigError
from pyrovae.teaching.deep_vs_linear import (
    ae_config,
    deep_vs_linear_lesson,
    pca_test_error,
    plot_deep_vs_linear,
    preserved_rng,
)


@pytest.fixture(scope="module")
def lesson():
    return lesson_result(
        "lesson2"
    )  # as docs/gen_lessons.py runs it: deep_vs_linear_lesson(code_sizes=(2, 8), seed=0)


@pytest.mark.parametrize("k", [2, 8])
def test_deep_beats_linear_and_pca_on_test_split(lesson, k):
    r = lesson.at(k)
    assert r.deep_error < r.linear_error
    # PCA is the best rank-k affine reconstruction of the training data: the floor of any linear
    # autoencoder. The deep autoencoder goes below it.
    assert r.deep_error < r.pca_error
    assert r.deep_vs_linear < 0.75


@pytest.mark.parametrize("k", [2, 8])
def test_linear_autoencoder_is_near_but_not_below_pca(lesson, k):
    r = lesson.at(k)
    assert r.linear_train_error >= r.pca_train_error * (1 - 1e-6)  # Eckart–Young
    assert r.linear_error < 1.15 * r.pca_error  # trained close to its optimum


def test_linear_variant_is_a_single_affine_map_each_way(lesson):
    k = 2
    assert lesson.at(k).linear_params == (64 * k + k) + (k * 64 + 64)
    assert lesson.at(k).linear_codes.shape == (lesson.n_test, k)


def test_pca_error_is_the_discarded_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64) * torch.tensor([3, 2, 1, 0.5, 0.1])
    tr, _, comps = pca_test_error(x, x, 2)
    eig = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    assert tr == pytest.approx(float(eig[2:].sum()), rel=1e-9)
    assert comps.shape == (5, 2)


def test_rng_is_preserved():
    before = torch.get_rng_state()
    with preserved_rng():
        torch.manual_seed(123)
        torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())


def test_errors():
    with pytest.raises(ConfigError):
        deep_vs_linear_lesson(code_sizes=(0,))
    with pytest.raises(ConfigError):
        deep_vs_linear_lesson(hidden=())
    with pytest.raises(ConfigError):
        ae_config("deep", 2, hidden=(0,))


def test_figure(lesson, tmp_path):
    path = plot_deep_vs_linear(lesson, tmp_path / "fig.png")
    assert_png(path, min_size=(800, 300))
