// MathJax 3's settings, read by javascripts/mathjax/tex-chtml.js (served from this site, see
// docs/hooks.py). pymdownx.arithmatex (generic mode) wraps the pages' LaTeX in
// <span class="arithmatex">\( ... \)</span> and <div class="arithmatex">\[ ... \]</div>, and
// docs/hooks.py wraps the notebooks' $...$ and $$...$$ the same way. Only those elements are
// typeset, so a dollar sign anywhere else (a shell prompt, a price) stays text.
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

// Material's instant navigation swaps pages without reloading: typeset each new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
