"""The repository keeps its promises: these tests read files, not behaviour.

* CI runs the README's quick start (its install steps and test command, on every supported
  Python), the supported Pythons are those CI tests, and the README's example runs;
* only minilora/backend.py imports NumPy or CuPy, and nothing imports pickle;
* imports flow one way (backend <- autograd <- functional <- fast, nn <- model / lora
  <- ...), with no cycle; the test-only stand-in device is not named in minilora/;
* every ``# noqa`` names a rule that ruff checks;
* no function in minilora/ is longer than 100 lines;
* ``pytest tests/x.py`` works without nbmake (the notebooks need it; a test file does not).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minilora"
README = (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------------------
# README and CI
# --------------------------------------------------------------------------------------


def quick_start_commands(readme: str) -> list[str]:
    """The commands of the README's quick start (its first bash block), comments dropped."""
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def ci_commands(script: str) -> list[str]:
    """The command lines of .ci/run, stripped, comments and blank lines dropped."""
    lines = [line.strip() for line in script.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def missing(steps: list[str], lines: list[str]) -> list[str]:
    """The steps that are not lines of ``lines`` in the given order."""
    absent, position = [], 0
    for step in steps:
        if step in lines[position:]:
            position = lines.index(step, position) + 1
        else:
            absent.append(step)
    return absent


def quick_start_problems(readme: str, script: str) -> list[str]:
    """How .ci/run strays from the README's quick start (an empty list when it does not).

    The quick start is two commands, the demo's and the tests', each made of steps joined by
    ``&&``, each step run from the environment the first step makes, ``.venv``. Every step but
    the demo's run must be a line of .ci/run, in the README's order (one step a line: ``set -e``
    ignores a failure inside an ``&&`` list). The test command (the last step) runs once as
    written, on the main Python; a loop over other Pythons may run the second command's steps
    again with ``"$python"`` for ``python3`` and ``"$venv"`` for ``.venv``, and pytest in no
    other way.
    """
    commands = quick_start_commands(readme)
    if len(commands) != 2 or "minilora demo" not in commands[0] or "pytest" not in commands[1]:
        return [f"the quick start must be two commands, the demo's and the tests': {commands}"]
    demo_steps = [step.strip() for step in commands[0].split("&&")]
    test_steps = [step.strip() for step in commands[1].split("&&")]
    test_command = test_steps[-1]
    problems = []
    for step in demo_steps + test_steps:
        if not step.startswith((".venv/", "python3 ")):
            problems.append(f"{step!r} is not run from the quick start's environment, .venv")
    ci = ci_commands(script)
    if ci.count(test_command) != 1:
        problems.append(f".ci/run must run the test command {test_command!r} once, as written")
    as_readme = [line.replace('"$venv"', ".venv").replace('"$python"', "python3") for line in ci]
    runs = [i for i, line in enumerate(as_readme) if "pytest" in line]
    for i in runs:
        if as_readme[i] != test_command:
            problems.append(f".ci/run runs pytest as {ci[i]!r}, not as the quick start does")
    # each run of the tests comes after the quick start's steps, in order, since the run before
    previous = -1
    for i in runs:
        if ci[i] == test_command:  # the main Python: exactly as written
            steps, lines = demo_steps[:-1] + test_steps[:-1], ci[previous + 1 : i]
        else:
            steps, lines = test_steps[:-1], as_readme[previous + 1 : i]
        problems += [f"{ci[i]!r} comes before the step {step!r}" for step in missing(steps, lines)]
        previous = i
    return problems


def test_ci_runs_exactly_the_readme_quick_start():
    script = (ROOT / ".ci" / "run").read_text()
    assert quick_start_problems(README, script) == []
    # the oldest and the newest supported Python, each through the README's test command
    loop = re.search(r"^for version in ([\d. ]+); do$", script, re.M).group(1).split()
    assert {"3.10", "3.13"} <= set(loop), loop


def test_the_quick_start_check_can_fail():
    script = (ROOT / ".ci" / "run").read_text()
    test_command = quick_start_commands(README)[1].split("&&")[-1].strip()
    other_python = '"$venv"/bin/python -m pytest -n 2'
    other_install = '"$venv"/bin/pip install -e ".[dev]"'
    demo_install = '.venv/bin/pip install ".[plots]"'
    spoiled = [
        ("CI skips an install step", README, script.replace(demo_install + "\n", "")),
        ("CI runs another command", README, script.replace(test_command, "python -m pytest")),
        ("another Python differs", README, script.replace(other_python, other_python + " -x")),
        ("another Python skips a step", README, script.replace(other_install, "true")),
        ("an && list", README, script.replace(test_command, "true && " + test_command)),
        ("a global install", README.replace(demo_install, demo_install[10:]), script),
    ]
    for what, readme, bad_script in spoiled:
        assert bad_script != script or readme != README, what  # the spoiling changed something
        assert quick_start_problems(readme, bad_script), what


def test_supported_pythons_match_what_ci_tests():
    text = (ROOT / "pyproject.toml").read_text()
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'^requires-python = ">=3\.10"$', text, re.M)
    classified = set(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text))
    tested = set(re.search(r"^for version in ([\d. ]+); do$", script, re.M).group(1).split())
    tested.add("3.11")  # the main Python, python3 on the CI machine
    assert classified == tested, (classified, tested)
    assert min(tested, key=lambda v: tuple(map(int, v.split(".")))) == "3.10"


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
        # the grader's worker runs apart from the installed minilora: NumPy directly
        if path != package / "course" / "worker.py"
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


