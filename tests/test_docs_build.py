"""The documentation builds offline with ``mkdocs build --strict`` (no warnings allowed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=tmp_path,  # the config must not depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("lesson1-linear-ae-pca", "lesson4-information-kl", "lesson6-vi-identity"):
        html = (site / "lessons" / page / "index.html").read_text(encoding="utf-8")
        assert "arithmatex" in html  # the derivations' math went through arithmatex
        assert "<table>" in html  # the generated numbers were included
    lesson4 = (site / "lessons" / "lesson4-information-kl" / "index.html").read_text(
        encoding="utf-8"
    )
    assert (
        "0.082283" in lesson4 and "0.087177" in lesson4
    )  # KL(p||q), KL(q||p) of the worked example
    for fig in (
        "lesson1_linear_ae_pca.png",
        "lesson4_information_kl.png",
        "lesson6_vi_identity.png",
    ):
        assert (site / "assets" / "lessons" / fig).stat().st_size > 10_000
    assert (site / "api" / "index.html").exists()
    assert not (site / "gen_lessons.py").exists()
