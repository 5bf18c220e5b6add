"""``minilora assignments`` (list, make a student copy, build a Gradescope autograder) and
``minilora grade`` (grade a student's package in a process of its own): the course
commands, over minilora/course/ (guide: docs/teaching.md)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from minilora.cli.options import (
    add_overwrite_option,
    check_out,
    non_negative_int,
    positive_float,
)
from minilora.course import assignments, grading
from minilora.interop import safetensors_files


def add_course_commands(sub) -> None:
    _add_assignments_command(sub)
    _add_grade_command(sub)


def _add_assignments_command(sub) -> None:
    p = sub.add_parser(
        "assignments",
        help="course assignments: list them, make a student copy, build a Gradescope autograder",
        description="Student copies are generated from this library's source: only the "
        "assignment's functions are stubs. Guide: docs/teaching.md.",
    )
    what = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = what.add_parser("list", help="one assignment a line: name, title, total points")
    q.set_defaults(func=_cmd_assignments_list)
    q = what.add_parser(
        "make",
        help="write a student copy: a working minilora/ package with NAME's tasks stubbed",
        epilog="example: minilora assignments make a3 --out a3 && minilora grade a3 a3",
    )
    q.add_argument("name", help=f"the assignment: {', '.join(assignments.ASSIGNMENTS)}")
    q.add_argument("--out", required=True, metavar="DIR", help="(required) folder to write")
    q.set_defaults(func=_cmd_assignments_make)
    q = what.add_parser(
        "autograder",
        help="write a Gradescope autograder zip (setup.sh, run_autograder) for NAME",
    )
    q.add_argument("name", help=f"the assignment: {', '.join(assignments.ASSIGNMENTS)}")
    q.add_argument("--out", required=True, metavar="ZIP", help="(required) zip file to write")
    q.add_argument(
        "--extra-tests",
        metavar="DIR",
        help="hidden tests (DIR/*.py, as minilora grade --extra-tests takes them) baked into "
        "the zip: their results are shown to students once the grades are published",
    )
    add_overwrite_option(q)
    q.set_defaults(func=_cmd_assignments_autograder)


def _add_grade_command(sub) -> None:
    p = sub.add_parser(
        "grade",
        help="grade a student's minilora/ package on an assignment",
        description="Imports the minilora/ package in DIR (never the installed one) in a "
        "separate process, on the reference ops, and checks each task with properties on "
        "random shapes: a table of points, and a line per failure. Exit status 0 only when "
        "every task passes.",
        epilog="example: minilora grade a3 /tmp/a3 --gradescope results.json",
    )
    p.add_argument("name", help=f"the assignment: {', '.join(assignments.ASSIGNMENTS)}")
    p.add_argument(
        "dir", nargs="?", default=".", help="folder holding minilora/ (default: this folder)"
    )
    p.add_argument("--task", metavar="ID", help="grade one task only, e.g. a3.4")
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=None,
        help="seed of the random shapes and values (default: one derived from the graded "
        "files, so the same code scores the same)",
    )
    p.add_argument(
        "--extra-tests",
        metavar="DIR",
        help="hidden tests: functions check_a1_7_<anything>(ctx) in DIR/*.py grade task a1.7",
    )
    p.add_argument(
        "--port",
        metavar="CMD",
        help="a5: the port's command, with the words IN and OUT where its folders go "
        "(default: the first line of DIR/port.txt), e.g. 'python my_port.py IN OUT'",
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument(
        "--gradescope",
        metavar="FILE",
        help="also write Gradescope's results.json (before grading starts, after each task, "
        "and at the end)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=540,
        metavar="SECONDS",
        help="the whole run's time limit: checks not started by then are not graded (default: 540)",
    )
    p.add_argument(
        "--check-timeout",
        type=positive_float,
        default=60,
        metavar="SECONDS",
        help="one check's time limit, the student's import included (default: 60)",
    )
    p.add_argument(
        "--memory",
        type=positive_float,
        default=2,
        metavar="GIB",
        help="the memory (address space) of the process that runs the student's code, in "
        "GiB (default: 2)",
    )
    p.add_argument(
        "--user",
        help="when grading as root, the unprivileged user the student's code runs as "
        "(default: nobody, where nobody can run this Python)",
    )
    p.set_defaults(func=_cmd_grade)


def _cmd_assignments_list(args) -> int:
    for a in assignments.ASSIGNMENTS.values():
        print(f"{a.name}  {a.title}  ({a.points} points, {len(a.tasks)} tasks)")
    return 0


def _cmd_assignments_make(args) -> int:
    assignment = assignments.get_assignment(args.name)
    out = check_out(args.out, "folder", overwrite=True)  # make_copy never replaces a copy
    package = assignments.make_copy(args.name, out)
    handout = out / f"{args.name}.md"
    if assignment.port:
        print(
            f"{args.name} is a porting assignment: nothing is stubbed; wrote {package}, the "
            f"working library to port from, and the handout {handout} ({assignment.points} "
            f"points); write your port's command in {out / 'port.txt'} and grade it with: "
            f"minilora grade {args.name} {out}"
        )
        return 0
    print(
        f"wrote {package}: minilora with the {len(assignment.tasks)} tasks of {args.name} "
        f"stubbed ({assignment.points} points), and the handout {handout}; grade it with: "
        f"minilora grade {args.name} {out}"
    )
    return 0


def _cmd_assignments_autograder(args) -> int:
    assignments.get_assignment(args.name)
    out = check_out(args.out, "file", args.overwrite)
    data = assignments.autograder_zip(args.name, args.extra_tests)
    safetensors_files.atomic_write([(out, data)])
    print(f"wrote {out}: a Gradescope autograder for {args.name} (upload it as a zip file)")
    return 0


def _write_reports(args, report) -> None:
    for flag, data in (("json", report.to_dict), ("gradescope", report.gradescope)):
        if getattr(args, flag):
            text = json.dumps(data(), indent=2, ensure_ascii=False) + "\n"
            safetensors_files.atomic_write([(Path(getattr(args, flag)), text.encode())])


@contextlib.contextmanager
def _failure_in_results(args):
    """A submission that cannot be graded (no minilora/ package) still gets results.json,
    saying why."""
    try:
        yield
    except ValueError as e:
        if args.gradescope:
            data = {"score": 0, "output": str(e), "tests": []}
            safetensors_files.atomic_write([(Path(args.gradescope), json.dumps(data).encode())])
        raise


def _cmd_grade(args) -> int:
    for flag in ("json", "gradescope"):
        if getattr(args, flag):
            check_out(getattr(args, flag), "file", overwrite=True)  # a report, made again
    if args.gradescope:  # a valid file whatever happens next (a grader killed outright)
        unfinished = grading.unfinished(args.name, args.dir, args.task, grading.UNFINISHED)
        safetensors_files.atomic_write(
            [(Path(args.gradescope), json.dumps(unfinished.gradescope(), indent=2).encode())]
        )
    with grading.stop_on_signals(), _failure_in_results(args):
        report = grading.grade(
            args.name,
            args.dir,
            args.task,
            args.seed,
            args.extra_tests,
            timeout=args.timeout,
            check_timeout=args.check_timeout,
            memory=int(args.memory * 2**30),
            user=args.user,
            progress=(lambda r: _write_reports(args, r)) if args.gradescope else None,
            port=args.port,
        )
    print(report.format())
    _write_reports(args, report)
    return 0 if report.ok else 1
