"""The training objectives are Pyro's own ELBOs (and IWAE_ELBO, a pyro.infer.ELBO): which class each
`train.objective` gives, IWAE against closed forms on probabilistic PCA (float64), the N/B
minibatch scaling, β as an argument of the model and guide, and the trainer's loss built on them."""

from __future__ import annotations

import warnings

import pyro
import pyro.optim
import pytest
import torch
from conftest import BLOCK_CASES, digits, small_vae
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from pyrovae.evaluate import log_weights
from pyrovae.objectives import IWAE_ELBO, OBJECTIVES, make_elbo, make_loss
from pyrovae.teaching import ppca as P

BINARY = ("bernoulli", "poisson", "negative_binomial")


def vae64(prior="normal", lik="continuous_bernoulli", guide="normal"):
    """A small float64 VAE for 8x8 digits with the given blocks."""
    return small_vae(
        prior={"kind": prior}, likelihood={"kind": lik}, guide={"kind": guide}
    ).double()


def data64(lik="continuous_bernoulli", n=12):
    return digits(n, binary=lik in BINARY).double()


def z_terms(v, x, seed):
    """With the RNG at `seed`: one z ~ q(z|x) per datapoint (the draw the ELBOs make at the same
    seed), and the summed log p(x|z), log p(z), log q(z|x) at it."""
    pyro.set_rng_seed(seed)
    g = poutine.trace(v.guide).get_trace(x)
    m = poutine.trace(poutine.replay(v.model, trace=g)).get_trace(x)
    z = g.nodes["z"]["value"]
    log_px = m.nodes["x"]["fn"].log_prob(x).sum()
    log_pz = m.nodes["z"]["fn"].log_prob(z).sum()
    log_q = g.nodes["z"]["fn"].log_prob(z).sum()
    return log_px, log_pz, log_q


# ---------------------------------------------------------------------------------- classes
@pytest.mark.parametrize(
    "objective,cls",
    [
        ("trace_elbo", Trace_ELBO),
        ("mean_field", TraceMeanField_ELBO),
        ("trace_enum", TraceEnum_ELBO),
        ("iwae", IWAE_ELBO),
    ],
)
@pytest.mark.parametrize("k", [1, 4])
def test_make_elbo_returns_pyro_elbos(objective, cls, k):
    e = make_elbo(objective, k)
    assert type(e) is cls and isinstance(e, pyro.infer.ELBO)
    assert e.num_particles == k
    assert e.max_plate_nesting == 1 + (k > 1)  # Pyro adds the particle dim when vectorizing
    assert e.vectorize_particles == (k > 1 or objective == "iwae")


def test_unknown_objective():
    assert set(OBJECTIVES) == {"trace_elbo", "mean_field", "trace_enum", "iwae"}
    with pytest.raises(ValueError, match="unknown objective 'elbo'.*trace_enum"):
        make_elbo("elbo")


# ---------------------------------------------------------------------------------- β
@pytest.mark.parametrize("prior,lik,guide,beta", BLOCK_CASES)
def test_beta_weights_only_the_latent_terms_of_trace_elbo(prior, lik, guide, beta):
    """`Trace_ELBO().differentiable_loss(model, guide, x, None, beta)` is
    -[log p(x|z) + β (log p(z) - log q(z|x))] at the z the same seed draws: β = 0 leaves the
    observed site's log-likelihood alone, any β leaves it unweighted. Every kind of block."""
    v, x = vae64(prior, lik, guide), data64(lik)
    log_px, log_pz, log_q = z_terms(v, x, seed=3)
    for b in sorted({0.0, beta, 2.0}):
        pyro.set_rng_seed(3)
        loss = Trace_ELBO().differentiable_loss(v.model, v.guide, x, None, b)
        want = -log_px if b == 0 else -(log_px + b * (log_pz - log_q))
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-9)
    assert (log_q - log_pz).abs() > 1e-3  # the latent terms are not 0: β has something to weigh


