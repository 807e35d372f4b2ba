"""Lesson 3: an over-complete autoencoder copies its input (J ≈ I); a denoising one does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_png, lesson_result

from pyrovae.errors import ConfigError
from pyrovae.teaching.overcomplete import (
    denoising_gains,
    jacobian,
    overcomplete_lesson,
    plot_overcomplete,
    principal_directions,
    relative_identity_error,
)


@pytest.fixture(scope="module")
def lesson():
    return lesson_result(
        "lesson3"
    )  # as docs/gen_lessons.py runs it: overcomplete_lesson(code_size=100, noise=0.3, seed=0)


def test_overcomplete_reconstructs_unseen_digits_and_noise(lesson):
    oc, dn = lesson.overcomplete, lesson.denoising
    assert oc.test_error < 1e-3  # digits it never saw: almost perfect
    assert oc.noise_error < 0.15 * lesson.noise_energy  # noise too (but for never-seen pixels)
    assert dn.test_error > 100 * oc.test_error
    assert dn.noise_error > 3 * oc.noise_error


def test_jacobian_is_identity_for_overcomplete_not_for_denoising(lesson):
    oc, dn = lesson.overcomplete, lesson.denoising
    assert oc.jacobian_error_data < 0.01  # on the subspace holding 99% of the variance
    assert dn.jacobian_error_data > 0.5
    assert oc.jacobian_error < dn.jacobian_error - 0.3  # all 64 pixels
    assert oc.directions_copied() >= 50
    assert dn.directions_copied() == 0


def test_denoising_gains_match_the_optimal_linear_denoiser(lesson):
    assert lesson.gain_max_deviation < 0.1
    assert lesson.constant_pixels >= 1  # why the full-pixel Jacobian error of the copy is not 0


def test_jacobian_and_identity_error_of_known_maps():
    class Affine:
        def __init__(self, A):
            self.A = A

        def reconstruct(self, x):
            return x @ self.A.T + 1.0

    A = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    J = jacobian(Affine(A), torch.rand(4))
    assert torch.allclose(J, A)
    assert relative_identity_error(torch.eye(4)) == 0.0
    assert relative_identity_error(J) == pytest.approx(np.sqrt(2 / 4))
    assert relative_identity_error(J, torch.eye(4)[:, :2]) == 0.0
    with pytest.raises(ConfigError):
        jacobian(Affine(A), torch.rand(2, 4))


def test_principal_directions_and_gains():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.1])
    lam, V = principal_directions(x)
    assert lam[0] > lam[1] > lam[2]
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(denoising_gains(torch.tensor([1.0, 0.0]), 1.0), torch.tensor([0.5, 0]))


def test_errors():
    with pytest.raises(ConfigError):
        overcomplete_lesson(code_size=64)
    with pytest.raises(ConfigError):
        overcomplete_lesson(noise=0.0)


def test_figure(lesson, tmp_path):
    path = plot_overcomplete(lesson, tmp_path / "fig.png")
    assert_png(path, min_size=(800, 300))
