"""The ``minilora`` command: ``minilora <command> --help`` explains each one. This file
builds the parser from the command groups (jobs, count, vectors, course; shared options in
options.py) and runs a command, turning bad input into one line and exit status 2, and
Ctrl-C into one line and exit status 130."""

from __future__ import annotations

import argparse
import sys
import warnings

from minilora.cli.count import add_count_command
from minilora.cli.course import add_course_commands
from minilora.cli.jobs import add_job_commands
from minilora.cli.vectors import add_vectors_command


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (not a usage block) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minilora",
        description="LoRA from nothing: a tiny GPT, hand-written autograd, low-rank adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_job_commands(sub)
    add_count_command(sub)
    add_vectors_command(sub)
    add_course_commands(sub)
    return parser


def _one_line(error: BaseException) -> str:
    """An error as one line: an OSError as "reason: path", a list of problems joined."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    head, *problems = [line.strip() for line in str(error).splitlines()] or [""]
    return " ".join([head, "; ".join(problems)]) if problems else head


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = " ".join(["minilora", args.command, *filter(None, [getattr(args, "action", None)])])
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: print(
            f"{prefix}: warning: {message}", file=sys.stderr
        )
        try:
            return args.func(args)
        except (ValueError, OSError, RuntimeError) as e:  # bad input: a message, not a trace
            print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C: every file is written atomically, so none is partial
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130  # 128 + SIGINT, as a shell reports it
