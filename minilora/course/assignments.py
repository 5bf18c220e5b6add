"""Course assignments: a manifest of tasks, and student copies generated from this library.

An assignment is a list of tasks; a task names the functions or methods a student writes
(its *targets*, ``"functional:LayerNormFunction.backward"`` = module ``minilora.functional``,
qualified name ``LayerNormFunction.backward``), its points, and the checks in
``minilora/course/checks.py`` that grade it.

A student copy is this package, copied, with only the assignment's targets stubbed: each
keeps its signature and docstring, and its body becomes::

    raise NotImplementedError(
        "Task a1.7: LayerNormFunction.backward (...); see the handout, a1.md beside minilora/"
    )

The copy is made from the library's own source at the moment it is made, so it can never
drift from the code the tests prove correct. Everything else in it is the working library:
a student who finishes a1 has a minilora that runs. Two files differ on purpose, so that the
copy holds no answers and runs the student's code (:func:`copy_source`): ``fast/ops.py``
loses the fast version of every reference op the assignment stubs (whose reference op, or a
function it calls, is a target), and ``backend.py`` defaults to the reference ops.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
HANDOUT_DIR = Path(__file__).resolve().parent / "handouts"  # their one source, package data
FAST_OPS_FILE = "fast/ops.py"  # the fast path's ops, each a subclass of its reference op
BACKEND_FILE = "backend.py"  # holds DEFAULT_OPS, the ops the engine runs by default


@dataclass(frozen=True)
class Task:
    id: str  # "a1.7"
    title: str
    points: int
    targets: tuple[str, ...]  # "module:Qualified.name" inside the minilora package
    hint: str  # printed under a failure: where to look


@dataclass(frozen=True)
class Assignment:
    name: str  # "a1"
    title: str
    tasks: tuple[Task, ...]
    summary: str  # one sentence for the handout and `assignments list`
    port: bool = False  # graded from a port's reference-vector set, not a minilora package

    @property
    def points(self) -> int:
        return sum(t.points for t in self.tasks)

    @property
    def handout(self) -> Path:
        """The handout's page, shipped with the package."""
        return HANDOUT_DIR / f"{self.name}.md"

    def task(self, task_id: str) -> Task:
        for t in self.tasks:
            if t.id == task_id:
                return t
        ids = ", ".join(t.id for t in self.tasks)
        raise ValueError(f"{self.name} has no task {task_id!r}; its tasks are {ids}")


def _tasks(name: str, *rows) -> tuple[Task, ...]:
    return tuple(
        Task(f"{name}.{i}", title, points, tuple(targets), hint)
        for i, (title, points, targets, hint) in enumerate(rows, 1)
    )


