"""``minilora vectors``: write the reference vectors a port checks itself against, or check
a port's set against minilora, tensor by tensor (minilora/interop/vectors.py; guide:
docs/porting.md)."""

from __future__ import annotations

from minilora.cli.options import add_overwrite_option, check_out, refuse_repeats


def add_vectors_command(sub) -> None:
    p = sub.add_parser(
        "vectors",
        help="write reference vectors for a port, or check a port's vectors",
        description="--out DIR writes, for every op, a LoRALinear and a tiny GPT with LoRA, "
        "the inputs, weights, upstream gradient, outputs and gradients as safetensors files, "
        "with a manifest.json. --check DIR compares a set written by another implementation "
        "(same inputs, its own outputs and gradients) with minilora, tensor by tensor, and "
        "exits 1 on any mismatch. Guide: docs/porting.md.",
        epilog="example: minilora vectors --out ref && minilora vectors --check my_port_set",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="DIR", help="write minilora's reference set to DIR")
    what.add_argument("--check", metavar="DIR", help="check the set in DIR against minilora")
    p.add_argument("--seed", type=int, default=0, help="with --out: input seed (default 0)")
    p.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32"),
        help="with --out: dtype of the set (default float64; float32 to check float32 code)",
    )
    p.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help="with --check: check only this case (repeatable), for a port in progress",
    )
    p.add_argument("--quiet", action="store_true", help="with --check: print only failures")
    add_overwrite_option(p)
    p.set_defaults(func=_cmd_vectors)


def _cmd_vectors(args) -> int:
    from minilora.interop import vectors  # builds its cases on import

    if args.out:
        check_out(args.out, "folder", args.overwrite)
        manifest = vectors.write_vectors(args.out, seed=args.seed, dtype=args.dtype)
        print(
            f"wrote {len(manifest['cases'])} cases ({args.dtype}, seed {args.seed}) and "
            f"{vectors.MANIFEST_NAME} to {args.out}"
        )
        return 0
    refuse_repeats("--case", args.case or [])
    report = vectors.check_vectors(args.check, cases=args.case)
    lines = report.format().splitlines()
    if args.quiet:
        lines = [lines[0], *(r.line() for r in report.failures), lines[-1]]
    print("\n".join(lines))
    return 0 if report.ok else 1
