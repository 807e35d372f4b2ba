"""Every likelihood: log-density against torch.distributions, and clear support errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributions as td

from pyrovae.errors import DataError
from pyrovae.likelihoods import LIKELIHOODS, build_likelihood

D = 5


def lik(kind, **opts):
    return build_likelihood(LIKELIHOODS[kind].Spec(**opts), D)


def raw(b=4):
    return torch.randn(b, 1, D)


def test_registry_lists_all_likelihoods():
    assert set(LIKELIHOODS.kinds()) == {
        "bernoulli",
        "bernoulli_cross_entropy",
        "continuous_bernoulli",
        "normal",
        "laplace",
        "poisson",
        "negative_binomial",
    }


def test_bernoulli():
    r, x = raw(), torch.randint(0, 2, (4, D)).float()
    ref = td.Bernoulli(logits=r[:, 0]).log_prob(x).sum(-1)
    torch.testing.assert_close(lik("bernoulli")(r).log_prob(x), ref)
    torch.testing.assert_close(lik("bernoulli").reconstruction_loss(r, x), -ref)


def test_continuous_bernoulli_normalizer():
    r, x = raw(), torch.rand(4, D)
    lam = torch.sigmoid(r[:, 0]).double()
    # C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ)
    log_c = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    ref = (log_c + x.double() * lam.log() + (1 - x.double()) * (1 - lam).log()).sum(-1)
    torch.testing.assert_close(
        lik("continuous_bernoulli")(r).log_prob(x).double(), ref, atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize("kind,family", [("normal", td.Normal), ("laplace", td.Laplace)])
def test_location_scale_fixed_and_learned(kind, family):
    r, x = raw(), torch.randn(4, D)
    fixed = lik(kind, scale=0.3)
    torch.testing.assert_close(fixed(r).log_prob(x), family(r[:, 0], 0.3).log_prob(x).sum(-1))
    learned = lik(kind, scale="learned")
    assert [n for n, _ in learned.named_parameters()] == ["log_scale"]
    torch.testing.assert_close(learned(r).log_prob(x), family(r[:, 0], 1.0).log_prob(x).sum(-1))


def test_normal_reconstruction_loss_is_squared_error():
    r, x = raw(), torch.randn(4, D)
    torch.testing.assert_close(
        lik("normal").reconstruction_loss(r, x), (x - r[:, 0]).pow(2).sum(-1)
    )


def test_poisson_and_negative_binomial():
    r, x = raw(), torch.randint(0, 7, (4, D)).float()
    rate = torch.nn.functional.softplus(r[:, 0]) + 1e-6
    torch.testing.assert_close(lik("poisson")(r).log_prob(x), td.Poisson(rate).log_prob(x).sum(-1))
    nb = lik("negative_binomial")
    total = torch.nn.functional.softplus(nb.raw_total_count) + 1e-4
    torch.testing.assert_close(
        nb(r).log_prob(x), td.NegativeBinomial(total, logits=r[:, 0]).log_prob(x).sum(-1)
    )


def test_grey_levels_under_bernoulli_suggest_binarize():
    x = torch.rand(3, D)
    with pytest.raises(DataError, match="binarize.*continuous_bernoulli") as e:
        lik("bernoulli").check_data(x, "train.npy")
    assert "train.npy" in str(e.value) and "bernoulli" in str(e.value)


@pytest.mark.parametrize(
    "kind,bad,pattern",
    [
        ("bernoulli", torch.tensor([[0.0, 2.0, 1.0, 0.0, 1.0]]), r"\{0, 1\}"),
        ("continuous_bernoulli", torch.tensor([[0.0, 1.5, 0.2, 0.1, 0.0]]), r"\[0, 1\]"),
        ("poisson", torch.tensor([[0.0, -1.0, 2.0, 3.0, 0.0]]), "non-negative integer"),
        ("negative_binomial", torch.tensor([[1.0, 0.5, 2.0, 3.0, 0.0]]), "non-negative integer"),
        ("normal", torch.tensor([[0.0, float("nan"), 2.0, 3.0, 0.0]]), "NaN"),
    ],
)
def test_support_errors_name_likelihood_and_values(kind, bad, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        lik(kind).check_data(bad, "mydata")
    msg = str(e.value)
    assert "mydata" in msg and "(0, 1)" in msg  # source and index of the first offending value


def test_valid_data_passes():
    lik("bernoulli").check_data(torch.randint(0, 2, (3, D)).float())
    lik("continuous_bernoulli").check_data(torch.rand(3, D))
    lik("poisson").check_data(torch.randint(0, 9, (3, D)).float())


def test_scale_must_be_positive():
    with pytest.raises(ValueError):
        LIKELIHOODS["normal"].Spec(scale=0)
    with pytest.raises(ValueError):
        LIKELIHOODS["normal"].Spec(scale="fixed")


def test_bernoulli_cross_entropy_on_grey_levels():
    """Σ x log σ(ℓ) + (1 − x) log(1 − σ(ℓ)) on grey x, written out; binary x gives `bernoulli`."""
    r, x = raw(), torch.rand(4, D)
    lam = torch.sigmoid(r[:, 0]).double()
    ref = (x.double() * lam.log() + (1 - x.double()) * (1 - lam).log()).sum(-1)
    ce = lik("bernoulli_cross_entropy")
    ce.check_data(x)  # grey levels are its data
    torch.testing.assert_close(ce(r).log_prob(x).double(), ref)
    torch.testing.assert_close(ce.reconstruction_loss(r, x).double(), -ref)
    b = torch.randint(0, 2, (4, D)).float()
    torch.testing.assert_close(ce(r).log_prob(b), lik("bernoulli")(r).log_prob(b))
    # the maximizer of the cross-entropy is λ = x: it is not a density, its floor is the entropy
    at_x = lik("bernoulli_cross_entropy")(torch.logit(x.clamp(1e-4, 1 - 1e-4))[:, None]).log_prob(x)
    assert (at_x >= ce(r).log_prob(x)).all()
    with pytest.raises(DataError, match=r"bernoulli_cross_entropy likelihood needs values in \[0, 1\]"):
        ce.check_data(torch.tensor([[0.0, 1.2, 0.5, 0.0, 1.0]]), "grey.npy")
