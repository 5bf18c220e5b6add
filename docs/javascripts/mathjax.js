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

// Typesetting is left to Material's document$, which emits for the first page and for each
// page instant navigation swaps in. (Typesetting at startup as well, then clearing the
// cache on the first emission, would drop the glyphs' styles and leave every formula blank.)
window.MathJax.startup = { typeset: false };
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    MathJax.startup.promise.then(() => {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      return MathJax.typesetPromise();
    });
  });
}
