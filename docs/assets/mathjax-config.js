// MathJax 3 configuration for pymdownx.arithmatex (generic mode), plus its loader.
//
// The site *builds* offline: mkdocs fetches nothing. To *render* formulas the browser loads
// MathJax from MATHJAX_SRC; without a network, formulas stay readable as their TeX source.
// To serve MathJax with the site instead, copy MathJax 3's `es5/` folder (npm package
// `mathjax@3`) to docs/assets/vendor/mathjax/ and point MATHJAX_SRC at its tex-mml-chtml.js.
const MATHJAX_SRC = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js";

window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

(function loadMathJax() {
  if (document.getElementById("MathJax-script")) return;
  const script = document.createElement("script");
  script.id = "MathJax-script";
  script.async = true;
  script.src = MATHJAX_SRC;
  document.head.appendChild(script);
})();

// Re-typeset after mkdocs-material's instant navigation swaps the page content.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && window.MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
