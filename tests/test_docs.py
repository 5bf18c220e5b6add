"""The documentation pages keep their promises: these tests read files, not behaviour.

* the formulas are LaTeX that the site typesets (pymdownx.arithmatex, MathJax served by the
  site itself), not Unicode math in code blocks;
* no install line tells a reader to install minilora from a package index it is not on.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Characters that only a formula uses: in a code block they mean math written as text.
MATH_CHARACTERS = set("ᵀΣ√²³∂δσμλ≤≥≪⊙‖∞Δ∑\u0302")  # U+0302: the hat of x̂, ĝ
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """Each fenced code block of a Markdown text: its language, its body and its first line."""
    return [(m[1], m[2], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def math_in_code_blocks(text: str, skip=("text", "console")) -> list[str]:
    """The code blocks that hold Unicode math, but for those in a language of ``skip`` (a
    program's output prints what it prints)."""
    return [
        f"line {line}: {body.splitlines()[0]!r}"
        for language, body, line in code_blocks(text)
        if language not in skip and MATH_CHARACTERS & set(body)
    ]


def test_the_math_page_writes_its_formulas_in_latex():
    text = (DOCS / "math.md").read_text()
    assert math_in_code_blocks(text) == []
    # what is left in code blocks is code: the few Python snippets
    assert {language for language, _, _ in code_blocks(text)} == {"python"}
    displays = re.findall(r"^\$\$\n(.*?)\n\$\$$", text, re.S | re.M)
    assert len(displays) >= 50, len(displays)
    assert sum("\\begin{aligned}" in d for d in displays) >= 30


def test_no_page_writes_math_in_a_code_block():
    """Formulas are typeset on every page; a Python snippet's comments may quote the code's."""
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) > 10
    skip = ("text", "console", "python")
    offenders = {
        page.name: found for page in pages if (found := math_in_code_blocks(page.read_text(), skip))
    }
    assert offenders == {}


def test_the_math_check_can_fail():
    assert math_in_code_blocks("```\ndx = g @ Wᵀ\n```\n")
    assert math_in_code_blocks("```python\n# y = Σ_i x_i\n```\n")
    assert not math_in_code_blocks("```text\nscaling α/√r  ok\n```\n")  # a program's output
    assert not math_in_code_blocks("```python\n# y = Σ_i x_i\n```\n", skip=("python",))


def test_the_site_typesets_latex_with_its_own_mathjax():
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^  - pymdownx\.arithmatex:\n      generic: true$", config, re.M)
    scripts = re.search(r"^extra_javascript:\n((?:  - .*\n)+)", config, re.M)[1].split()
    assert scripts[1::2] == ["javascripts/mathjax.js", "javascripts/mathjax/tex-chtml.js"]
    assert "://" not in "".join(scripts)  # served by the site, not a CDN
    assert (DOCS / "javascripts" / "mathjax.js").is_file()  # the configuration; the hooks copy
    hooks = (DOCS / "hooks.py").read_text()  # MathJax itself from the docs extra
    assert '"tex-chtml.js"' in hooks and "javascripts/mathjax/" in hooks
    assert "django-static-mathjax" in (ROOT / "pyproject.toml").read_text()


# An install of the package by name: `pip install minilora`, `pip install 'minilora[gpu]'`,
# `"minilora[text]"`; not `pip install -e ".[gpu]"` or `"minilora @ git+https://..."`.
FROM_AN_INDEX = re.compile(
    r"""pip install(?:\s+--?[\w-]+)*\s+["']?minilora(?:\[[\w,]+\])?["']?(?!\s*@)(?:[\s`)"']|$)"""
)


def install_lines_from_an_index(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if FROM_AN_INDEX.search(line)]


def test_no_install_line_names_a_package_index():
    paths = [ROOT / "README.md", *DOCS.glob("*.md"), *(ROOT / "minilora").rglob("*.md")]
    paths += [*(ROOT / "minilora").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    paths += [*(ROOT / "examples").glob("*.py")]
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in paths
        if (found := install_lines_from_an_index(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_the_install_check_can_fail():
    for bad in [
        "pip install minilora",
        "pip install 'minilora[gpu]'        # adds cupy",
        '(`pip install "minilora[text]"`)',
        "pip install minilora cupy-cuda11x",
        "pip install -U minilora",
        "_INSTALL = \"pip install 'minilora[hub]'\"",
    ]:
        assert install_lines_from_an_index(bad), bad
    for good in [
        'python3 -m venv .venv && .venv/bin/pip install ".[plots]" && .venv/bin/minilora demo',
        'pip install -e ".[gpu]"',
        '- run: pip install "minilora @ git+https://github.com/OWNER/minilora"',
        "/autograder/venv/bin/pip install -q /autograder/source/minilora-src",
        'pip install ".[plots]" && time minilora demo --out /tmp/demo_full',
        '(pip install -e ".[gpu]" in a clone of minilora)',
    ]:
        assert not install_lines_from_an_index(good), good