# The book: the top-level modules a student reads, in reading order. Each imports only
# modules before it, and no folder (docs/architecture.md, "Who imports whom").
BOOK = ["backend", "autograd", "functional", "gradcheck", "nn", "model", "lora", "optim", "data",
        "train"]
# Each folder may import the book, itself, and the folders listed here; nothing else. The
# arrows point one way (a test below checks that they form no cycle).
FOLDER_IMPORTS = {
    "fast": set(),
    "variants": set(),
    "compression": set(),
    "interop": {"variants"},
    "text": {"interop"},
    "relatives": {"interop"},
    "study": {"fast"},
    "experiments": {"variants", "relatives", "compression", "interop"},
    "course": {"fast", "interop", "study", "experiments"},
    "cli": {"fast", "variants", "relatives", "compression", "interop", "text", "study",
            "experiments", "course"},
}
# The front door (``import minilora``) re-exports the book and two folders: the fast path
# (importing it registers the fast ops) and the variants (importing them registers DoRA,
# PiSSA, embedding LoRA and the patterns with the book's apply_lora).
FRONT_DOOR_IMPORTS = {"fast", "variants"}


def minilora_imports(path: Path) -> set[str]:
    """The top-level names of minilora that ``path`` imports: a book module (``from minilora
    import lora``, ``minilora.lora``) or a folder (``from minilora.interop import x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "minilora":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilora."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minilora.")}
    return found & (set(BOOK) | set(FOLDER_IMPORTS))


def import_rule_violations(package: Path) -> list[str]:
    """Every import in ``package`` that breaks the rules above, as "file -> name"."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        imported = minilora_imports(path)
        if len(relative.parts) == 1:  # the book, or the front door
            name = relative.stem
            if name == "__init__":
                allowed = set(BOOK) | FRONT_DOOR_IMPORTS
            elif name == "__main__":
                allowed = {"cli"}
            else:
                allowed = set(BOOK[: BOOK.index(name)])
        else:
            folder = relative.parts[0]
            allowed = set(BOOK) | {folder} | FOLDER_IMPORTS[folder]
        bad += [f"{relative} -> {name}" for name in sorted(imported - allowed)]
    return bad


def test_the_top_level_is_the_book_and_its_folders():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(BOOK), "the top level holds the book only: put a new module in a folder"
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(FOLDER_IMPORTS), "add a new folder to FOLDER_IMPORTS, with its arrows"


def test_imports_flow_one_way():
    assert import_rule_violations(PACKAGE) == []
    assert "functional" not in minilora_imports(PACKAGE / "autograd.py")


def test_the_folder_arrows_form_no_cycle():
    order, left = [], dict(FOLDER_IMPORTS)
    while left:
        ready = [f for f, deps in left.items() if deps <= set(order)]
        assert ready, f"the folders {sorted(left)} import each other in a cycle"
        order += sorted(ready)
        left = {f: d for f, d in left.items() if f not in ready}


def architecture_section(title: str) -> str:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_the_architecture_page_states_the_import_rules_the_code_keeps():
    """docs/architecture.md's "Who imports whom" table is FOLDER_IMPORTS, and its book table
    lists the book in BOOK's order: what the page claims is what this file checks."""
    rows = re.findall(r"^\| `(\w+)/` \| (.*) \|$", architecture_section("Who imports whom"), re.M)
    every_other = set(FOLDER_IMPORTS)
    claimed = {
        folder: (every_other - {folder} if said == "every other folder" else
                 set(re.findall(r"`(\w+)/`", said)))
        for folder, said in rows
    }
    assert claimed == FOLDER_IMPORTS
    book_table = architecture_section("The book, in reading order")
    book = re.findall(r"^\| `(\w+)\.py` \|", book_table, re.M)
    assert book == BOOK
    tree = architecture_section("The house")
    assert all(f"  {folder}/ " in tree for folder in FOLDER_IMPORTS)


