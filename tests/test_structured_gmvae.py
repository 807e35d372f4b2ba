"""The mixture VAE (`kind = "gmvae"`): the enumerated cluster is summed exactly, a
cluster-conditioned sample comes from its component, cluster accuracy, config errors, and the
program trained end to end through the public API and the CLI."""

from __future__ import annotations

import json
import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import tiny_config
from pyro import poutine

import pyrovae
from pyrovae.build import build_model
from pyrovae.config import load_config
from pyrovae.errors import ConfigError
from pyrovae.structured.gmvae import GMVAE, cluster_accuracy
from pyrovae.train import Callback

MLP32 = {"kind": "mlp", "hidden": [32]}


def gmvae(data_shape=(1, 8, 8), **model) -> GMVAE:
    cfg = load_config(
        {
            "model": {
                "kind": "gmvae",
                "clusters": 4,
                "latent_dim": 3,
                "encoder": MLP32,
                "decoder": MLP32,
                **model,
            },
            "train": {"objective": "trace_enum"},
        }
    )
    net = build_model(cfg, data_shape)
    assert isinstance(net, GMVAE)
    return net


def test_trace_enum_loss_is_the_explicit_sum_over_clusters():
    """TraceEnum_ELBO's loss = -sum_b sum_c q(c|x_b) [log p(x_b|z_bc) + log p(z_bc|c) + log p(c)
    - log q(z_bc|x_b,c) - log q(c|x_b)], with the very z_bc (one per cluster) the guide drew."""
    gm = gmvae(likelihood={"kind": "bernoulli"}).double()
    x = torch.bernoulli(torch.full((5, 64), 0.3, dtype=torch.float64))
    traced = poutine.trace(gm.guide)
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(gm.model, traced, x)
    z = traced.trace.nodes["z"]["value"]  # (K, B, D): one draw per enumerated cluster
    k = gm.clusters
    assert z.shape == (k, 5, gm.latent_dim)

    with torch.no_grad():
        logits, loc, scale = gm.q_params(x)  # (B, K), (B, K, D)
        log_qc = torch.log_softmax(logits, -1)
        total = torch.zeros((), dtype=torch.float64)
        for c in range(k):
            zc = z[c]
            per_point = (
                gm.likelihood_dist(zc).log_prob(x)
                + gm.component(torch.full((5,), c)).log_prob(zc)
                + math.log(1 / k)
                - dist.Normal(loc[:, c], scale[:, c]).to_event(1).log_prob(zc)
                - log_qc[:, c]
            )
            total = total + (log_qc[:, c].exp() * per_point).sum()
    assert loss.item() == pytest.approx(-total.item(), rel=1e-12, abs=1e-9)


def test_mean_field_guide_loss_is_the_explicit_sum_over_clusters():
    """cluster_guide = "mean_field", q(c|x) q(z|x): one z per point, and the loss is
    -sum_b [log p(x_b|z_b) - log q(z_b|x_b) + sum_c q(c|x_b)(log p(z_b|c) + log p(c) - log q(c|x_b))]."""
    gm = gmvae(likelihood={"kind": "bernoulli"}, cluster_guide="mean_field").double()
    x = torch.bernoulli(torch.full((5, 64), 0.3, dtype=torch.float64))
    traced = poutine.trace(gm.guide)
    loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(gm.model, traced, x)
    z = traced.trace.nodes["z"]["value"]
    assert z.shape == (5, gm.latent_dim)  # one code per point, not one per cluster
    with torch.no_grad():
        logits, loc, scale = gm.q_params(x)
        log_qc = torch.log_softmax(logits, -1)
        per_point = gm.likelihood_dist(z).log_prob(x) - dist.Normal(loc, scale).to_event(
            1
        ).log_prob(z)
        for c in range(gm.clusters):
            log_pz = gm.component(torch.full((5,), c)).log_prob(z)
            per_point = per_point + log_qc[:, c].exp() * (
                log_pz + math.log(1 / gm.clusters) - log_qc[:, c]
            )
    assert loss.item() == pytest.approx(-per_point.sum().item(), rel=1e-12, abs=1e-9)


