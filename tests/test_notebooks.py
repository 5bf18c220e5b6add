"""The teaching notebooks are stored executed and shaped as lessons.

pytest *executes* every notebook through nbmake (``--nbmake`` and ``testpaths`` in
pyproject.toml; notebooks/conftest.py selects the quick mode), without writing anything back.
These tests check what running them cannot: that they are stored with the outputs of a full run
(``python notebooks/regenerate.py``: the repository's web page and the documentation site show
those), use the ``python3`` kernel, open with what the reader will learn and a cell that installs
minilora where it is missing, end with exercises, and import minilora instead of copying it.
"""

import inspect
import os
import re
import runpy
from pathlib import Path

import nbformat
import pytest

import minilora
from minilora import autograd, backend, data, functional, gradcheck, lora, model, nn, optim, train
from minilora.experiments import demo
from minilora.interop import model_files, peft_adapters, peft_config, safetensors_files
from minilora.study import accounting, analysis

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# The one place a notebook names the repository: its install cell (the first code cell) pip
# installs minilora from there in a fresh Colab or Binder.
REPOSITORY = re.compile(r'^MINILORA_REPOSITORY = "([^"]+)"$', re.M)
# A formula typed in Unicode inside a markdown cell's code span or indented code block: the site,
# GitHub and Jupyter typeset LaTeX (docs/hooks.py), not that.
_SYMBOLS = "ᵀ√≈εσΣ⊙−²ΔφΦ‖∈≤≥×·∝→₀₁₂ᵢⱼ"
UNICODE_MATH = re.compile(rf"`[^`\n]*[{_SYMBOLS}][^`\n]*`|^    .*[{_SYMBOLS}].*$", re.M)
EXPECTED = [
    "01_autograd.ipynb",
    "02_transformer.ipynb",
    "03_lora_layer.ipynb",
    "04_lora_vs_full.ipynb",
    "05_scaling_on_paper.ipynb",
    "06_gpu.ipynb",
    "07_relatives.ipynb",
    "08_compression.ipynb",
    "09_what_lora_learns.ipynb",
]
MODULES = (
    minilora,
    accounting,
    analysis,
    autograd,
    backend,
    data,
    demo,
    functional,
    gradcheck,
    lora,
    model,
    model_files,
    nn,
    optim,
    peft_adapters,
    peft_config,
    safetensors_files,
    train,
)
# Public functions and classes of minilora: a notebook that defines one of these names is
# copying the library instead of importing it.
LIBRARY_NAMES = {
    name
    for module in MODULES
    for name, obj in vars(module).items()
    if not name.startswith("_")
    and (inspect.isfunction(obj) or inspect.isclass(obj))
    and obj.__module__.startswith("minilora")
}


def notebook_problems(nb) -> list[str]:
    """Everything wrong with a notebook as stored in git (an empty list when it is fine)."""
    problems = []
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec name is {kernel!r}, expected 'python3'")
    problems += output_problems(nb)
    cells = nb.cells
    first = cells[0] if cells else None
    if first is None or first.cell_type != "markdown" or "What you will learn" not in first.source:
        problems.append("the first cell must be markdown with a 'What you will learn' section")
    last = cells[-1] if cells else None
    if (
        last is None
        or last.cell_type != "markdown"
        or not re.search(r"^#+ +Exercises", last.source, re.M)
    ):
        problems.append("the last cell must be markdown with an '## Exercises' section")
    code_cells = [cell for cell in cells if cell.cell_type == "code"]
    if not code_cells or not REPOSITORY.search(code_cells[0].source):
        problems.append("the first code cell must install minilora from MINILORA_REPOSITORY")
    code = "\n".join(cell.source for cell in code_cells[1:])  # the lesson, after the install
    if not re.search(r"^\s*(import minilora|from minilora)", code, re.M):
        problems.append("no code cell imports minilora")
    if "MINILORA_QUICK" not in code:
        problems.append("the notebook never reads MINILORA_QUICK (the test suite's quick mode)")
    copied = sorted(set(re.findall(r"^\s*(?:def|class) +(\w+)", code, re.M)) & LIBRARY_NAMES)
    if copied:
        problems.append(f"defines {copied}, which minilora already provides: import them")
    text = "\n".join(cell.source for cell in cells if cell.cell_type == "markdown")
    unicode_math = sorted(set(UNICODE_MATH.findall(text)))
    if unicode_math:
        problems.append(f"math in code, not LaTeX ($...$, $$...$$): {unicode_math}")
    return problems


