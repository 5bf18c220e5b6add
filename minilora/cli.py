"""The ``minilora`` command: ``minilora <command> --help`` explains each one."""

from __future__ import annotations

import argparse
import sys


def _add_count_command(sub) -> None:
    p = sub.add_parser(
        "count",
        help="closed-form parameter, memory and FLOP counts for a model shape",
        description="Closed-form LoRA accounting for a preset or a shape given by flags.",
    )
    p.set_defaults(func=_cmd_count)


def _cmd_count(args) -> int:
    raise NotImplementedError("count is being written")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="LoRA from nothing: a tiny GPT, hand-written autograd, low-rank adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_count_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