def test_beta_scales_the_analytic_kl_of_mean_field():
    """TraceMeanField_ELBO with β: -log p(x|z) + β KL(q || p), the KL in closed form."""
    v, x = vae64(), data64()
    log_px, _, _ = z_terms(v, x, seed=5)
    loc, scale = v.posterior.encode(x)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
    ).sum()
    for b in (0.0, 0.3, 1.0, 2.0):
        pyro.set_rng_seed(5)
        loss = TraceMeanField_ELBO().differentiable_loss(v.model, v.guide, x, None, b)
        torch.testing.assert_close(loss, -log_px + b * kl, rtol=1e-10, atol=1e-9)


def test_beta_is_a_scale_on_the_latent_site_of_model_and_guide():
    v, x = small_vae(), digits(8)
    for beta, scale in ((0.25, 0.25), (2.0, 2.0), (1.0, 1.0)):
        g = poutine.trace(v.guide).get_trace(x, None, beta)
        m = poutine.trace(poutine.replay(v.model, trace=g)).get_trace(x, None, beta)
        assert g.nodes["z"]["scale"] == scale and m.nodes["z"]["scale"] == scale
        assert m.nodes["x"]["scale"] == 1.0
    g = poutine.trace(v.guide).get_trace(x, None, 0.0)
    m = poutine.trace(poutine.replay(v.model, trace=g)).get_trace(x, None, 0.0)
    assert g.nodes["z"]["mask"] is False and m.nodes["z"]["mask"] is False
    assert m.nodes["x"]["mask"] is None


# ---------------------------------------------------------------------------------- IWAE
@pytest.mark.parametrize("prior,lik,guide,beta", BLOCK_CASES)
def test_iwae_with_one_particle_is_trace_elbo(prior, lik, guide, beta):
    """K = 1: the same z draw as Trace_ELBO at the same seed, so the same loss (float64
    rounding) for every kind of block and every β, and the log weights of `evaluate`."""
    v, x = vae64(prior, lik, guide), data64(lik)
    pyro.set_rng_seed(7)
    iwae = IWAE_ELBO(1).differentiable_loss(v.model, v.guide, x, None, beta)
    pyro.set_rng_seed(7)
    trace = Trace_ELBO().differentiable_loss(v.model, v.guide, x, None, beta)
    torch.testing.assert_close(iwae, trace, rtol=1e-10, atol=1e-9)
    pyro.set_rng_seed(7)
    lw = log_weights(v.model, v.guide, x, 1, max_plate_nesting=1)
    if beta == 1.0:
        torch.testing.assert_close(iwae.detach(), -lw.sum(), rtol=1e-10, atol=1e-9)


def test_iwae_minibatch_scaling_is_n_over_b():
    """`differentiable_loss(x, n_data=N)` is N/B times the loss on x alone (same RNG state),
    value and gradient: an unbiased estimate of the full-data loss, as Pyro's plate makes it."""
    v, x = vae64(), data64(n=8)
    n = 1000
    out = []
    for n_data in (None, n):
        v.zero_grad(set_to_none=True)
        pyro.set_rng_seed(11)
        loss = IWAE_ELBO(5).differentiable_loss(v.model, v.guide, x, n_data, 0.7)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in v.parameters()]))
    (plain, g_plain), (scaled, g_scaled) = out
    torch.testing.assert_close(scaled, plain * n / 8, rtol=1e-12, atol=0)
    for a, b in zip(g_plain, g_scaled, strict=True):
        torch.testing.assert_close(b, a * n / 8, rtol=1e-10, atol=1e-12)
    # and the Pyro ELBOs agree on the convention (their plate scales the sites by N/B)
    pyro.set_rng_seed(11)
    te_plain = Trace_ELBO().differentiable_loss(v.model, v.guide, x, None)
    pyro.set_rng_seed(11)
    te_scaled = Trace_ELBO().differentiable_loss(v.model, v.guide, x, n)
    torch.testing.assert_close(te_scaled, te_plain * n / 8, rtol=1e-10, atol=0)


def test_iwae_with_the_exact_posterior_is_log_marginal_for_any_k(ppca, x):
    """q = p(z|x): every weight is p(x), so every K gives -Σ log p(x) exactly."""
    guide = P.exact_guide(ppca)
    want = -ppca.log_marginal(x).sum()
    for k in (1, 3, 50):
        loss = IWAE_ELBO(k).differentiable_loss(ppca.model, guide, x)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-9)