ASSIGNMENTS: dict[str, Assignment] = {
    a.name: a
    for a in (
        Assignment(
            "a1",
            "autograd: hand-written backwards",
            _tasks(
                "a1",
                (
                    "unbroadcast",
                    2,
                    ["functional:unbroadcast"],
                    "sum over the axes broadcasting added (leading) or stretched (size 1)",
                ),
                (
                    "add and mul backward, with broadcasting",
                    2,
                    ["functional:Add.backward", "functional:Mul.backward"],
                    "each input's gradient has that input's shape: unbroadcast it",
                ),
                (
                    "matmul backward",
                    2,
                    ["functional:MatMul.backward"],
                    "da = g @ bᵀ, db = aᵀ @ g (transpose the last two axes), then unbroadcast",
                ),
                (
                    "sum and mean backward",
                    2,
                    ["functional:Sum.backward", "functional:Mean.backward"],
                    "broadcast g back over the reduced axes (keepdims shape); mean divides by n",
                ),
                (
                    "softmax, stable forward and backward",
                    2,
                    ["functional:_softmax", "functional:Softmax.backward"],
                    "exp(x - max) / Σ exp(x - max); dx = y · (g - Σ g·y) along the axis",
                ),
                (
                    "log-softmax and cross-entropy backward",
                    3,
                    [
                        "functional:LogSoftmax.backward",
                        "functional:SoftmaxCrossEntropyFunction.backward",
                    ],
                    "dlogits = (softmax - onehot) · g / n, zero on rows whose target is ignored",
                ),
                (
                    "layer norm forward and backward",
                    3,
                    [
                        "functional:LayerNormFunction.forward",
                        "functional:LayerNormFunction.backward",
                    ],
                    "biased variance mean((x-μ)²); dx = rstd·(ĝ - mean ĝ - x̂·mean(ĝ·x̂)), ĝ = g·w",
                ),
                (
                    "GELU backward",
                    2,
                    ["functional:GELUFunction.backward"],
                    "product rule on ½x(1 + tanh u), with du/dx = c(1 + 3·0.044715 x²)",
                ),
                (
                    "embedding backward",
                    2,
                    ["functional:EmbeddingFunction.backward"],
                    "scatter-add g into dW at the ids (np.add.at): repeated ids accumulate",
                ),
                (
                    "gradient accumulation in Tensor.backward",
                    3,
                    ["autograd:Tensor.backward"],
                    "a tensor used by several ops gets the sum of their gradients (+=, not =)",
                ),
            ),
            "write the backward of the ops a GPT is made of, and the engine's accumulation",
        ),
        Assignment(
            "a2",
            "the Transformer: attention and the GPT forward",
            _tasks(
                "a2",
                (
                    "causal self-attention forward",
                    3,
                    ["functional:CausalSelfAttentionFunction.forward"],
                    "S = q kᵀ/√hs with every later key masked (np.triu(..., k=1)), softmax, @ v",
                ),
                (
                    "causal self-attention backward",
                    4,
                    ["functional:CausalSelfAttentionFunction.backward"],
                    "dv = Pᵀg, dP = g vᵀ, dS = P·(dP - Σ dP·P), dq = dS k/√hs, dk = dSᵀ q/√hs",
                ),
                (
                    "the GPT forward",
                    3,
                    ["model:GPT.forward"],
                    "embeddings of ids and positions, the blocks, ln_f, lm_head, then the loss",
                ),
            ),
            "write attention's forward and backward and the tiny GPT's forward",
        ),
        Assignment(
            "a3",
            "the LoRA layer",
            _tasks(
                "a3",
                (
                    "init: A Gaussian, B zero",
                    2,
                    ["lora:LoRALinear._init_lora"],
                    "A ~ N(0, (1/r)²) (or uniform ±1/√in for kaiming), B zeros (out, r)",
                ),
                (
                    "scaling α/r and rsLoRA's α/√r",
                    1,
                    ["lora:lora_scaling"],
                    "s = lora_alpha / r, or lora_alpha / √r with use_rslora",
                ),
                (
                    "fused forward",
                    2,
                    ["functional:LoRALinearFunction.forward"],
                    "y = x Wᵀ + b + s · (d Aᵀ) Bᵀ, d = x_lora or x; save what backward needs",
                ),
                (
                    "fused backward",
                    4,
                    ["functional:LoRALinearFunction.backward"],
                    "gB = g B; dB = s gᵀu; dA = s gBᵀd; dx = g W (+ s gB A); no dW when frozen",
                ),
                (
                    "merge and unmerge",
                    2,
                    ["lora:LoRALinear.get_delta_weight", "lora:LoRALinear.unmerge"],
                    "ΔW = s · B @ A; merge adds it to W, unmerge subtracts it",
                ),
                (
                    "apply_lora and mark_only_lora_as_trainable",
                    2,
                    ["lora:add_lora_layers", "lora:mark_only_lora_as_trainable"],
                    "wrap each target Linear (same weight object), then freeze all but lora_A/B",
                ),
                (
                    "the trainable-parameter formula",
                    2,
                    ["lora:count_parameters", "study.accounting:lora_params"],
                    "count only requires_grad parameters; closed form r·(in + out) per adapter",
                ),
            ),
            "build the LoRA layer: its init, scaling, fused forward and backward, merging",
        ),
        Assignment(
            "a4",
            "fine-tuning: AdamW for what trains",
            _tasks(
                "a4",
                (
                    "AdamW with state only for trainable parameters",
                    4,
                    ["optim:AdamW.step"],
                    "skip parameters that are frozen or have no gradient; torch.optim.AdamW's "
                    "update, decoupled weight decay first",
                ),
                (
                    "a LoRA fine-tune of the shipped base reaches the stated accuracy",
                    4,
                    ["optim:AdamW.step"],
                    "your AdamW trains rank-4 adapters on q_proj and v_proj to sort descending",
                ),
            ),
            "write AdamW so that frozen weights cost no optimizer state, then fine-tune with it",
        ),
        Assignment(
            "a5",
            "porting: LoRA and the tiny GPT in another framework",
            _tasks(
                "a5",
                (
                    "linear and the fused LoRA linear",
                    3,
                    [],
                    "outputs and gradients of the cases linear and lora_linear; no dW for W",
                ),
                (
                    "the LoRA layer, α/r and rsLoRA's α/√r",
                    3,
                    [],
                    "the cases lora_layer and lora_layer_rslora: A, B and the scaling",
                ),
                (
                    "the tiny GPT with LoRA",
                    4,
                    [],
                    "the case gpt_lora: module paths as in PEFT, logits, loss and every gradient",
                ),
            ),
            "port the LoRA layer and the tiny GPT, checked by minilora vectors --check",
            port=True,
        ),
    )
}


