"""Every prior: a proper density on R^d checked against torch.distributions / closed forms."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.distributions as td

from pyrovae.guides import build_guide
from pyrovae.networks import MLP
from pyrovae.priors import PRIORS, build_prior

D, DATA = 3, 6


def make(kind: str, **opts):
    spec = PRIORS[kind].Spec(**opts)
    guide = build_guide(
        build_guide.__globals__["GUIDES"]["normal"].Spec(), MLP.Spec(hidden=[8]), (DATA,), D
    )
    return build_prior(spec, D, DATA, guide.encode), guide


def test_registry_lists_all_priors():
    builtin = {k for k in PRIORS.kinds() if PRIORS[k].__module__ == "pyrovae.priors"}
    assert builtin == {"normal", "normal_learned", "mixture", "vamp", "flow"}
    # anything else was registered by a plugin loaded in this process, and says where from
    assert all(PRIORS.origin[k]["sha256"] for k in set(PRIORS.kinds()) - builtin)


def test_standard_normal_matches_torch():
    prior, _ = make("normal")
    z = torch.randn(5, D)
    ref = td.Independent(td.Normal(torch.zeros(D), torch.ones(D)), 1).log_prob(z)
    torch.testing.assert_close(prior().log_prob(z), ref)
    assert prior().event_shape == (D,) and prior().batch_shape == ()


def test_learned_normal_matches_torch_and_has_parameters():
    prior, _ = make("normal_learned")
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
        prior.log_scale.copy_(torch.tensor([0.1, -0.2, 0.3]))
    z = torch.randn(7, D)
    ref = td.Independent(td.Normal(prior.loc, prior.log_scale.exp()), 1).log_prob(z)
    torch.testing.assert_close(prior().log_prob(z), ref)
    assert len(list(prior.parameters())) == 2


def test_mixture_matches_explicit_logsumexp():
    prior, _ = make("mixture", components=4)
    z = torch.randn(9, D)
    p = prior()
    comp = td.Independent(
        td.Normal(prior.locs, torch.nn.functional.softplus(prior.raw_scales) + 1e-4), 1
    )
    ref = torch.logsumexp(comp.log_prob(z[:, None, :]) + torch.log_softmax(prior.logits, 0), dim=1)
    torch.testing.assert_close(p.log_prob(z), ref)


def test_vamp_is_mixture_of_encoder_posteriors_at_pseudo_inputs():
    prior, guide = make("vamp", components=5)
    z = torch.randn(4, D)
    loc, scale = guide.encode(prior.pseudo_inputs)
    comp = td.Independent(td.Normal(loc, scale), 1)
    ref = torch.logsumexp(comp.log_prob(z[:, None, :]), 1) - math.log(5)
    torch.testing.assert_close(prior().log_prob(z), ref)
    # the encoder is not registered twice; pseudo-inputs are the prior's only parameters
    assert [n for n, _ in prior.named_parameters()] == ["pseudo_inputs"]


def test_flow_prior_normalizes_in_1d_and_2d():
    """A proper density integrates to one: check by quadrature on a grid."""
    for d in (1, 2):
        spec = PRIORS["flow"].Spec(layers=2, hidden=[16])
        prior = build_prior(spec, d, DATA, None)
        with torch.no_grad():
            for p in prior.parameters():
                p.add_(0.3 * torch.randn_like(p))
        g = torch.linspace(-8, 8, 801)
        h = (g[1] - g[0]).item()
        if d == 1:
            pts = g[:, None]
        else:
            pts = torch.cartesian_prod(g, g)
        with torch.no_grad():
            mass = prior().log_prob(pts).exp().sum().item() * h**d
        assert mass == pytest.approx(1.0, abs=2e-2), (d, mass)


@pytest.mark.parametrize("kind", ["normal", "normal_learned", "mixture", "vamp", "flow"])
def test_sample_shapes_and_plate_broadcast(kind):
    prior, _ = make(kind)
    assert prior().sample((11,)).shape == (11, D)
    with pyro.plate("data", 6):
        z = pyro.sample("z", prior())
    assert z.shape == (6, D)


def test_bad_options_rejected():
    with pytest.raises(ValueError):
        PRIORS["mixture"].Spec(components=0)
    with pytest.raises(ValueError):
        PRIORS["normal"].Spec(scale=2)  # unknown key


def test_diagonal_normal_mixture_matches_mixture_same_family():
    """The matrix-product log_prob equals the generic (N, K, D) broadcast, also for small
    scales (float64 quadratic form: no cancellation) and extra leading dims (particles), and so
    do its gradients."""
    from pyrovae.priors import DiagonalNormalMixture

    g = torch.Generator().manual_seed(0)
    k, d = 7, 5
    logits = torch.randn(k, generator=g).requires_grad_()
    loc = (3 * torch.randn(k, d, generator=g)).requires_grad_()
    scale = (0.01 + torch.rand(k, d, generator=g)).requires_grad_()
    z = loc.detach()[torch.arange(12) % k] + 0.02 * torch.randn(12, d, generator=g)
    z = torch.stack([z, z.flip(0)])  # (particles, N, D)
    fast = DiagonalNormalMixture(logits, loc, scale)
    ref = td.MixtureSameFamily(
        td.Categorical(logits=logits), td.Independent(td.Normal(loc, scale), 1)
    )
    a, b = fast.log_prob(z), ref.log_prob(z)
    assert a.shape == b.shape == (2, 12) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    ga = torch.autograd.grad(a.sum(), (logits, loc, scale))
    gb = torch.autograd.grad(b.sum(), (logits, loc, scale))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-3)
    assert fast.sample((3,)).shape == (3, d)
