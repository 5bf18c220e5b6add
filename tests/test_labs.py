"""Every notebook has its lab sheet and its teacher's key, and each key solves each exercise.

A lab sheet (``docs/labs/NN-name.md``, for students) and a key (``docs/labs/keys/NN-name.md``,
for teachers) go with each notebook ``notebooks/NN_name.ipynb``; mkdocs.yml lists both, in
separate sections, and teaching.md links them. A key has a section ``## Exercise N: ...`` for
each numbered exercise of its notebook, in order, each with its worked solution (a Python block,
or a derivation for an exercise that asks for one).

These tests read files. The solutions themselves run with ``python tests/test_labs.py --run``
(every key, a few minutes on two cores) or ``--run 04`` (one key): each key's Python blocks,
top to bottom, in one namespace, as a teacher would paste them into a notebook.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "docs" / "labs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PYTHON = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def page_name(notebook: Path) -> str:
    """``01_autograd.ipynb`` -> ``01-autograd.md``."""
    return notebook.stem.replace("_", "-") + ".md"


def notebook_exercises(notebook: Path) -> list[int]:
    """The numbers of the exercises listed under the notebook's ``## Exercises`` heading."""
    cells = json.loads(notebook.read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    section = text.split("## Exercises", 1)[1]
    section = re.split(r"^#{1,2} |\n\*\*Assignment", section, maxsplit=1, flags=re.M)[0]
    return [int(n) for n in re.findall(r"^(\d+)\. ", section, re.M)]


def key_solutions(key: str) -> dict[int, str]:
    """Each ``## Exercise N`` section of a key, by N."""
    parts = re.split(r"^## Exercise (\d+)\b.*$", key, flags=re.M)
    return {int(n): body for n, body in zip(parts[1::2], parts[2::2], strict=True)}


def missing_solutions(notebook: Path, key: str) -> list[str]:
    """What a key lacks: an exercise of its notebook without a section, or a section without
    a worked solution (a Python block or, for an exercise that asks for reasoning, at least a
    paragraph of it)."""
    solutions = key_solutions(key)
    problems = []
    for n in notebook_exercises(notebook):
        body = solutions.get(n)
        if body is None:
            problems.append(f"exercise {n}: no section '## Exercise {n}'")
        elif not PYTHON.search(body) and len(body.split()) < 60:
            problems.append(f"exercise {n}: no worked solution")
    if list(solutions) != sorted(solutions):
        problems.append(f"sections out of order: {list(solutions)}")
    return problems


def test_every_notebook_has_a_lab_sheet_and_a_key():
    assert len(NOTEBOOKS) == 9
    for notebook in NOTEBOOKS:
        sheet, key = LABS / page_name(notebook), LABS / "keys" / page_name(notebook)
        assert sheet.is_file(), sheet
        assert key.is_file(), key
        text = sheet.read_text()
        for heading in ("## Goals", "## Plan", "## Questions to discuss"):
            assert heading in text, (sheet.name, heading)
        minutes = [int(m) for m in re.findall(r"^\| *(\d+) *\|", text.split("## Plan")[1], re.M)]
        assert sum(minutes) == 90, (sheet.name, minutes)  # a 90-minute plan, minute by minute
        assert f"notebooks/{notebook.name}" in text
        assert "keys/" not in text  # the students' page does not lead to the answers


def test_every_key_solves_every_exercise_of_its_notebook():
    problems = {
        notebook.name: found
        for notebook in NOTEBOOKS
        if (found := missing_solutions(notebook, (LABS / "keys" / page_name(notebook)).read_text()))
    }
    assert problems == {}


def test_the_key_check_can_fail():
    notebook = NOTEBOOKS[0]
    key = (LABS / "keys" / page_name(notebook)).read_text()
    assert missing_solutions(notebook, key) == []
    dropped = re.sub(r"^## Exercise 3\b.*$", "## Notes", key, flags=re.M)
    assert missing_solutions(notebook, dropped) == ["exercise 3: no section '## Exercise 3'"]
    empty = re.sub(
        r"(^## Exercise 5\b[^\n]*).*", r"\1\n\nLeft to the reader.\n", key, flags=re.M | re.S
    )
    assert missing_solutions(notebook, empty) == ["exercise 5: no worked solution"]
    assert notebook_exercises(notebook) == [1, 2, 3, 4, 5]


def test_the_site_lists_labs_and_keys_apart():
    config = (ROOT / "mkdocs.yml").read_text()
    teaching = (ROOT / "docs" / "teaching.md").read_text()
    students = config.split("  - Lab sheets:", 1)[1].split("\n  - ", 1)[0]
    teachers = config.split("  - Lab keys (teachers):", 1)[1].split("\n  - ", 1)[0]
    for notebook in NOTEBOOKS:
        assert f"labs/{page_name(notebook)}" in students
        assert f"labs/keys/{page_name(notebook)}" in teachers
        assert f"labs/{page_name(notebook)}" in teaching
        assert f"labs/keys/{page_name(notebook)}" in teaching


def run_key(path: Path) -> float:
    """Run a key's Python blocks in one namespace; return the seconds it took."""
    namespace = {"__name__": "__key__"}
    start = time.perf_counter()
    for i, block in enumerate(PYTHON.findall(path.read_text())):
        exec(compile(block, f"{path.name}, block {i + 1}", "exec"), namespace)
    return time.perf_counter() - start


if __name__ == "__main__":
    if sys.argv[1:2] != ["--run"]:
        raise SystemExit("usage: python tests/test_labs.py --run [NN ...]")
    os.environ.setdefault("MPLBACKEND", "Agg")
    chosen = sys.argv[2:]
    for notebook in NOTEBOOKS:
        if not chosen or notebook.name[:2] in chosen:
            key = LABS / "keys" / page_name(notebook)
            print(f"== {key.relative_to(ROOT)}", flush=True)
            print(f"== {key.name}: every solution ran, {run_key(key):.0f} s", flush=True)
