"""The teaching notebooks are kept clean and shaped as lessons.

pytest *executes* every notebook through nbmake (``--nbmake`` and ``testpaths`` in
pyproject.toml; notebooks/conftest.py selects the quick mode). These tests check what running
them cannot: that they are stored without outputs, use the ``python3`` kernel, open with what
the reader will learn, end with exercises, and import minilora instead of copying it.
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
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has stored outputs (clear them before committing)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell['execution_count']}")
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
    code = "\n".join(cell.source for cell in cells if cell.cell_type == "code")
    if not re.search(r"^\s*(import minilora|from minilora)", code, re.M):
        problems.append("no code cell imports minilora")
    if "MINILORA_QUICK" not in code:
        problems.append("the notebook never reads MINILORA_QUICK (the test suite's quick mode)")
    copied = sorted(set(re.findall(r"^\s*(?:def|class) +(\w+)", code, re.M)) & LIBRARY_NAMES)
    if copied:
        problems.append(f"defines {copied}, which minilora already provides: import them")
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
    setup = next(c for c in read(name).cells if c.cell_type == "code")
    assert 'ml.set_ops("reference")' in setup.source


def _no_outputs(nb):
    return nb


def _add_output(nb):
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    return nb


def _add_execution_count(nb):
    next(c for c in nb.cells if c.cell_type == "code").execution_count = 3
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
        (_add_output, "stored outputs"),
        (_add_execution_count, "execution_count"),
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
    # nbmake is part of the dev extra, and tests/conftest.py turns it on
    assert pytestconfig.pluginmanager.hasplugin("nbmake") and pytestconfig.option.nbmake
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

    docs/hooks.py adds notebooks/ to the site and mkdocs-jupyter executes and renders them,
    so a link to ``notebooks/NN_name.ipynb`` becomes the notebook's page with its figures.
    """
    docs = ROOT / "docs"
    assert _linked_notebooks((docs / "index.md").read_text()) == EXPECTED
    assert _linked_notebooks((docs / "start-here.md").read_text()) == EXPECTED
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    nav = re.findall(r"^ +- (?:[^:\n]+: )?notebooks/(\S+\.ipynb)$", mkdocs, re.M)
    assert nav == EXPECTED
    plugin = mkdocs.split("- mkdocs-jupyter:", 1)[1].split("\n  - ", 1)[0]
    assert re.search(r"^ +execute: true\b", plugin, re.M), plugin
    assert re.search(r"^ +allow_errors: false\b", plugin, re.M), plugin


def test_the_order_check_can_fail():
    out_of_order = "".join(f"[n](notebooks/{name}) " for name in reversed(EXPECTED))
    assert _linked_notebooks(out_of_order) != EXPECTED