def iwae_mean(ppca, guide, x, k, repeats, beta=1.0):
    """The K-sample bound per datapoint, averaged over `repeats` independent estimates."""
    xr = x.repeat(repeats, 1)
    return -IWAE_ELBO(k).loss(ppca.model, guide, xr, None, beta) / len(xr)


def test_iwae_expectation_against_closed_forms(ppca, x):
    """On pPCA with a perturbed posterior q (KL(q || p(z|x)) = 0.56 nats per point):

    * K = 1 averages to the closed-form β-ELBO E_q log p(x|z) + β (E_q log p(z) + H[q]) (4000
      draws per point's mean: standard error about 0.01; tolerance 0.05);
    * the bound rises with K (1, 10, 100, 2000) and K = 2000 is within 0.02 nats of the
      closed-form log p(x) (measured: within 0.002), never above it beyond that.
    """
    guide = P.perturbed_guide(ppca, shift=0.2, scale_factor=1.2)
    mean, cov = P.perturbed_posterior(ppca, x, 0.2, 1.2)
    t = P.elbo_terms(mean, cov, ppca, x)
    log_px = float(ppca.log_marginal(x).mean())
    pyro.set_rng_seed(0)
    for beta in (1.0, 0.5, 2.0):
        closed = float((t.expected_loglik + beta * (t.expected_logprior + t.entropy)).mean())
        assert iwae_mean(ppca, guide, x, 1, 200, beta) == pytest.approx(closed, abs=0.05)
    assert log_px - float(t.elbo.mean()) > 0.5  # the bound at K = 1 is visibly loose
    bounds = [iwae_mean(ppca, guide, x, k, 20) for k in (1, 10, 100, 2000)]
    assert bounds == sorted(bounds), bounds
    assert bounds[-1] == pytest.approx(log_px, abs=0.02)
    assert bounds[1] - bounds[0] > 0.3  # K = 10 already closes most of the 0.56-nat gap


def test_iwae_trains_with_pyro_svi_and_a_pyro_optimizer(ppca, x):
    """IWAE_ELBO as `pyro.infer.SVI` uses it (loss_and_grads, pyro.optim.Adam) updates the
    guide's parameters, as Trace_ELBO does."""
    moved = {}
    for elbo in (Trace_ELBO(), IWAE_ELBO(4)):
        pyro.clear_param_store()
        guide = P.learnable_gaussian_guide(ppca.D, ppca.k)
        svi = SVI(ppca.model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
        svi.step(x)
        before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        for _ in range(5):
            svi.step(x)
        after = dict(pyro.get_param_store().items())
        moved[type(elbo).__name__] = all(not torch.equal(after[k], v) for k, v in before.items())
    assert moved == {"Trace_ELBO": True, "IWAE_ELBO": True}


# ---------------------------------------------------------------------------------- TraceEnum
@pytest.mark.parametrize("k", [1, 3])
def test_trace_enum_equals_trace_elbo_without_discrete_sites(k):
    """No site to enumerate: TraceEnum_ELBO's loss and gradients are Trace_ELBO's at the same
    seed (with minibatch scaling and β), to float64 rounding."""
    v, x = vae64(), data64()
    out = []
    for e in (make_elbo("trace_elbo", k), make_elbo("trace_enum", k)):
        v.zero_grad(set_to_none=True)
        pyro.set_rng_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "found no sample sites configured for enumeration"
            loss = e.differentiable_loss(v.model, v.guide, x, 500, 0.5)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in v.parameters()]))
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-9)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_trainer_loss_is_the_elbo_per_datapoint(objective):
    """`make_loss(vae, objective)(x, N, β)` = `elbo.differentiable_loss(model, guide, x, N, β) / N`
    with the objective's ELBO, at the same seed."""
    v, x = vae64(), data64()
    loss_fn = make_loss(v, objective, 2)
    assert isinstance(loss_fn.elbo, pyro.infer.ELBO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyro.set_rng_seed(4)
        got = loss_fn(x, 300, 0.4)
        pyro.set_rng_seed(4)
        want = make_elbo(objective, 2).differentiable_loss(v.model, v.guide, x, 300, 0.4) / 300
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got.requires_grad
