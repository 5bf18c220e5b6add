"""The repository keeps its promises: these tests read files, not behaviour.

* the README's test command is the one CI runs, and its example runs;
* only minilora/backend.py imports NumPy or CuPy, and nothing imports pickle;
* imports flow one way (backend <- autograd <- functional <- fast, nn <- model / lora
  <- ...), with no cycle; the test-only stand-in device is not named in minilora/;
* every ``# noqa`` names a rule that ruff checks;
* ``pytest tests/x.py`` works without nbmake (the notebooks need it; a test file does not).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minilora"
README = (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------------------
# README and CI
# --------------------------------------------------------------------------------------


def test_ci_runs_exactly_the_readme_test_command():
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    test_line = [line for line in quick_start.splitlines() if "pytest" in line][0]
    readme_command = test_line.split("&&", 1)[1].split("#", 1)[0].strip()
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if "pytest" in line and not line.lstrip().startswith("#")
    ]
    assert ci_lines == [readme_command], (ci_lines, readme_command)


def test_readme_example_runs_and_its_printed_count_is_right(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    claimed = re.search(r"# (trainable params: [\d,]+ \|\| all params: [\d,]+)", code).group(1)
    assert claimed in printed
    loss = float(re.search(r"loss after 20 steps: ([\d.]+)", printed).group(1))
    assert loss < 2.7  # ln(16) = 2.77 at the start; 20 LoRA steps must have reduced it


# --------------------------------------------------------------------------------------
# Imports: NumPy in one place, no pickle, one direction
# --------------------------------------------------------------------------------------

ARRAY_LIBRARIES = {"numpy", "cupy", "cupyx"}
NEVER = {"pickle", "torch"}  # nothing loads with pickle; PyTorch is only an oracle


def imports(source: str, libraries=ARRAY_LIBRARIES) -> list[str]:
    """Every import of one of ``libraries`` in ``source``, however it is spelled:
    ``import x``, ``from x import y``, ``importlib.import_module("x")``, ``__import__``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and _is_import_call(node.func):
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
        else:
            continue
        found += [n for n in names if isinstance(n, str) and n.split(".")[0] in libraries]
    return found


def _is_import_call(func) -> bool:
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return name in ("__import__", "import_module")


def test_only_backend_imports_numpy_or_cupy():
    package = ROOT / "minilora"
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted(package.rglob("*.py"))
        if path.name != "backend.py" or path.parent != package
        if (found := imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"only minilora/backend.py may import numpy or cupy: {offenders}"
    assert "numpy" in imports((package / "backend.py").read_text())  # sees it


def test_nothing_imports_pickle_or_torch():
    offenders = {
        path.name: found
        for path in sorted((ROOT / "minilora").rglob("*.py"))
        if (found := imports(path.read_text(encoding="utf-8"), NEVER))
    }
    assert offenders == {}


def test_the_import_check_finds_every_spelling():
    caught = """
import numpy
import numpy as np
import cupy.cuda
from numpy import zeros
from cupyx import scatter_add
import importlib
importlib.import_module("cupy")
from importlib import import_module
import_module("numpy.linalg")
__import__("cupyx")
"""
    assert imports(caught) == [
        "numpy",
        "numpy",
        "cupy.cuda",
        "numpy",
        "cupyx",
        "cupy",
        "numpy.linalg",
        "cupyx",
    ]
    allowed = "import safetensors.numpy\nfrom minilora import backend\nx = 'numpy'\n"
    assert imports(allowed) == []


# Each module may import only modules earlier in this order (backend first); the CLI last.
LAYERS = [
    "backend",
    "autograd",
    "functional",
    "fast",
    "gradcheck",
    "nn",
    "model",
    "lora",
    "optim",
    "accounting",
    "data",
    "train",
    "checkpoint",
    "vectors",
    "demo",
    "cli",
]


def minilora_imports(path: Path) -> set[str]:
    """The minilora modules ``path`` imports (``from minilora import x``, ``minilora.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "minilora":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilora."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minilora.")}
    return found & set(LAYERS)


def test_imports_flow_one_way():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(LAYERS), "add a new module to LAYERS, in its place"
    backwards = {
        name: sorted(
            m
            for m in minilora_imports(PACKAGE / f"{name}.py")
            if LAYERS.index(m) >= LAYERS.index(name)
        )
        for name in LAYERS
    }
    assert {k: v for k, v in backwards.items() if v} == {}
    assert "functional" not in minilora_imports(PACKAGE / "autograd.py")


def test_the_test_stand_in_device_is_not_named_in_the_package():
    named = [p.name for p in PACKAGE.rglob("*.py") if "standin" in p.read_text(encoding="utf-8")]
    assert named == []


# --------------------------------------------------------------------------------------
# Lint hygiene and running a test file on its own
# --------------------------------------------------------------------------------------


def test_every_noqa_names_a_rule_ruff_checks():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    selected = tuple(config["select"])
    unchecked = []
    for folder in ("minilora", "tests", "examples", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for code in re.findall(r"# noqa: ([A-Z]+\d+)", line):
                    if not code.startswith(selected):
                        unchecked.append(f"{path.relative_to(ROOT)}:{n} {code}")
    assert unchecked == []


def test_a_test_file_runs_without_nbmake(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:nbmake",
            "-p",
            "no:xdist",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_backend.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
