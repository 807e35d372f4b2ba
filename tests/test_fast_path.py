"""``train.fast_path``: the loss computed without Pyro's effect handlers equals the Pyro program's
(``LeanTrace_ELBO`` / ``LeanTraceMeanField_ELBO``, themselves bit-identical to Pyro's ELBOs:
tests/test_model.py) bit for bit, for every kind of block; the trainer uses it only on the steps
that skip Pyro's validation, and training is unchanged by it."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from conftest import BLOCK_CASES
from conftest import small_vae as vae

from pyrovae import VAE, load_config
from pyrovae.objectives import direct_loss, direct_loss_applies, make_elbo


def digits(n: int, binary: bool) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:n], dtype=torch.float32) / 16
    return x.round() if binary else x


def loss_and_grads(v: VAE, fn) -> tuple[float, list[torch.Tensor]]:
    v.zero_grad(set_to_none=True)
    pyro.set_rng_seed(1)
    loss = fn()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in v.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "prior,lik,guide,beta", [*BLOCK_CASES, ("mixture", "normal", "normal", 0.5)]
)
@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field"])
@pytest.mark.parametrize("n_data", [100, None])
def test_direct_loss_is_bit_identical_to_the_pyro_program(
    prior, lik, guide, beta, objective, n_data
):
    x = digits(8, binary=lik in ("bernoulli", "poisson", "negative_binomial"))
    pyro.set_rng_seed(0)
    v = vae(prior={"kind": prior}, likelihood={"kind": lik}, guide={"kind": guide})
    v.register_params, v.kl_scale = False, beta
    elbo = make_elbo(objective)
    with pyro.validation_enabled(False), v.trusted_data():
        ref = loss_and_grads(v, lambda: elbo.differentiable_loss(v.model, v.guide, x, n_data))
        got = loss_and_grads(v, lambda: direct_loss(v, x, n_data, objective))
    assert got[0] == ref[0]
    assert len(got[1]) == len(ref[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))


def test_direct_loss_sync_free_returns_the_surrogate():
    x = digits(8, binary=True)
    v = vae()
    v.register_params = False
    for objective in ("trace_elbo", "mean_field"):
        pyro.set_rng_seed(3)
        a = direct_loss(v, x, 100, objective)
        pyro.set_rng_seed(3)
        b = direct_loss(v, x, 100, objective, sync_free=True)
        assert torch.allclose(a, b, rtol=1e-6)


def test_direct_loss_declines_what_it_does_not_cover():
    v = vae()
    assert direct_loss(v, digits(4, True), None, "iwae") is None


_CFG = {
    "data": {"dataset": "digits", "binarize": "dynamic"},
    "model": {
        "latent_dim": 2,
        "encoder": {"kind": "mlp", "hidden": [16]},
        "decoder": {"kind": "mlp", "hidden": [16]},
    },
}


def test_fast_path_applies_only_to_the_sites_it_evaluates():
    """A model with a Pyro site of its own (here a global scale) keeps the Pyro program; the
    check does not move the random stream."""
    x = digits(8, binary=True)
    v = vae()
    v.register_params = False
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert direct_loss_applies(v, x, 100)
    assert torch.equal(torch.get_rng_state(), state)
    model = v.model

    def hierarchical(x, n_data=None):
        pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))
        return model(x, n_data)

    v.model = hierarchical
    assert not direct_loss_applies(v, x, 100)
    v.model, v.register_params = model, True  # pyro.module: parameters through the param store
    assert not direct_loss_applies(v, x, 100)


def _train(tmp_path, name: str, **train) -> tuple[dict, list[dict]]:
    import pyrovae

    cfg = load_config({**_CFG, "train": {"epochs": 2, "batch_size": 64, "seed": 5, **train}})
    run = pyrovae.fit(cfg, tmp_path / name, progress=False, figures=False)
    return run.model.state_dict(), json.loads((tmp_path / name / "metrics.json").read_text())[
        "history"
    ]


@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field"])
def test_training_with_the_fast_path_is_unchanged(tmp_path, monkeypatch, objective):
    """Same parameters and per-epoch ELBOs, bit for bit; the direct loss ran on every step but
    each epoch's first (where the Pyro program runs, validated)."""
    import pyrovae
    import pyrovae.train as train_mod

    calls = []
    real = train_mod.direct_loss
    monkeypatch.setattr(train_mod, "direct_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    slow, h_slow = _train(tmp_path, "slow", objective=objective)
    assert calls == []
    fast, h_fast = _train(tmp_path, "fast", objective=objective, fast_path=True)
    n_train = len(pyrovae.load_data(load_config(_CFG).data, seed=5).x_train)
    n_batches = -(-n_train // 64)
    assert len(calls) == 2 * (n_batches - 1)  # 2 epochs, all steps but the first of each
    for k in slow:
        assert torch.equal(slow[k], fast[k]), k
    for a, b in zip(h_slow, h_fast, strict=True):
        assert a["train_elbo"] == b["train_elbo"] and a["val_elbo"] == b["val_elbo"]
