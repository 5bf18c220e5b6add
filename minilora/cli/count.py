"""``minilora count``: closed-form parameter, memory and FLOP counts for a model shape
(formulas in minilora/study/accounting.py and docs/accounting.md), the flags that name the
shape and the ranks, and the table it prints (which notebook 05 prints too)."""

from __future__ import annotations

import argparse
import json
import sys

from minilora.cli.options import comma_items, int_option
from minilora.lora import BIAS_MODES
from minilora.study import accounting

# Bounds beyond any real model (the largest published ones have about 2·10^12 parameters,
# a few hundred layers, widths of tens of thousands): an integer flag above MAX_FLAG, or a
# shape with more than MAX_PARAMS parameters, is refused, naming it. Past them the counts
# describe nothing real, and the ratios printed lose their meaning ("whole step: 0.0%").
MAX_FLAG = 10**9
MAX_PARAMS = 10**15
count_int = int_option(1, MAX_FLAG, ", beyond any real model")


def add_count_command(sub) -> None:
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
        help = f"{flag} of the model (at most {MAX_FLAG:,})"
        shape.add_argument(f"--{flag}", type=count_int, metavar="N", help=help)
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
        choices=BIAS_MODES,
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
    run.add_argument(
        "--batch-size", type=count_int, default=1, help="sequences per step (default 1)"
    )
    run.add_argument(
        "--seq-len", type=count_int, default=None, help="tokens per sequence (default: block size)"
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
        shape = resolve_shape(args.preset, **flags)
        r = parse_ranks(args.r)
        targets = None if args.targets is None else comma_items("--targets", args.targets)
        spec = accounting.LoRASpec(targets, r, args.bias, args.lora_dropout)
        rep = accounting.report(
            shape, spec, args.dtype, args.batch_size, args.seq_len, args.optimizer
        )
    except ValueError as e:
        print(f"minilora count: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


# ---- what ``minilora count`` reads from its flags and prints ----------------------------


def resolve_shape(preset: str | None = None, **flags) -> accounting.Preset | accounting.ModelShape:
    """A preset by name, a shape from ``ModelShape`` fields, or a preset with some fields
    overridden (then no longer the published model: a plain ``ModelShape``). Fields given
    as None are ignored; without a preset every size field is required. A shape of more
    than ``MAX_PARAMS`` parameters is refused, naming the flags that give it."""
    given = {k: v for k, v in flags.items() if v is not None}
    sizes = ("n_layer", "n_embd", "n_head", "vocab_size", "block_size")
    if preset is not None:
        found = accounting.get_preset(preset)
        shape = accounting.ModelShape(**{**found.shape.to_dict(), **given}) if given else found
    else:
        missing = [k for k in sizes if k not in given]
        if missing:
            names = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ValueError(
                f"give --preset ({', '.join(accounting.PRESETS)}) or every shape flag; "
                f"missing: {names}"
            )
        shape = accounting.ModelShape(**given)
    total = accounting.total_params(shape)
    if total > MAX_PARAMS:
        named = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if k in sizes)
        raise ValueError(
            f"{named} gives a model of {total:.3g} parameters, more than {MAX_PARAMS:.0e}, "
            "beyond any real model (GPT-3 has 1.75e11); check the shape flags"
        )
    return shape


def parse_ranks(text: str):
    """``"4"`` -> 4; ``"q_proj=4,v_proj=8"`` -> ``{"q_proj": 4, "v_proj": 8}``. A value that
    is not an integer is kept as text, so that :meth:`LoRASpec.ranks` refuses it with a
    message naming the module and its shape; a module named twice is refused."""

    def number(value: str):
        value = value.strip()
        return int(value) if value.lstrip("-").isdigit() else value

    if "=" not in text:
        return number(text)
    ranks = {}
    for item in comma_items("--r", text, key=lambda item: item.partition("=")[0].strip()):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--r: {item!r} should look like name=rank, e.g. q_proj=4")
        ranks[name.strip()] = number(value)
    return ranks


def format_report(rep: dict) -> str:
    """The table ``minilora count`` prints, from a :func:`report` dict."""
    s, lo = rep["shape"], rep["lora"]
    title = f"{rep['preset']} ({rep['preset_title']})" if "preset" in rep else "shape from flags"
    ranks = ", ".join(f"{k}={v}" for k, v in lo["ranks"].items())
    lines = [
        f"minilora count: {title}",
        f"  n_layer={s['n_layer']} n_embd={s['n_embd']} n_head={s['n_head']} "
        f"vocab_size={s['vocab_size']} block_size={s['block_size']} bias={s['bias']} "
        f"tied={s['tied']}",
        f"  LoRA ranks: {ranks}; bias={lo['bias']}",
        f"  dtype={rep['dtype']} ({rep['bytes_per_element']} bytes), optimizer="
        f"{rep['optimizer']}, batch_size={rep['batch_size']}, seq_len={rep['seq_len']}",
        "",
        "Parameters",
    ]

    def row(label, n, note=""):
        return f"  {label:<34}{n:>20,}  {human_count(n):>7}{'  ' + note if note else ''}"

    total = rep["total_params"]
    note = "tied embeddings" if s["tied"] else "untied embeddings"
    if "published_params" in rep:
        published = rep["published_params"]
        note += (
            f"; published {human_count(published)} ({100 * (total - published) / published:+.2f}%)"
        )
    other = ("base model, untied", "total_params_untied")
    if not s["tied"]:
        other = ("base model, tied", "total_params_tied")
    lines += [
        row("base model", total, note),
        row(other[0], rep[other[1]]),
        row("LoRA adapter matrices", rep["lora_params"]),
        row("all (base + adapter)", rep["all_params"]),
        row("trainable, full fine-tuning", rep["trainable_params_full_ft"]),
        row(
            "trainable, LoRA",
            rep["trainable_params"],
            f"{100 * rep['trainable_fraction']:.4f}% of all",
        ),
        "",
        f"Training memory, bytes            {'full fine-tuning':>22}{'LoRA':>22}",
    ]
    full, lm = rep["memory_full_ft"], rep["memory_lora"]
    labels = {
        "weights": "weights",
        "gradients": "gradients",
        "optimizer_state": f"optimizer state ({rep['optimizer']})",
        "activations": "activations (saved for backward)",
        "total": "total",
    }
    for key, label in labels.items():
        lines.append(f"  {label:<34}{human_bytes(full[key]):>20}  {human_bytes(lm[key]):>20}")
    lines += [
        f"  {'full / LoRA':<34}{full['total'] / lm['total']:>42.2f}x",
        "",
        f"Adapter checkpoint                {human_bytes(rep['adapter_bytes']):>20}"
        f"  ({rep['adapter_bytes']:,} bytes of tensors)",
        "",
        f"FLOPs per token (matmuls)         {'full fine-tuning':>22}{'LoRA':>22}",
    ]
    ff, fl = rep["flops_full_ft"], rep["flops_lora"]
    for key, label in (("forward", "forward"), ("backward", "backward"), ("total", "step")):
        lines.append(f"  {label:<34}{human_flops(ff[key]):>20}  {human_flops(fl[key]):>20}")
    lines += [
        f"  weight gradients in full fine-tuning's backward: "
        f"{100 * rep['weight_gradient_share']:.1f}% (LoRA computes none for frozen weights)",
        f"  backward work LoRA removes, net: {100 * rep['backward_share_removed']:.1f}%; "
        f"whole step: {100 * rep['step_share_removed']:.1f}%",
    ]
    return "\n".join(lines)


def human_count(n: int) -> str:
    """174604259328 -> '174.6B' (decimal, 4 significant digits, as sizes are quoted)."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.4g}{unit}"
    return str(n)


def human_flops(n: int) -> str:
    """358791143424 -> '358.8 GFLOP'; 1076373430272 -> '1.076 TFLOP'."""
    for unit, size in (
        ("PFLOP", 10**15),
        ("TFLOP", 10**12),
        ("GFLOP", 10**9),
        ("MFLOP", 10**6),
        ("kFLOP", 10**3),
    ):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} FLOP"


def human_bytes(n: int) -> str:
    """Decimal units, as papers quote them ('350GB' for 175B float16 weights)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"