def output_problems(nb) -> list[str]:
    """What is missing from the stored outputs of a full run, cell by cell."""
    problems = []
    code = [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    for n, (i, cell) in enumerate(code, start=1):
        if cell.get("execution_count") != n:
            problems.append(
                f"cell {i} has execution_count {cell.get('execution_count')}, expected {n} "
                "(run python notebooks/regenerate.py)"
            )
        errors = [out.get("ename") for out in cell.get("outputs", ()) if out.output_type == "error"]
        if errors:
            problems.append(f"cell {i} stored an error output {errors}")
    outputs = [out for _, cell in code for out in cell.get("outputs", ())]
    if any("plt." in cell.source for _, cell in code) and not any(
        "image/png" in out.get("data", {}) for out in outputs
    ):
        problems.append("the notebook plots, but no figure (image/png output) is stored")
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    if "quick mode: False" not in printed:
        problems.append("no output says 'quick mode: False': store a full run, not a quick one")
    return problems


def read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_the_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_stored_clean_and_shaped_as_a_lesson(name):
    nb = read(name)
    nbformat.validate(nb)
    assert notebook_problems(nb) == []


@pytest.mark.parametrize("name", EXPECTED[:3])
def test_the_notebooks_that_teach_the_ops_run_on_them(name):
    """Notebooks 1-3 read functional.py's ops: their setup cell turns the fast path off."""
    setup = [c for c in read(name).cells if c.cell_type == "code"][1]  # after the install cell
    assert 'ml.set_ops("reference")' in setup.source


def test_every_notebook_installs_minilora_from_the_repository():
    """The same install cell opens every notebook, with the URL pyproject.toml and the README
    give, and it installs only where ``import minilora`` fails."""
    cells = {name: [c for c in read(name).cells if c.cell_type == "code"][0] for name in EXPECTED}
    first = cells[EXPECTED[0]].source
    assert all(cell.source == first for cell in cells.values())
    assert "except ImportError:" in first and "git+{MINILORA_REPOSITORY}" in first
    url = REPOSITORY.search(first).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^Repository = "{re.escape(url)}"$', pyproject, re.M), url
    assert url in (ROOT / "README.md").read_text()


def _clear_outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def _run_out_of_order(nb):
    [c for c in nb.cells if c.cell_type == "code"][-1].execution_count = 99
    return nb


def _an_error(nb):
    cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    cell.outputs.append(
        nbformat.v4.new_output("error", ename="ValueError", evalue="", traceback=[])
    )
    return nb


def _no_figure(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if "image/png" not in o.get("data", {})]
    return nb


def _quick_run(nb):
    for cell in nb.cells:
        for out in cell.get("outputs", ()):
            if out.output_type == "stream":
                out.text = out.text.replace("quick mode: False", "quick mode: True")
    return nb


def _unicode_math(nb):
    nb.cells[-1].source += "\n\nThe update is `ΔW = s B A`."
    return nb


def _no_install_cell(nb):
    install = next(c for c in nb.cells if c.cell_type == "code")
    install.source = install.source.replace("MINILORA_REPOSITORY", "URL")
    return nb


def _other_kernel(nb):
    nb.metadata["kernelspec"]["name"] = "minilora-venv"
    return nb


def _no_intro(nb):
    nb.cells = nb.cells[1:]
    return nb


def _no_exercises(nb):
    nb.cells[-1].source = nb.cells[-1].source.replace("Exercises", "Homework")
    return nb


def _copies_an_op(nb):
    nb.cells.insert(2, nbformat.v4.new_code_cell("def lora_linear(x, W, b, A, B, s):\n    pass"))
    return nb


def _no_import(nb):
    imports = re.compile(r"^(import minilora|from minilora).*$", re.M)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = imports.sub("", cell.source)
    return nb


def _no_quick_mode(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = cell.source.replace("MINILORA_QUICK", "SOMETHING_ELSE")
    return nb


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (_clear_outputs, "execution_count None"),
        (_run_out_of_order, "execution_count 99"),
        (_an_error, "error output"),
        (_no_figure, "no figure"),
        (_quick_run, "quick mode: False"),
        (_no_install_cell, "install minilora"),
        (_unicode_math, "ΔW = s B A"),
        (_other_kernel, "kernelspec"),
        (_no_intro, "What you will learn"),
        (_no_exercises, "Exercises"),
        (_copies_an_op, "lora_linear"),
        (_no_import, "imports minilora"),
        (_no_quick_mode, "MINILORA_QUICK"),
    ],
)
def test_the_checker_flags_a_spoiled_notebook(tmp_path, spoil, expected):
    """Each rule can fail: spoil a copy of a real notebook, write it, read it back."""
    path = tmp_path / "spoiled.ipynb"
    nbformat.write(spoil(read(EXPECTED[2])), path)
    problems = notebook_problems(nbformat.read(path, as_version=4))
    assert any(expected in p for p in problems), problems


