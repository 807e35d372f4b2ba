"""The documentation builds offline with ``mkdocs build --strict`` (no warnings allowed), and the
numbers on the lesson pages are the ones the current code gives."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
from conftest import LESSON_ARGS, LESSON_PAGES, assert_png, lesson_result

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(docs_site):
    site = docs_site
    for page in LESSON_PAGES:
        html = (site / "lessons" / page / "index.html").read_text(encoding="utf-8")
        assert "arithmatex" in html  # the derivations' math went through arithmatex
        assert "<table>" in html  # the generated numbers were included
        assert "FAILS" not in html  # no generated claim line reports a failure
    lesson4 = (site / "lessons" / "lesson4-information-kl" / "index.html").read_text(
        encoding="utf-8"
    )
    assert (
        "0.082283" in lesson4 and "0.087177" in lesson4
    )  # KL(p||q), KL(q||p) of the worked example
    for fig in (
        "lesson1_linear_ae_pca.png",
        "lesson2_deep_vs_linear.png",
        "lesson3_overcomplete.png",
        "lesson4_information_kl.png",
        "lesson5_intractable.png",
        "lesson6_vi_identity.png",
        "lesson7_ae_vs_vae.png",
    ):
        assert_png(site / "assets" / "lessons" / fig, min_size=(800, 300))
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for obj in ("pyrovae.VAE", "pyrovae.fit", "pyrovae.evaluate.log_likelihood", "pyrovae.data"):
        assert f'id="{obj}"' in api  # mkdocstrings rendered the reference
    # MathJax is served with the site, never fetched from a CDN
    assert (site / "assets" / "vendor" / "mathjax" / "tex-svg-full.js").stat().st_size > 1_000_000
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "cdn.jsdelivr" not in text and "mathjax@3" not in text, html
    assert not (site / "gen_lessons.py").exists()
    assert not (site / "griffe_rst.py").exists()
    # docstrings are Markdown: no Sphinx role reaches the page
    assert ":math:" not in api and ":class:" not in api
    blocks = {
        "priors": ("StandardNormal", "LearnedNormal", "GaussianMixture", "VampPrior", "FlowPrior"),
        "likelihoods": (
            "Bernoulli",
            "ContinuousBernoulli",
            "Normal",
            "Laplace",
            "Poisson",
            "NegativeBinomial",
        ),
    }
    for page, classes in blocks.items():
        html = (site / page / "index.html").read_text(encoding="utf-8")
        for cls in classes:
            assert f'id="pyrovae.{page}.{cls}"' in html
    for page in ("getting-started", "building-blocks", "diagnostics", "reliability", "benchmarks"):
        assert (site / page / "index.html").exists()
    assert not (site / "gen_lessons.py").exists()
    assert not (site / "griffe_rst.py").exists()


def _gen_lessons(where: Path):
    """A copy of docs/gen_lessons.py in `where`/docs, as a module: it writes its figures under
    `where` (its paths follow its own location), never over the committed ones."""
    script = where / "docs" / "gen_lessons.py"
    script.parent.mkdir(parents=True)
    script.write_text((ROOT / "docs" / "gen_lessons.py").read_text(encoding="utf-8"))
    spec = importlib.util.spec_from_file_location("gen_lessons", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def _normalized(text: str) -> str:
    """A generated page with what may differ between two correct runs made equal: measured
    times (lesson 5's cost of the grid) and round-off-level numbers (|v| < 1e-9, such as a
    "max |difference| = 1.1e-14" that is 7.1e-15 after any change in the order of float64
    operations). Every other number must match digit for digit."""
    text = re.sub(r"measured [\d.]+ µs", "measured T µs", text)
    text = re.sub(r"\| [\d.e+-]+ s \|", "| T s |", text)

    def tiny(m: re.Match) -> str:
        return "~0" if abs(float(m.group().replace(",", ""))) < 1e-9 else m.group()

    return _NUMBER.sub(tiny, text)


@pytest.mark.parametrize("name", sorted(LESSON_ARGS))
def test_generated_lesson_pages_hold_what_the_code_gives(name, tmp_path, monkeypatch):
    """Regenerate the lesson's snippet with docs/gen_lessons.py (a copy in a temporary folder,
    so the figure goes there) and compare it with the committed docs/lessons/_generated page. The lesson itself is
    computed once per session (`conftest.lesson_result`, shared with the teaching tests); the
    lesson function gen_lessons calls is replaced by one that checks gen_lessons asks for
    exactly those arguments and returns that result."""
    gen = _gen_lessons(tmp_path)
    gen.FIGURES.mkdir(parents=True)
    result = lesson_result(name)
    module_name, fn_name, kwargs = LESSON_ARGS[name]
    module = importlib.import_module(f"pyrovae.teaching.{module_name}")
    real = getattr(module, fn_name)
    signature = inspect.signature(real)
    want = signature.bind(**kwargs)
    want.apply_defaults()
    calls = []

    def cached(*args, **kw):
        got = signature.bind(*args, **kw)
        got.apply_defaults()
        assert got.arguments == want.arguments, "gen_lessons runs the lesson with other arguments"
        calls.append(got.arguments)
        return result

    monkeypatch.setattr(module, fn_name, cached)
    text = gen.HEADER + gen.LESSONS[name]()
    assert len(calls) == 1
    committed = (ROOT / "docs" / "lessons" / "_generated" / f"{name}.md").read_text(
        encoding="utf-8"
    )
    if _normalized(text) != _normalized(committed):
        diff = difflib.unified_diff(
            committed.splitlines(), text.splitlines(), "committed", "regenerated", lineterm=""
        )
        pytest.fail(
            f"docs/lessons/_generated/{name}.md is out of date (rerun docs/gen_lessons.py "
            f"{name}):\n" + "\n".join(list(diff)[:40])
        )
    assert "FAILS" not in text  # every claim line holds
    (figure,) = gen.FIGURES.glob("*.png")
    committed_figure = ROOT / "docs" / "assets" / "lessons" / figure.name
    from PIL import Image

    with Image.open(figure) as new, Image.open(committed_figure) as old:
        assert new.size == old.size
    assert_png(figure, min_size=(800, 300))
