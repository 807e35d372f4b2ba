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
