"""GPT-2 small on the CPU: a LoRA step against PyTorch + PEFT, greedy generation against
transformers' ``generate``, at every thread count the machine has.

A random ``GPT2LMHeadModel`` with transformers' ``GPT2Config`` defaults (124M parameters,
dropout set to 0) is saved with ``save_pretrained``; both engines train LoRA on it, on the
same weights:

* minilora: ``load_model(folder)``, ``apply_lora`` on ``q_proj`` and ``v_proj`` (r=8,
  random non-zero B), ``AdamW`` on the adapter;
* PyTorch + PEFT: ``GPT2LMHeadModel.from_pretrained(folder)`` and the adapter minilora
  saved, ``PeftModel.from_pretrained(..., is_trainable=True)``, ``torch.optim.AdamW`` with
  the same settings. The same function, but PEFT's adapter on the fused ``c_attn`` has
  rank 16 and 3C rows of B (zero for k): twice the trainable parameters.

One step is a forward, the cross-entropy of the same batch, a backward and an AdamW
update; the first losses must agree (same weights). The two steps alternate; medians and
the minilora / PyTorch ratio are reported, at 1, 2, ... threads up to the cores this process
may use (``--threads`` sets the count the memory figures use; with ``--quick``, the only one).

Greedy generation: the base GPT-2 (no adapter) completes the same random prompt of
``GEN_PROMPT`` tokens by ``GEN_NEW`` tokens at batch 1 and 8, minilora's ``GPT.generate``
(temperature 0, its KV cache) against transformers' ``generate`` (``do_sample=False``,
its KV cache, no stop at end-of-text), alternated, at each thread count. Random weights make
near-ties, so the share of tokens both pick is printed, not required.

Peak memory is measured for each engine in a process of its own that loads the model,
reads every weight and runs two steps, with malloc giving freed memory back
(``MINILORA_KEEP_FREED_MEMORY=0``): its resident memory once loaded and at its peak
(``VmHWM``, the load included), and for minilora the peak of the arrays one step adds
(tracemalloc).

    python benchmarks/gpt2_peft.py [--quick] [--threads N] [--batch B] [--seq T] [--repeats N]
                                   [--max-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import common
import numpy as np
from common import ms

from minilora import AdamW, LoRAConfig, apply_lora, backend, manual_seed
from minilora.interop.model_files import load_model
from minilora.interop.peft_adapters import save_adapter
from minilora.lora import count_parameters

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
QUICK_SHAPE = dict(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
GEN_BATCHES, GEN_PROMPT, GEN_NEW = (1, 8), 16, 32  # --quick: a prompt of 4, 8 new tokens


def make_folders(root: Path, quick: bool) -> tuple[Path, Path]:
    """The random GPT-2 (``root/gpt2``) and a LoRA on it with non-zero B (``root/adapter``)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(**(QUICK_SHAPE if quick else {}), **NO_DROPOUT)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "gpt2", safe_serialization=True)
    save_adapter(minilora_lora(root / "gpt2"), root / "adapter", LoRAConfig(**LORA))
    return root / "gpt2", root / "adapter"


def minilora_lora(folder: Path):
    """The GPT-2 with minilora's LoRA (q_proj, v_proj, r=8), the same in every process."""
    model = load_model(folder)
    manual_seed(0)
    apply_lora(model, LoRAConfig(**LORA))
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):  # B = 0 at init: give the adapter something to compute
            p.data[...] = 0.01 * rng.standard_normal(p.shape)
    return model


def minilora_engine(folder: Path, adapter: Path):
    model = minilora_lora(folder).train()  # the adapter saved from it is PEFT's
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, AdamW(trainable, lr=1e-3), count_parameters(model)[0]


def peft_engine(folder: Path, adapter: Path):
    import peft
    import torch
    import transformers

    base = transformers.GPT2LMHeadModel.from_pretrained(folder)
    model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-2)  # minilora's defaults
    return model, optimizer, sum(p.numel() for p in trainable)