def test_the_suite_executes_the_notebooks_in_quick_mode(monkeypatch, pytestconfig):
    text = (ROOT / "pyproject.toml").read_text()
    ini = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^testpaths *= *\[[^\]]*"notebooks"', ini, re.M), ini
    # nbmake is part of the dev extra, and tests/conftest.py turns it on; it must not write the
    # quick runs' outputs over the stored full ones (its --overwrite)
    assert pytestconfig.pluginmanager.hasplugin("nbmake") and pytestconfig.option.nbmake
    assert not pytestconfig.option.overwrite
    # notebooks/conftest.py sets the quick mode for the kernels it starts, unless the caller
    # chose a mode already
    monkeypatch.delenv("MINILORA_QUICK", raising=False)
    runpy.run_path(str(NOTEBOOKS / "conftest.py"))
    assert os.environ["MINILORA_QUICK"] == "1"
    monkeypatch.setenv("MINILORA_QUICK", "0")
    runpy.run_path(str(NOTEBOOKS / "conftest.py"))
    assert os.environ["MINILORA_QUICK"] == "0"


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for name in EXPECTED:
        assert f"(notebooks/{name})" in readme, name


def _linked_notebooks(markdown: str) -> list[str]:
    """The notebooks a page links to, in the order of their first link."""
    names = re.findall(r"\]\(notebooks/(\d\d_\w+\.ipynb)\)", markdown)
    return list(dict.fromkeys(names))


def test_the_site_shows_every_notebook_in_teaching_order():
    """The home page, the start page and the site's menu list the notebooks in order.

    docs/hooks.py adds notebooks/ to the site and mkdocs-jupyter renders them with their stored
    outputs, so a link to ``notebooks/NN_name.ipynb`` becomes the notebook's page with its
    figures; the build executes nothing (it would take minutes, and quick-mode numbers).
    """
    docs = ROOT / "docs"
    assert _linked_notebooks((docs / "index.md").read_text()) == EXPECTED
    assert _linked_notebooks((docs / "start-here.md").read_text()) == EXPECTED
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    nav = re.findall(r"^ +- (?:[^:\n]+: )?notebooks/(\S+\.ipynb)$", mkdocs, re.M)
    assert nav == EXPECTED
    plugin = mkdocs.split("- mkdocs-jupyter:", 1)[1].split("\n  - ", 1)[0]
    assert re.search(r"^ +execute: false\b", plugin, re.M), plugin


def test_the_order_check_can_fail():
    out_of_order = "".join(f"[n](notebooks/{name}) " for name in reversed(EXPECTED))
    assert _linked_notebooks(out_of_order) != EXPECTED


