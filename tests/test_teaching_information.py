"""Lesson 4: information, entropy, discrete and Gaussian KL, Monte Carlo KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_png, lesson_result
from torch.distributions import Categorical, Independent, Normal, kl_divergence

from pyrovae.errors import ConfigError, DataError
from pyrovae.teaching.information import (
    diag_gaussian_kl,
    entropy,
    gaussian_kl,
    gibbs_check,
    information,
    kl_discrete,
    mc_gaussian_kl,
    plot_information,
)


@pytest.fixture(scope="module")
def lesson():
    return lesson_result("lesson4")  # as docs/gen_lessons.py runs it: information_lesson(seed=0)


def test_worked_example_two_outcomes(lesson):
    # KL(p||q) = 0.3 ln(0.3/0.5) + 0.7 ln(0.7/0.5); KL(q||p) = 0.5 ln(0.5/0.3) + 0.5 ln(0.5/0.7)
    assert lesson.kl_pq_nats == pytest.approx(0.3 * math.log(0.6) + 0.7 * math.log(1.4), abs=1e-12)
    assert lesson.kl_qp_nats == pytest.approx(
        0.5 * math.log(5 / 3) + 0.5 * math.log(5 / 7), abs=1e-12
    )
    assert lesson.kl_pq_nats == pytest.approx(0.082283, abs=1e-6)
    assert lesson.kl_qp_nats == pytest.approx(0.087177, abs=1e-6)
    assert lesson.kl_pq_bits == pytest.approx(lesson.kl_pq_nats / math.log(2), abs=1e-12)
    assert lesson.kl_qp_bits == pytest.approx(lesson.kl_qp_nats / math.log(2), abs=1e-12)
    assert abs(lesson.kl_pq_nats - lesson.kl_qp_nats) > 1e-3  # not symmetric
    assert lesson.kl_pq_torch == pytest.approx(lesson.kl_pq_nats, abs=1e-12)
    assert lesson.entropy_q_bits == pytest.approx(1.0)


def test_three_outcomes_against_torch(lesson):
    assert lesson.kl3_pq_nats == pytest.approx(lesson.kl3_pq_torch, abs=1e-12)
    expected = sum(p * math.log(p / q) for p, q in zip(lesson.p3, lesson.q3, strict=True))
    assert lesson.kl3_pq_nats == pytest.approx(expected, abs=1e-12)
    assert lesson.kl3_pq_nats != pytest.approx(lesson.kl3_qp_nats, abs=1e-3)


def test_gibbs_inequality_on_many_random_pairs():
    for k in (2, 3, 10):
        g = gibbs_check(n_pairs=5000, n_outcomes=k, seed=k)
        assert g.n_negative == 0 and g.min_kl >= 0
        assert g.max_abs_diff_torch < 1e-10
        assert g.mean_abs_asymmetry > 0


def test_information_and_entropy():
    assert float(information(0.5, base=2)) == pytest.approx(1.0)
    assert float(information(1.0)) == 0.0
    assert math.isinf(float(information(0.0)))
    assert float(entropy([1.0, 0.0])) == 0.0  # 0 log 0 = 0
    assert float(entropy([0.25] * 4, base=2)) == pytest.approx(2.0)
    p = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    assert float(entropy(p)) == pytest.approx(float(Categorical(probs=p).entropy()), abs=1e-12)
    # entropy = expected information
    assert float(entropy(p)) == pytest.approx(float((p * information(p)).sum()), abs=1e-12)


def test_kl_support_and_identity():
    assert float(kl_discrete([0.5, 0.5], [0.5, 0.5])) == 0.0
    assert float(kl_discrete([0.0, 1.0], [0.5, 0.5])) == pytest.approx(math.log(2))
    assert math.isinf(float(kl_discrete([0.5, 0.5], [1.0, 0.0])))


def test_gaussian_closed_form_equals_torch_kl_divergence():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (
        torch.randn(200, generator=g, dtype=torch.float64),
        torch.randn(200, generator=g, dtype=torch.float64),
    )
    s1 = torch.exp(torch.randn(200, generator=g, dtype=torch.float64))
    s2 = torch.exp(torch.randn(200, generator=g, dtype=torch.float64))
    ref = kl_divergence(Normal(mu1, s1), Normal(mu2, s2))
    assert torch.allclose(gaussian_kl(mu1, s1, mu2, s2), ref, atol=1e-6, rtol=0)
    shape = (50, 4)
    m1, m2 = mu1[:200].reshape(shape), mu2.reshape(shape)
    d1, d2 = s1.reshape(shape), s2.reshape(shape)
    ref = kl_divergence(Independent(Normal(m1, d1), 1), Independent(Normal(m2, d2), 1))
    assert torch.allclose(diag_gaussian_kl(m1, d1, m2, d2), ref, atol=1e-6, rtol=0)


def test_lesson_gaussians_match_torch(lesson):
    assert lesson.gauss_kl == pytest.approx(lesson.gauss_kl_torch, abs=1e-6)
    assert lesson.gauss_kl == pytest.approx(math.log(2) + 2 / 8 - 0.5, abs=1e-12)
    assert lesson.diag_kl == pytest.approx(lesson.diag_kl_torch, abs=1e-6)


def test_monte_carlo_within_four_standard_errors(lesson):
    mc = lesson.mc
    assert np.all(np.abs(mc.estimates - mc.exact) <= 4 * mc.stderrs)
    # and the error shrinks like 1/sqrt(n): RMS error within a factor 2 of sd/sqrt(n)
    ratio = mc.rms_errors / (mc.sd / np.sqrt(mc.ns))
    assert np.all((ratio > 0.4) & (ratio < 2.0))


def test_errors():
    with pytest.raises(DataError):
        kl_discrete([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(DataError):
        kl_discrete([0.5, 0.5], [0.3, 0.3, 0.4])
    with pytest.raises(DataError):
        entropy([-0.1, 1.1])
    with pytest.raises(DataError):
        information(1.5)
    with pytest.raises(ConfigError):
        entropy([0.5, 0.5], base=1)
    with pytest.raises(ConfigError):
        gaussian_kl(0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ConfigError):
        mc_gaussian_kl(torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1), n=1)
    with pytest.raises(ConfigError):
        gibbs_check(n_outcomes=1)


def test_figure(lesson, tmp_path):
    assert_png(plot_information(lesson, tmp_path / "fig.png"), min_size=(800, 300))
