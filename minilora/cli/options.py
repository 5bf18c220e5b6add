"""What every group of the ``minilora`` command shares: option types that refuse an invalid
value when the command line is read (never replacing it by a default), the flags of every
training or inference command, and the checks run before any work (--out, mixed modes)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from minilora import backend, fast
from minilora.lora import count_parameters

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # never written to (its base model is shipped)


def int_option(least: int, most: int | None = None, beyond: str = ""):
    """An argparse type: an integer, at least ``least`` and, when given, at most ``most``
    (``beyond`` says what a larger value would mean, for the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        if most is not None and value > most:
            shown = text.strip() if len(text.strip()) <= 20 else f"{value:.3g}"
            raise argparse.ArgumentTypeError(f"{shown} is more than {most:,}{beyond}")
        return value

    return parse


def float_option(positive: bool):
    """An argparse type: a finite number, > 0 when ``positive``, else >= 0 (nan refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0 < value < math.inf if positive else 0 <= value < math.inf):
            raise argparse.ArgumentTypeError(
                f"{text} is not a finite number {'> 0' if positive else '>= 0'}"
            )
        return value

    return parse


positive_int, non_negative_int = int_option(1), int_option(0)
positive_float, non_negative_float = float_option(True), float_option(False)


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction strictly between 0 and 1")
    return value


def comma_items(flag: str, text: str, key=None) -> list[str]:
    """The comma-separated items of ``flag``'s value, stripped, empty ones dropped. An item
    whose key (``key(item)``, default the item) repeats an earlier one is refused, naming
    the flag and the key: a later value would otherwise silently replace the first."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    refuse_repeats(flag, [item if key is None else key(item) for item in items])
    return items


def refuse_repeats(flag: str, keys: list[str]) -> None:
    """Refuse a key given twice in one flag, naming the flag and the key."""
    seen = set()
    for k in keys:
        if k in seen:
            raise ValueError(f"{flag}: {k} is given twice; give each once")
        seen.add(k)


# --threads' default: models of at least this many parameters use every core. On a shared
# 2-core machine (docs/performance.md) a step of the benchmarks' small shape (0.8M parameters)
# ran ten times slower on two threads than on one, and a LoRA step on GPT-2 small (124M) ran
# 1.66 times quicker on two while the other core was free (730 and 439 ms); the
# threshold is a choice between them, below the smallest GPT-2 on the hub (distilgpt2, 82M).
ALL_CORES_FROM = 50_000_000


def default_threads(n_parameters: int, cores: int) -> int:
    """--threads' default for a model of ``n_parameters``: 1 below :data:`ALL_CORES_FROM`
    (small matrices: extra threads mostly wait), else ``cores``."""
    return cores if n_parameters >= ALL_CORES_FROM else 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def add_run_options(p, out_help: str | None = None) -> None:
    """Flags every training or inference command shares (and --out, when it writes)."""
    p.add_argument(
        "--device",
        default=os.environ.get("MINILORA_DEVICE", "cpu"),
        help="cpu or cuda (default: $MINILORA_DEVICE or cpu)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=f"BLAS threads (default: fits the model: 1 below {ALL_CORES_FROM // 10**6}M "
        "parameters, such as the digit tasks' models, whose small matrices extra threads only "
        "slow down; every core this process may use from there, such as GPT-2 small's 124M; "
        "on a machine other jobs keep busy, give 1; docs/text.md)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide progress bars (and, when stderr is not a terminal, the periodic progress lines)",
    )
    if out_help:
        p.add_argument("--out", required=out_help.startswith("(required)"), help=out_help)
        add_overwrite_option(p)


def add_overwrite_option(p) -> None:
    """--overwrite, for a command whose --out may already exist (see :func:`check_out`)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write --out even when it exists (a file) or is not empty (a folder); without "
        "it such an --out is refused before any work",
    )


def set_up_run(args) -> None:
    """Apply the shared flags: BLAS threads (--threads, else 1 until :func:`fit_threads`
    sees the model), host memory reuse, and a device that exists."""
    fast.process.set_num_threads(args.threads or 1)
    fast.process.keep_freed_host_memory()  # reuse freed memory step after step (see its docstring)
    backend.check_device(args.device)


def fit_threads(args, model) -> None:
    """Without --threads, use :func:`default_threads` for ``model``, once it is loaded."""
    if args.threads is None:
        n_parameters = count_parameters(model)[1]
        fast.process.set_num_threads(default_threads(n_parameters, usable_cores()))


def check_out(path, kind: str, overwrite: bool) -> Path:
    """Refuse an output path before any work: inside the installed package, of the wrong
    kind (``kind`` is "file" or "folder"), where we cannot write, or, unless ``overwrite``,
    a file that exists or a folder that is not empty (nothing is replaced without a word)."""
    out = Path(path)
    if out.resolve().is_relative_to(PACKAGE_DIR):
        raise ValueError(
            f"--out {out} is inside the installed minilora package ({PACKAGE_DIR}); "
            "minilora never writes there: give a path of your own"
        )
    if out.exists() and kind == "file" and out.is_dir():
        raise ValueError(f"--out {out} is a folder; expected a file name such as model.safetensors")
    if out.exists() and kind == "folder" and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder")
    if out.exists() and not overwrite and (kind == "file" or any(out.iterdir())):
        what = "exists" if kind == "file" else "is a folder that is not empty"
        raise ValueError(
            f"--out {out} {what}; pass --overwrite to replace "
            + ("it" if kind == "file" else "the files of the same name in it")
        )
    # the nearest existing folder is where the file or the new folders will be made
    parent = out if kind == "folder" else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out} is under {parent}, which is a file, not a folder")
    target = out if out.exists() else parent
    if not os.access(target, os.W_OK):
        raise ValueError(f"--out {out}: {target} is not writable")
    return out


def refuse_mixed(args, mode: str, flags: tuple[str, ...]) -> None:
    """Refuse options of the other mode: ``flags`` (attribute names) must all be unset."""
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be used {mode}")
