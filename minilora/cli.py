"""The ``minilora`` command: ``minilora <command> --help`` explains each one."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from minilora import accounting, backend, checkpoint, demo, fast
from minilora.data import DOWNSTREAM_TASK, TASKS, DigitTasks, decode, encode
from minilora.lora import BIAS_MODES, merge_and_unload
from minilora.train import evaluate


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
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads (default 1: minilora's matrices are small, and extra threads "
        "slow them down on a busy machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if out_help:
        p.add_argument("--out", required=out_help.startswith("(required)"), help=out_help)


def _model_args(p) -> None:
    p.add_argument(
        "--model", help="a model .safetensors file (default: the pretrained base in the package)"
    )
    p.add_argument("--adapter", help="a PEFT adapter folder to load on top of the model")


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
        "pretrain",
        help="train the base model (reproduces the one shipped in the package)",
        description="Pretrain the tiny GPT on copy, reverse and sort-ascending.",
    )
    _common(p, "where to write the model (default: minilora/assets/base.safetensors)")
    p.add_argument("--steps", type=int, default=demo.PretrainRecipe.steps)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a task, fully or with LoRA",
        description="Fine-tune on a digit task. LoRA writes a PEFT adapter folder; full "
        "fine-tuning writes a model file.",
    )
    _common(p, "(required) adapter folder (lora) or model file (full)")
    p.add_argument("--base", help="base model file (default: the pretrained base)")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--task", choices=sorted(TASKS), default=DOWNSTREAM_TASK)
    p.add_argument("--r", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2·r)")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="default 1e-2 (lora), 1e-3 (full)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "merge",
        help="fold an adapter into its base model and save a plain model",
        description="base + adapter folder -> merged model file (W = W0 + s·B·A).",
    )
    p.add_argument("--base", help="base model file (default: the pretrained base)")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--out", required=True, help="merged model file to write")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("eval", help="exact-match accuracy of a model on a task")
    _common(p)
    _model_args(p)
    p.add_argument("--task", choices=sorted(TASKS), default=DOWNSTREAM_TASK)
    p.add_argument("--examples", type=int, default=512)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="complete a prompt such as 'D 3 1 4 ='")
    _common(p)
    _model_args(p)
    p.add_argument("--prompt", required=True, help="task letter, digits and '=', e.g. 'S 3 1 4 ='")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: as many as digits+1")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.set_defaults(func=_cmd_generate)


def _setup(args) -> None:
    fast.set_num_threads(args.threads)
    fast.keep_freed_host_memory()  # reuse freed memory step after step (see its docstring)
    backend.check_device(args.device)


def _load(args):
    model = (
        checkpoint.load_model(args.model, args.device)
        if args.model
        else demo.load_base(args.device)
    )
    if args.adapter:
        checkpoint.load_adapter(model, args.adapter)
    return model


def _cmd_demo(args) -> int:
    _setup(args)
    settings = (
        demo.DemoSettings.quick(args.seed) if args.quick else demo.DemoSettings(seed=args.seed)
    )
    demo.run_demo(settings, Path(args.out or "minilora-demo"), args.device, not args.no_progress)
    return 0


def _cmd_pretrain(args) -> int:
    _setup(args)
    recipe = demo.PretrainRecipe(steps=args.steps, seed=args.seed)
    model, history = demo.pretrain(recipe, args.device, not args.no_progress)
    out = Path(args.out) if args.out else demo.base_model_path()
    checkpoint.save_model(model, out)
    last = history[-1]
    print(
        f"pretrained {recipe.steps} steps: loss {last['loss']:.4f}, "
        f"accuracy {last.get('accuracy', float('nan')):.1%}; wrote {out}"
    )
    return 0


def _cmd_finetune(args) -> int:
    _setup(args)
    base = (
        checkpoint.load_model(args.base, args.device) if args.base else demo.load_base(args.device)
    )
    settings = demo.DemoSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr_full=args.lr or 1e-3,
        lr_lora=args.lr or 1e-2,
        targets=tuple(t for t in args.targets.split(",") if t),
        seed=args.seed,
    )
    rank = args.r if args.method == "lora" else None
    model, opt, config, history = demo.finetune(
        base, args.method, settings, rank, not args.no_progress, task=args.task, alpha=args.alpha
    )
    if args.method == "lora":
        checkpoint.save_adapter(model, args.out, config)
    else:
        checkpoint.save_model(model, args.out)
    x, y = DigitTasks((args.task,)).eval_set(seed=2024, n=512, device=args.device)
    acc = evaluate(model, x, y)["accuracy"]
    print(
        f"{args.method} fine-tuning on task {args.task}: final loss {history[-1]['loss']:.4f}, "
        f"accuracy {acc:.1%}; wrote {args.out}"
    )
    return 0


def _cmd_merge(args) -> int:
    base = checkpoint.load_model(args.base) if args.base else demo.load_base()
    checkpoint.load_adapter(base, args.adapter)
    merged = merge_and_unload(base)
    checkpoint.save_model(merged, args.out)
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


def _cmd_generate(args) -> int:
    _setup(args)
    model = _load(args)
    ids = encode(args.prompt)
    n_digits = sum(ch.isdigit() for ch in args.prompt)
    new = args.max_new_tokens or n_digits + 1
    idx = backend.array([ids], dtype=backend.int64, device=args.device)
    model.eval()
    out = model.generate(
        idx, new, temperature=args.temperature, generator=backend.Generator(args.seed)
    )
    print(" ".join(decode(backend.to_numpy(out)[0])))
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
    from minilora import vectors  # builds its cases on import

    if args.out:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="LoRA from nothing: a tiny GPT, hand-written autograd, low-rank adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_job_commands(sub)
    _add_count_command(sub)
    _add_vectors_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input: a message, not a trace
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
