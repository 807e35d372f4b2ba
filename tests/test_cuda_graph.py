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


@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field", "iwae"])
def test_capturable_pyro_gives_pyros_loss_and_gradient(objective):
    """What the graph records: Pyro's own ELBO with `torch_item`/`warn_if_nan` kept on the
    device. Same loss (to float rounding) and the same gradient as the eager ELBO, same noise."""
    from pyrovae.cuda_graph import capturable_pyro, check_reparameterized
    from pyrovae.objectives import make_loss

    cfg = load_config(tiny_config(train={"objective": objective}))
    data = load_data(cfg.data)
    model = build_model(cfg, data.shape)
    check_reparameterized(model, data.x_train[:4])
    loss_fn, x, params = make_loss(model, objective), data.x_train[:64], list(model.parameters())
    torch.manual_seed(3)
    eager = loss_fn(x, 256, 0.7)
    g_eager = torch.autograd.grad(eager, params)
    torch.manual_seed(3)
    with capturable_pyro():
        kept = loss_fn(x, 256, 0.7)
    g_kept = torch.autograd.grad(kept, params)
    assert torch.is_tensor(kept) and kept.item() == pytest.approx(eager.item(), rel=1e-6)
    for a, b in zip(g_eager, g_kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    import pyro.infer.trace_elbo as te

    assert te.torch_item(torch.tensor(2.0)) == 2.0 and isinstance(te.torch_item(torch.tensor(2.0)), float)