def test_posterior_guide_loss_and_gradient_are_the_mixture_prior_elbo():
    """cluster_guide = "posterior", q(z|x) q(c|z) with q(c|z) = p(c|z): the enumerated terms
    collapse to log p(z), so the loss is -sum_b [log p(x_b|z_b) + log sum_c p(c) p(z_b|c)
    - log q(z_b|x_b)], in value and in gradient (all parameters, through q(c|z)'s dependence
    on z and on p(z|c)), to float64 precision."""
    gm = gmvae(likelihood={"kind": "bernoulli"}, cluster_guide="posterior").double()
    with torch.no_grad():  # components apart, so that q(c|z) is far from uniform
        gm.component_loc.mul_(3.0)
    x = torch.bernoulli(torch.full((5, 64), 0.3, dtype=torch.float64))
    traced = poutine.trace(gm.guide)
    loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(gm.model, traced, x)
    params = [p for p in gm.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    z = traced.trace.nodes["z"]["value"]
    assert z.shape == (5, gm.latent_dim)
    assert traced.trace.nodes["c"]["value"].reshape(-1).tolist() == list(range(gm.clusters))

    loc, scale = gm.q_z(x)
    eps = ((z - loc) / scale).detach()
    z = loc + scale * eps  # the same draw, rebuilt as a function of the parameters
    comps = gm.component(torch.arange(gm.clusters))
    log_pz = torch.logsumexp(comps.log_prob(z.unsqueeze(-2)) + math.log(1 / gm.clusters), -1)
    per_point = gm.likelihood_dist(z).log_prob(x) + log_pz - dist.Normal(loc, scale).to_event(1).log_prob(z)
    closed = -per_point.sum()
    want = torch.autograd.grad(closed, params)
    assert loss.item() == pytest.approx(closed.item(), rel=1e-12, abs=1e-9)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-10)
    # a point's cluster is argmax p(c | z = mu(x))
    with torch.no_grad():
        want_c = (comps.log_prob(loc.unsqueeze(-2))).argmax(-1)
    assert torch.equal(gm.assign(x), want_c)


def test_enumerated_loss_differs_from_one_cluster():
    """Sanity of the above: the sum is not a single cluster's term (the enumeration is real)."""
    gm = gmvae()
    x = torch.rand(8, 64)
    pyro.set_rng_seed(1)
    traced = poutine.trace(gm.guide)
    pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(gm.model, traced, x)
    assert traced.trace.nodes["c"]["value"].reshape(-1).tolist() == list(range(gm.clusters))


def test_loss_with_subsampling_and_beta():
    """N/B scaling through the data plate, and beta on the latent sites only."""
    gm = gmvae()
    x = torch.rand(8, 64)
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(3)
    full = elbo.differentiable_loss(gm.model, gm.guide, x)
    pyro.set_rng_seed(3)
    scaled = elbo.differentiable_loss(gm.model, gm.guide, x, None, 80)
    assert scaled.item() == pytest.approx(10 * full.item(), rel=1e-5)
    pyro.set_rng_seed(3)
    zero = elbo.differentiable_loss(gm.model, gm.guide, x, None, None, 0.0)
    pyro.set_rng_seed(3)
    traced = poutine.trace(gm.guide)
    elbo.differentiable_loss(gm.model, traced, x)
    z = traced.trace.nodes["z"]["value"]
    with torch.no_grad():
        qc = torch.softmax(gm.q_params(x)[0], -1).T  # (K, B)
        recon = (qc * gm.likelihood_dist(z).log_prob(x)).sum()
    assert zero.item() == pytest.approx(-recon.item(), rel=1e-5)


