"""The VAE as a Pyro program: trace shapes under validation, SVI, objectives, β, guides, priors."""

from __future__ import annotations

import copy

import pyro
import pyro.optim
import pytest
import torch
from conftest import small_vae as vae
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyrovae.objectives import kl_scale, make_elbo

SHAPE = (1, 8, 8)


def data(n=20, binary=False):
    """Real 8x8 digits scaled to [0, 1] (rounded to {0, 1} for binary likelihoods)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:n], dtype=torch.float32) / 16
    return x.round() if binary else x


def test_model_and_guide_trace_shapes_under_validation():
    v, x = vae(), data()
    g = poutine.trace(v.guide).get_trace(x)
    m = poutine.trace(poutine.replay(v.model, trace=g)).get_trace(x)
    m.compute_log_prob()
    assert m.nodes["z"]["value"].shape == (20, 3)
    assert m.nodes["z"]["log_prob"].shape == (20,)
    assert m.nodes["x"]["log_prob"].shape == (20,) and m.nodes["x"]["is_observed"]
    assert [f.name for f in m.nodes["x"]["cond_indep_stack"]] == ["data"]


def test_plate_scales_minibatch_to_dataset_size():
    v, x = vae(), data(10)
    g = poutine.trace(v.guide).get_trace(x, 1000)
    m = poutine.trace(poutine.replay(v.model, trace=g)).get_trace(x, 1000)
    assert m.nodes["x"]["scale"] == pytest.approx(100.0)


def test_render_model_draws_plate_and_sites():
    pytest.importorskip("graphviz")
    v = vae()
    graph = pyro.render_model(v.model, model_args=(data(4),), render_distributions=True)
    src = graph.source
    assert "cluster_data" in src and "z" in src and "x" in src


def test_own_step_equals_pyro_svi_step():
    """Trainer's step (differentiable_loss + one torch Adam) == pyro.infer.SVI with pyro.optim.Adam."""
    x = data(16)
    a = vae()
    b = copy.deepcopy(a)
    b.pyro_name = "copy_of_vae"
    # pyrovae's step
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    losses_a = []
    torch.manual_seed(3)
    for _ in range(3):
        opt.zero_grad()
        loss = Trace_ELBO().differentiable_loss(a.model, a.guide, x)
        loss.backward()
        opt.step()
        losses_a.append(loss.item())
    # Pyro's SVI
    svi = SVI(b.model, b.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    torch.manual_seed(3)
    losses_b = [svi.step(x) for _ in range(3)]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field", "iwae"])
def test_objectives_improve_elbo(objective):
    from pyrovae.evaluate import elbo

    v, x = vae(), data(64)
    e = make_elbo(objective, 3 if objective == "iwae" else 1)
    opt = torch.optim.Adam(v.parameters(), lr=1e-2)
    before = elbo(v.model, v.guide, x, num_particles=20).mean()
    for _ in range(100):
        opt.zero_grad()
        if objective == "iwae":
            e.loss_and_grads(v.model, v.guide, x)
        else:
            e.differentiable_loss(v.model, v.guide, x).backward()
        opt.step()
    after = elbo(v.model, v.guide, x, num_particles=20).mean()
    assert after > before + 5


def test_mean_field_uses_analytic_kl_and_agrees_with_trace_elbo():
    v, x = vae(), data(32)
    torch.manual_seed(0)
    mc = torch.stack(
        [Trace_ELBO().differentiable_loss(v.model, v.guide, x) for _ in range(300)]
    ).mean()
    mf = torch.stack(
        [make_elbo("mean_field").differentiable_loss(v.model, v.guide, x) for _ in range(300)]
    ).mean()
    assert mf.item() == pytest.approx(mc.item(), rel=0.01)


def test_kl_warmup_is_linear_then_beta():
    assert kl_scale(2.0, 0, 0.0) == 2.0
    assert kl_scale(1.0, 4, 1.0) == pytest.approx(0.25)
    assert kl_scale(1.0, 4, 9.0) == 1.0


@pytest.mark.parametrize(
    "prior",
    [
        {"kind": "normal_learned"},
        {"kind": "mixture", "components": 3},
        {"kind": "vamp", "components": 4},
        {"kind": "flow"},
    ],
)
def test_every_prior_trains_and_gets_gradients(prior):
    v, x = vae(prior=prior), data(16)
    loss = Trace_ELBO().differentiable_loss(v.model, v.guide, x)
    loss.backward()
    grads = [p.grad for p in v.prior.parameters()]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert all(gr.abs().sum() > 0 for gr in grads)  # every prior parameter is in the loss


def test_flow_guide_trace_and_sampling():
    v, x = vae(guide={"kind": "flow", "layers": 2}), data(5)
    loss = Trace_ELBO().differentiable_loss(v.model, v.guide, x)
    loss.backward()
    assert all(f.weight.grad is not None for f in v.posterior.flows[0].arn.layers)
    assert v.encode(x).shape == (5, 3)


def elbo_by_hand(v, x, seed):
    """-[log p(x|z) + log p(z) - log q(z|x)] at the z drawn at `seed`, and log p(x|z) summed."""
    pyro.set_rng_seed(seed)
    g = poutine.trace(v.guide).get_trace(x)
    z = g.nodes["z"]["value"]
    log_px = v.likelihood_dist(z).log_prob(x).sum()
    return -(log_px + v.prior().log_prob(z).sum() - g.nodes["z"]["fn"].log_prob(z).sum()), log_px


@pytest.mark.parametrize("lik", ["bernoulli", "poisson", "negative_binomial"])
def test_discrete_likelihoods_under_validation(lik):
    """Under validation, the loss on {0, 1} data is the hand-computed one, and the discrete
    log-likelihood is a log-probability (<= 0)."""
    v, x = vae(likelihood={"kind": lik}), data(6, binary=True)
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().differentiable_loss(v.model, v.guide, x)
    want, log_px = elbo_by_hand(v, x, 1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    assert log_px < 0


def test_validation_catches_grey_levels_under_bernoulli_in_model():
    v, x = vae(likelihood={"kind": "bernoulli"}), data(4)
    with pytest.raises(ValueError):
        Trace_ELBO().differentiable_loss(v.model, v.guide, x)


def test_conv_vae_on_images():
    v = vae(
        encoder={"kind": "conv", "channels": [8, 8]}, decoder={"kind": "conv", "channels": [8, 8]}
    )
    x = data(4)
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().differentiable_loss(v.model, v.guide, x)
    torch.testing.assert_close(loss, elbo_by_hand(v, x, 1)[0], rtol=1e-5, atol=1e-4)
    loss.backward()
    convs = [m for m in v.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 4 and all(m.weight.grad.abs().sum() > 0 for m in convs)
    assert v.sample(3).shape == (3, 64)
    assert v.reconstruct(x).shape == (4, 64)
