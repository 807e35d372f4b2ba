// MathJax 3 configuration for pymdownx.arithmatex (generic mode).
//
// MathJax itself is served with the site: `make` installs the npm package mathjax@3.2.2
// (package.json) and copies its unmodified es5/tex-svg-full.js (Apache-2.0, with its LICENSE)
// to docs/assets/vendor/mathjax/, which is not committed. It is one self-contained file: every TeX extension is built in (nothing is autoloaded)
// and SVG output needs no font files, so formulas render with no network at all.
// mkdocs.yml loads this file first, then the MathJax file.
window.MathJax = {
  tex: {
    // \( \) and \[ \] from arithmatex; $ and $$ in the notebooks' Markdown cells
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  svg: {
    fontCache: "global",
  },
  options: {
    // Skip every element with a class (and all inside it) except the formulas' own: arithmatex
    // spans, and the notebooks' Markdown cells (whose <p>, <li> have no class, so they inherit
    // "process"; ".*|" would also match class-less elements and skip them).
    ignoreHtmlClass: ".+",
    processHtmlClass: "arithmatex|jp-MarkdownOutput",
  },
};

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
