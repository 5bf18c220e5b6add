"""The README's promises: its test command is the one CI runs, and its example runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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
