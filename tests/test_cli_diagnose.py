"""End to end: ``pyrovae diagnose`` on tiny digits runs (VAE and AE), JSON and HTML report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from pyrovae.cli import main


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    import pyrovae

    out = tmp_path_factory.mktemp("runs") / "ae"
    return pyrovae.fit(
        tiny_config(model={"kind": "ae"}, train={"epochs": 1}), out, progress=False, figures=False
    )


def test_diagnose_vae_json_and_report_with_defaults(digits_run, tmp_path, capsys):
    report = tmp_path / "report.html"
    assert main(["diagnose", str(digits_run.dir), "--json", "--report", str(report)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "vae" and r["split"] == "test" and r["points"] == 64
    ll, d = r["log_likelihood"], r["decomposition"]
    assert ll["samples"] == 1000 and 0.05 < ll["se"] < 0.5
    # IWAE(1000) above the ELBO by the trained run's gap (measured 0.33 nats with 100 particles)
    assert 0.1 < ll["mean"] - r["elbo"]["mean"] < 1.0, (ll["mean"], r["elbo"]["mean"])
    assert d["mutual_information"] <= d["log_n"] + 1e-9 and 0 <= d["active_units"] <= 2
    assert len(d["kl_per_dim"]) == 2 and d["kl_method"].startswith("analytic")
    assert (
        r["nuts"]["chains"] == 4 and len(r["nuts"]["points"]) == 4 and r["nuts"]["max_rhat"] < 1.2
    )
    assert r["amortization"]["points"] == 50
    assert set(r["verdicts"]) == {"collapse", "psis", "bound", "nuts", "amortization"}
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert (
        len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page))
        == 5  # latent usage, k-hat, NUTS overlay, q-vs-NUTS comparison, gaps
    )
    assert not re.search(r'(src|href)="https?:', page)  # self-contained: opens from disk
    assert f"{ll['mean']:.3f}" in page and f"{d['kl']:.3f}" in page
    assert "ELBO decomposition" in page and "NUTS" in page and "amortization gap" in page
    # the per-point NUTS table (points x dims rows) is folded away under its figure
    folded = re.search(r"<details><summary>the (\d+) \(point, dimension\) rows</summary><table>", page)
    assert folded and int(folded[1]) == 4 * 2
    assert page.index('alt="q against NUTS, every point and dimension"') < folded.start()
    # every verdict links to the section of the report that explains it, and names the docs
    for section in ("decomposition", "psis", "nuts", "amortization"):
        assert f"<h2 id='{section}'>" in page and f"href='#{section}'" in page
    assert page.count("docs: <code>docs/diagnostics.md#") == 5


def test_report_links_verdicts_to_a_built_docs_site(digits_run, tmp_path):
    """With --docs-url every verdict links to its section of the Diagnostics page, and those
    anchors exist in docs/diagnostics.md."""
    report = tmp_path / "r.html"
    args = ["diagnose", str(digits_run.dir), "--report", str(report), "--points", "0"]
    assert main([*args, "--gap-points", "0", "--docs-url", "file:///docs/site"]) == 0
    links = re.findall(r"href='file:///docs/site/diagnostics/#([\w-]+)'", report.read_text())
    assert sorted(links) == ["elbo-decomposition", "log-likelihood-iwae-bound", "psis-khat"]
    source = (Path(__file__).resolve().parents[1] / "docs" / "diagnostics.md").read_text()
    for anchor in ("elbo-decomposition", "log-likelihood-iwae-bound", "psis-khat", "gold-standard-nuts", "gaps"):
        assert "{ #" + anchor + " }" in source


def test_diagnose_text_output_and_skips(digits_run, capsys):
    args = [
        "diagnose",
        str(digits_run.dir),
        "--points",
        "0",
        "--gap-points",
        "0",
        "--iwae-samples",
        "50",
        "--khat-samples",
        "50",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "log-likelihood (IWAE K=50)" in out and "active units" in out and "- collapse:" in out
    assert "NUTS" not in out and "gaps:" not in out


def test_diagnose_autoencoder(ae_run, tmp_path, capsys):
    report = tmp_path / "ae.html"
    assert main(["diagnose", str(ae_run.dir), "--json", "--report", str(report)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "ae" and len(r["code_variance"]) == 2 and r["reconstruction_error"] > 0
    assert "not defined" in r["not_applicable"] and "log_likelihood" not in r
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 1 and "no prior p(z)" in page


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--iwae-samples", "0"], "--iwae-samples must be at least 1"),
        (["--report", "report.txt"], "expected a file name ending in .html"),
    ],
)
def test_diagnose_rejects_bad_options(digits_run, capsys, extra, message):
    assert main(["diagnose", str(digits_run.dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyrovae: error:") and message in err


def test_diagnose_missing_run_folder(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_console_script_lists_diagnose():
    exe = Path(sys.executable).with_name("pyrovae")
    if not exe.exists():
        pytest.skip("pyrovae console script not installed in this environment")
    out = subprocess.run(
        [str(exe), "diagnose", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--iwae-samples" in out.stdout and "--report" in out.stdout