def test_the_api_reference_is_organised_by_folder_and_misses_no_module():
    """docs/api.md documents every module but the command line's, each under the heading of
    its folder (the book first)."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    placed, heading = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("::: minilora."):
            placed[line[len("::: minilora.") :]] = heading
    expected = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__") or parts[0] == "cli":
            continue
        expected[".".join(parts)] = "The book" if len(parts) == 1 else f"{parts[0]}/"
    assert placed == expected
    assert [m for m, h in placed.items() if h == "The book"] == BOOK  # in reading order


def test_the_import_rule_catches_a_book_module_that_imports_a_folder(tmp_path):
    package = tmp_path / "minilora"
    (package / "interop").mkdir(parents=True)
    (package / "interop" / "__init__.py").write_text("")
    (package / "interop" / "files.py").write_text("from minilora import lora, train\n")
    (package / "lora.py").write_text(
        "from minilora.interop import files\nfrom minilora import nn\n"
    )
    (package / "nn.py").write_text("from minilora import lora\n")
    assert import_rule_violations(package) == ["lora.py -> interop", "nn.py -> lora"]


def test_the_test_stand_in_device_is_not_named_in_the_package():
    named = [p.name for p in PACKAGE.rglob("*.py") if "standin" in p.read_text(encoding="utf-8")]
    assert named == []


# --------------------------------------------------------------------------------------
# Function length: a function a reader can hold in their head
# --------------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 100  # DESIGN.md, "The house": no function longer than about 100 lines


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """Every function (nested ones and methods included) longer than ``limit`` lines, counted
    from its ``def`` to the end of its body (decorators excluded), as dotted name -> lines."""
    found = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit:
                        found[name] = lines
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return found


def test_no_function_is_longer_than_100_lines():
    too_long = {
        f"{path.relative_to(ROOT)}:{name}": lines
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, lines in long_functions(path.read_text(encoding="utf-8")).items()
    }
    assert too_long == {}, f"split these into well-named steps: {too_long}"


def test_the_length_check_counts_from_def_to_the_end_of_the_body():
    def body(n, indent=4):
        return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(n))

    source = (
        f"@decorator\ndef fits():\n{body(99)}\n"
        f"def too_long():\n{body(99)}    return 0\n\n"
        f"class C:\n    def method(self):\n        def inner():\n{body(198, 12)}"
    )
    assert long_functions(source) == {
        "too_long": 101,
        "C.method": 200,
        "C.method.inner": 199,
    }


def private_uses(source: str) -> list[str]:
    """Private helpers (a leading underscore, not a dunder) that ``source`` takes from another
    minilora module: ``from minilora.x import _helper`` or ``module._helper``."""
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    tree, modules, found = ast.parse(source), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilora"):
            modules |= {a.asname or a.name for a in node.names}
            found += [f"{node.module}.{a.name}" for a in node.names if private(a.name)]
        elif isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and private(node.attr)
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_helper_is_used_from_another_file():
    used = {
        str(path.relative_to(ROOT)): names
        for path in sorted(PACKAGE.rglob("*.py"))
        if (names := private_uses(path.read_text(encoding="utf-8")))
    }
    assert used == {}, "make a helper public where another file needs it"


def test_classes_share_a_name_only_when_one_subclasses_the_other():
    """A fast op keeps its reference op's name (it subclasses it); no other two classes share
    one (the op CausalSelfAttentionFunction, the module CausalSelfAttention)."""
    seen: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
                seen.setdefault(node.name, []).append((str(path.relative_to(PACKAGE)), bases))
    clashes = {
        name: [where for where, _ in places]
        for name, places in seen.items()
        if len(places) > 1 and sum(name not in bases for _, bases in places) > 1
    }
    assert clashes == {}


def test_the_private_helper_check_finds_both_spellings():
    source = (
        "from minilora import functional as F\nfrom minilora.lora import _plan, apply_lora\n"
        "x = F._swap(a) + F.linear(a) + self._own + F.__name__\n"
    )
    assert private_uses(source) == ["minilora.lora._plan", "F._swap"]


# --------------------------------------------------------------------------------------
# Lint hygiene and running a test file on its own
# --------------------------------------------------------------------------------------


def test_every_noqa_names_a_rule_ruff_checks():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    select = re.search(r"^select = \[(.*?)\]", pyproject, re.M).group(1)
    selected = tuple(re.findall(r'"([A-Z]+)"', select))
    assert "E" in selected and "F" in selected, selected  # the list was read
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
