"""User plugins: priors, likelihoods and whole Pyro models from outside `pyrovae/`, declared in
TOML, trained, evaluated, diagnosed and sampled through the CLI like the built-in ones."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pyro
import pytest
import torch

import pyrovae
from pyrovae.cli import main
from pyrovae.errors import ConfigError
from pyrovae.registry import load_plugin
from pyrovae.runs import CHECKPOINT, load_checkpoint, save_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = [
    "--set", "data.limit=300", "--set", "train.epochs=2", "--set", "train.device=\"cpu\"",
]  # fmt: skip


def copy_plugin(name: str, folder: Path, new_name: str) -> Path:
    """The example plugin under another name and folder: loading must not depend on either."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / new_name
    shutil.copy(EXAMPLES / "plugins" / name, dst)
    return dst


def cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize(
    "config, plugin",
    [
        ("plugin_student_t.toml", "student_t_prior.py"),
        ("plugin_beta.toml", "beta_likelihood.py"),
        ("plugin_tutorial_vae.toml", "tutorial_vae.py"),
    ],
)
def test_example_plugins_fit_evaluate_diagnose_sample(tmp_path, capsys, config, plugin):
    """Each example plugin, copied under a different file name, trains through `pyrovae fit`,
    and the run is evaluated (IWAE), diagnosed and sampled by the CLI with the same plugin."""
    src = copy_plugin(plugin, tmp_path / "elsewhere", f"renamed_{plugin}")
    out = tmp_path / "run"
    assert cli("fit", EXAMPLES / "configs" / config, "--plugin", src, "--out", out, *FAST) == 0
    state = load_checkpoint(out / CHECKPOINT)
    assert state["plugins"] and all(p["sha256"] and p["file"] == str(src) for p in state["plugins"])
    capsys.readouterr()
    assert cli("evaluate", out, "--plugin", src, "--iwae-samples", "20", "--json") == 0
    m = json.loads(capsys.readouterr().out)
    assert m["log_likelihood"] >= m["test_elbo"] - 0.5  # IWAE(K=20) bound above the ELBO, up to MC noise
    args = ["--points", "1", "--iwae-samples", "20", "--khat-samples", "50", "--gap-points", "1"]
    assert cli("diagnose", out, "--plugin", src, "--json", "--max-points", "40", *args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["log_likelihood"]["samples"] == 20 and "nuts" in d and "amortization" in d
    assert cli("sample", out, "--plugin", src, "-n", "9", "--out", tmp_path / "s.npy") == 0
    import numpy as np

    s = np.load(tmp_path / "s.npy")
    assert s.shape == (9, 1, 8, 8) and np.isfinite(s).all()


def test_plugin_by_import_path_from_the_environment(tmp_path, monkeypatch):
    """`kind = "module:Class"` imports from sys.path; the run records the import path and the
    source hash, and `load_run` re-imports it from the environment (not from the run folder)."""
    copy_plugin("student_t_prior.py", tmp_path / "pkgs", "my_priors_mod.py")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    cfg = {
        "data": {"dataset": "digits", "limit": 300},
        "model": {"latent_dim": 2, "prior": {"kind": "my_priors_mod:StudentT", "df": 5.0}},
        "train": {"epochs": 2, "device": "cpu"},
    }
    run = pyrovae.fit(cfg, tmp_path / "r", progress=False, figures=False)
    assert run.config.model.prior.df == 5.0
    assert type(run.model.prior).__name__ == "StudentT"
    z = run.model.prior()
    assert isinstance(z.base_dist, pyro.distributions.StudentT)
    again = pyrovae.load_run(tmp_path / "r")
    for a, b in zip(run.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unknown_option_of_a_plugin_names_the_dotted_key(tmp_path):
    load_plugin(EXAMPLES / "plugins" / "student_t_prior.py")
    with pytest.raises(ConfigError, match=r"model\.prior\.dof: unknown key \(allowed: kind, df, scale\)"):
        pyrovae.load_config({"model": {"prior": {"kind": "student_t", "dof": 3}}})
    with pytest.raises(ConfigError, match=r"model\.prior\.df: Input should be greater than 0"):
        pyrovae.load_config({"model": {"prior": {"kind": "student_t", "df": -1}}})


def test_changed_or_missing_plugin_is_a_clear_error(tmp_path, capsys):
    """A run whose plugin source changed refuses to load (exit 2, naming the plugin and both
    hashes) unless --accept-plugin-changes; without the plugin, the error says which to load."""
    src = copy_plugin("student_t_prior.py", tmp_path / "p", "tprior.py")
    out = tmp_path / "run"
    cfg = EXAMPLES / "configs" / "plugin_student_t.toml"
    assert cli("fit", cfg, "--plugin", src, "--out", out, *FAST) == 0
    capsys.readouterr()
    # a fresh process would not have the plugin: simulate with a run whose plugin is unknown
    state = load_checkpoint(out / CHECKPOINT)
    state["config"]["model"]["prior"]["kind"] = "student_t_never_loaded"
    state["plugins"][0]["kind"] = "student_t_never_loaded"
    state.pop("format_version")
    save_checkpoint(tmp_path / "missing" / CHECKPOINT, state)
    assert cli("evaluate", tmp_path / "missing") == 2
    err = capsys.readouterr().err
    assert "student_t_never_loaded" in err and "--plugin" in err and "Traceback" not in err

    src.write_text(src.read_text() + "\n# edited after training\n")
    changed = tmp_path / "p2" / "tprior.py"
    changed.parent.mkdir()
    shutil.copy(src, changed)  # the edited source, a new file (loaded files are cached by path)
    assert cli("evaluate", out, "--plugin", changed) == 2
    err = capsys.readouterr().err
    assert "changed since the run was trained" in err and "model.prior" in err
    assert cli("evaluate", out, "--plugin", changed, "--accept-plugin-changes") == 0


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
        ("pyrovae.priors:NoSuchClass", "has no attribute 'NoSuchClass'"),
        ("pyrovae.priors:Prior", "has no Spec"),
        ("pyrovae.likelihoods:Bernoulli", "is not a prior"),
        ("not a path:", "is not an import path"),
    ],
)
def test_bad_plugin_paths_are_one_line_config_errors(kind, message):
    with pytest.raises(ConfigError, match="model.prior.kind") as e:
        pyrovae.load_config({"model": {"prior": {"kind": kind}}})
    assert message in str(e.value)