# Sentences of the notebooks' text that quote numbers a cell prints: the notebook, the sentence
# with a format field per number, a pattern of the stored output whose groups are the printed
# numbers, and the unit the sentence counts in (the output's, divided by ``scale``). A full run
# that moves a number fails here until the sentence follows it (python notebooks/regenerate.py).
CLAIMS = [
    (
        "04_lora_vs_full.ipynb",
        "into {:.0f} to {:.0f} of them",
        r"r=64 : 90% of ‖ΔW‖² in (\d+) to (\d+) ",
        1,
    ),
    (
        "04_lora_vs_full.ipynb",
        "it needs {:.0f} to {:.0f} of the 64 directions for 90%",
        r"full : 90% of ‖ΔW‖² in (\d+) to (\d+) ",
        1,
    ),
    (
        "04_lora_vs_full.ipynb",
        "(90% of it in {:.0f} to {:.0f} of 64 directions)",
        r"full : 90% of ‖ΔW‖² in (\d+) to (\d+) ",
        1,
    ),
    (
        "04_lora_vs_full.ipynb",
        "misses {:.0f}% to {:.0f}% of its norm",
        r"rank-4 approximation misses (\d+)% to (\d+)%",
        1,
    ),
    ("04_lora_vs_full.ipynb", "({:.0f}% of the held-out examples", r"(?m)^ +r=4 .* ([\d.]+)%$", 1),
    ("04_lora_vs_full.ipynb", "against {:.0f}% in the full run", r"(?m)^ +full .* ([\d.]+)%$", 1),
    ("04_lora_vs_full.ipynb", "where rank 8 reaches {:.0f}%", r"(?m)^ +r=8 .* ([\d.]+)%$", 1),
    (
        "04_lora_vs_full.ipynb",
        "the pretraining tasks fail too ({:.0f}% in the full run)",
        r"adapters on: +([\d.]+)%",
        1,
    ),
    (
        "05_scaling_on_paper.ipynb",
        "exactly the {:,.0f} parameters of the released checkpoint",
        r"(?m)^gpt2-small(?: +\d+){5} +([\d,]+)",
        1,
    ),
    (
        "05_scaling_on_paper.ipynb",
        "at two bytes each {:.1f} MB, which is {:.1f} MiB",
        r"\(([\d,]+) bytes of tensors\)[\s\S]*= ([\d.]+) MiB",
        (1e6, 1),
    ),
    (
        "05_scaling_on_paper.ipynb",
        "two moments give {:.2f} TB; adding the gradients gives {:.2f} TB",
        r"([\d.]+) TB weights \+ moments; ([\d.]+) TB with gradients",
        1,
    ),
    (
        "05_scaling_on_paper.ipynb",
        "LoRA removes {:.1f}% of a step's matrix-product FLOPs",
        r"([\d.]+)% fewer FLOPs per step",
        1,
    ),
    (
        "05_scaling_on_paper.ipynb",
        "against {:.0f} GB for a full copy",
        r"\(sec\. 4\.2\) +([\d.]+) GB",
        1,
    ),
    (
        "05_scaling_on_paper.ipynb",
        "LoRA r=4 on q and v trains {:.1f}M parameters",
        r"trainable, LoRA +[\d,]+ +([\d.]+)M",
        1,
    ),
    ("07_relatives.ipynb", "takes a position from an {:.0f}-position", r"context (\d+) -> ", 1),
]


def _text(nb) -> str:
    """The notebook's markdown, with every run of whitespace (line breaks too) as one space."""
    return " ".join(" ".join(c.source for c in nb.cells if c.cell_type == "markdown").split())


def _printed(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", ())
    )


def claim_problem(nb, sentence: str, pattern: str, scale) -> str | None:
    """What is wrong with a sentence's numbers against the notebook's stored output, if anything."""
    found = re.search(pattern, _printed(nb))
    if found is None:
        return f"no stored output matches {pattern!r}"
    scales = scale if isinstance(scale, tuple) else (scale,) * len(found.groups())
    numbers = [float(g.replace(",", "")) / s for g, s in zip(found.groups(), scales, strict=True)]
    expected = sentence.format(*numbers)
    if expected not in _text(nb):
        return f"the text should say {expected!r} (from the output {found.group(0)!r})"
    return None


@pytest.mark.parametrize("name, sentence, pattern, scale", CLAIMS)
def test_the_text_quotes_the_numbers_the_notebook_prints(name, sentence, pattern, scale):
    assert claim_problem(read(name), sentence, pattern, scale) is None