def get_assignment(name: str) -> Assignment:
    if name not in ASSIGNMENTS:
        raise ValueError(
            f"no assignment named {name!r}; the assignments are {', '.join(ASSIGNMENTS)}"
        )
    return ASSIGNMENTS[name]


# ======================================================================================
# Finding a function in the source, and stubbing it
# ======================================================================================


def split_target(target: str) -> tuple[str, str]:
    """``"functional:Add.backward"`` -> ``("functional", "Add.backward")``."""
    module, _, qualname = target.partition(":")
    return module, qualname


def find_def(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    """The ``def`` node of ``qualname`` (``"f"`` or ``"Class.method"``) in a parsed module."""
    body, node = tree.body, None
    for part in qualname.split("."):
        node = next(
            (n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part),
            None,
        )
        if node is None:
            raise ValueError(f"{qualname} is not defined in this source")
        body = node.body
    if not isinstance(node, ast.FunctionDef):
        raise ValueError(f"{qualname} is a class, not a function")
    return node


def stub_message(task: Task, qualname: str) -> str:
    name = task.id.split(".")[0]
    return f"Task {task.id}: {qualname} ({task.title}); see the handout, {name}.md beside minilora/"


def stub_source(source: str, stubs: dict[str, str], reference: str | None = None) -> str:
    """``source`` with each ``{qualname: message}`` function's body replaced by
    ``raise NotImplementedError(message)``, keeping its signature and docstring; a
    backward's stub also lists what the forward of ``reference`` (default: ``source``)
    saves (:func:`saved_contract`)."""
    tree = ast.parse(source)
    contract_tree = tree if reference is None else ast.parse(reference)
    lines = source.splitlines(keepends=True)
    edits = []
    for qualname, message in stubs.items():
        node = find_def(tree, qualname)
        body = node.body
        has_doc = (
            isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        )
        rest = body[1:] if has_doc else body
        if not rest:
            raise ValueError(f"{qualname} has only a docstring: nothing to stub")
        start, indent = rest[0].lineno - 1, " " * rest[0].col_offset
        top = body[0].end_lineno if has_doc else node.lineno  # comments above the body go too
        while start > top and lines[start - 1].lstrip().startswith("#"):
            start -= 1
        literal = json.dumps(message, ensure_ascii=False)  # a valid Python string literal
        contract = "".join(f"{indent}{line}\n" for line in saved_contract(contract_tree, qualname))
        edits.append(
            (start, node.end_lineno, f"{contract}{indent}raise NotImplementedError({literal})\n")
        )
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    return "".join(lines)


def saved_contract(tree: ast.Module, qualname: str) -> list[str]:
    """For a ``backward``, comment lines naming what the class's ``forward`` saves on
    ``self`` (each ``self.name = ...`` line of the reference), which the backward may read;
    nothing for any other function."""
    owner, _, name = qualname.rpartition(".")
    try:
        forward = find_def(tree, f"{owner}.forward") if name == "backward" else None
    except ValueError:
        forward = None
    saved = []
    for n in ast.walk(forward) if forward is not None else ():
        if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
            for t in n.targets
        ):
            saved.append(ast.unparse(n))
    if not saved:
        return []
    head = [
        "# What the reference forward saves for this backward (graded with your forward",
        "# when you wrote it, else with the reference's; then read these names):",
    ]
    return head + [f"#   {line}" for line in saved]


