"""Text mode of ``minilora finetune`` (with --data) and ``minilora generate`` (with --base):
LoRA on a text file or prompt/response pairs, and completing text, with a minilora model file
or a Hugging Face GPT-2 folder and its byte-level BPE tokenizer (guide: docs/text.md)."""

from __future__ import annotations

from pathlib import Path

from minilora import backend
from minilora.cli.options import (
    check_out,
    comma_items,
    fit_threads,
    fraction,
    positive_int,
    refuse_mixed,
    set_up_run,
)
from minilora.data import IGNORE_INDEX
from minilora.interop import hf_gpt2, hub, model_files, peft_adapters
from minilora.lora import LoRAConfig
from minilora.text import bpe, corpus

# finetune's defaults with --data: a real model is slower per step than the digit tasks',
# and a pretrained one needs a gentler learning rate
TEXT_DEFAULTS = {"steps": 200, "batch_size": 8, "lr": 1e-3}
TEXT_ADAPTER, TEXT_HELD_OUT, TEXT_NEW_TOKENS = "minilora-adapter", 0.1, 50


def add_finetune_text_options(p) -> None:
    """finetune's options for text, in a group of their own."""
    group = p.add_argument_group("text (these need --data)")
    group.add_argument(
        "--data",
        metavar="FILE",
        help="fine-tune on text: FILE.txt (plain text) or FILE.jsonl (one "
        '{"prompt": ..., "response": ...} object a line)',
    )
    _add_tokenizer_option(group)
    group.add_argument(
        "--held-out",
        type=fraction,
        default=None,
        metavar="FRACTION",
        help=f"share of the data held out to measure the loss (default {TEXT_HELD_OUT}): the "
        "end of a text, or whole prompt/response pairs",
    )
    group.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="tokens per training example (default: the model's block_size)",
    )


def add_generate_text_options(p) -> None:
    """generate's options for text, in a group of their own."""
    group = p.add_argument_group("text (these need --base)")
    _add_tokenizer_option(group)
    group.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        help="sample among the k most likely tokens only (default: all)",
    )


def _add_tokenizer_option(group) -> None:
    group.add_argument(
        "--tokenizer",
        metavar="TOKENIZER_JSON",
        help="a Hugging Face tokenizer.json, byte-level BPE (default: BASE/tokenizer.json when "
        "--base is a folder; required when it is a file)",
    )


def _text_model(args, base: str):
    """The base model and its tokenizer for text mode: ``base`` is a model file, a Hugging
    Face folder or hub id (its folder in the cache); the tokenizer is --tokenizer, or
    tokenizer.json in the folder."""
    base = hub.local_path(base, "--base")
    if args.tokenizer is not None:
        path = Path(args.tokenizer)
    elif base.is_dir():
        path = base / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{base} has no tokenizer.json; give --tokenizer TOKENIZER_JSON")
    else:
        raise ValueError(
            f"--base {base} is a model file, which holds no tokenizer: give --tokenizer "
            "TOKENIZER_JSON (a Hugging Face tokenizer.json)"
        )
    tokenizer = bpe.load_tokenizer(path)  # before the model: it is the quicker to refuse
    model = model_files.load_model(base, args.device)
    fit_threads(args, model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: its ids would not fit the model's embedding (use "
            "the tokenizer the model was trained with)"
        )
    return model, tokenizer


def fine_tune_on_text(args) -> int:
    """``minilora finetune --data``: LoRA on a text file or prompt/response pairs, with the
    held-out loss printed before and after."""
    refuse_mixed(args, "with --data (they are for the digit tasks)", ("task",))
    if args.method not in (None, "lora"):
        raise ValueError(
            f"--method {args.method} cannot be used with --data: text fine-tuning "
            "trains a LoRA adapter"
        )
    if args.base is None:
        raise ValueError(
            "--data needs --base: a minilora model file or a Hugging Face GPT-2 folder"
        )
    out = check_out(args.out if args.out is not None else TEXT_ADAPTER, "folder", args.overwrite)
    corpus.check_data_path(args.data)  # before loading a model that may take a while
    set_up_run(args)
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
        target_modules=comma_items("--targets", args.targets),
    )
    hf_gpt2.check_targets(model, config.target_modules, "--targets")  # before any training
    held_out = TEXT_HELD_OUT if args.held_out is None else args.held_out
    data = corpus.load_text_data(args.data, tokenizer, block_size, held_out, args.seed)
    x, y = data.held_out(args.device)
    scored = int((backend.to_numpy(y) != IGNORE_INDEX).sum())
    before = corpus.held_out_loss(model, x, y)
    print(f"held-out loss before: {before:.4f} ({scored} tokens of {args.data})", flush=True)
    steps = args.steps or TEXT_DEFAULTS["steps"]
    history = corpus.fine_tune_lora_on_text(
        model,
        data,
        config,
        steps,
        TEXT_DEFAULTS["lr"] if args.lr is None else args.lr,
        args.batch_size or TEXT_DEFAULTS["batch_size"],
        args.seed,
        not args.no_progress,
        # refuse now, not after the last step, an adapter that save_adapter would refuse
        before_training=lambda adapted: peft_adapters.adapter_files(adapted, config),
    )
    after = corpus.held_out_loss(model, x, y)
    peft_adapters.save_adapter(model, out, config)
    print(
        f"held-out loss after:  {after:.4f} (LoRA r={config.r}, {steps} steps, final training "
        f"loss {history[-1]['loss']:.4f}); wrote {out}"
    )
    return 0


def generate_text(args) -> int:
    """``minilora generate --base``: complete a text prompt, stopping at end-of-text."""
    refuse_mixed(args, "with --base (give the model file as --base)", ("model",))
    set_up_run(args)
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
