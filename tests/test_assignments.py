"""Course assignments: the student copies, the grader, and the grader's own tests.

The grader is held to what the issue asks of it: the stubs score 0 with "not implemented",
the reference scores full marks, and a dozen typical student bugs each cost the right task
(and only that task) its points, with a message that names what is wrong.

Each grading runs a separate Python process, so each test grades a whole assignment (or
one task) in one run; fixed seeds keep the mutations' messages reproducible.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minilora import backend, cli
from minilora import functional as F
from minilora.course import assignments, grading, ports

PACKAGE = assignments.PACKAGE_DIR
FAST = {"a1": None, "a2": None, "a3": None, "a4": "a4.1"}  # a4.2 fine-tunes: its own test
PACKAGES = [name for name, a in assignments.ASSIGNMENTS.items() if not a.port]


def reference_copy(folder: Path) -> Path:
    shutil.copytree(PACKAGE, folder / "minilora", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def grade(name, folder, task=None, seed=0, **kw) -> grading.Report:
    return grading.grade(name, folder, task, seed, **kw)


# --------------------------------------------------------------------------------------
# The manifest and the student copies
# --------------------------------------------------------------------------------------


def test_every_task_has_checks_and_every_target_exists():
    for a in assignments.ASSIGNMENTS.values():
        assert [t.id for t in a.tasks] == [f"{a.name}.{i}" for i in range(1, len(a.tasks) + 1)]
        for task in a.tasks:
            assert (ports.TASK_CASES if a.port else grading.CHECKS)[task.id], task.id
            for target in task.targets:
                module, qualname = assignments.split_target(target)
                source = (PACKAGE / assignments.target_file(module)).read_text(encoding="utf-8")
                tree = ast.parse(source)
                assignments.find_def(tree, qualname)  # raises if missing
    every = {t.id for a in assignments.ASSIGNMENTS.values() for t in a.tasks}
    assert set(grading.CHECKS) | set(ports.TASK_CASES) == every


@pytest.mark.parametrize("name", list(assignments.ASSIGNMENTS))
def test_a_student_copy_stubs_exactly_the_targets(tmp_path, name):
    package = assignments.make_copy(name, tmp_path / "copy")
    assignment = assignments.get_assignment(name)
    stubbed = {}
    for task in assignment.tasks:
        for target in task.targets:
            module, qualname = assignments.split_target(target)
            stubbed.setdefault(assignments.target_file(module), {}).setdefault(qualname, task.id)
    for path in sorted(PACKAGE.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(PACKAGE)
        copy = package / relative
        if str(relative) not in stubbed:
            if str(relative) in assignments.copied_files(assignment):  # fast/ops.py, backend.py
                text = assignments.copy_source(assignment, str(relative), path.read_text())
                assert copy.read_text() == text, relative  # tested on their own below
            else:
                assert copy.read_bytes() == path.read_bytes(), relative
            continue
        ours, theirs = ast.parse(path.read_text()), ast.parse(copy.read_text())
        for qualname, task_id in stubbed[str(relative)].items():
            ref, stub = assignments.find_def(ours, qualname), assignments.find_def(theirs, qualname)
            assert ast.dump(stub.args) == ast.dump(ref.args)  # the signature is kept
            assert ast.get_docstring(stub) == ast.get_docstring(ref)  # and the docstring
            body = stub.body[1:] if ast.get_docstring(stub) else stub.body
            assert len(body) == 1 and isinstance(body[0], ast.Raise)
            message = ast.unparse(body[0])
            assert f"Task {task_id}: {qualname}" in message
            assert f"see the handout, {name}.md beside minilora/" in message
    assert assignments.changed_files(assignment, package) == []  # a fresh copy changed nothing
    handout = (tmp_path / "copy" / f"{name}.md").read_text()  # the handout comes along
    page = (PACKAGE / "course" / "handouts" / f"{name}.md").read_text()
    if assignment.port:
        assert handout == page
        return
    # it opens on the files the student is graded on, then the page follows
    title, _, rest = page.partition("\n")
    assert handout.startswith(f"{title}\n\n## Your files\n") and handout.endswith(rest)
    opened = handout[: len(handout) - len(rest)]
    for path in stubbed:
        assert (package / path).is_file() and f"`minilora/{path}`: " in opened, path


def test_the_handout_names_each_file_with_its_tasks():
    text = assignments.files_section(assignments.get_assignment("a3"))
    assert "- `minilora/study/accounting.py`: a3.7\n" in text
    assert "- `minilora/functional.py`: a3.3, a3.4\n" in text
    assert "- `minilora/lora.py`: a3.1, a3.2, a3.5, a3.6, a3.7\n" in text


def installed_package(site: Path) -> Path:
    """The package as a regular install (pip install .) lays it out in ``site``, without the
    repository around it: its modules, and the package data pyproject.toml names."""
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    section = pyproject.split("[tool.setuptools.package-data]")[1]
    data = re.findall(r'"([^"]+)"', re.search(r"^minilora = \[(.*?)\]", section, re.M).group(1))
    assert "course/handouts/*.md" in data
    for path in [*PACKAGE.rglob("*.py"), *(p for g in data for p in PACKAGE.glob(g))]:
        if "__pycache__" not in path.parts:
            target = site / "minilora" / path.relative_to(PACKAGE)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return site


def test_a_copy_from_a_regular_install_carries_the_whole_handout(tmp_path):
    """Without the repository's docs/ folder, the handout is still the whole page (formulas,
    what is graded, the contracts), not a summary from the manifest."""
    site = installed_package(tmp_path / "site-packages")
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = [sys.executable, "-c", "import minilora; print(minilora.__file__)"]
    found = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.stdout.strip() == str(site / "minilora" / "__init__.py")  # not the clone's
    for name in ("a1", "a5"):
        make = [sys.executable, "-m", "minilora", "assignments", "make", name, "--out", name]
        subprocess.run(make, cwd=tmp_path, env=env, check=True, capture_output=True)
        assignments.make_copy(name, tmp_path / f"{name}-clone")
        clone = (tmp_path / f"{name}-clone" / f"{name}.md").read_text()
        assert (tmp_path / name / f"{name}.md").read_text() == clone, name
    a1 = (tmp_path / "a1" / "a1.md").read_text()  # the page, opened by the student's files
    assert "## Your files" in a1 and "## How it is graded" in a1 and "Read first" in a1


FAST_KEPT = {  # the fast ops a copy keeps: none whose reference op the assignment stubs
    "a1": set(),  # every fast op's reference is stubbed, or calls a1.5's _softmax
    "a2": {"GELUFunction", "LayerNormFunction", "SoftmaxCrossEntropyFunction", "EmbeddingFunction"},
    "a3": {op.__name__ for op in backend.FAST_OPS},
    "a4": {op.__name__ for op in backend.FAST_OPS},
}


def test_every_fast_op_subclasses_its_reference_op():
    """What lets a copy find the fast version of a stubbed op from the class hierarchy."""
    for reference, fast in backend.FAST_OPS.items():
        assert fast.__bases__ == (reference,) and fast.__name__ == reference.__name__


@pytest.mark.parametrize("name", PACKAGES)
def test_a_copy_holds_no_fast_version_of_a_stubbed_op(tmp_path, name):
    """A copy's fast/ops.py answers no task: no class there subclasses a reference op with a
    stubbed method (its own or a base class's), no private helper of a removed op is left,
    and what the copy registers is exactly what its file defines."""
    assignment = assignments.get_assignment(name)
    package = assignments.make_copy(name, tmp_path)
    stubbed = set(assignments.targets_by_file(assignment).get("functional.py", {}))
    tree = ast.parse((package / "fast" / "ops.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes == FAST_KEPT[name]
    for cls in classes:
        for base in getattr(F, cls).__mro__:
            assert not any(q.startswith(f"{base.__name__}.") for q in stubbed), (cls, base)
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if name == "a1":
        assert defined == {"query_blocks", "keeps_probabilities"}  # used by accounting.py
    script = "from minilora import backend; print(sorted(c.__name__ for c in backend.FAST_OPS))"
    registered = run_in_copy(tmp_path, script, MINILORA_OPS="fast")
    assert registered == str(sorted(classes))


def run_in_copy(folder: Path, script: str, **env) -> str:
    """What ``script`` prints, run in a fresh Python in ``folder`` (its minilora imported),
    with ``env`` and no MINILORA_OPS unless ``env`` sets it."""
    environment = {k: v for k, v in os.environ.items() if k != "MINILORA_OPS"}
    command = [sys.executable, "-c", f"import minilora; assert minilora.__file__.startswith("
               f"{str(folder)!r}); {script}"]  # fmt: skip
    done = subprocess.run(
        command, cwd=folder, env={**environment, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


STUDENT_CODE = """
import numpy as np
from minilora import backend, functional as F, Tensor
x = Tensor(np.ones((2, 4, 8), np.float32))
q = Tensor(np.ones((1, 2, 3, 4), np.float32))
print(backend.get_ops())
for f, args in ((F.layer_norm, (x, None, None)), (F.causal_self_attention, (q, q, q))):
    try:
        f(*args)
        print(f.__name__, "ran")
    except NotImplementedError as e:
        print(f.__name__, str(e).split(":")[0])
"""


def test_a_copy_runs_the_students_code_by_default(tmp_path):
    """A notebook in a copy runs the student's functions: the reference ops by default, and
    MINILORA_OPS=fast, honoured, still meets the student's stub where a fast op was removed."""
    for name in ("a1", "a2"):
        assignments.make_copy(name, tmp_path / name)
    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    assert run_in_copy(a1, STUDENT_CODE).splitlines() == [
        "reference", "layer_norm Task a1.7", "causal_self_attention Task a1.5",
    ]  # fmt: skip
    assert run_in_copy(a1, STUDENT_CODE, MINILORA_OPS="fast").splitlines() == [
        "fast", "layer_norm Task a1.7", "causal_self_attention Task a1.5",
    ]  # fmt: skip
    assert run_in_copy(a2, STUDENT_CODE).splitlines() == [
        "reference", "layer_norm ran", "causal_self_attention Task a2.1",
    ]  # fmt: skip
    assert run_in_copy(a2, STUDENT_CODE, MINILORA_OPS="fast").splitlines() == [
        "fast", "layer_norm ran", "causal_self_attention Task a2.1",
    ]  # fmt: skip


def test_a_copy_runs_a_model_on_the_reference_ops(tmp_path):
    """a3's copy stubs only LoRA: its GPT runs, on the reference ops, unless asked otherwise."""
    assignments.make_copy("a3", tmp_path)
    script = (
        "import numpy as np; from minilora import backend, functional as F; "
        "from minilora.model import GPT, GPTConfig; "
        "m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)); "
        "m(np.zeros((1, 8), np.int64)); "
        "print(backend.get_ops(), backend.implementation(F.LayerNormFunction).__module__)"
    )
    assert run_in_copy(tmp_path, script) == "reference minilora.functional"
    assert run_in_copy(tmp_path, script, MINILORA_OPS="fast") == "fast minilora.fast.ops"


def test_make_a5_says_nothing_is_stubbed(tmp_path, capsys):
    assert cli.main(["assignments", "make", "a5", "--out", str(tmp_path / "a5")]) == 0
    out = capsys.readouterr().out
    assert "a5 is a porting assignment: nothing is stubbed" in out and "tasks stubbed" not in out
    assert f"the handout {tmp_path / 'a5' / 'a5.md'}" in out


def test_make_refuses_a_folder_that_already_holds_a_copy(tmp_path):
    assignments.make_copy("a3", tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        assignments.make_copy("a3", tmp_path)


def test_stub_source_keeps_a_method_without_docstring_runnable():
    source = (
        "class A:\n    def f(self, x=1):\n        y = x\n        return y\n\n"
        "    def g(self):\n        return 2\n"
    )
    stubbed = assignments.stub_source(source, {"A.f": "Task t"})
    namespace = {}
    exec(stubbed, namespace)
    assert namespace["A"]().g() == 2
    with pytest.raises(NotImplementedError, match="Task t"):
        namespace["A"]().f()


# --------------------------------------------------------------------------------------
# Stubs score 0, the reference full marks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PACKAGES)
def test_stubs_score_zero_and_each_task_says_not_implemented(tmp_path, name):
    assignments.make_copy(name, tmp_path)
    report = grade(name, tmp_path, FAST[name])
    assert report.earned == 0 and not report.ok
    for t in report.tasks:
        assert t.failures and t.failures[0].startswith(f"not implemented: Task {t.id}:"), t


@pytest.mark.parametrize("name", PACKAGES)
def test_the_reference_scores_full_marks(tmp_path, name):
    seed = random.SystemRandom().randrange(2**31)  # a fresh seed each run, printed on failure
    report = grade(name, reference_copy(tmp_path), FAST[name], seed=seed)
    assert report.ok, report.format()
    assert report.earned == report.possible > 0


def test_the_fine_tune_task_passes_on_the_reference_and_fails_on_the_stub(tmp_path):
    report = grade("a4", reference_copy(tmp_path / "ref"), "a4.2")
    assert report.ok, report.format()
    assignments.make_copy("a4", tmp_path / "stub")
    assert grade("a4", tmp_path / "stub", "a4.2").earned == 0


# --------------------------------------------------------------------------------------
# Typical student bugs: the right task, and only it, loses its points
# --------------------------------------------------------------------------------------

# (bug, assignment, task, file, reference line, buggy line, what the message must say)
MUTATIONS = [
    (
        "a missing transpose",
        "a1",
        "a1.3",
        "functional.py",
        'da = unbroadcast(mm(g, swap_last_two(self.b), "matmul.da"), self.a.shape)',
        'da = unbroadcast(mm(g, self.b, "matmul.da"), self.a.shape)',
        "matmul",
    ),
    (
        "broadcasting not undone",
        "a1",
        "a1.2",
        "functional.py",
        "return (unbroadcast(g, sa) if na else None, unbroadcast(g, sb) if nb else None)",
        "return (g if na else None, g if nb else None)",
        "Add.backward returned a gradient of shape",
    ),
    (
        "a gradient overwritten instead of accumulated",
        "a1",
        "a1.10",
        "autograd.py",
        "grads[id(inp)] = ig if prev is None else prev + ig",
        "grads[id(inp)] = ig",
        "x used twice",
    ),
    (
        "softmax without subtracting the max overflows",
        "a1",
        "a1.5",
        "functional.py",
        "e = xp.exp(z - z.max(axis=axis, keepdims=True))",
        "e = xp.exp(z)",
        "subtract the row maximum",
    ),
    (
        "layer norm with the wrong variance",
        "a1",
        "a1.7",
        "functional.py",
        "var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)",
        "var = x.var(axis=-1, ddof=1, keepdims=True)",
        "biased variance",
    ),
    (
        "cross-entropy ignoring the ignore index",
        "a1",
        "a1.6",
        "functional.py",
        "dz *= (self.valid * (float32_if_half(g) / self.n))[:, None].astype(dz.dtype)",
        "dz *= float32_if_half(g) / self.n",
        "ignore_index=-100",
    ),
    (
        "embedding rows overwritten, not accumulated",
        "a1",
        "a1.9",
        "functional.py",
        "xp.add.at(dw, self.ids.reshape(-1), g.reshape(-1, self.weight_shape[1]))",
        "dw[self.ids.reshape(-1)] = g.reshape(-1, self.weight_shape[1])",
        "use np.add.at",
    ),
    (
        "GELU's chain rule stops at tanh",
        "a1",
        "a1.8",
        "functional.py",
        "du_dx = GELU_C * (1.0 + 3 * 0.044715 * x * x)",
        "du_dx = GELU_C",
        "gelu",
    ),
    (
        "the causal mask off by one",
        "a2",
        "a2.1",
        "functional.py",
        "future = xp.triu(xp.ones((T, T), dtype=bool), k=1)",
        "future = xp.triu(xp.ones((T, T), dtype=bool), k=2)",
        "must be masked",
    ),
    (
        "B initialised at random",
        "a3",
        "a3.1",
        "lora.py",
        "self.lora_B = Parameter(backend.zeros((out_f, r), dtype, device))",
        "self.lora_B = Parameter(gen.normal((out_f, r), std=1.0, dtype=dtype, device=device))",
        "lora_B must start at zero",
    ),
    (
        "the scaling α/r forgotten in the forward",
        "a3",
        "a3.3",
        "functional.py",
        'y += self.s * mm(u, lora_B.T, "lora.B")',
        'y += mm(u, lora_B.T, "lora.B")',
        "scaling=",
    ),
    (
        "the rank forgotten in the scaling",
        "a3",
        "a3.2",
        "lora.py",
        "return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r",
        "return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha",
        "(α/r)",
    ),
    (
        "dA without the scaling",
        "a3",
        "a3.4",
        "functional.py",
        'dA = s * mm(gB.T, self.d2, "lora.dA") if need_A else None',
        'dA = mm(gB.T, self.d2, "lora.dA") if need_A else None',
        "dlora_A",
    ),
    (
        "merge without the scaling",
        "a3",
        "a3.5",
        "lora.py",
        'return self.scaling * backend.matmul(self.lora_B.data, self.lora_A.data, "lora.merge")',
        'return backend.matmul(self.lora_B.data, self.lora_A.data, "lora.merge")',
        "(s·B·A)",
    ),
    (
        "frozen parameters counted as trainable",
        "a3",
        "a3.7",
        "lora.py",
        "return sum(p.size for p in params if p.requires_grad), sum(p.size for p in params)",
        "return sum(p.size for p in params), sum(p.size for p in params)",
        "do not count as trainable",
    ),
    (
        "AdamW state for frozen parameters",
        "a4",
        "a4.1",
        "optim.py",
        "for p in self._trainable(group):\n                xp",
        'for p in (q for q in group["params"] if q.grad is not None):\n                xp',
        "frozen parameter",
    ),
]


@pytest.mark.parametrize("bug", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_typical_bug_costs_its_task_and_only_its_task(tmp_path, bug):
    _, name, task_id, filename, right, wrong, said = bug
    path = reference_copy(tmp_path) / "minilora" / filename
    source = path.read_text(encoding="utf-8")
    assert source.count(right) == 1, f"the mutation's line is no longer in {filename}"
    path.write_text(source.replace(right, wrong), encoding="utf-8")
    report = grade(name, tmp_path, FAST[name], seed=1)
    lost = {t.id: t.failures for t in report.tasks if t.failures}
    assert list(lost) == [task_id], report.format()
    assert any(said in line for line in lost[task_id]), lost[task_id]
    assert not any("Traceback" in line for line in lost[task_id])


def test_isolation_a_broken_op_costs_nothing_elsewhere(tmp_path):
    """Every binary op's backward calls unbroadcast: with it broken, only a1.1 fails."""
    ref = reference_copy(tmp_path / "ref")
    target = ref / "minilora" / "functional.py"
    text = target.read_text(encoding="utf-8")
    start = text.index('    """Sum ``grad`` over the axes that broadcasting added')
    end = text.index("\n\n\ndef _broadcast_shape")
    target.write_text(text[:start] + '    """Broken."""\n    return None' + text[end:])
    report = grade("a1", ref, seed=2)
    assert [t.id for t in report.tasks if t.failures] == ["a1.1"], report.format()


# --------------------------------------------------------------------------------------
# Hidden tests, broken packages
# --------------------------------------------------------------------------------------


def test_the_report_notes_files_changed_outside_the_tasks(tmp_path, capsys):
    """A student's edit outside the assignment's functions is named for the instructor; the
    functions they were asked to write are not."""
    package = assignments.make_copy("a3", tmp_path)
    lora_py = package / "lora.py"
    text = lora_py.read_text().replace(
        'raise NotImplementedError("Task a3.2: lora_scaling',
        'return lora_alpha / r\n    raise NotImplementedError("Task a3.2: lora_scaling',
    )
    lora_py.write_text(text)
    assert grade("a3", tmp_path).changed == []
    (package / "gradcheck.py").write_text(  # a gradcheck that passes everything
        "class GradcheckError(AssertionError):\n    pass\n\n\n"
        "def gradcheck(*args, **kwargs):\n    return True\n"
    )
    assert cli.main(["grade", "a3", str(tmp_path), "--task", "a3.4"]) == 1
    out = capsys.readouterr().out
    assert "not implemented: Task a3.4" in out  # graded with the installed gradcheck
    assert out.strip().endswith("differ from the installed minilora's: gradcheck.py")


def test_a_students_own_checks_change_nothing(tmp_path, capsys):
    """The checks come from the installed library: a copy whose checks.py passes every task
    is still graded by the real ones."""
    package = assignments.make_copy("a3", tmp_path)
    (package / "course" / "checks.py").write_text(
        "import collections\n\n\nclass CheckFailed(Exception):\n    pass\n\n\n"
        "class Context:\n    pass\n\n\nCHECKS = collections.defaultdict(list)\n"
    )
    assert cli.main(["grade", "a3", str(tmp_path), "--task", "a3.2"]) == 1
    out = capsys.readouterr().out
    assert "not implemented: Task a3.2" in out
    assert out.strip().endswith("differ from the installed minilora's: course/checks.py")


def test_hidden_tests_grade_their_task(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "hidden_a3.py").write_text(  # the student's code, reached as the checks do
        "def check_a3_2_big_rank(ctx):\n"
        "    got = ctx.module('lora').lora_scaling(16, 256)\n"
        "    assert got == 1 / 16, 'lora_scaling(16, 256) is not 1/16'\n\n\n"
        "def check_a3_5_always_fails(ctx):\n"
        "    assert False, 'a hidden property'\n"
    )
    report = grade("a3", reference_copy(tmp_path / "ref"), extra_tests=hidden)
    lost = {t.id: t.failures for t in report.tasks if t.failures}
    assert list(lost) == ["a3.5"]
    assert lost["a3.5"][0] == "check_a3_5_always_fails: a hidden property"
    assert lost["a3.5"][1].startswith("hint: ")


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="a hidden test's limit needs SIGALRM")
def test_a_check_that_never_ends_costs_its_task_only(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "loops.py").write_text(
        "def check_a3_2_forever(ctx):\n    while True:\n        pass\n"
    )
    report = grading.grade(
        "a3", reference_copy(tmp_path / "ref"), seed=0, extra_tests=hidden, check_timeout=3
    )
    lost = {t.id: t.failures for t in report.tasks if t.failures}
    assert list(lost) == ["a3.2"]
    assert lost["a3.2"][0] == "check_a3_2_forever: took longer than 3 s"


def test_a_package_that_does_not_import_scores_zero_with_the_reason(tmp_path):
    reference_copy(tmp_path)
    (tmp_path / "minilora" / "lora.py").write_text("def broken(:\n")
    report = grade("a3", tmp_path)
    assert report.earned == 0
    assert "importing minilora from" in report.tasks[0].failures[0]
    assert "SyntaxError" in report.tasks[0].failures[0]


def test_grading_leaves_the_students_folder_as_it_was(tmp_path):
    assignments.make_copy("a3", tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    grade("a3", tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_deleted_function_is_named(tmp_path):
    reference_copy(tmp_path)
    lora_py = tmp_path / "minilora" / "lora.py"
    lora_py.write_text(lora_py.read_text().replace("def lora_scaling(", "def scaling_of_lora("))
    lost = {t.id: t.failures[0] for t in grade("a3", tmp_path).tasks}
    assert "has no attribute 'lora_scaling'" in lost["a3.2"]  # its own task
    assert lost["a3.1"].startswith("minilora.lora has no lora_scaling")  # the others' swap


def test_grade_refuses_a_folder_without_a_package(tmp_path):
    with pytest.raises(ValueError, match="has no minilora/ package"):
        grade("a3", tmp_path)


# --------------------------------------------------------------------------------------
# The same score every time; copies of the reference named
# --------------------------------------------------------------------------------------


def with_reference_functions(name: str, folder: Path) -> Path:
    """A student copy of ``name`` with each stub replaced by its reference function's
    source, copied back in: what a student who pastes the library's code hands in."""
    package = assignments.make_copy(name, folder)
    for filename, stubs in assignments.targets_by_file(assignments.get_assignment(name)).items():
        ours = (PACKAGE / filename).read_text(encoding="utf-8").splitlines(keepends=True)
        path = package / filename
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        mine, theirs = ast.parse("".join(lines)), ast.parse("".join(ours))
        spans = [(assignments.find_def(mine, q), assignments.find_def(theirs, q)) for q in stubs]
        for stub, ref in sorted(spans, key=lambda pair: -pair[0].lineno):
            lines[stub.lineno - 1 : stub.end_lineno] = ours[ref.lineno - 1 : ref.end_lineno]
        path.write_text("".join(lines), encoding="utf-8")
    return folder


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} is no longer in {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_without_a_seed_the_same_code_gets_the_same_seed_and_report(tmp_path):
    """The seed comes from the graded files: grading a submission again, or from another
    folder, gives the same seed and the same report (its random shapes and values in the
    failure line); an edit to a graded function changes the seed, one elsewhere does not."""
    ref = reference_copy(tmp_path / "one")
    edit(
        ref / "minilora" / "functional.py",
        'y += self.s * mm(u, lora_B.T, "lora.B")',
        'y += mm(u, lora_B.T, "lora.B")',
    )  # the scaling forgotten: a3.3 fails with its shapes
    first, again = grading.grade("a3", ref, "a3.3"), grading.grade("a3", ref, "a3.3")
    assert first.seed_from == "submission" and 0 <= first.seed < 2**31
    assert first.format().startswith(f"minilora grade a3: {ref} (seed {first.seed} from the ")
    assert again.seed == first.seed and again.format() == first.format()
    assert first.tasks[0].failures  # the report compared holds the random case's values
    moved = Path(shutil.copytree(ref, tmp_path / "two"))
    assert grading.grade("a3", moved, "a3.3").seed == first.seed
    for outside in ("nn.py", "model.py"):  # files a3 does not grade
        with open(moved / "minilora" / outside, "a", encoding="utf-8") as f:
            f.write("# a student's note\n")
    assert grading.grade("a3", moved, "a3.3").seed == first.seed
    edit(
        moved / "minilora" / "lora.py",
        "use_rslora else lora_alpha / r\n",
        "use_rslora else lora_alpha / float(r)\n",
    )
    assert grading.grade("a3", moved, "a3.3").seed != first.seed


def test_seed_overrides_the_submissions_seed(tmp_path, capsys):
    reference_copy(tmp_path)
    report = grading.grade("a3", tmp_path, "a3.2", seed=4)
    assert report.seed == 4 and report.seed_from == "--seed"
    assert report.format().startswith(f"minilora grade a3: {tmp_path} (seed 4)\n")
    js = tmp_path / "report.json"
    assert cli.main(["grade", "a3", str(tmp_path), "--task", "a3.2", "--json", str(js)]) == 0
    derived = grading.submission_seed(assignments.get_assignment("a3"), tmp_path)
    assert f"(seed {derived} from the submission)" in capsys.readouterr().out
    assert json.loads(js.read_text())["seed"] == derived
    assert json.loads(js.read_text())["seed_from"] == "submission"
    assert cli.main(["grade", "a3", str(tmp_path), "--seed", "7", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["seed"] == 7
    assert json.loads(js.read_text())["seed_from"] == "--seed"


@pytest.mark.parametrize("name", PACKAGES)
def test_a_copy_of_the_reference_is_marked_identical_for_every_task(tmp_path, name):
    package = with_reference_functions(name, tmp_path / "copy") / "minilora"
    assert all(
        grading.identical_to_reference(t, package) for t in assignments.get_assignment(name).tasks
    )
    stubs = assignments.make_copy(name, tmp_path / "stubs")
    assert not any(
        grading.identical_to_reference(t, stubs) for t in assignments.get_assignment(name).tasks
    )


def test_comments_and_renamed_locals_are_still_identical(tmp_path):
    """The same code, commented, reformatted, its docstring and every argument and local
    renamed: still the reference's (a1.1 and a3.5)."""
    package = with_reference_functions("a1", tmp_path / "a1") / "minilora"
    edit(
        package / "functional.py",
        (PACKAGE / "functional.py")
        .read_text(encoding="utf-8")[
            (PACKAGE / "functional.py").read_text(encoding="utf-8").index("def unbroadcast(") :
        ]
        .partition("\n\n\n")[0],
        "def unbroadcast(g, target: tuple):\n"
        '    """My own words."""\n'
        "    # same shape: nothing to do\n"
        "    if tuple(g.shape) == tuple(target):\n"
        "        return g\n"
        "    lead = g.ndim - len(target)  # axes broadcasting added\n"
        "    axes = tuple(lead + k for k, m in enumerate(target)\n"
        "                 if m == 1 and g.shape[lead + k] != 1)\n"
        "    return g.sum(axis=tuple(range(lead)) + axes,\n"
        "                 keepdims=True).reshape(target)",
    )
    a1 = assignments.get_assignment("a1")
    assert grading.identical_to_reference(a1.task("a1.1"), package)
    package = with_reference_functions("a3", tmp_path / "a3") / "minilora"
    edit(
        package / "lora.py",
        "self.weight.data -= self.get_delta_weight()",
        "self.weight.data -= self.get_delta_weight()    # W - s·B·A",
    )
    assert grading.identical_to_reference(assignments.get_assignment("a3").task("a3.5"), package)


def test_a_different_correct_implementation_is_not_marked(tmp_path):
    """Another formula (α·r^-½ for α/√r) and two independent statements swapped: full
    points, and not marked; the untouched tasks still are."""
    folder = with_reference_functions("a3", tmp_path)
    lora_py = folder / "minilora" / "lora.py"
    edit(lora_py, "lora_alpha / math.sqrt(r) if", "lora_alpha * r**-0.5 if")
    edit(
        lora_py,
        "        self.weight.data -= self.get_delta_weight()\n        self.merged = False\n",
        "        self.merged = False\n        self.weight.data -= self.get_delta_weight()\n",
    )
    report = grading.grade("a3", folder)
    assert report.ok, report.format()
    marked = [t.id for t in report.tasks if t.identical]
    assert marked == ["a3.1", "a3.3", "a3.4", "a3.6", "a3.7"], report.format()
    assert "a3.2   scaling α/r and rsLoRA's α/√r               1 of 1  ok\n" in report.format()


# --------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------


def test_assignments_list(capsys):
    assert cli.main(["assignments", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(assignments.ASSIGNMENTS)
    assert lines[2].startswith("a3  the LoRA layer  (15 points")


def test_grade_writes_json_and_gradescope_results(tmp_path, capsys):
    reference_copy(tmp_path)
    gs, js = tmp_path / "results.json", tmp_path / "report.json"
    argv = ["grade", "a3", str(tmp_path), "--seed", "4", "--gradescope", str(gs), "--json", str(js)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "total: 15 of 15 points" in out and "(seed 4)" in out
    assert out.count("ok  identical to the reference\n") == 7  # a copy: each task marked
    results = json.loads(gs.read_text())
    assert results["score"] == 15
    visible = [t for t in results["tests"] if t["visibility"] == "visible"]
    assert len(visible) == 7
    for test in visible:
        assert set(test) == {"name", "score", "max_score", "output", "visibility", "execution_time"}
        assert test["score"] == test["max_score"]
    hidden = [t for t in results["tests"] if t not in visible]  # staff only, no points
    assert [t["name"] for t in hidden] == [
        f"a3.{i} identical to the reference" for i in range(1, 8)
    ]
    assert all(t["visibility"] == "hidden" and t["max_score"] == 0 for t in hidden)
    report = json.loads(js.read_text())
    assert report["earned"] == 15
    assert all(t["identical_to_reference"] for t in report["tasks"])


def test_grade_defaults_to_the_current_folder(tmp_path, monkeypatch, capsys):
    reference_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["grade", "a3", "--task", "a3.2"]) == 0
    assert capsys.readouterr().out.startswith("minilora grade a3: . (seed ")


def test_grade_one_task(tmp_path, capsys):
    assignments.make_copy("a3", tmp_path)
    assert cli.main(["grade", "a3", str(tmp_path), "--task", "a3.2"]) == 1
    out = capsys.readouterr().out
    assert "a3.2" in out and "a3.1" not in out and "total: 0 of 1 points" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["grade", "a9", "."], "no assignment named 'a9'"),
        (["grade", "a3", "--task", "a3.99"], "a3 has no task 'a3.99'"),
        (["grade", "a3", "/nonexistent"], "has no minilora/ package"),
        (["assignments", "make", "a9", "--out", "x"], "no assignment named 'a9'"),
        (["assignments", "make", "a3", "--out", str(PACKAGE / "x")], "inside the installed"),
        (["grade", "a3", "--seed", "-1"], "is less than 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse refuses a bad option value itself
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_autograder_zip(tmp_path, capsys):
    out = tmp_path / "autograder.zip"
    assert cli.main(["assignments", "autograder", "a3", "--out", str(out)]) == 0
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert {"setup.sh", "run_autograder", "minilora-src/pyproject.toml"} <= names
        assert "minilora-src/minilora/course/grading.py" in names
        assert z.getinfo("run_autograder").external_attr >> 16 == 0o755
        run = z.read("run_autograder").decode()
    assert "minilora grade a3" in run and "/autograder/results/results.json" in run


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_autograder is a bash script")
@pytest.mark.parametrize("submitted", ["copy", "nothing"])
def test_run_autograder_writes_gradescope_results(tmp_path, submitted):
    """Gradescope's flow, with /autograder moved into tmp_path and the venv's minilora this
    Python's: a submission scores its points, and one without minilora/ scores 0."""
    root = tmp_path / "autograder"
    (root / "venv" / "bin").mkdir(parents=True)
    minilora_cmd = root / "venv" / "bin" / "minilora"
    minilora_cmd.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m minilora "$@"\n')
    minilora_cmd.chmod(0o755)
    submission = root / "submission" / "my-work"
    submission.mkdir(parents=True)
    if submitted == "copy":
        assignments.make_copy("a3", submission)
    script = assignments.RUN_AUTOGRADER.format(name="a3", extra="").replace(
        "/autograder", str(root)
    )
    subprocess.run(["bash", "-c", script], check=True, capture_output=True)
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == 0
    if submitted == "copy":
        assert [t["max_score"] for t in results["tests"]] == [2, 1, 2, 4, 2, 2, 2]
        assert all(t["output"].startswith("not implemented") for t in results["tests"])
    else:
        assert "has no minilora/ package" in results["output"]


def test_done_criterion_from_the_command_line(tmp_path):
    """`minilora assignments make a3 --out DIR && minilora grade a3 DIR`: 0 of 15, a line
    per task, a non-zero exit; the reference copy: 15 of 15, exit 0."""
    exe = [sys.executable, "-m", "minilora"]
    made = subprocess.run([*exe, "assignments", "make", "a3", "--out", str(tmp_path / "a3")])
    assert made.returncode == 0
    run = subprocess.run(
        [*exe, "grade", "a3", str(tmp_path / "a3")], capture_output=True, text=True
    )
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr
    assert "total: 0 of 15 points" in run.stdout
    stubbed = [line for line in run.stdout.splitlines() if "- not implemented: Task a3." in line]
    assert len(stubbed) == len(set(stubbed)) == 7  # a line per task, said once for its checks
    ref = reference_copy(tmp_path / "ref")
    run = subprocess.run([*exe, "grade", "a3", str(ref)], capture_output=True, text=True)
    assert run.returncode == 0 and "total: 15 of 15 points" in run.stdout