def test_a_quoted_number_that_the_output_contradicts_is_caught():
    nb = read("05_scaling_on_paper.ipynb")
    (_, sentence, pattern, scale), *_ = (c for c in CLAIMS if "FLOPs" in c[1])
    assert claim_problem(nb, sentence, pattern, scale) is None
    for cell in nb.cells:
        for out in cell.get("outputs", ()):
            if out.output_type == "stream":
                out.text = re.sub(r"[\d.]+% fewer FLOPs", "32.5% fewer FLOPs", out.text)
    assert "32.5%" in claim_problem(nb, sentence, pattern, scale)


def test_the_site_marks_notebook_math_as_arithmatex_does():
    """docs/hooks.py wraps a notebook's $...$ and $$...$$ for the site's math script; code spans
    and the outputs keep their dollars."""
    pytest.importorskip("mkdocs")
    hooks = runpy.run_path(str(ROOT / "docs" / "hooks.py"))
    cell = '<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown" data-mime-type="text/markdown">'
    html = (
        f"{cell}<p>$W_0 x$ and <code>$a$</code></p>\n<p>$$\na &amp;= b\n$$</p></div>"
        '<div class="jp-OutputArea"><pre>$HOME $PATH</pre></div>'
    )
    assert hooks["arithmatex_markup"](html) == (
        f'{cell}<p><span class="arithmatex">\\(W_0 x\\)</span> and <code>$a$</code></p>\n'
        '<p><span class="arithmatex">\\[\na &amp;= b\n\\]</span></p></div>'
        '<div class="jp-OutputArea"><pre>$HOME $PATH</pre></div>'
    )


def test_regenerate_picks_notebooks_and_drops_what_changes_by_itself(tmp_path, monkeypatch):
    """notebooks/regenerate.py (which executes them, so it is not run here): its choice of
    notebooks, what it strips, and its atomic write."""
    regenerate = runpy.run_path(str(NOTEBOOKS / "regenerate.py"))
    chosen = regenerate["select"](["04", "05_scaling_on_paper", "06_gpu.ipynb"])
    assert [path.name for path in chosen] == EXPECTED[3:6]
    assert [path.name for path in regenerate["select"]([])] == EXPECTED
    with pytest.raises(SystemExit, match="'10'"):
        regenerate["select"](["10"])

    nb = read(EXPECTED[0])
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.9"}
    nb.metadata["widgets"] = {"state": {}}
    nb.cells[1].metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    out = nbformat.v4.new_output
    nb.cells[1].outputs = [
        out("stream", name="stdout", text="a\n"),
        out("stream", name="stdout", text="b\n"),
        out("stream", name="stderr", text="c\n"),
        out("display_data", data={"text/plain": "d"}),
        out("stream", name="stderr", text="e\n"),
    ]
    nb = regenerate["strip_volatile"](nb)
    assert [(o.get("name"), o.get("text")) for o in nb.cells[1].outputs] == [
        ("stdout", "a\nb\n"),  # one message, however the kernel cut the printing into messages
        ("stderr", "c\n"),
        (None, None),
        ("stderr", "e\n"),
    ]
    kernelspec = read(EXPECTED[0]).metadata.kernelspec
    assert nb.metadata == {"kernelspec": kernelspec, "language_info": {"name": "python"}}
    assert all("execution" not in cell.metadata for cell in nb.cells)

    path = tmp_path / "n.ipynb"
    regenerate["write_atomically"](nb, path)
    assert nbformat.read(path, as_version=4) == nb
    broken = read(EXPECTED[0])
    broken.cells[0].cell_type = "not a cell type"
    with pytest.raises(nbformat.ValidationError):
        regenerate["write_atomically"](broken, path)

    def half_written(nb, f):
        f.write('{"cells": [')
        raise OSError("disk full")

    monkeypatch.setattr(nbformat, "write", half_written)
    with pytest.raises(OSError, match="disk full"):
        regenerate["write_atomically"](read(EXPECTED[1]), path)
    monkeypatch.undo()
    assert nbformat.read(path, as_version=4) == nb  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["n.ipynb"]  # no temporary file left
