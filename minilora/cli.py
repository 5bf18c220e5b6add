"""The ``minilora`` command: ``minilora <command> --help`` explains each one."""

from __future__ import annotations

import argparse
import json
import sys

from minilora import accounting


def _add_count_command(sub) -> None:
    p = sub.add_parser(
        "count",
        help="closed-form parameter, memory and FLOP counts for a model shape",
        description="Closed-form LoRA accounting for a preset or a shape given by flags: "
        "parameters, training memory (full fine-tuning vs LoRA), adapter size and FLOPs per "
        "token. Formulas: docs/accounting.md.",
        epilog="example: minilora count --preset gpt3-175b --targets q_proj,v_proj --r 4 "
        "--dtype float16",
    )
    names = ", ".join(accounting.PRESETS)
    p.add_argument("--preset", help=f"a real model shape: {names}")
    shape = p.add_argument_group("shape (instead of, or overriding, a preset)")
    for flag in ("n-layer", "n-embd", "n-head", "vocab-size", "block-size"):
        shape.add_argument(f"--{flag}", type=int, metavar="N")
    shape.add_argument(
        "--model-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="biases in Linear and LayerNorm layers (default: on)",
    )
    shape.add_argument(
        "--tied",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lm_head shares the token embedding (default: on for presets, "
        "off for a shape from flags, like minilora's GPT)",
    )
    shape.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="model dropout (only changes the activation estimate)",
    )
    lora = p.add_argument_group("LoRA")
    lora.add_argument(
        "--targets",
        help="comma-separated leaf names (default: q_proj,v_proj); "
        f"valid: {','.join(accounting.TARGET_MODULES)}",
    )
    lora.add_argument(
        "--r",
        default="8",
        help="rank for every target (default 8), or per-module ranks such as q_proj=4,v_proj=8",
    )
    lora.add_argument(
        "--bias",
        default="none",
        choices=accounting.BIAS_MODES,
        help="which biases train with the adapter (default: none)",
    )
    lora.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        help="dropout on the bypass input (only changes activations)",
    )
    run = p.add_argument_group("training setup")
    run.add_argument(
        "--dtype",
        default="float32",
        choices=list(accounting.DTYPE_BYTES),
        help="one dtype for weights, gradients, optimizer state and activations (default: float32)",
    )
    run.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    run.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: block size)"
    )
    run.add_argument(
        "--optimizer",
        default="adamw",
        choices=list(accounting.OPTIMIZER_STATES),
        help="adamw keeps 2 moments per trainable parameter, sgd-momentum 1, "
        "sgd 0 (default: adamw)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_count)


def _cmd_count(args) -> int:
    flags = {
        "n_layer": args.n_layer,
        "n_embd": args.n_embd,
        "n_head": args.n_head,
        "vocab_size": args.vocab_size,
        "block_size": args.block_size,
        "bias": args.model_bias,
        "tied": args.tied,
        "dropout": args.dropout,
    }
    try:
        shape = accounting.resolve_shape(args.preset, **flags)
        r = accounting.parse_ranks(args.r)
        spec = accounting.LoRASpec(args.targets, r, args.bias, args.lora_dropout)
        rep = accounting.report(
            shape, spec, args.dtype, args.batch_size, args.seq_len, args.optimizer
        )
    except ValueError as e:
        print(f"minilora count: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep) if args.json else accounting.format_report(rep))
    return 0


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