def test_model_with_a_global_latent_is_refused_before_training(tmp_path):
    """A whole-model plugin whose latent site is outside pyro.plate("data") cannot be scaled
    by N/B without bias: fit refuses it, naming the site, and writes nothing."""
    f = tmp_path / "global_latent.py"
    f.write_text(textwrap.dedent('''
        from typing import Literal
        import pyro, pyro.distributions as dist, torch
        from pyrovae.model import MODELS
        from pyrovae.registry import Spec

        @MODELS.register
        class GlobalMean(torch.nn.Module):
            class Spec(Spec):
                kind: Literal["global_mean"] = "global_mean"

            def __init__(self, spec):
                super().__init__()
                self.loc = torch.nn.Parameter(torch.zeros(()))

            def model(self, x):
                mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
                with pyro.plate("data", x.shape[0]):
                    pyro.sample("x", dist.Normal(mu, 1.0).expand([x.shape[1]]).to_event(1), obs=x)

            def guide(self, x):
                pyro.sample("mu", dist.Normal(self.loc, 1.0))
    '''))
    load_plugin(f)
    cfg = {"data": {"dataset": "digits", "limit": 100}, "model": {"kind": "global_mean"}}
    with pytest.raises(ConfigError, match=r"sample site 'mu' of GlobalMean\.(guide|model)"):
        pyrovae.fit(cfg, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_tutorial_vae_minibatch_loss_is_the_full_data_elbo_scaled(tmp_path):
    """The trainer's loss for a plugin model is (N/B) x the batch's summed loss, divided by N:
    the mean negative ELBO per datapoint of the batch, with β = 1; β scales only the latent site."""
    load_plugin(EXAMPLES / "plugins" / "tutorial_vae.py")
    from pyrovae.model import MODELS
    from pyrovae.objectives import make_loss

    vae = MODELS["tutorial_vae"](MODELS.spec("tutorial_vae")(z_dim=3, hidden_dim=16, input_dim=64))
    x = torch.bernoulli(torch.full((10, 64), 0.3), generator=torch.Generator().manual_seed(0))
    loss = make_loss(vae, "trace_elbo")
    pyro.set_rng_seed(1)
    per_point = loss(x, 1000, 1.0).item()
    pyro.set_rng_seed(1)
    direct = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x) / 10  # plain batch -ELBO
    assert per_point == pytest.approx(direct, rel=1e-5)
    # beta = 0: only the likelihood term is left
    pyro.set_rng_seed(1)
    rec_only = loss(x, 10, 0.0).item()
    pyro.set_rng_seed(1)
    g = pyro.poutine.trace(vae.guide).get_trace(x)
    m = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=g)).get_trace(x)
    assert rec_only == pytest.approx(-m.nodes["obs"]["fn"].log_prob(x).sum().item() / 10, rel=1e-5)