def peft_step(model, optimizer, x, y):
    import torch

    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        logits = model(input_ids=tx, use_cache=False).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ty.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def make_step(engine: str, folder: Path, adapter: Path, x, y):
    """(one training step, trainable parameters, the parameters' total, which reads every
    weight: transformers maps the file, and its pages are resident only once read)."""
    if engine == "minilora":
        model, optimizer, trainable = minilora_engine(folder, adapter)
        total = sum(float(p.data.sum()) for p in model.parameters())
        return common.minilora_step(model, optimizer, x, y), trainable, total
    model, optimizer, trainable = peft_engine(folder, adapter)
    total = sum(float(p.detach().sum()) for p in model.parameters())
    return peft_step(model, optimizer, x, y), trainable, total


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(engine: str, folder: Path, adapter: Path, batch: tuple) -> dict:
    """In a process of its own: load ``engine`` and run two steps. Resident memory once
    loaded and at its peak (the load included); for minilora also the peak of the live
    arrays a step adds, traced (NumPy reports its allocations to tracemalloc; PyTorch's
    CPU allocator does not, so there is no such figure for it)."""
    x, y = batch
    step, _, _ = make_step(engine, folder, adapter, x, y)
    loaded = _status_kib("VmRSS")  # every weight read: resident
    step()  # the first step creates the optimizer's moments
    out = {}
    if engine == "minilora":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        step()
        out["step_traced_mib"] = (tracemalloc.get_traced_memory()[1] - before) / 2**20
        tracemalloc.stop()
    else:
        step()
    return {"loaded_mib": loaded / 1024, "peak_mib": _status_kib("VmHWM") / 1024, **out}


