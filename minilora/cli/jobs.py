"""The job on the digit tasks: ``minilora demo``, ``compare``, ``pretrain``, ``finetune``,
``merge``, ``eval`` and ``generate`` (the main job and the steps it is made of). With --data
or --base, finetune and generate hand over to their text mode (minilora/cli/text.py)."""

from __future__ import annotations

from minilora import backend
from minilora.cli.options import (
    add_overwrite_option,
    add_run_options,
    check_out,
    comma_items,
    fit_threads,
    non_negative_float,
    positive_float,
    positive_int,
    refuse_mixed,
    set_up_run,
)
from minilora.cli.text import (
    TEXT_ADAPTER,
    TEXT_DEFAULTS,
    TEXT_NEW_TOKENS,
    add_finetune_text_options,
    add_generate_text_options,
    fine_tune_on_text,
    generate_text,
)
from minilora.data import DOWNSTREAM_TASK, TASKS, VOCAB, DigitTasks, decode, encode
from minilora.experiments import compare, demo
from minilora.interop import model_files, peft_adapters
from minilora.lora import merge_and_unload
from minilora.train import evaluate

TASK_LETTERS = "C copy, R reverse, S sort ascending (the pretraining tasks), D sort descending"
DIGIT_DEFAULTS = {"steps": 300, "batch_size": 64}  # finetune's, without --data (unchanged)


def add_job_commands(sub) -> None:
    _add_demo_command(sub)
    _add_compare_command(sub)
    _add_pretrain_command(sub)
    _add_finetune_command(sub)
    _add_merge_command(sub)
    _add_eval_command(sub)
    _add_generate_command(sub)


def _add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole LoRA story in under a minute on a laptop CPU (the main job)",
        description="Fine-tune the shipped base model to sort descending, fully and with LoRA "
        "at several ranks; print a table; save, merge and time the adapter.",
    )
    add_run_options(p, "output folder (default: minilora-demo)")
    p.add_argument("--quick", action="store_true", help="a smoke run (a few seconds)")
    p.set_defaults(func=_cmd_demo)


def _add_compare_command(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="LoRA beside full fine-tuning, adapters, prefix tuning, QLoRA and compression",
        description="Train each method on the downstream task from the shipped base and print "
        "one row each: trainable parameters, bytes kept for the task, held-out and "
        "pretraining-task accuracy, latency relative to the base, context length. Writes "
        "compare.json (and compare.png with matplotlib).",
    )
    add_run_options(p, "output folder (default: minilora-compare)")
    p.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    p.set_defaults(func=_cmd_compare)


def _add_pretrain_command(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train the base model (reproduces the one shipped in the package)",
        description="Pretrain the tiny GPT on copy, reverse and sort-ascending.",
    )
    add_run_options(p, "(required) model file to write (never the package's own base model)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=demo.PretrainRecipe.steps,
        help=f"optimizer steps (default {demo.PretrainRecipe.steps}, the shipped model's)",
    )
    p.set_defaults(func=_cmd_pretrain)


