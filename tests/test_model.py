"""The VAE as a Pyro program: trace shapes under validation, SVI, objectives, β, guides, priors."""

from __future__ import annotations

import contextlib
import copy

import pyro
import pyro.optim
import pytest
import torch
from conftest import BLOCK_CASES
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
    a.register_params = False
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
    v.register_params = objective == "iwae"
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


def test_beta_scales_only_the_kl_term():
    v, x = vae(), data(8)
    g = poutine.trace(v.guide).get_trace(x)
    m = poutine.trace(poutine.replay(v.model, trace=g)).get_trace(x)
    loss1 = -(m.log_prob_sum() - g.log_prob_sum())
    v.kl_scale = 0.25
    g2 = poutine.trace(poutine.replay(v.guide, trace=g)).get_trace(x)
    m2 = poutine.trace(poutine.replay(v.model, trace=g)).get_trace(x)
    assert (
        m2.nodes["z"]["scale"] == 0.25
        and g2.nodes["z"]["scale"] == 0.25
        and m2.nodes["x"]["scale"] == 1.0
    )
    rec = m.nodes["x"]["fn"].log_prob(x).sum()
    kl = (
        g.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"])
        - m.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"])
    ).sum()
    loss2 = -(m2.log_prob_sum() - g2.log_prob_sum())
    torch.testing.assert_close(loss1, -rec + kl)
    torch.testing.assert_close(loss2, -rec + 0.25 * kl)


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


def test_flow_guide_trace_and_sampling():
    v, x = vae(guide={"kind": "flow", "layers": 2}), data(5)
    loss = Trace_ELBO().differentiable_loss(v.model, v.guide, x)
    loss.backward()
    assert all(f.weight.grad is not None for f in v.posterior.flows[0].arn.layers)
    assert v.encode(x).shape == (5, 3)


@pytest.mark.parametrize("lik", ["bernoulli", "poisson", "negative_binomial"])
def test_discrete_likelihoods_under_validation(lik):
    v, x = vae(likelihood={"kind": lik}), data(6, binary=True)
    assert torch.isfinite(Trace_ELBO().differentiable_loss(v.model, v.guide, x))


def test_validation_catches_grey_levels_under_bernoulli_in_model():
    v, x = vae(likelihood={"kind": "bernoulli"}), data(4)
    with pytest.raises(ValueError):
        Trace_ELBO().differentiable_loss(v.model, v.guide, x)


def test_conv_vae_on_images():
    v = vae(
        encoder={"kind": "conv", "channels": [8, 8]}, decoder={"kind": "conv", "channels": [8, 8]}
    )
    x = data(4)
    assert torch.isfinite(Trace_ELBO().differentiable_loss(v.model, v.guide, x))
    assert v.sample(3).shape == (3, 64)
    assert v.reconstruct(x).shape == (4, 64)


@pytest.mark.parametrize("prior,lik,guide,beta", BLOCK_CASES)
@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field"])
def test_lean_elbos_are_bit_identical_to_pyro_s(prior, lik, guide, beta, objective):
    """The trainer's LeanTrace_ELBO / LeanTraceMeanField_ELBO (+ data trusted after the one-time
    check) give exactly Trace_ELBO's / TraceMeanField_ELBO's loss and gradients, for every kind of
    block (analytic KL where registered, Monte Carlo otherwise), with β-scaling and β = 0."""
    from pyro.infer import TraceMeanField_ELBO

    from pyrovae.objectives import LeanTrace_ELBO, LeanTraceMeanField_ELBO

    lean_cls, pyro_cls = {
        "trace_elbo": (LeanTrace_ELBO, Trace_ELBO),
        "mean_field": (LeanTraceMeanField_ELBO, TraceMeanField_ELBO),
    }[objective]
    x = data(8, binary=lik in ("bernoulli", "poisson", "negative_binomial"))
    results = []
    for lean in (False, True):
        pyro.set_rng_seed(0)
        v = vae(prior={"kind": prior}, likelihood={"kind": lik}, guide={"kind": guide})
        v.register_params, v.kl_scale = False, beta
        elbo = (lean_cls if lean else pyro_cls)(max_plate_nesting=1)
        pyro.set_rng_seed(1)
        out = []
        for _ in range(2):  # the second call skips the already-done structural checks
            v.zero_grad(set_to_none=True)
            with v.trusted_data() if lean else contextlib.nullcontext():
                loss = elbo.differentiable_loss(v.model, v.guide, x, 100)
            loss.backward()
            out.append(
                (loss.item(), [p.grad.clone() for p in v.parameters() if p.grad is not None])
            )
        results.append(out)
    for (l0, g0), (l1, g1) in zip(*results, strict=True):
        assert l0 == l1
        assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_lean_trace_elbo_still_validates_structure():
    from pyrovae.objectives import LeanTrace_ELBO

    def model(x):
        with pyro.plate("data", 3):
            pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))

    def guide(x):  # wrong shape: a (2,)-batch site inside a plate of size 3
        pyro.sample("z", pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ValueError):
        LeanTrace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, None)
