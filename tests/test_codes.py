"""`data.codes_from`: a model trained on the codes of a trained VAE (M1+M2 of Kingma et al. 2014).

The codes are the VAE's posterior means (validation, test, and training with `codes = "mean"`);
with `codes = "sample"` every training minibatch is drawn afresh from q(z|x). Checked against
the VAE's own encoder, by the statistics of many draws, and end to end through the CLI.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tomli_w
import torch

import pyrovae
from pyrovae.cli import main
from pyrovae.config import load_config
from pyrovae.data import load_data
from pyrovae.errors import DataError
from pyrovae.train import Trainer

VAE = {
    "data": {"dataset": "digits"},
    "model": {
        "kind": "vae",
        "latent_dim": 6,
        "encoder": {"kind": "mlp", "hidden": [64]},
        "decoder": {"kind": "mlp", "hidden": [64]},
        "likelihood": {"kind": "continuous_bernoulli"},
    },
    "train": {"epochs": 25, "batch_size": 64, "lr": 3e-3, "device": "cpu"},
}


def _m2(vae_dir, **data) -> dict:
    return {
        "data": {"dataset": "digits", "labels": 50, "codes_from": str(vae_dir), **data},
        "model": {
            "kind": "m2",
            "latent_dim": 4,
            "encoder": {"kind": "mlp", "hidden": [64]},
            "decoder": {"kind": "mlp", "hidden": [64]},
            "likelihood": {"kind": "normal", "scale": "learned"},
            "alpha": 20.0,
        },
        "train": {
            "objective": "trace_enum",
            "epochs": 15,
            "batch_size": 64,
            "lr": 3e-3,
            "device": "cpu",
        },
    }


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "vae"
    return pyrovae.fit(VAE, out, progress=False, figures=False)


def test_codes_are_the_vae_posterior_means(vae_run):
    images = load_data(load_config(_m2("")).data)
    codes = load_data(load_config(_m2(vae_run.dir, codes="mean")).data)
    enc = vae_run.model.cpu().eval().posterior.encode
    with torch.no_grad():
        for split in ("x_train", "x_val", "x_test"):
            loc = enc(getattr(images, split))[0]
            torch.testing.assert_close(getattr(codes, split), loc, rtol=0, atol=0)
    assert codes.shape == (6,) and codes.x_train_scale is None
    for split in ("y_train", "y_val", "y_test"):  # labels, the labelled subset included, kept
        assert torch.equal(getattr(codes, split), getattr(images, split))
    assert int((codes.y_train >= 0).sum()) == 50


def test_sampled_codes_are_fresh_draws_from_q(vae_run):
    images = load_data(load_config(_m2("")).data)
    cfg = load_config(_m2(vae_run.dir))  # codes = "sample", the default
    data = load_data(cfg.data)
    with torch.no_grad():
        loc, scale = vae_run.model.cpu().eval().posterior.encode(images.x_train)
    torch.testing.assert_close(data.x_train, loc, rtol=0, atol=0)
    torch.testing.assert_close(data.x_train_scale, scale, rtol=0, atol=0)
    model = pyrovae.build_model(cfg, data.shape)
    trainer = Trainer(
        model,
        cfg.train,
        data.x_train,
        data.x_val,
        y_train=data.y_train,
        x_train_scale=data.x_train_scale,
        progress=False,
    )
    trainer.perm = torch.arange(data.x_train.shape[0])  # epoch order: identity
    draws = torch.stack([trainer.batch(0) for _ in range(4000)])  # (4000, 64, 6)
    assert not torch.equal(draws[0], draws[1])  # drawn afresh every time
    b = cfg.train.batch_size
    # mean within 5 standard errors of loc, standard deviation within 10 % of the scale
    err = (draws.mean(0) - loc[:b]).abs() / (scale[:b] / math.sqrt(len(draws)))
    assert float(err.max()) < 5.0
    ratio = draws.std(0) / scale[:b]
    assert float((ratio - 1).abs().max()) < 0.1


def test_m2_on_codes_through_the_cli(vae_run, tmp_path, capsys):
    cfg = tmp_path / "m1m2.toml"
    cfg.write_text(tomli_w.dumps(_m2(vae_run.dir)))
    run = tmp_path / "m2"
    assert main(["fit", str(cfg), "--out", str(run), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "-q"]) == 0
    m = json.loads(capsys.readouterr().out)
    # 50 labels of 10 classes on 6-dim codes: far above chance (0.1)
    assert m["test_accuracy"] > 0.4 and math.isfinite(m["test_elbo"])
    assert pyrovae.load_run(run).model.data_shape == (6,)
    # samples of a label are codes, shown as the images M1 decodes them to
    out = tmp_path / "threes.npy"
    assert main(["sample", str(run), "-n", "5", "--label", "3", "--out", str(out), "-q"]) == 0
    x = np.load(out)
    assert x.shape == (5, 1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    assert main(["sample", str(run), "-n", "5", "--out", str(tmp_path / "g.png"), "-q"]) == 0


def test_bad_codes_inputs_are_one_line_errors(vae_run, tmp_path, capsys):
    with pytest.raises(DataError, match="data.codes_from: cannot load the run"):
        load_data(load_config(_m2(tmp_path / "missing")).data)
    with pytest.raises(DataError, match="data.binarize: expected 'none' with data.codes_from"):
        load_data(load_config(_m2(vae_run.dir, binarize="dynamic")).data)
    arr = np.random.default_rng(0).random((200, 5, 5)).astype("float32")
    np.savez(tmp_path / "small.npz", x=arr, y=np.arange(200) % 10)
    with pytest.raises(DataError, match=r"trained on points of shape \(1, 8, 8\); this dataset's "):
        load_data(load_config(_m2(vae_run.dir, dataset=str(tmp_path / "small.npz"))).data)
    # a run that is not a Gaussian-guide VAE, through the CLI: exit 2, one line, no run folder
    ae = tmp_path / "ae"
    pyrovae.fit({**VAE, "model": {**VAE["model"], "kind": "ae"}}, ae, progress=False, figures=False)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(tomli_w.dumps(_m2(ae)))
    assert main(["fit", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "expected a run of kind = 'vae' with the Gaussian guide" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_example_m1_m2_configs_build():
    from pyrovae.objectives import make_elbo
    from tests.conftest import ROOT

    m1 = load_config(ROOT / "examples" / "configs" / "mnist_m1.toml")
    cfg = load_config(ROOT / "examples" / "configs" / "mnist_m1m2.toml")
    assert cfg.data.codes_from == "runs/mnist_m1" and cfg.data.codes == "sample"
    assert cfg.data.val_fraction == m1.data.val_fraction  # M1 trains on M2's split
    vae = pyrovae.build_model(m1, (1, 28, 28))
    model = pyrovae.build_model(cfg, (vae.latent_dim,))  # M2 on the codes of M1
    z = torch.randn(3, vae.latent_dim)
    loss = make_elbo(cfg.train.objective).differentiable_loss(
        model.model, model.guide, z, y=torch.tensor([1, -1, 2])
    )
    assert torch.isfinite(loss)
