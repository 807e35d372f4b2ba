"""Config validation: dotted names, allowed values, overrides, round trip."""

from __future__ import annotations

import pytest

from pyrovae import ConfigError, load_config
from pyrovae.config import Config


def test_defaults_match_the_documented_contract():
    c = load_config()
    assert c.data.dataset == "digits" and c.data.binarize == "none"
    assert c.model.kind == "vae" and c.model.latent_dim == 2
    assert c.model.prior.kind == "normal" and c.model.likelihood.kind == "continuous_bernoulli"
    assert c.model.encoder.hidden == [256, 128] and c.model.decoder.hidden == [128, 256]
    assert c.train.objective == "trace_elbo" and c.train.epochs == 30 and c.train.lr == 1e-3


def test_example_config_loads():
    c = load_config("examples/configs/digits_vae.toml")
    assert c.model.encoder.activation == "softplus"


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"train": {"epoch": 3}}, "train.epoch: unknown key (allowed: objective, num_particles"),
        ({"trian": {}}, "trian: unknown key (allowed: data, model, train)"),
        ({"model": {"prior": {"kind": "gauss"}}}, "model.prior: "),
        (
            {"model": {"prior": {"kind": "mixture", "compnents": 3}}},
            "model.prior.compnents: unknown key (allowed: kind, components)",
        ),
        ({"model": {"likelihood": {"kind": "normal", "scale": -1}}}, "model.likelihood.scale"),
        (
            {"train": {"epochs": -1}},
            "train.epochs: Input should be greater than or equal to 1; got -1",
        ),
        (
            {"model": {"latent_dim": 0}},
            "model.latent_dim: Input should be greater than or equal to 1; got 0",
        ),
        ({"train": {"lr": 0}}, "train.lr: Input should be greater than 0; got 0"),
        ({"train": {"lr_decay": 1.5}}, "train.lr_decay: Input should be less than or equal to 1"),
        ({"train": {"lr": 1e-3, "lr_min": 1e-2}}, "lr_min (0.01) must not exceed lr (0.001)"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        (
            {"train": {"objective": "elbo"}},
            "train.objective: Input should be 'trace_elbo', 'mean_field', 'trace_enum' or "
            "'iwae'; got 'elbo'",
        ),
        ({"data": {"binarize": "yes"}}, "data.binarize"),
    ],
)
def test_errors_name_the_key_and_allowed_values(raw, needle):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert needle in str(e.value)


def test_unknown_prior_kind_lists_allowed_kinds():
    with pytest.raises(ConfigError) as e:
        load_config({"model": {"prior": {"kind": "gauss"}}})
    for kind in ("normal", "normal_learned", "mixture", "vamp", "flow"):
        assert kind in str(e.value)


def test_overrides_parse_toml_values_and_bare_strings():
    c = load_config(
        None,
        [
            "train.epochs=5",
            'model.prior={kind="mixture", components=4}',
            "model.likelihood.kind=bernoulli",
            "data.binarize=dynamic",
        ],
    )
    assert c.train.epochs == 5 and c.model.prior.components == 4
    assert c.model.likelihood.kind == "bernoulli" and c.data.binarize == "dynamic"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs: unknown key|is a value"):
        load_config(None, ["train.epochs=3", "train.epochs.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def test_save_and_reload_round_trip(tmp_path):
    c = load_config(
        {
            "model": {
                "prior": {"kind": "vamp", "components": 7},
                "likelihood": {"kind": "normal", "scale": "learned"},
            }
        }
    )
    (tmp_path / "c.toml").write_text(c.to_toml())
    assert load_config(tmp_path / "c.toml") == c
    assert isinstance(c, Config)


def test_retired_fast_path_is_dropped_with_a_warning(tmp_path):
    """Run folders written before the redesign hold train.fast_path: they still load; asking
    for it (true) warns that it no longer exists, false is dropped silently."""
    import warnings

    with pytest.warns(UserWarning, match=r"train\.fast_path is no longer an option.*ignored"):
        c = load_config({"train": {"fast_path": True, "epochs": 3}})
    assert c.train.epochs == 3 and "fast_path" not in c.train.model_dump()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config({"train": {"fast_path": False}}) == load_config()
    old = tmp_path / "old.toml"
    old.write_text("[train]\nfast_path = true\nepochs = 4\n")
    with pytest.warns(UserWarning, match="old.toml: train.fast_path"):
        assert load_config(old).train.epochs == 4
    assert "fast_path" not in c.to_toml()


def test_trace_enum_is_an_objective():
    assert load_config({"train": {"objective": "trace_enum"}}).train.objective == "trace_enum"
