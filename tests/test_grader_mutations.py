"""Wrong implementations a student writes from the handouts and docstrings, each caught.

Each mutation edits one function of a copy of the reference package the way a student
gets it wrong (a broadcasting mistake, a lost keepdims, the wrong axis, eps in the wrong
place, a forgotten bias, a repeated call, a parameter group ignored...) and must cost its
own task, and only that task, its points, with a failure that names the problem. The
checks' hard cases are fixed (checks.fixed), so each is caught whatever the seed: here its
task is graded on two seeds (that a bug costs no other task is isolation's work, tested on
whole assignments in test_assignments.py); benchmarks/grader_audit.py grades every mutation
(these and test_assignments.py's) on whole assignments and many seeds, and the reference on
four hundred.
"""

from __future__ import annotations

import pytest
from test_assignments import reference_copy

from minilora.course import grading

# (name, assignment, task, file, right, wrong, words the failure must contain); ``right``
# and ``wrong`` are a string, or a tuple of strings for a bug made of several edits
MUTATIONS = [
    # a1.1 unbroadcast
    (
        "unbroadcast sums only the added leading axes",
        "a1",
        "a1.1",
        "functional.py",
        "return grad.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)",
        "return grad.sum(axis=tuple(range(extra)))",
        "stretched from size 1",
    ),
    (
        "unbroadcast takes the mean, not the sum",
        "a1",
        "a1.1",
        "functional.py",
        "return grad.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)",
        "return grad.mean(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)",
        "unbroadcast(g of shape",
    ),
    # a1.2 add and mul
    (
        "Mul's da multiplies by a instead of b",
        "a1",
        "a1.2",
        "functional.py",
        "da = unbroadcast(g * self.b, self.a.shape) if na else None",
        "da = unbroadcast(g * self.a, self.a.shape) if na else None",
        "mul of shapes",
    ),
    (
        "Mul's db unbroadcast to a's shape",
        "a1",
        "a1.2",
        "functional.py",
        "db = unbroadcast(g * self.a, self.b.shape) if nb else None",
        "db = unbroadcast(g * self.a, self.a.shape) if nb else None",
        "Mul.backward returned a gradient of shape",
    ),
    # a1.3 matmul
    (
        "matmul's da with .T, which reverses every axis",
        "a1",
        "a1.3",
        "functional.py",
        'da = unbroadcast(mm(g, swap_last_two(self.b), "matmul.da"), self.a.shape)',
        'da = unbroadcast(mm(g, self.b.T, "matmul.da"), self.a.shape)',
        "transpose the last two axes",
    ),
    (
        "matmul's db not summed over broadcast batch axes",
        "a1",
        "a1.3",
        "functional.py",
        'db = unbroadcast(mm(swap_last_two(self.a), g, "matmul.db"), self.b.shape) if nb else None',
        'db = mm(swap_last_two(self.a), g, "matmul.db") if nb else None',
        "MatMul.backward returned a gradient of shape",
    ),
    # a1.4 sum and mean
    (
        "sum's backward broadcasts g without the keepdims shape",
        "a1",
        "a1.4",
        "functional.py",
        "        g = g.reshape(_keepdims_shape(self.shape, self.axis))\n",
        "",
        "keepdims shape",
    ),
    (
        "mean's backward divides by the whole size",
        "a1",
        "a1.4",
        "functional.py",
        "g = g.reshape(_keepdims_shape(self.shape, self.axis)) / self.n",
        "g = g.reshape(_keepdims_shape(self.shape, self.axis)) / math.prod(self.shape)",
        "mean divides by the number of elements averaged",
    ),
    # a1.5 softmax
    (
        "softmax shifts by the maximum of the whole array",
        "a1",
        "a1.5",
        "functional.py",
        "e = xp.exp(z - z.max(axis=axis, keepdims=True))",
        "e = xp.exp(z - z.max())",
        "along the softmax's own axis",
    ),
    (
        "softmax's maximum without keepdims",
        "a1",
        "a1.5",
        "functional.py",
        "e = xp.exp(z - z.max(axis=axis, keepdims=True))",
        "e = xp.exp(z - z.max(axis=axis))",
        "keepdims=True",
    ),
    (
        "softmax's backward sums over the last axis",
        "a1",
        "a1.5",
        "functional.py",
        "(g32 - (g32 * y).sum(axis=self.axis, keepdims=True))",
        "(g32 - (g32 * y).sum(axis=-1, keepdims=True))",
        "softmax(shape (3, 4), axis=0)",
    ),
    # a1.6 log-softmax and cross-entropy
    (
        "log_softmax's backward sums over the last axis",
        "a1",
        "a1.6",
        "functional.py",
        "g32 - xp.exp(self.y) * g32.sum(axis=self.axis, keepdims=True)",
        "g32 - xp.exp(self.y) * g32.sum(axis=-1, keepdims=True)",
        "log_softmax(shape (3, 4), axis=0)",
    ),
    (
        "cross-entropy's n counts the ignored rows",
        "a1",
        "a1.6",
        "functional.py",
        "dz *= (self.valid * (float32_if_half(g) / self.n))[:, None].astype(dz.dtype)",
        "dz *= (self.valid * (float32_if_half(g) / dz.shape[0]))[:, None].astype(dz.dtype)",
        "not all 6 rows",
    ),
    (
        "cross-entropy's backward drops the upstream gradient",
        "a1",
        "a1.6",
        "functional.py",
        "dz *= (self.valid * (float32_if_half(g) / self.n))[:, None].astype(dz.dtype)",
        "dz *= (self.valid * (1.0 / self.n))[:, None].astype(dz.dtype)",
        "softmax_cross_entropy(logits",
    ),
    # a1.7 layer norm
    (
        "layer norm's eps outside the square root",
        "a1",
        "a1.7",
        "functional.py",
        "self.rstd = 1.0 / xp.sqrt(var + self.eps)",
        "self.rstd = 1.0 / (xp.sqrt(var) + self.eps)",
        "eps inside the square root",
    ),
    (
        "layer norm's dweight summed over the first axis only",
        "a1",
        "a1.7",
        "functional.py",
        "dw = (g * xhat).sum(axis=lead) if need_w else None",
        "dw = (g * xhat).sum(axis=0) if need_w else None",
        "LayerNormFunction.backward returned a gradient of shape (3, 4)",
    ),
    (
        "layer norm's dx without the weight",
        "a1",
        "a1.7",
        "functional.py",
        "gh = g if self.weight is None else g * self.weight",
        "gh = g",
        "dx (shape",
    ),
    # a1.8 GELU
    (
        "GELU's backward loses the ½ of its second term",
        "a1",
        "a1.8",
        "functional.py",
        "return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx),)",
        "return (g * (0.5 * (1.0 + t) + x * (1.0 - t * t) * du_dx),)",
        "gelu(12 values",
    ),
    # a1.9 embedding
    (
        "embedding's dW[ids] += g drops repeated ids",
        "a1",
        "a1.9",
        "functional.py",
        "xp.add.at(dw, self.ids.reshape(-1), g.reshape(-1, self.weight_shape[1]))",
        "dw[self.ids.reshape(-1)] += g.reshape(-1, self.weight_shape[1])",
        "repeated ids accumulate",
    ),
    # a1.10 accumulation
    (
        "a second backward() overwrites a leaf's .grad",
        "a1",
        "a1.10",
        "autograd.py",
        "t.grad = g if t.grad is None else t.grad + g",
        "t.grad = g",
        "backward() calls",
    ),
    # a2.1 attention forward
    (
        "attention scores scaled by 1/hs, not 1/√hs",
        "a2",
        "a2.1",
        "functional.py",
        "self.scale = 1.0 / math.sqrt(hs)\n"
        '        S = mm(q, swap_last_two(k), "attention.scores") * self.scale  # (B, nh, T, T)',
        "self.scale = 1.0 / hs\n"
        '        S = mm(q, swap_last_two(k), "attention.scores") * self.scale  # (B, nh, T, T)',
        "q kᵀ/√hs",
    ),
    (
        "attention's softmax without the row maximum",
        "a2",
        "a2.1",
        "functional.py",
        "P = _softmax(xp.where(future, -xp.inf, S), axis=-1)  # (B, nh, T, T)",
        "P = xp.exp(xp.where(future, -xp.inf, S))\n"
        "        P = P / P.sum(axis=-1, keepdims=True)  # (B, nh, T, T)",
        "float32 exp(89) = inf",
    ),
    (
        "future scores set to 0 instead of -inf",
        "a2",
        "a2.1",
        "functional.py",
        "P = _softmax(xp.where(future, -xp.inf, S), axis=-1)  # (B, nh, T, T)",
        "P = _softmax(xp.where(future, 0.0, S), axis=-1)  # (B, nh, T, T)",
        "must be masked",
    ),
    # a2.2 attention backward
    (
        "attention's dq without the 1/√hs",
        "a2",
        "a2.2",
        "functional.py",
        'dq = mm(dS, self.k, "attention.dq") * self.scale if need_q else None',
        'dq = mm(dS, self.k, "attention.dq") if need_q else None',
        "dq (shape",
    ),
    (
        "attention's dS without softmax's row sum",
        "a2",
        "a2.2",
        "functional.py",
        "dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))",
        "dS = P * dP",
        "dS = P·(dP - Σ_row dP·P)",
    ),
    (
        "attention's dk without transposing dS",
        "a2",
        "a2.2",
        "functional.py",
        'dk = mm(swap_last_two(dS), self.q, "attention.dk") * self.scale if need_k else None',
        'dk = mm(dS, self.q, "attention.dk") * self.scale if need_k else None',
        "dk (shape",
    ),
    # a2.3 the GPT forward
    (
        "the GPT forward forgets the embedding dropout",
        "a2",
        "a2.3",
        "model.py",
        "x = self.drop(self.embed(idx))  # (B, T, C)",
        "x = self.embed(idx)  # (B, T, C)",
        "train mode",
    ),
    (
        "the GPT forward applies dropout in eval mode too",
        "a2",
        "a2.3",
        "model.py",
        "x = self.drop(self.embed(idx))  # (B, T, C)",
        "x = F.dropout(self.embed(idx), self.config.dropout, True)  # (B, T, C)",
        "eval mode",
    ),
    # a3.1 init
    (
        "A's std 1/√r, not 1/r",
        "a3",
        "a3.1",
        "lora.py",
        "A = gen.normal((r, in_f), std=1.0 / r, dtype=dtype, device=device)",
        "A = gen.normal((r, in_f), std=1.0 / math.sqrt(r), dtype=dtype, device=device)",
        "not 1/√r",
    ),
    (
        "A drawn in the default dtype, not the weight's",
        "a3",
        "a3.1",
        "lora.py",
        "A = gen.normal((r, in_f), std=1.0 / r, dtype=dtype, device=device)",
        "A = gen.normal((r, in_f), std=1.0 / r, device=device)",
        "expected the weight's",
    ),
    (
        "kaiming's bound from out_features",
        "a3",
        "a3.1",
        "lora.py",
        "bound = 1.0 / math.sqrt(in_f)",
        "bound = 1.0 / math.sqrt(out_f)",
        "±1/√in",
    ),
    # a3.2 scaling
    (
        "rsLoRA ignored: α/r always",
        "a3",
        "a3.2",
        "lora.py",
        "return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r",
        "return lora_alpha / r",
        "use_rslora=True",
    ),
    (
        "the scaling with integer division",
        "a3",
        "a3.2",
        "lora.py",
        "return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r",
        "return lora_alpha // math.sqrt(r) if use_rslora else lora_alpha // r",
        "lora_scaling(",
    ),
    # a3.3 fused forward
    (
        "the fused forward forgets the bias",
        "a3",
        "a3.3",
        "functional.py",
        "        if bias is not None:\n            y += bias\n        need_x, need_w, _, need_A",
        "        need_x, need_w, _, need_A",
        "lora_linear(x",
    ),
    (
        "the bypass reads x even when x_lora is given",
        "a3",
        "a3.3",
        "functional.py",
        "d2 = x2 if x_lora is None else x_lora.reshape(x2.shape)  # (N, in) bypass input",
        "d2 = x2  # (N, in) bypass input",
        "x_lora given",
    ),
    # a3.4 fused backward
    (
        "the bias gradient summed over the first axis of g only",
        "a3",
        "a3.4",
        "functional.py",
        "db = g2.sum(axis=0) if need_b else None\n        dB = s",
        "db = g.sum(axis=0) if need_b else None\n        dB = s",
        "LoRALinearFunction.backward returned a gradient of shape (2, 2)",
    ),
    (
        "dx forgets the bypass path",
        "a3",
        "a3.4",
        "functional.py",
        "            if not self.separate:\n                dx += dbypass\n",
        "",
        "dx (shape",
    ),
    (
        "dB computed transposed",
        "a3",
        "a3.4",
        "functional.py",
        'dB = s * mm(g2.T, self.u, "lora.dB") if need_B else None',
        'dB = s * mm(self.u.T, g2, "lora.dB") if need_B else None',
        "dlora_B",
    ),
    # a3.5 merge and unmerge
    (
        "unmerge without checking merged: a second call subtracts again",
        "a3",
        "a3.5",
        "lora.py",
        '        if not self.merged:\n            warnings.warn("LoRALinear.unmerge(): not merged; '
        'nothing was done", stacklevel=2)\n            return\n        self.weight.data -=',
        "        self.weight.data -=",
        "a second unmerge()",
    ),
    (
        "get_delta_weight scales by α, not α/r",
        "a3",
        "a3.5",
        "lora.py",
        'return self.scaling * backend.matmul(self.lora_B.data, self.lora_A.data, "lora.merge")',
        'return self.lora_alpha * backend.matmul(self.lora_B.data, self.lora_A.data, "lora.merge")',
        "s = α/r = 2.5",
    ),
    # a3.6 apply_lora and mark_only_lora_as_trainable
    (
        "every layer wrapped as a LoRALinear, whatever the config",
        "a3",
        "a3.6",
        "lora.py",
        "wrap = LORA_LAYERS[type(base)]",
        "wrap = LoRALinear.from_linear",
        "without a magnitude",
    ),
    (
        "rank_pattern and alpha_pattern ignored",
        "a3",
        "a3.6",
        "lora.py",
        "base, own = model.get_submodule(path), config.for_module(path)",
        "base, own = model.get_submodule(path), config",
        "rank_pattern and alpha_pattern",
    ),
    (
        "only parameters named lora_A and lora_B train",
        "a3",
        "a3.6",
        "lora.py",
        "p.requires_grad_(is_lora_parameter(name))",
        'p.requires_grad_(name.endswith(("lora_A", "lora_B")))',
        "every lora_* parameter trains",
    ),
    (
        "bias='lora_only' trains every bias",
        "a3",
        "a3.6",
        "lora.py",
        '    if bias == "all":\n        for name, p in model.named_parameters():',
        '    if bias in ("all", "lora_only"):\n        for name, p in model.named_parameters():',
        "is trainable",
    ),
    (
        "the base layer deep-copied, so the weight is no longer the model's",
        "a3",
        "a3.6",
        "lora.py",
        "model.set_submodule(path, wrap(base, own, generator))",
        'model.set_submodule(path, wrap(__import__("copy").deepcopy(base), own, generator))',
        "not a copy",
    ),
    # a3.7 counts
    (
        "lora_params counts r·2·in, as if every layer were square",
        "a3",
        "a3.7",
        "study/accounting.py",
        "total += s.module_count(name) * r * (in_f + out_f)",
        "total += s.module_count(name) * r * 2 * in_f",
        "fc1's in = C and out = 4C",
    ),
    # a4.1 AdamW
    (
        "weight decay coupled: L2 added to the gradient",
        "a4",
        "a4.1",
        "optim.py",
        "w *= 1.0 - lr * wd",
        "g = g + wd * w",
        "decay decoupled",
    ),
    (
        "eps inside the square root",
        "a4",
        "a4.1",
        "optim.py",
        "denom = xp.sqrt(v)  # then in place: √v / √(1-β2^t) + eps\n"
        "                denom /= math.sqrt(1.0 - b2**t)\n"
        "                denom += eps",
        "denom = xp.sqrt(v / (1.0 - b2**t) + eps)",
        "small_grads",
    ),
    (
        "every group takes the first group's lr",
        "a4",
        "a4.1",
        "optim.py",
        'lr, (b1, b2), eps, wd = group["lr"], group["betas"]',
        'lr, (b1, b2), eps, wd = self.param_groups[0]["lr"], group["betas"]',
        "parameter group_1",
    ),
    (
        "one step counter for the whole optimizer",
        "a4",
        "a4.1",
        "optim.py",
        (
            "    def step(self) -> None:\n        for group in self.param_groups:\n"
            '            lr, (b1, b2), eps, wd = group["lr"]',
            't, m, v = state["step"], state["exp_avg"]',
        ),
        (
            "    def step(self) -> None:\n        self.t = getattr(self, 't', 0) + 1\n"
            "        for group in self.param_groups:\n"
            '            lr, (b1, b2), eps, wd = group["lr"]',
            't, m, v = self.t, state["exp_avg"]',
        ),
        "no_grad_until_step_3",
    ),
    (
        "weight decay applied to parameters without a gradient",
        "a4",
        "a4.1",
        "optim.py",
        (
            "            for p in self._trainable(group):\n                xp =",
            "                if wd:\n                    w *= 1.0 - lr * wd\n",
        ),
        (
            "            for p in group['params']:\n"
            "                if p.requires_grad and wd:\n"
            "                    p.data *= 1.0 - lr * wd\n"
            "                if p.grad is None or not p.requires_grad:\n"
            "                    continue\n"
            "                xp =",
            "",
        ),
        "no_grad_until_step_3",
    ),
    (
        "no bias correction of the moments",
        "a4",
        "a4.1",
        "optim.py",
        (
            "step_size = lr / (1.0 - b1**t)",
            "                denom /= math.sqrt(1.0 - b2**t)\n",
        ),
        ("step_size = lr", ""),
        "after step 1",
    ),
]


