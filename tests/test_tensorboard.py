"""TensorBoard logs of a run (`pyrovae.tblog`) read back with TensorBoard's own
`EventAccumulator`, and `pyrovae compare RUN RUN ...`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pyrovae
from pyrovae.cli import main
from pyrovae.tblog import TB, tb_scalars

STEPS_PER_EPOCH = 4  # tiny_config: 256 points, 179 for training, batch 64


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    log = logging.getLogger("pyrovae")
    for h in [h for h in log.handlers if getattr(h, "_pyrovae", False)]:
        log.removeHandler(h)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    run = tmp_path_factory.mktemp("tb") / "run"
    r = pyrovae.fit(
        tiny_config(train={"epochs": 3, "log_every": 2}), run, progress=False, figures=False
    )
    return r


def test_scalars_and_images_are_logged_and_match_metrics_json(logged):
    run = logged.dir
    s = tb_scalars(run)
    history = json.loads((run / "metrics.json").read_text())["history"]
    steps = [STEPS_PER_EPOCH * (e + 1) for e in range(3)]
    for tag, key in (("epoch/val_elbo", "val_elbo"), ("epoch/train_elbo", "train_elbo"),
                     ("epoch/lr", "lr"), ("epoch/beta", "kl_scale"), ("epoch/epoch", "epoch")):  # fmt: skip
        assert [st for st, _ in s[tag]] == steps, tag
        # event files store float32: equal to metrics.json up to that rounding
        assert [v for _, v in s[tag]] == pytest.approx([h[key] for h in history], rel=1e-6), tag
    assert [st for st, _ in s["step/elbo"]] == list(range(2, 13, 2))  # every log_every steps
    assert {"step/lr", "step/beta", "epoch/seconds"} <= set(s)
    # the ELBO's parts on the validation split, from the model's Pyro traces: at the first and
    # the last epoch always, in between within the 1 % time budget (timing-dependent)
    parts_steps = [st for st, _ in s["elbo/elbo"]]
    assert parts_steps[0] == steps[0] and parts_steps[-1] == steps[-1]
    for i, st in enumerate(parts_steps):
        elbo, rec, kl = (s[t][i][1] for t in ("elbo/elbo", "elbo/reconstruction", "elbo/kl"))
        assert [s[t][i][0] for t in ("elbo/reconstruction", "elbo/kl", "kl_per_dim/1")] == [st] * 3
        assert elbo == pytest.approx(rec - kl, abs=1e-4)
        assert kl > 0
        # normal prior, diagonal normal guide: the per-dimension KLs add up to the KL (analytic)
        assert sum(s[f"kl_per_dim/{u}"][i][1] for u in range(2)) == pytest.approx(kl, rel=1e-5)
        # one draw of z on the validation points vs the mean ELBO on them: same quantity
        assert abs(elbo - history[steps.index(st)]["val_elbo"]) < 3.0
    acc = EventAccumulator(str(run / TB), size_guidance={"images": 0})
    acc.Reload()
    assert {"reconstructions", "samples"} <= set(acc.Tags()["images"])
    img = acc.Images("reconstructions")[-1]
    # 16 pairs (8x8 data | 8x8 reconstruction) tiled by add_images into 8 columns x 2 rows
    assert img.step == steps[-1] and (img.width, img.height) == (8 * 16, 2 * 8)
    assert [e.step for e in acc.Images("samples")] == parts_steps


def test_logging_off_writes_nothing_and_does_not_change_training(logged, tmp_path):
    """train.log = false: no tb/ folder; and logging on draws nothing from the training RNG
    streams, so both runs end with identical parameters."""
    off = pyrovae.fit(
        tiny_config(train={"epochs": 3, "log": False}), tmp_path / "off", progress=False,
        figures=False,
    )  # fmt: skip
    assert not (tmp_path / "off" / TB).exists()
    a, b = logged.model.state_dict(), off.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged.history[-1]["val_elbo"] == off.history[-1]["val_elbo"]


def test_resume_continues_the_curves_without_duplicates(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    import tomli_w

    cfg.write_text(tomli_w.dumps(tiny_config(train={"epochs": 2, "log_every": 1})))
    assert cli(capsys, "fit", cfg, "--out", run, "-q")[0] == 0
    assert cli(capsys, "fit", "--out", run, "--resume", "--set", "train.epochs=3", "-q")[0] == 0
    s = tb_scalars(run)
    assert [st for st, _ in s["epoch/val_elbo"]] == [4, 8, 12]
    assert [st for st, _ in s["step/elbo"]] == list(range(1, 13))
    assert len(list((run / TB).iterdir())) == 2  # one event file per process
    rc, _, err = cli(capsys, "fit", cfg, "--out", tmp_path / "off", "--set", "train.log=false", "-q")
    assert rc == 0, err
    assert not (tmp_path / "off" / TB).exists()


def test_autoencoder_logs_losses(tmp_path):
    cfg = tiny_config(model={"kind": "ae"}, train={"log_every": 2})
    pyrovae.fit(cfg, tmp_path / "ae", progress=False, figures=False)
    s = tb_scalars(tmp_path / "ae")
    assert {"epoch/train_loss", "epoch/val_loss", "step/loss"} <= set(s)
    assert not any(t.startswith(("elbo/", "kl_per_dim/")) for t in s)


# ------------------------------------------------------------------------------ compare
def test_compare_many_run_folders(logged, tmp_path, capsys):
    b = pyrovae.fit(tiny_config(model={"latent_dim": 3}), tmp_path / "b", progress=False, figures=False)
    rc, out, err = cli(capsys, "compare", logged.dir, b.dir, "--out", tmp_path / "curves.png")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["run", "kind", "epochs"]
    row = next(ln for ln in lines if ln.startswith("b "))
    m = json.loads((b.dir / "metrics.json").read_text())
    assert f"{m['test_elbo']:.2f}" in row and f"{m['history'][-1]['val_elbo']:.2f}" in row
    assert "model.latent_dim=3" in row and "train.epochs=2" in row
    assert "model.kind" not in row  # the same in both runs
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("make", "needle", "code"),
    [
        (lambda t: t / "missing", "not a run folder (no such folder)", 2),
        (lambda t: (t / "empty").mkdir() or t / "empty", "not a run folder: expected metrics.json", 2),
        (lambda t: (t / "f.txt").write_text("x") and t / "f.txt", "not a run folder (a file)", 2),
    ],
)
def test_compare_rejects_what_is_not_a_run_folder(logged, tmp_path, capsys, make, needle, code):
    bad = make(tmp_path)
    rc, _, err = cli(capsys, "compare", logged.dir, bad)
    assert rc == code and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("pyrovae: error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and needle in lines[0], err
    rc, _, err = cli(capsys, "compare", logged.dir, "--out", tmp_path / "x.txt")
    assert rc == 2 and "expected a .png, .pdf or .svg file" in err


def test_dynamic_binarization_without_validation_split_gets_elbo_parts(tmp_path):
    """No validation split and dynamic binarization (the MNIST configs): the parts are
    computed on binarized training points (inside the Bernoulli likelihood's support)."""
    cfg = tiny_config(
        data={"binarize": "dynamic", "val_fraction": 0},
        model={"likelihood": {"kind": "bernoulli"}},
        train={"epochs": 1},
    )
    pyrovae.fit(cfg, tmp_path / "r", progress=False, figures=False)
    s = tb_scalars(tmp_path / "r")
    assert {"elbo/elbo", "elbo/kl", "kl_per_dim/0"} <= set(s)
    assert "epoch/val_elbo" not in s and "epoch/train_elbo" in s


def test_structured_models_log_their_own_terms(tmp_path, caplog):
    """A structured model, whose guide has several latent sites (hvae) or an enumerated one
    (gmvae), logs its own `metrics` on the parts points: for the hvae the ELBO per layer, whose
    combination is the validation ELBO (same quantity, one draw), and no warning; for the gmvae
    the cluster accuracy against the validation labels."""
    hv = tiny_config(model={"kind": "hvae", "latent_dims": [4, 2], "layer_hidden": [16]})
    with caplog.at_level(logging.WARNING, logger="pyrovae"):
        run = pyrovae.fit(hv, tmp_path / "hv", progress=False, figures=False)
    assert "no ELBO parts" not in caplog.text
    s = tb_scalars(run.dir)
    ends = [STEPS_PER_EPOCH * (e + 1) for e in range(2)]
    assert [st for st, _ in s["metrics/kl_z1"]] == ends  # first and last epoch: always
    for i, h in enumerate(run.history):
        rec, kl1, kl2 = (s[f"metrics/{t}"][i][1] for t in ("reconstruction", "kl_z1", "kl_z2"))
        assert kl1 + kl2 > 0
        assert abs(rec - kl1 - kl2 - h["val_elbo"]) < 3.0

    gm = tiny_config(
        model={"kind": "gmvae", "clusters": 10, "latent_dim": 4},
        train={"objective": "trace_enum", "epochs": 1},
    )
    run = pyrovae.fit(gm, tmp_path / "gm", progress=False, figures=False)
    s = tb_scalars(run.dir)
    (_, acc), = s["metrics/cluster_accuracy"]
    (_, used), = s["metrics/clusters_used"]
    assert 0.0 < acc <= 1.0 and 1 <= used <= 10
    # the same figure as the model gives on the parts points (cluster assignment is the
    # argmax of q(c|x), no draw): the logger scored the validation points with their labels
    x, y = run.data.x_val[:256], run.data.y_val[:256]
    assert acc == pytest.approx(run.model.metrics(x, y)["cluster_accuracy"], abs=1e-6)


def test_evaluate_keeps_its_log_likelihood_for_compare(tmp_path, capsys):
    """`evaluate --iwae-samples K` keeps its estimate in metrics.json, which `compare` shows as
    the test NLL; a smaller K does not replace a larger one; `--no-record` and a folder
    locked by a running fit leave metrics.json byte for byte as it was."""
    from pyrovae.runs import RunLock
    from pyrovae.workflow import compare_runs

    run = pyrovae.fit(tiny_config(), tmp_path / "r", progress=False, figures=False).dir
    metrics = run / "metrics.json"
    assert compare_runs([run])[0]["test_nll"] is None
    rc, out, err = cli(capsys, "evaluate", run, "--json", "--iwae-samples", "20")
    assert rc == 0, err
    ll = json.loads(out)["log_likelihood"]
    assert "recorded in" in err and "K=20" in err
    stored = json.loads(metrics.read_text())
    assert stored["log_likelihood"] == ll and stored["log_likelihood_samples"] == 20
    assert "history" in stored and stored["test_elbo"] is not None  # the rest kept
    assert compare_runs([run])[0]["test_nll"] == pytest.approx(-ll)
    rc, out, _ = cli(capsys, "compare", run)
    assert rc == 0 and f"{-ll:.2f}" in out

    before = metrics.read_bytes()
    rc, _, err = cli(capsys, "evaluate", run, "--iwae-samples", "5")
    assert rc == 0 and "not recorded" in err and "K=20" in err
    rc, _, err = cli(capsys, "evaluate", run, "--iwae-samples", "30", "--no-record")
    assert rc == 0 and "recorded" not in err
    with RunLock(run):  # a fit writing the folder
        rc, _, err = cli(capsys, "evaluate", run, "--iwae-samples", "30")
    assert rc == 0 and "not recorded" in err and "in use by another pyrovae process" in err
    assert metrics.read_bytes() == before
