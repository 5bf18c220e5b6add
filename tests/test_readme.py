"""The README's promises: CI runs its quick start's steps and test command, its example runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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
    spoiled = [
        ("CI skips an install step", README, script.replace(".venv/bin/pip install .\n", "")),
        ("CI runs another command", README, script.replace(test_command, "python -m pytest")),
        ("another Python differs", README, script.replace(other_python, other_python + " -x")),
        ("another Python skips a step", README, script.replace(other_install, "true")),
        ("an && list", README, script.replace(test_command, "true && " + test_command)),
        ("a global install", README.replace(".venv/bin/pip install .", "pip install ."), script),
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