def _add_finetune_command(sub) -> None:
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
    add_run_options(
        p,
        "adapter folder (lora) or model file (full); required for the digit tasks, "
        f"default {TEXT_ADAPTER} with --data",
    )
    p.add_argument(
        "--base",
        help="base model file (default: the pretrained base); with --data (required): a "
        "minilora model file, a Hugging Face GPT-2 folder or hub id (gpt2, org/name: the "
        "hub extra, from its cache)",
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
    p.add_argument("--r", type=positive_int, default=4, help="LoRA rank (default 4)")
    p.add_argument(
        "--alpha",
        "--lora-alpha",
        type=positive_float,
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
        type=positive_int,
        default=None,
        help=f"optimizer steps (default {DIGIT_DEFAULTS['steps']}, "
        f"{TEXT_DEFAULTS['steps']} with --data)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="peak learning rate (default 1e-2 for lora, 1e-3 for full, "
        f"{TEXT_DEFAULTS['lr']:g} with --data)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"sequences per step (default {DIGIT_DEFAULTS['batch_size']}, "
        f"{TEXT_DEFAULTS['batch_size']} with --data)",
    )
    add_finetune_text_options(p)
    p.set_defaults(func=_cmd_finetune)


def _add_merge_command(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="fold an adapter into its base model and save a plain model",
        description="base + adapter folder -> merged model file (W = W0 + s·B·A). A Hugging "
        "Face GPT-2 folder as --base gives a minilora model file (its head still tied).",
    )
    p.add_argument(
        "--base",
        help="base model file, Hugging Face GPT-2 folder or hub id (gpt2, org/name: the hub "
        "extra, from its cache) (default: the pretrained base)",
    )
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--out", required=True, help="merged model file to write")
    add_overwrite_option(p)
    p.set_defaults(func=_cmd_merge)


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="exact-match accuracy of a model on a task")
    add_run_options(p)
    _model_args(p)
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default=DOWNSTREAM_TASK,
        help=f"the task to score: {TASK_LETTERS} (default: {DOWNSTREAM_TASK})",
    )
    p.add_argument(
        "--examples",
        type=positive_int,
        default=512,
        help="held-out examples to score (default 512)",
    )
    p.set_defaults(func=_cmd_eval)


def _add_generate_command(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="complete a prompt such as 'D 3 1 4 =', or text with --base",
        description="Digit tasks (without --base): complete a task prompt. Text (with --base): "
        "complete a text prompt with a model file or a Hugging Face GPT-2 folder and its "
        "tokenizer, stopping at the end-of-text token. Guide: docs/text.md.",
        epilog="example: minilora generate --base gpt2/ --adapter my-adapter --prompt 'Once'",
    )
    add_run_options(p)
    _model_args(p)
    p.add_argument(
        "--base",
        help="text mode: a minilora model file, a Hugging Face GPT-2 folder or hub id (gpt2, "
        "org/name: the hub extra, from its cache) (instead of --model)",
    )
    p.add_argument(
        "--prompt",
        required=True,
        help=f"a task letter ({TASK_LETTERS}), digits and '=', e.g. 'S 3 1 4 ='; with --base, "
        "any text",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="tokens to generate (default: the answer's length, digits + 1; "
        f"{TEXT_NEW_TOKENS} with --base)",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature; 0 picks the most likely token (greedy, the default)",
    )
    add_generate_text_options(p)
    p.set_defaults(func=_cmd_generate)


def _model_args(p) -> None:
    """--model and --adapter, for the commands that run a model on the digit tasks."""
    p.add_argument(
        "--model", help="a model .safetensors file (default: the pretrained base in the package)"
    )
    p.add_argument("--adapter", help="a PEFT adapter folder to load on top of the model")


def _load(args):
    """The model of --model (default: the shipped base), with the adapter of --adapter.
    A model of another vocabulary (a Hugging Face GPT-2, say) is refused: these commands
    speak the digit tasks' tokens."""
    model = (
        model_files.load_model(args.model, args.device)
        if args.model
        else demo.load_base(args.device)
    )
    if model.config.vocab_size != len(VOCAB):
        raise ValueError(
            f"--model {args.model} has a vocabulary of {model.config.vocab_size} tokens, not "
            f"the {len(VOCAB)} of the digit tasks ({VOCAB!r}); for a text model (a Hugging "
            "Face GPT-2 folder) use --base with generate or finetune --data"
        )
    fit_threads(args, model)
    if args.adapter:
        peft_adapters.load_adapter(model, args.adapter)
    return model


def _cmd_demo(args) -> int:
    out = check_out(args.out if args.out is not None else "minilora-demo", "folder", args.overwrite)
    set_up_run(args)
    settings = (
        demo.DemoSettings.quick(args.seed) if args.quick else demo.DemoSettings(seed=args.seed)
    )
    demo.run_demo(settings, out, args.device, not args.no_progress)
    return 0


def _cmd_compare(args) -> int:
    out = check_out(
        args.out if args.out is not None else "minilora-compare", "folder", args.overwrite
    )
    set_up_run(args)
    settings = (
        compare.CompareSettings.quick(args.seed)
        if args.quick
        else compare.CompareSettings(seed=args.seed)
    )
    compare.run_compare(settings, out, args.device, not args.no_progress)
    return 0


def _cmd_pretrain(args) -> int:
    out = check_out(args.out, "file", args.overwrite)
    set_up_run(args)
    recipe = demo.PretrainRecipe(steps=args.steps, seed=args.seed)
    model, history = demo.pretrain(recipe, args.device, not args.no_progress)
    model_files.save_model(model, out)
    last = history[-1]
    print(
        f"pretrained {recipe.steps} steps: loss {last['loss']:.4f}, "
        f"accuracy {last.get('accuracy', float('nan')):.1%}; wrote {out}"
    )
    return 0


def _cmd_finetune(args) -> int:
    if args.data is not None:
        return fine_tune_on_text(args)
    refuse_mixed(
        args, "without --data (they are for text)", ("tokenizer", "held_out", "block_size")
    )
    method = args.method or "lora"
    if args.out is None:
        raise ValueError(
            "--out is required: an adapter folder (lora) or a model file (full) to write"
        )
    check_out(args.out, "folder" if method == "lora" else "file", args.overwrite)  # before training
    set_up_run(args)
    base = (
        model_files.load_model(args.base, args.device) if args.base else demo.load_base(args.device)
    )
    fit_threads(args, base)
    defaults = demo.DemoSettings()
    settings = demo.DemoSettings(
        steps=args.steps or DIGIT_DEFAULTS["steps"],
        batch_size=args.batch_size or DIGIT_DEFAULTS["batch_size"],
        lr_full=defaults.lr_full if args.lr is None else args.lr,
        lr_lora=defaults.lr_lora if args.lr is None else args.lr,
        targets=tuple(comma_items("--targets", args.targets)),
        seed=args.seed,
    )
    task = args.task or DOWNSTREAM_TASK
    rank = args.r if method == "lora" else None
    model, opt, config, history = demo.fine_tune_on_digit_task(
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


def _cmd_merge(args) -> int:
    check_out(args.out, "file", args.overwrite)
    base = model_files.load_model(args.base) if args.base else demo.load_base()
    peft_adapters.load_adapter(base, args.adapter)
    merged = merge_and_unload(base)
    model_files.save_model(merged, args.out)
    print(f"merged {args.adapter} into the base; wrote {args.out}")
    return 0


def _cmd_eval(args) -> int:
    set_up_run(args)
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
        return generate_text(args)
    refuse_mixed(args, "without --base (they are for text)", ("tokenizer", "top_k"))
    set_up_run(args)
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