def memory(engine: str, folder: Path, adapter: Path, args) -> dict | None:
    """``child_memory`` in a fresh Python (each engine's memory alone); None off Linux."""
    if not Path("/proc/self/status").exists():
        return None
    command = [sys.executable, __file__, "--child", engine, "--folder", str(folder)]
    command += ["--adapter", str(adapter), "--threads", str(args.threads)]
    command += ["--batch", str(args.batch), "--seq", str(args.seq)] + (["--quick"] * args.quick)
    # malloc returns freed memory to the system here, so that resident memory is live
    # memory (keep_freed_host_memory would keep the file's bytes, read and freed, resident)
    env = {**os.environ, "PYTHONPATH": str(common.ROOT), "MINILORA_KEEP_FREED_MEMORY": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def generators(folder: Path, prompt, new: int) -> dict:
    """Greedy decoding of ``new`` tokens after ``prompt`` (B, T0) with a KV cache, one
    function per engine, each returning the new tokens (B, new) as a NumPy array."""
    import torch
    import transformers

    ours = load_model(folder)  # eval mode
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    theirs.generation_config.eos_token_id = None  # as minilora: never stop early
    tprompt, ids = torch.from_numpy(prompt), backend.array(prompt, dtype=backend.int64)

    def minilora():
        return backend.to_numpy(ours.generate(ids, new, temperature=0.0))[:, prompt.shape[1] :]

    def transformers_generate():
        with torch.no_grad():
            out = theirs.generate(
                tprompt,
                attention_mask=torch.ones_like(tprompt),
                max_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out[:, prompt.shape[1] :].numpy()

    return {"minilora": minilora, "torch": transformers_generate}


def timed(fns: dict, repeats: int) -> dict:
    """Each engine's summary and the minilora / torch ratios, alternated (common.alternate)."""
    times = common.alternate(fns, repeats, warmup=1)
    return {
        **{engine: common.summary(times[engine]) for engine in fns},
        **common.ratio(times, "minilora", "torch"),  # paired by round, with quartiles
    }


def thread_counts(args) -> list[int]:
    """1, 2, ... up to the cores this process may use (or --max-threads), and --threads;
    --quick: --threads only."""
    if args.quick:
        return [args.threads]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return sorted(set(range(1, (args.max_threads or cores) + 1)) | {args.threads})


def sweep(args, steps: dict, folder: Path) -> dict:
    """At each thread count: the LoRA step, and greedy generation at each batch size (the
    same random prompt for both engines)."""
    repeats = 3 if args.quick else (args.repeats or 7)
    length, new = (4, GEN_NEW // 4) if args.quick else (GEN_PROMPT, GEN_NEW)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(2)
    gen = {
        batch: generators(folder, rng.integers(0, vocab, (batch, length), dtype="int64"), new)
        for batch in GEN_BATCHES
    }
    agree = {}
    for batch, fns in gen.items():
        ours, theirs = fns["minilora"](), fns["torch"]()
        agree[batch] = float((ours == theirs).mean())
    out = {}
    for n in thread_counts(args):
        print(f"timing at {n} thread(s)...", file=sys.stderr, flush=True)  # minutes each
        common.set_threads(n)
        out[n] = {"step": timed(steps, repeats)}
        for batch, fns in gen.items():
            out[n][f"generate_b{batch}"] = timed(fns, max(3, repeats // 2))
    common.set_threads(args.threads)
    return {"by_threads": out, "generate": {"prompt": length, "new": new}, "same_tokens": agree}


def the_batch(folder: Path, batch: int, seq: int):
    config = json.loads((folder / "config.json").read_text())
    rng = np.random.default_rng(0)
    shape, V = (batch, seq), config["vocab_size"]
    return rng.integers(0, V, shape, dtype="int64"), rng.integers(0, V, shape, dtype="int64")


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 64)")
    p.add_argument("--max-threads", type=int, default=None, help="sweep 1..N (default: cores)")
    # internal: the memory measurement's child process
    p.add_argument("--child", choices=["minilora", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or 2
    args.seq = args.seq or (16 if args.quick else 64)
    if args.child:  # one engine's memory, in this fresh process
        common.set_threads(args.threads, torch_too=args.child == "torch")
        batch = the_batch(args.folder, args.batch, args.seq)
        print(json.dumps(child_memory(args.child, args.folder, args.adapter, batch)))
        return {}
    if common.optional_torch() is None:
        raise SystemExit("gpt2_peft.py needs PyTorch, transformers and PEFT")
    common.set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, adapter = make_folders(Path(tmp), args.quick)
        x, y = the_batch(folder, args.batch, args.seq)
        steps, trainable = {}, {}
        for engine in ("minilora", "torch"):
            steps[engine], trainable[engine], _ = make_step(engine, folder, adapter, x, y)
        first = {k: f() for k, f in steps.items()}  # the same weights: the same loss
        swept = sweep(args, steps, folder)
        mem = {engine: memory(engine, folder, adapter, args) for engine in steps}
        params = json.loads((folder / "config.json").read_text())
    at_threads = swept["by_threads"][args.threads]["step"]
    result = {
        "shape": {k: params[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer")},
        "batch": args.batch,
        "seq": args.seq,
        "lora": LORA,
        "trainable_params": trainable,
        "first_loss": first,
        **at_threads,  # the step at --threads: minilora, torch, the paired ratio
        "memory": mem,
        **swept,
    }
    print_step(result, args)
    print_sweep(swept)
    common.write_json(args.out, "gpt2_peft", result, args)
    return result


def print_step(result: dict, args) -> None:
    """The step at --threads: times, trainable parameters, memory."""
    mem, trainable, first = result["memory"], result["trainable_params"], result["first_loss"]
    rows = [
        {
            "engine": engine,
            "step": ms(result[engine]["median_s"]),
            "q1": ms(result[engine]["q1_s"]),
            "q3": ms(result[engine]["q3_s"]),
            "trainable": trainable[engine],
            "loaded": mem[engine] and mem[engine]["loaded_mib"],
            "peak": mem[engine] and mem[engine]["peak_mib"],
            "traced": mem[engine] and mem[engine].get("step_traced_mib"),
        }
        for engine in ("minilora", "torch")
    ]
    print(
        f"\nLoRA step on GPT-2 ({result['shape']}), B={args.batch} T={args.seq}, float32, "
        f"{args.threads} thread(s); first losses {first['minilora']:.6f} / {first['torch']:.6f}"
    )
    print(
        common.table(
            rows,
            [
                ("engine", "engine"),
                ("step", "step ms (median)"),
                ("q1", "q1"),
                ("q3", "q3"),
                ("trainable", "trainable params"),
                ("loaded", "RSS loaded MiB"),
                ("peak", "peak RSS MiB"),
                ("traced", "step arrays MiB"),
            ],
        )
    )
    print(f"minilora / torch, paired by round: {result['text']}")


def print_sweep(swept: dict) -> None:
    """Each timed job at each thread count: medians and minilora / torch, paired with spread."""
    rows = [
        {
            "threads": n,
            "job": job,
            "minilora": ms(t["minilora"]["median_s"]),
            "torch": ms(t["torch"]["median_s"]),
            "paired": t["text"],
        }
        for n, jobs in swept["by_threads"].items()
        for job, t in jobs.items()
    ]
    gen = swept["generate"]
    print(
        f"\nby thread count (generate_bB: batch B, a prompt of {gen['prompt']} tokens and "
        f"{gen['new']} new, greedy; share of tokens both engines picked: "
        + ", ".join(f"b{b} {share:.0%}" for b, share in swept["same_tokens"].items())
        + ")"
    )
    columns = [("threads", "threads"), ("job", "job"), ("minilora", "minilora ms")]
    columns += [("torch", "torch ms"), ("paired", "minilora / torch, paired by round")]
    print(common.table(rows, columns))


if __name__ == "__main__":
    main()
