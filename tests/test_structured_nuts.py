"""NUTS on structured programs (`pyrovae.diagnostics.nuts_posterior`), checked against closed
forms: a discrete parent summed out by enumeration, two continuous layers sampled jointly with a
per-datapoint keyword argument, and the guide's marginal draws with the discrete site sampled."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import diagnostics as D

# -------------------------------------------- a two-component mixture prior, Gaussian likelihood
W = torch.tensor([0.3, 0.7])
M = torch.tensor([[-1.5, 0.0], [1.5, 1.0]])
S, SIGMA = 0.8, 0.6  # prior component sd, likelihood sd
X_MIX = torch.tensor([[0.0, 0.5], [1.0, 1.0], [-0.8, 0.0]])


def mixture_model(x):
    """p(c) p(z | c) p(x | z): c ~ Cat(W), z ~ N(M_c, S^2 I), x ~ N(z, SIGMA^2 I)."""
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(probs=W), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(M[c], S).to_event(1))
        pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x)


def exact_mixture_posterior(x):
    """p(z | x) = sum_c p(c | x) N(z; m_c(x), s^2 I): weights, means (N, 2, d), sd."""
    s2 = 1.0 / (1.0 / S**2 + 1.0 / SIGMA**2)
    means = s2 * (M / S**2 + x.unsqueeze(1) / SIGMA**2)
    marg = dist.Normal(M, math.sqrt(S**2 + SIGMA**2)).to_event(1)
    logw = W.log() + marg.log_prob(x.unsqueeze(1))
    return logw.softmax(-1), means, math.sqrt(s2)


def mixture_moments(x):
    """Mean and sd per point and dimension of the exact p(z | x), `(N, d)` each."""
    w, m, s = exact_mixture_posterior(x)
    mean = (w.unsqueeze(-1) * m).sum(1)
    second = (w.unsqueeze(-1) * (m**2 + s**2)).sum(1)
    return mean, (second - mean**2).sqrt()


def exact_mixture_guide(x):
    """q(c | x) q(z | x, c) equal to the exact posterior; c is sampled by `guide_site_draws`."""
    w, m, s = exact_mixture_posterior(x)
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(probs=w), infer={"enumerate": "parallel"})
        idx = c.unsqueeze(-1).unsqueeze(-1).expand(*c.shape, 1, m.shape[-1])
        loc = torch.gather(m.expand(*c.shape, *m.shape[-2:]), -2, idx).squeeze(-2)
        pyro.sample("z", dist.Normal(loc, s).to_event(1))


def test_nuts_sums_the_discrete_parent_out():
    """NUTS moments of p(z|x) = sum_c p(z, c|x) against the closed form, for three points at
    once (4 vectorized chains): a z drawn under one fixed c is off by 0.5 to 2.2 sds at some
    point (each component's posterior mean against the mixture's), chains mixed up between
    points by more than 0.5 sd."""
    nuts = D.nuts_posterior(
        mixture_model, X_MIX, num_samples=300, warmup_steps=200, num_chains=4, seed=0
    )
    assert nuts.z.shape == (4, 300, 3, 2) and set(nuts.sites) == {"z"}
    mean, sd = mixture_moments(X_MIX)
    draws = nuts.z.reshape(-1, 3, 2)
    # 1,200 draws, ESS about 400 or more: s.e. of a mean about 0.05 sd; 0.2 sd is 4 s.e.
    assert ((draws.mean(0) - mean) / sd).abs().max() < 0.2
    assert (draws.std(0) / sd - 1).abs().max() < 0.15
    # the three points' posteriors differ by more than the tolerance (the test can tell them apart)
    assert (mean[0] - mean[1]).abs().max() > 0.5 * sd.max()


def test_guide_marginal_draws_sample_the_discrete_site():
    """`guide_site_draws` draws q(z|x) = sum_c q(c|x) q(z|x,c) (c sampled): with the exact
    posterior as guide, the comparison with NUTS finds no difference (sd ratio 1, means within
    0.2 sd)."""
    q = D.guide_site_draws(exact_mixture_guide, X_MIX, 4000)
    assert set(q) == {"z"} and q["z"].shape == (4000, 3, 2)
    mean, sd = mixture_moments(X_MIX)
    assert ((q["z"].mean(0) - mean) / sd).abs().max() < 0.1
    assert (q["z"].std(0) / sd - 1).abs().max() < 0.06
    nuts = D.nuts_posterior(
        mixture_model, X_MIX, num_samples=300, warmup_steps=200, num_chains=4, seed=1
    )
    idata = D.sites_inference_data(nuts.sites, q, X_MIX, point_ids=[10, 11, 12])
    c = D.compare_posteriors(idata, "z")
    assert c["points"] == [10, 11, 12] and c["max_rhat"] < 1.05
    assert abs(c["mean_sd_ratio"] - 1) < 0.1 and c["mean_abs_std_mean_diff"] < 0.15


# --------------------------- two continuous layers, a per-datapoint keyword argument (shift)
A, S1, SIGMA2 = 1.5, 0.5, 0.4


def chain_model(x, shift):
    """z2 ~ N(0, 1), z1 ~ N(A z2, S1^2), x ~ N(z1 + shift, SIGMA2^2), one dim each."""
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
        z1 = pyro.sample("z1", dist.Normal(A * z2, S1).to_event(1))
        pyro.sample("x", dist.Normal(z1 + shift.unsqueeze(-1), SIGMA2).to_event(1), obs=x)


def exact_chain_posterior(x, shift):
    """Gaussian conditioning: means `(N, 2)` and sds `(2,)` of (z2, z1) given x."""
    cov_zx = torch.tensor([A, A**2 + S1**2])
    var_x = A**2 + S1**2 + SIGMA2**2
    mean = (x.squeeze(-1) - shift).unsqueeze(-1) * cov_zx / var_x
    var = torch.tensor([1.0, A**2 + S1**2]) - cov_zx**2 / var_x
    return mean, var.sqrt()


def test_nuts_samples_every_continuous_site_with_per_point_kwargs():
    """Both layers sampled jointly; `shift` (one per point) is repeated with x for the vectorized
    chains, so each chain's copy of point n sees shift n (a misaligned shift moves the posterior
    mean of z1 by several sds)."""
    x = torch.tensor([[3.5], [-2.0], [0.3]])
    shift = torch.tensor([3.0, -3.0, 0.0])
    nuts = D.nuts_posterior(
        chain_model, x, num_samples=300, warmup_steps=200, num_chains=3, site=None, seed=0,
        model_kwargs={"shift": shift},
    )
    assert set(nuts.sites) == {"z1", "z2"}
    mean, sd = exact_chain_posterior(x, shift)
    for j, name in enumerate(("z2", "z1")):
        draws = nuts.sites[name].reshape(-1, 3)
        assert ((draws.mean(0) - mean[:, j]) / sd[j]).abs().max() < 0.25, name
        assert (draws.std(0) / sd[j] - 1).abs().max() < 0.15, name


def test_a_mixture_prior_on_the_top_layer_gets_transforms_for_every_site():
    """An hvae whose top prior is a mixture (support without `biject_to`): NUTS gets a transform
    for both layers, not only the special one, and runs."""
    from pyrovae import build_model, load_config

    cfg = load_config(
        {
            "model": {
                "kind": "hvae",
                "latent_dims": [3, 2],
                "layer_hidden": [8],
                "encoder": {"kind": "mlp", "hidden": [16]},
                "decoder": {"kind": "mlp", "hidden": [16]},
                "prior": {"kind": "mixture"},
            }
        }
    )
    h = build_model(cfg, (1, 8, 8))
    x = torch.bernoulli(torch.full((2, 64), 0.4))
    with D.frozen_parameters(h):
        nuts = D.nuts_posterior(h.model, x, num_samples=10, warmup_steps=10, num_chains=2, site=None)
    assert nuts.sites["z1"].shape == (2, 10, 2, 3) and nuts.sites["z2"].shape == (2, 10, 2, 2)
    assert all(torch.isfinite(v).all() for v in nuts.sites.values())


def test_unknown_site_is_a_clear_error():
    with pytest.raises(D.DiagnosticsError, match="site 'w': not a continuous latent site"):
        D.nuts_posterior(mixture_model, X_MIX[:1], num_samples=5, warmup_steps=5, num_chains=1,
                         site="w")