def test_training_loss_is_the_programs_elbo_per_datapoint():
    """`make_loss` (what the trainer calls) on a structured model without labels passes the
    dataset size and beta by name: the loss is the program's TraceEnum loss / N, for any N/B."""
    from pyrovae.objectives import make_loss

    gm = gmvae()
    x = torch.rand(8, 64)
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    for n_data, beta in ((80, 1.0), (8, 0.5)):
        pyro.set_rng_seed(5)
        ref = elbo.differentiable_loss(gm.model, gm.guide, x, n_data=n_data, beta=beta) / n_data
        pyro.set_rng_seed(5)
        got = make_loss(gm, "trace_enum")(x, n_data, beta, None)
        assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_cluster_conditioned_sample_comes_from_that_component():
    """Linear decoder, Normal likelihood: E[x|z] = W z + b, so the mean of many conditioned
    samples is W mu_k + b, and mapping it back through W recovers component k's mean."""
    gm = gmvae(
        data_shape=(6,),
        clusters=3,
        latent_dim=2,
        decoder={"kind": "linear"},
        likelihood={"kind": "normal", "scale": 0.1},
    )
    means = torch.tensor([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    with torch.no_grad():
        gm.component_loc.copy_(means)
    w, b = gm.decoder.weight.detach(), gm.decoder.bias.detach()
    for k in range(3):
        x = gm.sample(4000, cluster=k)
        z_hat = torch.linalg.lstsq(w, (x.mean(0) - b).unsqueeze(-1)).solution.squeeze(-1)
        # unit component scales: the mean of 4000 draws is within 4 / sqrt(4000) = 0.06
        assert torch.allclose(z_hat, means[k], atol=0.1), (k, z_hat)
        pyro.set_rng_seed(7)
        again = gm.sample(5, cluster=k)
        pyro.set_rng_seed(7)
        z = gm.component(torch.full((5,), k)).sample()
        assert torch.allclose(again, gm.decode(z))
    with pytest.raises(ConfigError, match=r"cluster: expected an integer in \[0, 2\].*got 3"):
        gm.sample(2, cluster=3)


@pytest.mark.parametrize("cluster_guide", ["conditional", "mean_field", "posterior"])
def test_iwae_with_the_cluster_summed_reaches_the_closed_form_log_likelihood(cluster_guide):
    """Linear decoder and Gaussian likelihood: p(x) = sum_c p(c) N(x; W mu_c + b,
    W diag(s_c^2) W^T + sigma^2 I) exactly. With the guide fitted for 600 steps (model
    fixed; every q(z|x,c) must cover its cluster's posterior, also where q(c|x) is small),
    `evaluate.log_likelihood` (c summed inside each weight) with K = 2000 is within 0.02 nats
    of it on average over 200 points and 0.2 at every point; the ELBO is below it."""
    from pyrovae import evaluate
    from pyrovae.objectives import make_loss

    pyro.set_rng_seed(0)
    gm = gmvae(
        data_shape=(6,),
        clusters=3,
        latent_dim=2,
        decoder={"kind": "linear"},
        likelihood={"kind": "normal", "scale": 0.5},
        cluster_guide=cluster_guide,
    ).double()
    with torch.no_grad():
        gm.component_loc.copy_(torch.tensor([[-2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]))
        x = gm.sample(200, mean=False)
    w, b = gm.decoder.weight.detach(), gm.decoder.bias.detach()
    comps = gm.component(torch.arange(3))
    loc = comps.mean @ w.T + b  # (3, 6)
    cov = w @ torch.diag_embed(comps.variance) @ w.T + 0.25 * torch.eye(6).double()
    log_pxc = torch.distributions.MultivariateNormal(loc, cov).log_prob(x.unsqueeze(1))
    exact = torch.logsumexp(log_pxc + math.log(1 / 3), -1).detach()

    params = [p for n, p in gm.named_parameters() if n.startswith("encoder")]
    opt = torch.optim.Adam(params, lr=3e-2)
    loss = make_loss(gm, "trace_enum")
    for _ in range(600):
        opt.zero_grad()
        loss(x, 200, 1.0, None).backward()
        opt.step()
    ll = evaluate.log_likelihood(gm.model, gm.guide, x, 2000)
    with torch.no_grad():
        elbo = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(gm.model, gm.guide, x) / 200
    assert abs((ll - exact).mean().item()) < 0.02
    assert (ll - exact).abs().max().item() < 0.2
    assert elbo < exact.mean().item() - 0.05


def test_cluster_accuracy_protocols():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    # a permutation of the labels with one mistake: one-to-one matching finds 7/8
    pred = torch.tensor([2, 2, 0, 0, 1, 1, 1, 1])
    assert cluster_accuracy(pred, labels, 3) == pytest.approx(7 / 8)
    # many-to-one (more clusters than classes): each cluster takes its majority class
    pred = torch.tensor([0, 3, 1, 1, 2, 2, 4, 4])
    assert cluster_accuracy(pred, labels, 5) == pytest.approx(7 / 8)
    # one-to-one cannot give two clusters the same class
    pred = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert cluster_accuracy(pred, labels, 3) == pytest.approx(5 / 8)


@pytest.mark.parametrize(
    ("model", "train", "match"),
    [
        (
            {"kind": "gmvae", "clusters": 1},
            {"objective": "trace_enum"},
            r"model.clusters: Input should be greater than or equal to 2; got 1",
        ),
        (
            {"kind": "vae", "clusters": 3},
            {},
            r"model.clusters applies to model.kind = 'gmvae'; got model.kind = 'vae'",
        ),
        (
            {"kind": "gmvae"},
            {"objective": "trace_elbo"},
            r"train.objective: kind = 'gmvae' needs 'trace_enum'.*got 'trace_elbo'",
        ),
        (
            {"kind": "gmvae", "prior": {"kind": "mixture"}},
            {"objective": "trace_enum"},
            r"model.prior does not apply to kind = 'gmvae'",
        ),
        (
            {"kind": "gmvae", "guide": {"kind": "flow"}},
            {"objective": "trace_enum"},
            r"model.guide does not apply to kind = 'gmvae'",
        ),
        (
            {"kind": "vae", "cluster_guide": "mean_field"},
            {},
            r"model.cluster_guide applies to model.kind = 'gmvae'",
        ),
        (
            {"kind": "gmvae", "cluster_guide": "q(z|x)"},
            {"objective": "trace_enum"},
            r"model.cluster_guide: Input should be 'conditional', 'mean_field' or 'posterior'",
        ),
        (
            {"kind": "gmvae", "init_from": "runs/m1"},
            {"objective": "trace_enum"},
            r"model.init_from applies to model.cluster_guide = \"posterior\".*got model.cluster_guide = None",
        ),
        (
            {"kind": "vae", "init_from": "runs/m1"},
            {},
            r"model.init_from applies to model.kind = 'gmvae'",
        ),
        (
            {"kind": "gmvae", "latent_dims": [4, 2]},
            {"objective": "trace_enum"},
            r"model.latent_dims applies to model.kind = 'hvae'",
        ),
    ],
)
def test_bad_config_is_one_line(model, train, match):
    with pytest.raises(ConfigError, match=match):
        load_config({"model": model, "train": train})


def gm_tiny(**train) -> dict:
    return tiny_config(
        model={"kind": "gmvae", "clusters": 10, "latent_dim": 4},
        train={"objective": "trace_enum", "epochs": 2, **train},
    )


def test_fit_evaluate_and_metrics_through_the_api(tmp_path):
    run = pyrovae.fit(gm_tiny(), tmp_path / "gm", progress=False)
    assert run.model.kind == "gmvae" and len(run.history) == 2
    loaded = pyrovae.load_run(tmp_path / "gm", data=True)
    m = loaded.model.metrics(loaded.data.x_test, loaded.data.y_test)
    assert 0.0 < m["cluster_accuracy"] <= 1.0 and 1 <= m["clusters_used"] <= 10
    assert loaded.model.sample(3, cluster=2).shape == (3, 64)


def test_cli_fit_evaluate_sample(tmp_path, server):
    cfg = tmp_path / "gm.toml"
    import tomli_w

    cfg.write_text(tomli_w.dumps(gm_tiny()))
    run = tmp_path / "run"

    cli = server.run

    p = cli("fit", str(cfg), "--out", str(run), "-q")
    assert p.rc == 0, p.stderr
    p = cli("evaluate", str(run), "--json", "--iwae-samples", "10", "-q")
    assert p.rc == 0, p.stderr
    out = json.loads(p.stdout)
    assert (
        math.isfinite(out["log_likelihood"])
        and "c summed out exactly" in out["log_likelihood_note"]
    )
    assert 0.0 < out["cluster_accuracy"] <= 1.0 and 1 <= out["clusters_used"] <= 10
    p = cli("diagnose", str(run), "--iwae-samples", "8", "--khat-samples", "25", "--max-points",
            "20", "--iwae-points", "20", "--points", "2", "--nuts-samples", "30",
            "--nuts-warmup", "30", "-q")
    assert p.rc == 0, p.stderr  # the text output: NUTS with c summed out, site by site
    assert "conditioned on x; c summed out" in p.stdout and "z: q is " in p.stdout
    p = cli("sample", str(run), "--out", str(tmp_path / "s.png"), "-q")
    assert p.rc == 0, p.stderr
    p = cli("sample", str(run), "--cluster", "3", "-n", "8", "--out", str(tmp_path / "c.npy"))
    assert p.rc == 0, p.stderr
    import numpy as np

    assert np.load(tmp_path / "c.npy").shape[0] == 8
    p = cli("sample", str(run), "--cluster", "10", "--out", str(tmp_path / "c.npy"))
    assert p.rc == 2 and "cluster: expected an integer in [0, 9]" in p.stderr
    p = cli("fit", str(cfg), "--out", str(tmp_path / "bad"), "--set", "model.clusters=1")
    assert p.rc == 2 and "model.clusters" in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------- model.init_from (VaDE's start)
@pytest.fixture(scope="module")
def m1_run(tmp_path_factory):
    """A tiny trained VAE (digits, latent 4) to start mixture VAEs from."""
    out = tmp_path_factory.mktemp("runs") / "m1"
    cfg = tiny_config(model={"latent_dim": 4}, train={"epochs": 60, "lr": 1e-2})
    return pyrovae.fit(cfg, out, progress=False, figures=False)


def vade_tiny(run_dir, **model) -> dict:
    return tiny_config(
        model={
            "kind": "gmvae",
            "clusters": 10,
            "latent_dim": 4,
            "cluster_guide": "posterior",
            "init_from": str(run_dir),
            **model,
        },
        train={"objective": "trace_enum", "epochs": 2},
    )


def test_init_from_copies_the_vae_and_fits_the_mixture_to_its_codes(m1_run):
    """`before_training(data)` (what `fit` calls in a new run): q(z|x) and E[x|z] become the
    VAE's; on the informative dimensions (Var_x mu > E_x sigma^2) p(z|c) is scikit-learn's
    diagonal mixture of the posterior means, variances widened by E_x sigma^2; elsewhere every
    component is the codes' marginal moment match."""
    from sklearn.mixture import GaussianMixture

    cfg = load_config(vade_tiny(m1_run.dir))
    data = pyrovae.load_data(cfg.data, seed=0)
    gm = build_model(cfg, data.shape)
    vae = m1_run.model.cpu().eval()
    x = data.x_test
    with torch.no_grad():
        assert not torch.allclose(gm.q_z(x)[0], vae.posterior.encode(x)[0])
        gm.before_training(data)
        q_loc, q_scale = gm.q_z(x)
        v_loc, v_scale = vae.posterior.encode(x)
        assert torch.allclose(q_loc, v_loc) and torch.allclose(q_scale, v_scale)
        z = torch.randn(7, 4)
        assert torch.allclose(gm.decode(z), vae.decode(z))

        loc, scale = (t.double() for t in vae.posterior.encode(data.x_train))
        noise, spread = scale.pow(2).mean(0), loc.var(0)
        informative = spread > noise
        assert 0 < int(informative.sum()) == gm.init_informative
        ref = GaussianMixture(10, covariance_type="diag", random_state=0, max_iter=500)
        ref.fit(loc[:, informative].numpy())
        comps = gm.component(torch.arange(10))
        got_loc, got_var = comps.mean.double(), comps.variance.double()
        want = torch.as_tensor(ref.means_)
        assert torch.allclose(got_loc[:, informative], want, atol=1e-5)
        want_var = torch.as_tensor(ref.covariances_) + noise[informative]
        assert torch.allclose(got_var[:, informative], want_var, rtol=1e-4, atol=1e-6)
        rest = ~informative
        assert torch.allclose(got_loc[:, rest], loc.mean(0)[rest].expand(10, -1), atol=1e-5)
        assert torch.allclose(got_var[:, rest], (spread + noise)[rest].expand(10, -1), rtol=1e-4)


def test_init_from_through_the_cli(tmp_path, server, m1_run):
    """fit with init_from and evaluate through the CLI; a run that does not fit the model is
    refused in one line naming the field, with no folder left behind."""
    import tomli_w

    cfg = tmp_path / "vade.toml"
    cfg.write_text(tomli_w.dumps(vade_tiny(m1_run.dir)))
    p = server.run("fit", str(cfg), "--out", str(tmp_path / "run"), "-q")
    assert p.rc == 0, p.stderr
    p = server.run("evaluate", str(tmp_path / "run"), "--json", "--iwae-samples", "10", "-q")
    assert p.rc == 0, p.stderr
    out = json.loads(p.stdout)
    assert 0.0 < out["cluster_accuracy"] <= 1.0 and math.isfinite(out["log_likelihood"])
    for sets, match in (
        (["model.latent_dim=3"], "model.init_from = .*: expected the run's model.latent_dim to equal this model's \\(3\\); got 4"),
        (['model.init_from="nowhere"'], "model.init_from = 'nowhere': expected a trained VAE run folder"),
        (['model.cluster_guide="mean_field"'], 'model.init_from applies to model.cluster_guide = "posterior"'),
    ):
        args = [a for s in sets for a in ("--set", s)]
        p = server.run("fit", str(cfg), "--out", str(tmp_path / "bad"), *args)
        assert p.rc == 2, p.stderr
        assert re.search(match, p.stderr), p.stderr
        assert len(p.stderr.strip().splitlines()) <= 2
        assert not (tmp_path / "bad").exists()
    gm_run = tmp_path / "run"
    cfg.write_text(tomli_w.dumps(vade_tiny(gm_run)))  # a gmvae run is not a VAE
    p = server.run("fit", str(cfg), "--out", str(tmp_path / "bad"))
    assert p.rc == 2 and "expected a run of model.kind = 'vae' with the Gaussian guide; got kind = 'gmvae'" in p.stderr


def test_a_resumed_run_keeps_its_trained_parameters_not_the_vae(tmp_path, m1_run):
    """`--resume` continues from the checkpoint: the VAE run is not read again (it may be
    gone), and the resumed model starts from the trained parameters, not from the VAE's."""
    import shutil

    vae_dir = tmp_path / "m1"
    shutil.copytree(m1_run.dir, vae_dir)
    cfg = vade_tiny(vae_dir)
    cfg["train"]["epochs"] = 1
    first = pyrovae.fit(cfg, tmp_path / "run", progress=False, figures=False)
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}
    shutil.rmtree(vae_dir)
    cfg["train"]["epochs"] = 2

    class FirstStep(Callback):  # the parameters the resumed run's first step starts from
        state = None

        def on_loss(self, trainer, loss):
            if self.state is None:
                self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            return loss

    seen = FirstStep()
    again = pyrovae.fit(cfg, tmp_path / "run", resume=True, progress=False, figures=False, callbacks=[seen])
    assert len(again.history) == 2
    for k, v in seen.state.items():
        assert torch.equal(v.cpu(), trained[k].cpu()), k
    vae_enc = m1_run.model.posterior.encoder.state_dict()
    moved = [k for k, v in vae_enc.items() if not torch.allclose(seen.state[f"encoder.{k}"].cpu(), v.cpu())]
    assert moved, "the first run trained the encoder away from the VAE's"