def test_entry_point_gives_a_short_name_and_checks_its_kind(tmp_path, monkeypatch):
    """An installed distribution's `pyrovae.priors` entry point makes its class available by a
    short name; a Spec whose kind differs from the entry-point name is refused."""
    site = tmp_path / "site"
    (site / "ep_priors_pkg").mkdir(parents=True)
    shutil.copy(EXAMPLES / "plugins" / "student_t_prior.py", site / "ep_priors_pkg" / "mod.py")
    (site / "ep_priors_pkg" / "__init__.py").write_text("")
    dist_info = site / "ep_priors_pkg-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-priors-pkg\nVersion: 0.1\n")
    (site / "ep_priors_pkg" / "wide.py").write_text(textwrap.dedent('''
        from typing import Literal
        import pyro.distributions as dist, torch
        from pyrovae.priors import Prior
        from pyrovae.registry import Spec

        class WideNormal(Prior):  # not decorated: registered by its entry point
            class Spec(Spec):
                kind: Literal["wide_normal_ep"] = "wide_normal_ep"
                scale: float = 3.0

            def forward(self):
                return dist.Normal(torch.zeros(self.latent_dim), self.spec.scale).to_event(1)
    '''))
    (dist_info / "entry_points.txt").write_text(
        "[pyrovae.priors]\nheavy_t = ep_priors_pkg.mod:StudentT\n"
        "wide_normal_ep = ep_priors_pkg.wide:WideNormal\n"
    )
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError, match="kind = 'student_t'; expected kind = 'heavy_t'"):
        pyrovae.load_config({"model": {"prior": {"kind": "heavy_t"}}})
    cfg = pyrovae.load_config({"model": {"prior": {"kind": "wide_normal_ep", "scale": 2.0}}})
    vae = pyrovae.build_model(cfg, (1, 8, 8))
    assert vae.prior().base_dist.scale.unique().item() == 2.0
    for mod in ("ep_priors_pkg.mod", "ep_priors_pkg.wide", "ep_priors_pkg"):
        monkeypatch.delitem(sys.modules, mod, raising=False)


def test_load_plugin_rejects_what_is_not_a_python_file(tmp_path):
    with pytest.raises(ConfigError, match="expected an existing Python file"):
        load_plugin(tmp_path / "nope.py")
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="importing it raised RuntimeError: boom"):
        load_plugin(bad)


def test_cli_plugin_errors_exit_2_without_traceback(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nprior = { kind = "nowhere_mod:Prior" }\n')
    assert cli("fit", cfg, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 3 and "model.prior.kind" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_fuzzed_plugin_kinds_never_crash():
    """Any string as a prior kind is either a valid kind or a one-line ConfigError naming the key."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = st.sampled_from(list("abcXYZ_019.:- /\\$é\n"))
    kinds = st.one_of(
        st.text(alphabet, max_size=30),
        st.builds(lambda a, b: f"{a}:{b}", st.text(alphabet, max_size=12), st.text(alphabet, max_size=12)),
    )

    @settings(max_examples=150, deadline=None)
    @given(kinds)
    def check(kind):
        try:
            pyrovae.load_config({"model": {"prior": {"kind": kind}}})
        except ConfigError as e:
            assert "model.prior" in str(e)

    check()


def test_whole_model_plugin_resumes_exactly(tmp_path):
    """The tutorial VAE stopped mid-epoch and resumed ends with the parameters of an
    uninterrupted run, bit for bit (checkpoint, optimizer moments, RNG and epoch order restored)."""
    from conftest import StopAt

    load_plugin(EXAMPLES / "plugins" / "tutorial_vae.py")
    cfg = {
        "data": {"dataset": "digits", "limit": 256, "binarize": "dynamic"},
        "model": {"kind": "tutorial_vae", "options": {"z_dim": 3, "hidden_dim": 32, "input_dim": 64}},
        "train": {"epochs": 3, "batch_size": 64, "device": "cpu"},
    }
    full = pyrovae.fit(cfg, tmp_path / "full", progress=False, figures=False)
    cut = pyrovae.fit(cfg, tmp_path / "cut", progress=False, figures=False, callbacks=[StopAt(6)])
    assert cut.interrupted and len(cut.history) == 1
    resumed = pyrovae.fit(None, tmp_path / "cut", resume=True, progress=False, figures=False)
    assert resumed.history[0] == cut.history[0]  # the stored row, not recomputed
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_plugin_likelihood_that_rejects_the_data_is_a_data_error(tmp_path):
    """The Beta likelihood's own `check_data` refuses values outside [0, 1] before training,
    naming the split; nothing is written."""
    import numpy as np

    load_plugin(EXAMPLES / "plugins" / "beta_likelihood.py")
    x = np.random.default_rng(0).uniform(0, 1, size=(200, 16)).astype("float32")
    x[150, 3] = 1.5
    np.save(tmp_path / "grey.npy", x)
    cfg = {
        "data": {"dataset": str(tmp_path / "grey.npy")},
        "model": {"latent_dim": 2, "likelihood": {"kind": "beta"}},
        "train": {"epochs": 1, "device": "cpu"},
    }
    with pytest.raises(pyrovae.DataError, match=r"split\): the beta likelihood needs grey levels in \[0, 1\]; found 1 value"):
        pyrovae.fit(cfg, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
