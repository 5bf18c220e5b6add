"""The ``minilora`` command: ``minilora <command> --help`` explains each one."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from minilora import backend, fast
from minilora.course import assignments, grading
from minilora.data import DOWNSTREAM_TASK, IGNORE_INDEX, TASKS, DigitTasks, decode, encode
from minilora.experiments import compare, demo
from minilora.interop import hf_gpt2, model_files, peft_adapters, safetensors_files
from minilora.lora import BIAS_MODES, LoRAConfig, merge_and_unload
from minilora.study import accounting
from minilora.text import bpe
from minilora.text import corpus as text
from minilora.train import evaluate

TASK_LETTERS = "C copy, R reverse, S sort ascending (the pretraining tasks), D sort descending"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # never written to (its base model is shipped)
# finetune's defaults: the digit tasks' (unchanged), and text's (a real model is slower per
# step, and a pretrained one needs a gentler learning rate)
DIGIT_DEFAULTS = {"steps": 300, "batch_size": 64}
TEXT_DEFAULTS = {"steps": 200, "batch_size": 8, "lr": 1e-3}
TEXT_ADAPTER, TEXT_HELD_OUT, TEXT_NEW_TOKENS = "minilora-adapter", 0.1, 50


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (not a usage block) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Option types: an invalid value is refused when the command line is read, before any
# work, never replaced by a default.


def _int_option(least: int):
    """An argparse type: an integer, at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value

    return parse


def _float_option(positive: bool):
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


_positive_int, _non_negative_int = _int_option(1), _int_option(0)


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction strictly between 0 and 1")
    return value


