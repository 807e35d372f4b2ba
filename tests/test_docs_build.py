"""The documentation builds offline with ``mkdocs build --strict`` (no warnings allowed)."""

from __future__ import annotations


def test_mkdocs_build_strict(docs_site):
    site = docs_site
    lessons = (
        "lesson1-linear-ae-pca",
        "lesson2-deep-vs-linear",
        "lesson3-overcomplete",
        "lesson4-information-kl",
        "lesson5-intractable",
        "lesson6-vi-identity",
        "lesson7-ae-vs-vae",
    )
    for page in lessons:
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
        assert (site / "assets" / "lessons" / fig).stat().st_size > 10_000
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for obj in ("pyrovae.VAE", "pyrovae.fit", "pyrovae.evaluate.log_likelihood", "pyrovae.data"):
        assert f'id="{obj}"' in api  # mkdocstrings rendered the reference
    # Sphinx roles in docstrings are rewritten as Markdown (docs/griffe_rst.py)
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
    # MathJax is served with the site, never fetched from a CDN
    assert (site / "assets" / "vendor" / "mathjax" / "tex-svg-full.js").stat().st_size > 1_000_000
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "cdn.jsdelivr" not in text and "mathjax@3" not in text, html
    assert not (site / "gen_lessons.py").exists()
    assert not (site / "griffe_rst.py").exists()
