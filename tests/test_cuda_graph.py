"""`train.cuda_graph`: what a CPU can check (the graph itself runs in
`benchmarks/cuda_graph_step.py --device cuda`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pyrovae.build import build_model
from pyrovae.cli import main
from pyrovae.config import load_config
from pyrovae.cuda_graph import check_config
from pyrovae.data import load_data
from pyrovae.errors import ConfigError
from pyrovae.train import Trainer


def test_cuda_graph_on_cpu_is_a_one_line_error_and_no_folder(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(load_config(tiny_config()).to_toml())
    out = tmp_path / "run"
    rc = main(["fit", str(cfg), "--out", str(out), "-q", "--set", "train.cuda_graph=true"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "train.cuda_graph = true records the step as a CUDA graph" in err
    assert "training device is cpu" in err
    assert not out.exists()


def test_cuda_graph_checks_name_the_field():
    cfg = load_config(tiny_config(train={"cuda_graph": True}))
    data = load_data(cfg.data)
    with pytest.raises(ConfigError, match="training device is cpu"):
        Trainer(build_model(cfg, data.shape), cfg.train, data.x_train)
    enum = load_config(tiny_config(train={"cuda_graph": True, "objective": "trace_enum"}))
    with pytest.raises(ConfigError, match="expected train.objective in trace_elbo, mean_field, iwae"):
        check_config(enum.train, torch.device("cuda"))
    with pytest.raises(ConfigError, match="not combined with data-parallel training"):
        check_config(cfg.train, torch.device("cuda"), world=object())
    check_config(load_config(tiny_config()).train, torch.device("cpu"))  # off: nothing to check


CASES = [
    ("trace_elbo", {}, 1),
    ("trace_elbo", {}, 3),
    ("mean_field", {}, 1),
    ("mean_field", {}, 3),
    ("mean_field", {"prior": {"kind": "mixture"}}, 1),  # no analytic KL: log q - log p
    ("trace_elbo", {"guide": {"kind": "flow"}}, 2),
    ("mean_field", {"prior": {"kind": "vamp"}, "guide": {"kind": "flow"}}, 1),
    ("trace_elbo", {"kind": "hvae", "latent_dims": [4, 2]}, 2),
]


@pytest.mark.parametrize(("objective", "model", "particles"), CASES)
@pytest.mark.parametrize("beta", [0.7, 0.0])
def test_capturable_elbo_is_pyros_estimator(objective, model, particles, beta):
    """What the graph records (`CapturableELBO`) against Pyro's own `Trace_ELBO` /
    `TraceMeanField_ELBO` on the same noise: the same loss (float rounding) and the same
    gradient, with particles vectorized, β (β = 0 masks the latent sites), subsampling
    N/B, flows (no analytic KL) and a two-layer model."""
    from pyrovae.objectives import CapturableELBO, make_loss

    cfg = load_config(tiny_config(train={"objective": objective, "num_particles": particles},
                                  model=model))
    data = load_data(cfg.data)
    model = build_model(cfg, data.shape)
    eager_fn = make_loss(model, objective, particles)
    graph_fn = make_loss(model, objective, particles, capturable=True)
    assert isinstance(graph_fn.elbo, CapturableELBO)
    x, params = data.x_train[:64], [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(3)
    eager = eager_fn(x, 256, beta)
    g_eager = torch.autograd.grad(eager, params, allow_unused=True)
    torch.manual_seed(3)
    kept = graph_fn(x, 256, beta)
    g_kept = torch.autograd.grad(kept, params, allow_unused=True)
    assert torch.is_tensor(kept) and kept.item() == pytest.approx(eager.item(), rel=1e-6)
    for a, b in zip(g_eager, g_kept, strict=True):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field", "iwae"])
def test_the_recorded_loss_makes_no_host_read(objective):
    """A CUDA graph capture fails on any device-to-host read. `HostReads` sees them on a CPU
    too: Pyro's own `Trace_ELBO` makes some (it is why the graph cannot record it); the loss
    the graph records, under `capturable_pyro`, makes none — forward and backward."""
    from pyrovae.cuda_graph import HostReads, capturable_pyro
    from pyrovae.objectives import make_loss

    cfg = load_config(tiny_config(train={"objective": objective, "num_particles": 2}))
    data = load_data(cfg.data)
    model = build_model(cfg, data.shape)
    x = data.x_train[:64]
    if objective != "iwae":
        with HostReads() as pyros:
            make_loss(model, objective, 2)(x, 256, 1.0).backward()
        assert pyros.reads, "Pyro's ELBO reads on the host: the detector must see it"
    loss_fn = make_loss(model, objective, 2, capturable=True)
    with capturable_pyro(), HostReads() as h:
        loss = loss_fn(x, 256, 1.0)
        loss.backward()
    assert h.reads == [] and torch.isfinite(loss)


def test_host_reads_sees_what_a_capture_forbids():
    from pyrovae.cuda_graph import HostReads

    t = torch.arange(4.0)
    with HostReads() as h:
        t.sum().item()
        bool(t[0] > 1)
        float(t[1])
        t[t > 1]
        t.nonzero()
        t.tolist()
        t * 2 + 1  # no read
    assert h.reads == ["item", "__bool__", "__float__", "__getitem__", "nonzero", "tolist"]


def test_capturable_elbo_refuses_a_sampled_latent_site():
    import pyro
    import pyro.distributions as dist

    from pyrovae.objectives import CapturableELBO

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="site 'c' \\(Bernoulli\\) is not reparameterized"):
        CapturableELBO().differentiable_loss(model, guide, torch.zeros(3))