def mutate(folder, filename: str, right, wrong) -> None:
    """Apply one mutation (one edit, or a tuple of edits) to the copy in ``folder``."""
    path = folder / "minilora" / filename
    source = path.read_text(encoding="utf-8")
    rights, wrongs = (right, wrong) if isinstance(right, tuple) else ((right,), (wrong,))
    for old, new in zip(rights, wrongs, strict=True):
        assert source.count(old) == 1, f"the mutation's text is no longer in {filename}: {old!r}"
        source = source.replace(old, new)
    path.write_text(source, encoding="utf-8")


@pytest.mark.parametrize("bug", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_realistic_bug_costs_its_task_on_every_seed(tmp_path, bug):
    _, name, task_id, filename, right, wrong, said = bug
    mutate(reference_copy(tmp_path), filename, right, wrong)
    for seed in (1, 2):
        report = grading.grade(name, tmp_path, task_id, seed)
        lost = {t.id: t.failures for t in report.tasks if t.failures}
        assert list(lost) == [task_id], report.format()
        assert any(said in line for line in lost[task_id]), lost[task_id]
        assert not any("Traceback" in line for line in lost[task_id])


def test_there_are_at_least_thirty_distinct_mutations():
    assert len(MUTATIONS) >= 30
    assert len({m[0] for m in MUTATIONS}) == len(MUTATIONS)
    assert len({(m[3], m[4], m[5]) for m in MUTATIONS}) == len(MUTATIONS)  # all different
