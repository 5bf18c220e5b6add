"""Accuracy and bytes of each compressed variant of the shipped base model (docs/compression.md).

Evaluation only (no timing): the pretraining tasks' held-out set for each variant, then a
rank-4 QLoRA adapter trained 300 steps on the downstream task and merged two ways. About 10 s.

    python benchmarks/compression.py
"""

import copy

import numpy as np

import minilora
from minilora import backend, data, train
from minilora.compression.compress import compressed, storage_bytes, stored_parameters
from minilora.compression.prune import block_importance
from minilora.compression.qlora import merge_qlora
from minilora.experiments import demo
from minilora.lora import LoRAConfig
from minilora.optim import AdamW

base = demo.load_base()
x, y = data.DigitTasks(data.PRETRAIN_TASKS).eval_set(seed=123, n=512)
ref = storage_bytes(base)
rows = [("float32 base", base)]
for name, method, opts in [
    ("int8 per tensor", "int8", {"block_size": None}),
    ("int8 per channel", "int8", {}),
    ("int4 block 64", "int4", {}),
    ("nf4 block 64", "nf4", {}),
    ("nf4 block 64 + DQ", "nf4", {"double_quant": True}),
    ("svd rank 32", "svd", {"rank": 32}),
    ("svd rank 24", "svd", {"rank": 24}),
    ("svd rank 16", "svd", {"rank": 16}),
    ("svd rank 8", "svd", {"rank": 8}),
    ("prune 30% (per layer)", "prune", {"sparsity": 0.3}),
    ("prune 50% (per layer)", "prune", {"sparsity": 0.5}),
    ("prune 50% (global)", "prune", {"sparsity": 0.5, "scope": "global"}),
    ("prune 70% (per layer)", "prune", {"sparsity": 0.7}),
    ("prune 50% MLP units", "prune-neurons", {"sparsity": 0.5}),
    ("prune 75% MLP units", "prune-neurons", {"sparsity": 0.75}),
    ("drop block 0", "drop-blocks", {"blocks": [0]}),
    ("drop block 1", "drop-blocks", {"blocks": [1]}),
]:
    rows.append((name, compressed(base, method, **opts)))
print("| variant | accuracy | eval loss | stored parameters | bytes | vs float32 |")
print("|---|---|---|---|---|---|")
for name, m in rows:
    r = train.evaluate(m, x, y)
    b = storage_bytes(m)
    cells = [f"{r['accuracy']:.3f}", f"{r['eval_loss']:.4f}", f"{stored_parameters(m):,}"]
    print(f"| {name} | " + " | ".join([*cells, f"{b:,}", f"{b / ref:.3f}"]) + " |")
print("block importance:", block_importance(base, x[:64]))

# QLoRA: train an adapter on the downstream task D on an NF4+DQ base, then merge two ways
tasks = data.DigitTasks((data.DOWNSTREAM_TASK,))
dx, dy = tasks.eval_set(seed=123, n=512)
backend.manual_seed(0)
q = compressed(
    base, "qlora", config=LoRAConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
)
gen = backend.Generator(1)
params = [p for p in q.parameters() if p.requires_grad]
opt = AdamW(params, lr=1e-2)
print(
    "D before:", train.evaluate(q, dx, dy), "pretrain tasks:", train.evaluate(q, x, y)["accuracy"]
)
train.train(q, opt, lambda s: tasks.batch(gen, 64), 300, progress=False)
ra = train.evaluate(q, dx, dy)
with minilora.no_grad():
    la = q(dx)[0].data
    fm = merge_qlora(copy.deepcopy(q), requantize=False)
    rq = merge_qlora(copy.deepcopy(q), requantize=True)
    lf, lr = fm(dx)[0].data, rq(dx)[0].data
print("QLoRA adapted on D:", ra, "bytes", storage_bytes(q))
print(
    "float merge:",
    train.evaluate(fm, dx, dy),
    "max|dlogits|",
    float(np.abs(lf - la).max()),
    "bytes",
    storage_bytes(fm),
)
print(
    "requantized merge:",
    train.evaluate(rq, dx, dy),
    "max|dlogits|",
    float(np.abs(lr - la).max()),
    "mean|dlogits|",
    float(np.abs(lr - la).mean()),
    "logit scale (mean |logit|)",
    float(np.abs(la).mean()),
    "bytes",
    storage_bytes(rq),
)