_positive_float, _non_negative_float = _float_option(True), _float_option(False)


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
        shape.add_argument(f"--{flag}", type=int, metavar="N", help=f"{flag} of the model")
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
        shape = resolve_shape(args.preset, **flags)
        r = parse_ranks(args.r)
        spec = accounting.LoRASpec(args.targets, r, args.bias, args.lora_dropout)
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
    as None are ignored; without a preset every size field is required."""
    given = {k: v for k, v in flags.items() if v is not None}
    if preset is not None:
        found = accounting.get_preset(preset)
        return accounting.ModelShape(**{**found.shape.to_dict(), **given}) if given else found
    sizes = ("n_layer", "n_embd", "n_head", "vocab_size", "block_size")
    missing = [k for k in sizes if k not in given]
    if missing:
        names = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ValueError(
            f"give --preset ({', '.join(accounting.PRESETS)}) or every shape flag; missing: {names}"
        )
    return accounting.ModelShape(**given)


def parse_ranks(text: str):
    """``"4"`` -> 4; ``"q_proj=4,v_proj=8"`` -> ``{"q_proj": 4, "v_proj": 8}``. A value that
    is not an integer is kept as text, so that :meth:`LoRASpec.ranks` refuses it with a
    message naming the module and its shape."""

    def number(value: str):
        value = value.strip()
        return int(value) if value.lstrip("-").isdigit() else value

    if "=" not in text:
        return number(text)
    ranks = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
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


# ======================================================================================
# The job: demo, pretrain, finetune, merge, eval, generate
# ======================================================================================


def _common(p, out_help: str | None = None) -> None:
    """Flags every training or inference command shares."""
    p.add_argument(
        "--device",
        default=os.environ.get("MINILORA_DEVICE", "cpu"),
        help="cpu or cuda (default: $MINILORA_DEVICE or cpu)",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="BLAS threads (default 1: minilora's matrices are small, and extra threads "
        "slow them down on a busy machine)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide progress bars (and, when stderr is not a terminal, the periodic progress lines)",
    )
    if out_help:
        p.add_argument("--out", required=out_help.startswith("(required)"), help=out_help)


def _model_args(p) -> None:
    p.add_argument(
        "--model", help="a model .safetensors file (default: the pretrained base in the package)"
    )
    p.add_argument("--adapter", help="a PEFT adapter folder to load on top of the model")


def _tokenizer_arg(group) -> None:
    group.add_argument(
        "--tokenizer",
        metavar="TOKENIZER_JSON",
        help="a Hugging Face tokenizer.json, byte-level BPE (default: BASE/tokenizer.json when "
        "--base is a folder; required when it is a file)",
    )


def _add_job_commands(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole LoRA story in under a minute on a laptop CPU (the main job)",
        description="Fine-tune the shipped base model to sort descending, fully and with LoRA "
        "at several ranks; print a table; save, merge and time the adapter.",
    )
    _common(p, "output folder (default: minilora-demo)")
    p.add_argument("--quick", action="store_true", help="a smoke run (a few seconds)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "compare",
        help="LoRA beside full fine-tuning, adapters, prefix tuning, QLoRA and compression",
        description="Train each method on the downstream task from the shipped base and print "
        "one row each: trainable parameters, bytes kept for the task, held-out and "
        "pretraining-task accuracy, latency relative to the base, context length. Writes "
        "compare.json (and compare.png with matplotlib).",
    )
    _common(p, "output folder (default: minilora-compare)")
    p.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "pretrain",
        help="train the base model (reproduces the one shipped in the package)",
        description="Pretrain the tiny GPT on copy, reverse and sort-ascending.",
    )
    _common(p, "(required) model file to write (never the package's own base model)")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=demo.PretrainRecipe.steps,
        help=f"optimizer steps (default {demo.PretrainRecipe.steps}, the shipped model's)",
    )
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a task, fully or with LoRA, or with LoRA on text",
        description="Digit tasks (without --data): fine-tune on a task; LoRA writes a PEFT "
        "adapter folder, full fine-tuning writes a model file. Text (with --data FILE.txt or "
        "FILE.jsonl): LoRA on a plain-text file (next-token prediction) or on prompt/response "
        "pairs (loss on the responses), printing the held-out loss before and after. Guide: "
        "docs/text.md.",
        epilog="example: minilora finetune --base gpt2/ --data notes.txt --out my-adapter",
    )
    _common(
        p,
        "adapter folder (lora) or model file (full); required for the digit tasks, "
        f"default {TEXT_ADAPTER} with --data",
    )
    p.add_argument(
        "--base",
        help="base model file (default: the pretrained base); with --data (required): a "
        "minilora model file or a Hugging Face GPT-2 folder",
    )
    p.add_argument(
        "--method",
        choices=("lora", "full"),
        default=None,
        help="lora: train a low-rank adapter, the base frozen; full: train every weight "
        "(default: lora; text fine-tuning is lora only)",
    )
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default=None,
        help=f"the task to learn: {TASK_LETTERS} (default: {DOWNSTREAM_TASK})",
    )
    p.add_argument("--r", type=_positive_int, default=4, help="LoRA rank (default 4)")
    p.add_argument(
        "--alpha",
        "--lora-alpha",
        type=_positive_float,
        default=None,
        help="lora_alpha (default 2·r)",
    )
    p.add_argument(
        "--targets",
        default="q_proj,v_proj",
        help="comma-separated names of the layers LoRA adapts (default: q_proj,v_proj)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"optimizer steps (default {DIGIT_DEFAULTS['steps']}, "
        f"{TEXT_DEFAULTS['steps']} with --data)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="peak learning rate (default 1e-2 for lora, 1e-3 for full, "
        f"{TEXT_DEFAULTS['lr']:g} with --data)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"sequences per step (default {DIGIT_DEFAULTS['batch_size']}, "
        f"{TEXT_DEFAULTS['batch_size']} with --data)",
    )
    group = p.add_argument_group("text (these need --data)")
    group.add_argument(
        "--data",
        metavar="FILE",
        help="fine-tune on text: FILE.txt (plain text) or FILE.jsonl (one "
        '{"prompt": ..., "response": ...} object a line)',
    )
    _tokenizer_arg(group)
    group.add_argument(
        "--held-out",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help=f"share of the data held out to measure the loss (default {TEXT_HELD_OUT}): the "
        "end of a text, or whole prompt/response pairs",
    )
    group.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        help="tokens per training example (default: the model's block_size)",
    )
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "merge",
        help="fold an adapter into its base model and save a plain model",
        description="base + adapter folder -> merged model file (W = W0 + s·B·A). A Hugging "
        "Face GPT-2 folder as --base gives a minilora model file (its head still tied).",
    )
    p.add_argument(
        "--base",
        help="base model file or Hugging Face GPT-2 folder (default: the pretrained base)",
    )
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--out", required=True, help="merged model file to write")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("eval", help="exact-match accuracy of a model on a task")
    _common(p)
    _model_args(p)
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default=DOWNSTREAM_TASK,
        help=f"the task to score: {TASK_LETTERS} (default: {DOWNSTREAM_TASK})",
    )
    p.add_argument(
        "--examples",
        type=_positive_int,
        default=512,
        help="held-out examples to score (default 512)",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "generate",
        help="complete a prompt such as 'D 3 1 4 =', or text with --base",
        description="Digit tasks (without --base): complete a task prompt. Text (with --base): "
        "complete a text prompt with a model file or a Hugging Face GPT-2 folder and its "
        "tokenizer, stopping at the end-of-text token. Guide: docs/text.md.",
        epilog="example: minilora generate --base gpt2/ --adapter my-adapter --prompt 'Once'",
    )
    _common(p)
    _model_args(p)
    p.add_argument(
        "--base",
        help="text mode: a minilora model file or a Hugging Face GPT-2 folder (instead of --model)",
    )
    p.add_argument(
        "--prompt",
        required=True,
        help=f"a task letter ({TASK_LETTERS}), digits and '=', e.g. 'S 3 1 4 ='; with --base, "
        "any text",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="tokens to generate (default: the answer's length, digits + 1; "
        f"{TEXT_NEW_TOKENS} with --base)",
    )
    p.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        help="sampling temperature; 0 picks the most likely token (greedy, the default)",
    )
    group = p.add_argument_group("text (these need --base)")
    _tokenizer_arg(group)
    group.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="sample among the k most likely tokens only (default: all)",
    )
    p.set_defaults(func=_cmd_generate)


def _check_out(path, kind: str) -> Path:
    """Refuse an output path before any work: inside the installed package, of the wrong
    kind (``kind`` is "file" or "folder"), or where we cannot write."""
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


def _setup(args) -> None:
    fast.process.set_num_threads(args.threads)
    fast.process.keep_freed_host_memory()  # reuse freed memory step after step (see its docstring)
    backend.check_device(args.device)


def _load(args):
    model = (
        model_files.load_model(args.model, args.device)
        if args.model
        else demo.load_base(args.device)
    )
    if args.adapter:
        peft_adapters.load_adapter(model, args.adapter)
    return model


def _cmd_demo(args) -> int:
    out = _check_out(args.out if args.out is not None else "minilora-demo", "folder")
    _setup(args)
    settings = (
        demo.DemoSettings.quick(args.seed) if args.quick else demo.DemoSettings(seed=args.seed)
    )
    demo.run_demo(settings, out, args.device, not args.no_progress)
    return 0


def _cmd_compare(args) -> int:
    out = _check_out(args.out if args.out is not None else "minilora-compare", "folder")
    _setup(args)
    settings = (
        compare.CompareSettings.quick(args.seed)
        if args.quick
        else compare.CompareSettings(seed=args.seed)
    )
    compare.run_compare(settings, out, args.device, not args.no_progress)
    return 0


def _cmd_pretrain(args) -> int:
    out = _check_out(args.out, "file")
    _setup(args)
    recipe = demo.PretrainRecipe(steps=args.steps, seed=args.seed)
    model, history = demo.pretrain(recipe, args.device, not args.no_progress)
    model_files.save_model(model, out)
    last = history[-1]
    print(
        f"pretrained {recipe.steps} steps: loss {last['loss']:.4f}, "
        f"accuracy {last.get('accuracy', float('nan')):.1%}; wrote {out}"
    )
    return 0


def _refuse_mixed(args, mode: str, flags: tuple[str, ...]) -> None:
    """Refuse options of the other mode: ``flags`` (attribute names) must all be unset."""
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be used {mode}")


def _cmd_finetune(args) -> int:
    if args.data is not None:
        return _cmd_finetune_text(args)
    _refuse_mixed(
        args, "without --data (they are for text)", ("tokenizer", "held_out", "block_size")
    )
    method = args.method or "lora"
    if args.out is None:
        raise ValueError(
            "--out is required: an adapter folder (lora) or a model file (full) to write"
        )
    _check_out(args.out, "folder" if method == "lora" else "file")  # before training
    _setup(args)
    base = (
        model_files.load_model(args.base, args.device) if args.base else demo.load_base(args.device)
    )
    defaults = demo.DemoSettings()
    settings = demo.DemoSettings(
        steps=args.steps or DIGIT_DEFAULTS["steps"],
        batch_size=args.batch_size or DIGIT_DEFAULTS["batch_size"],
        lr_full=defaults.lr_full if args.lr is None else args.lr,
        lr_lora=defaults.lr_lora if args.lr is None else args.lr,
        targets=tuple(t for t in args.targets.split(",") if t),
        seed=args.seed,
    )
    task = args.task or DOWNSTREAM_TASK
    rank = args.r if method == "lora" else None
    model, opt, config, history = demo.finetune(
        base, method, settings, rank, not args.no_progress, task=task, alpha=args.alpha
    )
    if method == "lora":
        peft_adapters.save_adapter(model, args.out, config)
    else:
        model_files.save_model(model, args.out)
    x, y = DigitTasks((task,)).eval_set(seed=2024, n=512, device=args.device)
    acc = evaluate(model, x, y)["accuracy"]
    print(
        f"{method} fine-tuning on task {task}: final loss {history[-1]['loss']:.4f}, "
        f"accuracy {acc:.1%}; wrote {args.out}"
    )
    return 0


def _text_model(args, base: str):
    """The base model and its tokenizer for text mode: ``base`` is a model file or a Hugging
    Face folder; the tokenizer is --tokenizer, or tokenizer.json in the folder."""
    if args.tokenizer is not None:
        path = Path(args.tokenizer)
    elif Path(base).is_dir():
        path = Path(base) / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{base} has no tokenizer.json; give --tokenizer TOKENIZER_JSON")
    else:
        raise ValueError(
            f"--base {base} is a model file, which holds no tokenizer: give --tokenizer "
            "TOKENIZER_JSON (a Hugging Face tokenizer.json)"
        )
    tokenizer = bpe.load_tokenizer(path)  # before the model: it is the quicker to refuse
    model = model_files.load_model(base, args.device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: its ids would not fit the model's embedding (use "
            "the tokenizer the model was trained with)"
        )
    return model, tokenizer


def _cmd_finetune_text(args) -> int:
    _refuse_mixed(args, "with --data (they are for the digit tasks)", ("task",))
    if args.method not in (None, "lora"):
        raise ValueError(
            f"--method {args.method} cannot be used with --data: text fine-tuning "
            "trains a LoRA adapter"
        )
    if args.base is None:
        raise ValueError(
            "--data needs --base: a minilora model file or a Hugging Face GPT-2 folder"
        )
    out = _check_out(args.out if args.out is not None else TEXT_ADAPTER, "folder")
    text.check_data_path(args.data)  # before loading a model that may take a while
    _setup(args)
    model, tokenizer = _text_model(args, args.base)
    block_size = args.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise ValueError(
            f"--block-size {block_size} is more than the model's block_size "
            f"{model.config.block_size}"
        )
    config = LoRAConfig(
        r=args.r,
        lora_alpha=2 * args.r if args.alpha is None else args.alpha,
        target_modules=[t for t in args.targets.split(",") if t],
    )
    hf_gpt2.check_targets(model, config.target_modules, "--targets")  # before any training
    held_out = TEXT_HELD_OUT if args.held_out is None else args.held_out
    data = text.load_text_data(args.data, tokenizer, block_size, held_out, args.seed)
    x, y = data.held_out(args.device)
    scored = int((backend.to_numpy(y) != IGNORE_INDEX).sum())
    before = text.held_out_loss(model, x, y)
    print(f"held-out loss before: {before:.4f} ({scored} tokens of {args.data})", flush=True)
    steps = args.steps or TEXT_DEFAULTS["steps"]
    history = text.finetune(
        model,
        data,
        config,
        steps,
        TEXT_DEFAULTS["lr"] if args.lr is None else args.lr,
        args.batch_size or TEXT_DEFAULTS["batch_size"],
        args.seed,
        not args.no_progress,
    )
    after = text.held_out_loss(model, x, y)
    peft_adapters.save_adapter(model, out, config)
    print(
        f"held-out loss after:  {after:.4f} (LoRA r={config.r}, {steps} steps, final training "
        f"loss {history[-1]['loss']:.4f}); wrote {out}"
    )
    return 0


def _cmd_merge(args) -> int:
    _check_out(args.out, "file")
    base = model_files.load_model(args.base) if args.base else demo.load_base()
    peft_adapters.load_adapter(base, args.adapter)
    merged = merge_and_unload(base)
    model_files.save_model(merged, args.out)
    print(f"merged {args.adapter} into the base; wrote {args.out}")
    return 0


def _cmd_eval(args) -> int:
    _setup(args)
    model = _load(args)
    x, y = DigitTasks((args.task,)).eval_set(seed=2024, n=args.examples, device=args.device)
    result = evaluate(model, x, y)
    print(
        f"task {args.task}: accuracy {result['accuracy']:.1%}, loss {result['eval_loss']:.4f} "
        f"({args.examples} examples)"
    )
    return 0


def _prompt_digits(prompt: str, block_size: int) -> int:
    """The number of digits in a prompt of the task's form, or a ValueError saying what
    the form is (rather than printing a guess for a prompt the model was never shown)."""
    most = (block_size - 2) // 2  # prompt (task, digits, '=') + answer (digits, '.') fit
    form = f"a task letter ({TASK_LETTERS}), 1 to {most} digits, then '=', e.g. 'S 3 1 4 ='"
    text = prompt.replace(" ", "")
    if not text:
        raise ValueError(f"--prompt is empty; expected {form}")
    if text[0] not in TASKS:
        raise ValueError(f"--prompt starts with {text[0]!r}, which is not a task; expected {form}")
    digits = text[1:-1]
    if text[-1] != "=" or not 1 <= len(digits) <= most or set(digits) - set("0123456789"):
        raise ValueError(f"--prompt {prompt!r} lacks the task's form; expected {form}")
    return len(digits)


def _cmd_generate(args) -> int:
    if args.base is not None:
        return _cmd_generate_text(args)
    _refuse_mixed(args, "without --base (they are for text)", ("tokenizer", "top_k"))
    _setup(args)
    model = _load(args)
    n_digits = _prompt_digits(args.prompt, model.config.block_size)
    ids = encode(args.prompt)
    new = n_digits + 1 if args.max_new_tokens is None else args.max_new_tokens
    idx = backend.array([ids], dtype=backend.int64, device=args.device)
    model.eval()
    out = model.generate(
        idx, new, temperature=args.temperature, generator=backend.Generator(args.seed)
    )
    print(" ".join(decode(backend.to_numpy(out)[0])))
    return 0


def _cmd_generate_text(args) -> int:
    _refuse_mixed(args, "with --base (give the model file as --base)", ("model",))
    _setup(args)
    model, tokenizer = _text_model(args, args.base)
    if args.adapter:
        peft_adapters.load_adapter(model, args.adapter)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt is empty; expected some text to complete")
    if args.top_k is not None and args.top_k > model.config.vocab_size:
        raise ValueError(
            f"--top-k {args.top_k} is more than the vocab_size {model.config.vocab_size}"
        )
    context = ids[-model.config.block_size :]  # a longer prompt: its end is what the model sees
    idx = backend.array([context], dtype=backend.int64, device=args.device)
    model.eval()
    new = args.max_new_tokens or TEXT_NEW_TOKENS
    out = model.generate(
        idx, new, args.temperature, top_k=args.top_k, generator=backend.Generator(args.seed)
    )
    completion = backend.to_numpy(out)[0, len(context) :].tolist()
    eot = tokenizer.token_to_id(bpe.END_OF_TEXT)
    if eot in completion:  # the model says the text ends here
        completion = completion[: completion.index(eot)]
    print(tokenizer.decode(ids + completion))
    return 0


# ======================================================================================
# Reference vectors for porters
# ======================================================================================


def _add_vectors_command(sub) -> None:
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
    p.set_defaults(func=_cmd_vectors)


def _cmd_vectors(args) -> int:
    from minilora.interop import vectors  # builds its cases on import

    if args.out:
        _check_out(args.out, "folder")
        manifest = vectors.write_vectors(args.out, seed=args.seed, dtype=args.dtype)
        print(
            f"wrote {len(manifest['cases'])} cases ({args.dtype}, seed {args.seed}) and "
            f"{vectors.MANIFEST_NAME} to {args.out}"
        )
        return 0
    report = vectors.check_vectors(args.check, cases=args.case)
    lines = report.format().splitlines()
    if args.quiet:
        lines = [lines[0], *(r.line() for r in report.failures), lines[-1]]
    print("\n".join(lines))
    return 0 if report.ok else 1


# ======================================================================================
# Course assignments: student copies and the grader
# ======================================================================================


def _add_assignment_commands(sub) -> None:
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
    q.set_defaults(func=_cmd_assignments_autograder)

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
        type=_non_negative_int,
        default=None,
        help="seed of the random shapes and values (default: a fresh one each run)",
    )
    p.add_argument(
        "--extra-tests",
        metavar="DIR",
        help="hidden tests: functions check_a1_7_<anything>(ctx) in DIR/*.py grade task a1.7",
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--gradescope", metavar="FILE", help="also write Gradescope's results.json")
    p.set_defaults(func=_cmd_grade)


def _cmd_assignments_list(args) -> int:
    for a in assignments.ASSIGNMENTS.values():
        print(f"{a.name}  {a.title}  ({a.points} points, {len(a.tasks)} tasks)")
    return 0


def _cmd_assignments_make(args) -> int:
    assignment = assignments.get_assignment(args.name)
    out = _check_out(args.out, "folder")
    package = assignments.make_copy(args.name, out)
    print(
        f"wrote {package}: minilora with the {len(assignment.tasks)} tasks of {args.name} "
        f"stubbed ({assignment.points} points); grade it with: minilora grade {args.name} {out}"
    )
    return 0


def _cmd_assignments_autograder(args) -> int:
    assignments.get_assignment(args.name)
    out = _check_out(args.out, "file")
    safetensors_files.atomic_write([(out, assignments.autograder_zip(args.name))])
    print(f"wrote {out}: a Gradescope autograder for {args.name} (upload it as a zip file)")
    return 0


def _cmd_grade(args) -> int:
    for flag in ("json", "gradescope"):
        if getattr(args, flag):
            _check_out(getattr(args, flag), "file")
    report = grading.grade(args.name, args.dir, args.task, args.seed, args.extra_tests)
    print(report.format())
    for flag, data in (("json", report.to_dict), ("gradescope", report.gradescope)):
        if getattr(args, flag):
            text = json.dumps(data(), indent=2, ensure_ascii=False) + "\n"
            safetensors_files.atomic_write([(Path(getattr(args, flag)), text.encode())])
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minilora",
        description="LoRA from nothing: a tiny GPT, hand-written autograd, low-rank adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_job_commands(sub)
    _add_count_command(sub)
    _add_vectors_command(sub)
    _add_assignment_commands(sub)
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


if __name__ == "__main__":
    sys.exit(main())