def target_file(module: str) -> str:
    """The file of a target's module, relative to the package: ``"study.accounting"`` ->
    ``"study/accounting.py"``."""
    return module.replace(".", "/") + ".py"


def targets_by_file(assignment: Assignment) -> dict[str, dict[str, str]]:
    """``{"functional.py": {qualname: stub message}}`` for every target of the assignment."""
    files: dict[str, dict[str, str]] = {}
    for task in assignment.tasks:
        for target in task.targets:
            module, qualname = split_target(target)
            stubs = files.setdefault(target_file(module), {})
            stubs.setdefault(qualname, stub_message(task, qualname))
    return files


def stubbed_reference_ops(functional_source: str, stubs) -> set[str]:
    """The classes of ``functional_source`` that a copy with the functions ``stubs``
    (qualified names) stubbed cannot run: a method of the class, or of a base class defined
    there, is stubbed or calls a stubbed function of the module."""
    tree = ast.parse(functional_source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    functions = {q for q in stubs if "." not in q}

    def stubbed(name: str) -> bool:
        node = classes[name]
        return (
            any(q.startswith(f"{name}.") for q in stubs)
            or any(isinstance(x, ast.Name) and x.id in functions for x in ast.walk(node))
            or any(
                isinstance(b, ast.Name) and b.id in classes and stubbed(b.id) for b in node.bases
            )
        )

    return {name for name in classes if stubbed(name)}


def bound_names(node: ast.stmt) -> set[str]:
    """The module-level names a top-level statement defines (none for other statements)."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if (
        isinstance(node, (ast.Import, ast.ImportFrom))
        and getattr(node, "module", "") != "__future__"
    ):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def names_used(nodes: list, but: ast.stmt) -> set[str]:
    """The names read or written anywhere in ``nodes`` other than ``but``."""
    return {x.id for n in nodes if n is not but for x in ast.walk(n) if isinstance(x, ast.Name)}


def removable(node: ast.stmt, used: set[str]) -> bool:
    """Whether a top-level statement of fast/ops.py goes once nothing uses it: an import or a
    private name (``_blocks``), that no name in ``used`` reads."""
    names = bound_names(node)
    private = isinstance(node, (ast.Import, ast.ImportFrom)) or all(
        n.startswith("_") for n in names
    )
    return bool(names) and private and not names & used


def without_fast_ops(source: str, reference_ops: set[str]) -> str:
    """fast/ops.py ``source`` without the classes that subclass one of ``reference_ops``
    (``class X(F.Name)``, F the module's name for functional), their entries in the
    ``FAST_OPS`` registration, and the private helpers and imports only they used."""
    tree = ast.parse(source)
    alias = next(
        a.asname or a.name
        for n in tree.body
        if isinstance(n, ast.ImportFrom)
        for a in n.names
        if a.name == "functional"
    )
    gone = [
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef)
        and any(ast.unparse(b) in {f"{alias}.{r}" for r in reference_ops} for b in n.bases)
    ]
    removed = {n.name for n in gone}
    while True:  # then whatever nothing left uses, one layer at a time
        live = [n for n in tree.body if n not in gone]
        unused = [n for n in live if removable(n, names_used(live, n))]
        if not unused:
            break
        gone += unused
    lines = source.splitlines(keepends=True)
    spans = [
        (min([n.lineno, *(d.lineno for d in getattr(n, "decorator_list", []))]), n.end_lineno)
        for n in gone
    ]
    spans += [
        (key.lineno, value.end_lineno)
        for d in ast.walk(tree)
        if isinstance(d, ast.Dict)
        for key, value in zip(d.keys, d.values, strict=True)
        if isinstance(value, ast.Name) and value.id in removed
    ]
    for start, end in sorted(spans, reverse=True):
        while start > 1 and lines[start - 2].lstrip().startswith("#"):
            start -= 1  # the comment above goes with it
        del lines[start - 1 : end]
    return re.sub(r"\n{4,}", "\n\n\n", "".join(lines)).rstrip("\n") + "\n"


def with_default_ops(source: str, ops: str) -> str:
    """backend.py ``source`` with ``DEFAULT_OPS = ops``."""
    tree = ast.parse(source)
    node = next(
        n for n in tree.body if isinstance(n, ast.Assign) and bound_names(n) == {"DEFAULT_OPS"}
    )
    lines = source.splitlines(keepends=True)
    lines[node.lineno - 1 : node.end_lineno] = [f"DEFAULT_OPS = {json.dumps(ops)}\n"]
    return "".join(lines)


def copy_source(assignment: Assignment, name: str, text: str) -> str:
    """What a student copy holds in the package file ``name`` (``"functional.py"``) whose
    library text is ``text``: the assignment's targets stubbed; in fast/ops.py, no fast
    version of a stubbed reference op (it would hold the answer); in backend.py, the
    reference ops by default (so the student's code runs; ``MINILORA_OPS=fast`` still works,
    the stripped ops running their reference)."""
    targets = targets_by_file(assignment)
    if name in targets:
        text = stub_source(text, targets[name])
    if name == FAST_OPS_FILE:
        functional = (PACKAGE_DIR / "functional.py").read_text(encoding="utf-8")
        stubs = targets.get("functional.py", {})
        text = without_fast_ops(text, stubbed_reference_ops(functional, stubs))
    if name == BACKEND_FILE:
        text = with_default_ops(text, "reference")
    return text


def copied_files(assignment: Assignment) -> list[str]:
    """The package files a student copy changes: the targets' files, fast/ops.py, backend.py."""
    return sorted({*targets_by_file(assignment), FAST_OPS_FILE, BACKEND_FILE})


def changed_files(assignment: Assignment, package: Path) -> list[str]:
    """The files of a student's ``package`` that differ from the copy :func:`make_copy` writes
    outside the assignment's functions (their bodies are compared as stubs), or are missing."""
    targets = targets_by_file(assignment)
    changed = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name = str(path.relative_to(PACKAGE_DIR))
        theirs = package / name
        if not theirs.is_file():
            changed.append(f"{name} (missing)")
            continue
        reference = path.read_text(encoding="utf-8")
        ours = copy_source(assignment, name, reference)
        their_text = theirs.read_text(encoding="utf-8")
        if name in targets:
            try:
                their_text = stub_source(their_text, targets[name], reference)
            except (SyntaxError, ValueError):
                changed.append(name)
                continue
        if ours != their_text:
            changed.append(name)
    return changed


PORT_TEMPLATE = """\
# The command that runs your port (minilora grade a5 runs it in this folder). The grader
# replaces IN by a folder of inputs it has just drawn and OUT by an empty folder for your
# port's set: copy each case's inputs, add your outputs and gradients (the handout says how).
python my_port.py IN OUT
"""


def _copy_package(destination: Path) -> None:
    shutil.copytree(PACKAGE_DIR, destination, ignore=shutil.ignore_patterns("__pycache__"))


def make_copy(name: str, out) -> Path:
    """Write the student copy of assignment ``name`` into folder ``out``: ``out/minilora``
    (this package, with only the assignment's targets stubbed, and the changes of
    :func:`copy_source`) and ``out/<name>.md``, the handout (:func:`handout_text`). Built in
    a temporary folder beside ``out`` and moved into place, so a failure leaves no half-made
    copy. Refuses an ``out`` that already holds a ``minilora`` folder."""
    assignment = get_assignment(name)
    out = Path(out)
    if (out / "minilora").exists():
        raise ValueError(f"{out / 'minilora'} already exists; choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".minilora-", dir=out))
    try:
        _copy_package(work / "minilora")
        for filename in copied_files(assignment):
            path = work / "minilora" / filename
            text = copy_source(assignment, filename, path.read_text(encoding="utf-8"))
            path.write_text(text, encoding="utf-8")
        (work / "handout.md").write_text(handout_text(assignment), encoding="utf-8")
        if assignment.port and not os.path.lexists(out / "port.txt"):  # the student edits it
            (work / "port.txt").write_text(PORT_TEMPLATE, encoding="utf-8")
            os.replace(work / "port.txt", out / "port.txt")
        os.replace(work / "handout.md", out / f"{name}.md")
        os.replace(work / "minilora", out / "minilora")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / "minilora"


def graded_files(assignment: Assignment) -> dict[str, list[str]]:
    """``{"minilora/lora.py": ["a3.1", ...]}``: the files a student edits, in the order the
    tasks name them, each with the tasks graded there."""
    files: dict[str, list[str]] = {}
    for task in assignment.tasks:
        for target in task.targets:
            tasks = files.setdefault(f"minilora/{target_file(split_target(target)[0])}", [])
            if task.id not in tasks:
                tasks.append(task.id)
    return files


def files_section(assignment: Assignment) -> str:
    """The handout's first section: which files to open, and what is graded in each ("" for
    a port, which is graded from its vectors)."""
    if assignment.port:
        return ""
    lines = [f"- `{path}`: {', '.join(tasks)}" for path, tasks in graded_files(assignment).items()]
    return "\n".join(["## Your files", "", *lines, "", "Everything else is the working library."])


def handout_text(assignment: Assignment) -> str:
    """The handout: its page (shipped with the package, so every copy carries the whole of
    it), opened, but for a port, by the files the student edits (from the manifest, so they
    always match what is stubbed)."""
    text = assignment.handout.read_text(encoding="utf-8")
    if assignment.port:
        return text
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{files_section(assignment)}\n{rest}"


# ======================================================================================
# A Gradescope autograder
# ======================================================================================

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, when the autograder image is built: the versions of minilora's
# dependencies that the course used when this autograder was made, then minilora itself.
set -euo pipefail
apt-get update -q && apt-get install -y -q python3 python3-pip python3-venv
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install -q {pins}
/autograder/venv/bin/pip install -q --no-deps /autograder/source/minilora-src
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission: the student's minilora/ folder is somewhere in
# /autograder/submission (at its top, or a folder or two down; with several, the grader
# takes the shallowest and its report says which).
set -uo pipefail
results=/autograder/results/results.json
mkdir -p /autograder/results
/autograder/venv/bin/minilora grade {name} /autograder/submission --gradescope "$results"{extra}
exit 0  # the score is in results.json; a failing grade is not a failing autograder
"""


def pinned_requirements() -> list[str]:
    """``name==version`` for each dependency of minilora, at the version installed here."""
    from importlib import metadata

    pins = []
    for requirement in metadata.requires("minilora") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        pins.append(f"{name}=={metadata.version(name)}")
    return pins


def autograder_zip(name: str, extra_tests=None) -> bytes:
    """A Gradescope autograder for assignment ``name``, as the bytes of a zip: ``setup.sh``
    (minilora's dependencies pinned to the versions installed here), ``run_autograder``,
    the minilora source (``minilora-src/``) that setup.sh installs, and the hidden tests
    (``hidden/``: the ``*.py`` files of ``extra_tests``, if given), shown to students only
    once the grades are published. Needs the repository's ``pyproject.toml`` beside this
    package (a clone, or an editable install)."""
    get_assignment(name)
    source = PACKAGE_DIR.parent
    if not (source / "pyproject.toml").is_file():
        raise ValueError(
            f"{source} has no pyproject.toml: build the autograder from a clone of the "
            "minilora repository (pip install -e .)"
        )
    hidden = sorted(Path(extra_tests).glob("*.py")) if extra_tests is not None else []
    if extra_tests is not None and not hidden:
        raise ValueError(f"--extra-tests {extra_tests} holds no *.py file")
    extra = " --extra-tests /autograder/source/hidden" if hidden else ""
    scripts = {
        "setup.sh": SETUP_SH.format(pins=" ".join(pinned_requirements())),
        "run_autograder": RUN_AUTOGRADER.format(name=name, extra=extra),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for script, text in scripts.items():
            info = zipfile.ZipInfo(script)
            info.external_attr = 0o755 << 16  # executable, as Gradescope requires
            z.writestr(info, text)
        for path in sorted(PACKAGE_DIR.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                z.write(path, f"minilora-src/minilora/{path.relative_to(PACKAGE_DIR)}")
        for extra_file in ("pyproject.toml", "README.md"):
            z.write(source / extra_file, f"minilora-src/{extra_file}")
        for path in hidden:
            z.write(path, f"hidden/{path.name}")
    return buffer.getvalue()
