"""Every lesson notebook runs top to bottom (small-data setting) and its exercises check out.

The notebooks are the jupytext sources `docs/lessons/notebooks/lesson*.py`; each is converted in
memory and executed in a fresh kernel with `PYROVAE_SMOKE=1` (a few seconds each) and
`PYROVAE_CHECK_SOLUTIONS=1` (each exercise cell checks the reference answer and raises if the
check fails). Any cell that raises fails the test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "lessons" / "notebooks").glob("lesson*.py"))


#: lessons taught by a notebook alone (no `examples/` script, no `pyrovae.teaching` module)
NOTEBOOK_ONLY = {"lesson8", "lesson9"}


def test_one_notebook_per_lesson():
    lessons = {p.stem.split("_")[0] for p in (ROOT / "examples").glob("lesson*_*.py")}
    stems = [p.stem.split("_")[0] for p in NOTEBOOKS]
    assert len(stems) == len(set(stems)), "two notebooks for one lesson"
    assert set(stems) == lessons | NOTEBOOK_ONLY


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PYROVAE_SMOKE", "1")
    monkeypatch.setenv("PYROVAE_CHECK_SOLUTIONS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel imports this checkout's pyrovae whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = jupytext.read(path)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    asked = re.findall(r'^check\("(\d\.\d)"', "".join(c.source + "\n" for c in nb.cells), re.M)
    assert 2 <= len(asked) <= 3
    for name in asked:
        assert f"exercise {name}: reference answer checked" in text
    figures = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert figures, "the notebook shows no figure"
