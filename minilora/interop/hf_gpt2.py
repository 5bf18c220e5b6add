"""Hugging Face GPT-2 in minilora's names: the checkpoint mapping and the adapter mapping.

GPT-2 is minilora's GPT (pre-LayerNorm, learned positions, tanh GELU, which transformers
calls ``"gelu_new"``) with three differences of layout, undone here:

* one fused projection ``attn.c_attn`` (C -> 3C) computes q, k and v side by side, where
  minilora keeps ``q_proj``, ``k_proj`` and ``v_proj``;
* its ``Conv1D`` layers store the weight as (in, out) and compute ``x @ W + b``: minilora's
  ``Linear`` weight is the transpose, (out, in);
* the output head is tied to the token embedding (``tie_word_embeddings``).

Names, GPT-2 -> minilora (keys may carry ``transformer.``, as ``save_pretrained`` writes
them, or not, as the original gpt2 files)::

    wte, wpe                     tok_emb, pos_emb
    h.{i}.ln_1, h.{i}.ln_2, ln_f blocks.{i}.ln1, blocks.{i}.ln2, ln_f
    h.{i}.attn.c_attn  (C, 3C)   blocks.{i}.attn.{q,k,v}_proj   columns [0:C], [C:2C], [2C:3C]
    h.{i}.attn.c_proj  (C, C)    blocks.{i}.attn.o_proj         transposed
    h.{i}.mlp.c_fc     (C, 4C)   blocks.{i}.mlp.fc1             transposed
    h.{i}.mlp.c_proj   (4C, C)   blocks.{i}.mlp.fc2             transposed
    lm_head (absent, or = wte)   lm_head, the same Parameter as tok_emb

Adapters cross over both ways (PEFT adapts ``c_attn``, ``c_proj`` and ``c_fc`` with
``fan_in_fan_out=True``): a rank-r adapter on the fused ``c_attn`` is a rank-r adapter on
each of q, k and v (A shared, B split by rows), and adapters on q, k and v are one adapter
on ``c_attn`` (the A's stacked, the B's placed block by block). Why both are exact:
docs/porting.md, "GPT-2 checkpoints and their PEFT adapters".

This module maps names, shapes and arrays; reading and writing the files is model_files.py's
and peft_adapters.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minilora import backend
from minilora.lora import LoRAConfig, is_target, lora_layers
from minilora.model import GPTConfig
from minilora.variants import multi_adapter
from minilora.variants.patterns import paths_matching

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# config.json: the activations minilora computes (its GELU is the tanh one), and options
# that would make GPT-2 compute something minilora does not, with the value minilora needs.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_REQUIRED_OPTIONS = {
    "add_cross_attention": False,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
}
# The Conv1D layers of one block, in GPT-2's names, and minilora's layer(s) for each.
_ATTN, _ATTN_OUT, _FC, _FC_OUT = "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"
_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
_SINGLE = {_ATTN_OUT: "attn.o_proj", _FC: "mlp.fc1", _FC_OUT: "mlp.fc2"}
_LAYER_NORMS = {"ln_1": "ln1", "ln_2": "ln2"}


@dataclass
class GPT2Config(GPTConfig):
    """The ``GPTConfig`` of a model loaded from a GPT-2 folder: the same fields and the same
    model, remembered as GPT-2's so that its adapters are saved and loaded in GPT-2's module
    names (a model file records it as ``"hf_model_type": "gpt2"``)."""


def is_gpt2(model) -> bool:
    """Whether ``model`` was loaded from a GPT-2 folder (its adapters use GPT-2's names)."""
    return isinstance(getattr(model, "config", None), GPT2Config)


# ======================================================================================
# Checkpoints: config.json and model.safetensors
# ======================================================================================


def gpt_config(raw, where) -> GPT2Config:
    """The ``GPT2Config`` of a GPT-2 ``config.json`` (parsed), or a ValueError naming
    ``where`` and every value minilora cannot compute. Dropout is 0, as in nanoGPT's
    ``from_pretrained``; the model is for inference and LoRA fine-tuning."""
    if not isinstance(raw, dict):
        raise ValueError(f"load_model: {where} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != "gpt2":
        raise ValueError(
            f"load_model: {where} has model_type={raw.get('model_type')!r}; minilora loads "
            "Hugging Face folders of model_type 'gpt2' only (its own architecture)"
        )
    problems = []
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if key not in raw:
            problems.append(f"{key} is missing")
    activation = raw.get("activation_function", "gelu_new")
    if activation not in _TANH_GELUS:
        problems.append(
            f"activation_function={activation!r} is not supported: minilora's GELU is the "
            f"tanh approximation, expected one of {list(_TANH_GELUS)}"
        )
    for key, want in _REQUIRED_OPTIONS.items():
        if key in raw and raw[key] != want:
            problems.append(f"{key}={raw[key]!r} is not supported by minilora (expected {want})")
    n_embd, n_inner = raw.get("n_embd"), raw.get("n_inner")
    if n_inner is not None and not (isinstance(n_embd, int) and n_inner == 4 * n_embd):
        problems.append(
            f"n_inner={n_inner!r} is not supported: minilora's MLP is 4 * n_embd wide "
            f"(n_embd={n_embd!r}; expected n_inner null or 4 * n_embd)"
        )
    if problems:
        raise ValueError(
            f"load_model: {where} describes a GPT-2 minilora cannot load:\n  "
            + "\n  ".join(problems)
        )
    try:
        return GPT2Config(
            vocab_size=raw["vocab_size"],
            block_size=raw["n_positions"],
            n_layer=raw["n_layer"],
            n_head=raw["n_head"],
            n_embd=n_embd,
            dropout=0.0,
            bias=True,
            layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),  # GPT-2's default
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_model: {where}: {e}") from None


def gpt2_shape_problems(shapes: dict, config: GPTConfig) -> tuple[set, list[str]]:
    """GPT-2's tensor shapes (by GPT-2 name, as the file's header gives them) against
    ``config``, before any tensor is read: (the names of the tensors that are parameters,
    every missing, unexpected or misshapen tensor). The parameters leave out the old
    files' attention-mask buffers and a tied head written out.

    The layers are counted first: an n_layer beyond the file's is one problem, not a
    missing tensor for each of a million layers (which took minutes to list)."""
    names = [key.removeprefix("transformer.") for key in shapes]
    held = len({name.split(".")[1] for name in names if name.startswith("h.")})
    want = _gpt2_shapes(config, min(config.n_layer, held))
    found, problems = {}, []
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) and name.startswith("h."):
            continue  # the causal-mask buffers of older files: not parameters
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # compared with wte once read (state_dict_from_gpt2)
        if name not in want:
            problems.append(f"unexpected tensor {key!r}")
        elif name in found:
            problems.append(f"{name} is given twice (with and without 'transformer.')")
        elif tuple(shape) != want[name]:
            problems.append(f"{key} has shape {tuple(shape)}, config.json implies {want[name]}")
        else:
            found[name] = key
    problems += [f"missing tensor {name!r}" for name in sorted(set(want) - set(found))]
    if config.n_layer > held:
        problems.append(
            f"config.json says n_layer={config.n_layer}, but the file holds {held} layers"
        )
    return set(found.values()), problems


def _gpt2_shapes(config: GPTConfig, L: int) -> dict:
    """{GPT-2 parameter name: shape} for ``config``'s first ``L`` layers."""
    V, T, C = config.vocab_size, config.block_size, config.n_embd
    want = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(L):
        for ln in _LAYER_NORMS:
            want[f"h.{i}.{ln}.weight"] = want[f"h.{i}.{ln}.bias"] = (C,)
        for module, (n_in, n_out) in _conv1d_shapes(C).items():
            want[f"h.{i}.{module}.weight"] = (n_in, n_out)
            want[f"h.{i}.{module}.bias"] = (n_out,)
    if not config.tie_word_embeddings:
        want["lm_head.weight"] = (V, C)
    return want


def state_dict_from_gpt2(tensors: dict, config: GPTConfig, where) -> dict:
    """GPT-2's tensors (host arrays by GPT-2 name) as minilora's state dict, or a ValueError
    naming ``where`` and every missing, unexpected or misshapen tensor, or a written-out
    head that differs from the embedding it is tied to. The state's arrays are views of
    the tensors (q, k and v of ``c_attn``'s columns; the (out, in) transposes)."""
    params, problems = gpt2_shape_problems({k: a.shape for k, a in tensors.items()}, config)
    found = {key.removeprefix("transformer."): tensors[key] for key in params}
    wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
    for key, array in tensors.items():
        if key.removeprefix("transformer.") == "lm_head.weight" and key not in params:
            if wte is None or array.shape != wte.shape or not (array == wte).all():
                problems.append(
                    f"{key} differs from the token embedding wte.weight, but config.json "
                    "says tie_word_embeddings=true (one matrix for both)"
                )
    if problems:
        raise ValueError(
            f"load_model: {where} does not hold the GPT-2 that its config.json describes:\n  "
            + "\n  ".join(problems)
        )

    C, L = config.n_embd, config.n_layer
    state = {"tok_emb.weight": found["wte.weight"], "pos_emb.weight": found["wpe.weight"]}
    state["ln_f.weight"], state["ln_f.bias"] = found["ln_f.weight"], found["ln_f.bias"]
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = found["lm_head.weight"]
    for i in range(L):
        for ln, ours in _LAYER_NORMS.items():
            for leaf in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{leaf}"] = found[f"h.{i}.{ln}.{leaf}"]
        for gpt2, ours in _modules_of_block(C).items():
            W, b = found[f"h.{i}.{gpt2}.weight"], found[f"h.{i}.{gpt2}.bias"]  # (in, out)
            for name, cols in ours:
                state[f"blocks.{i}.{name}.weight"] = W[:, cols].T  # (out, in), as Linear
                state[f"blocks.{i}.{name}.bias"] = b[cols]
    return state


def _conv1d_shapes(C: int) -> dict:
    """Each Conv1D of a block: (in, out)."""
    return {_ATTN: (C, 3 * C), _ATTN_OUT: (C, C), _FC: (C, 4 * C), _FC_OUT: (4 * C, C)}


def _modules_of_block(C: int) -> dict:
    """Each Conv1D of a block -> [(minilora layer, the slice of its outputs it computes)]:
    ``c_attn``'s 3C outputs are q, k, v side by side."""
    out = {_ATTN: [(name, slice(j * C, (j + 1) * C)) for j, name in enumerate(_QKV)]}
    for gpt2, ours in _SINGLE.items():
        out[gpt2] = [(ours, slice(0, _conv1d_shapes(C)[gpt2][1]))]
    return out


# ======================================================================================
# Adapters: minilora's LoRA layers <-> PEFT's on GPT2LMHeadModel
# ======================================================================================


# GPT-2's own layer names, as PEFT's target_modules spell them, and minilora's for each.
_OUR_NAMES = {
    "c_attn": "q_proj,k_proj,v_proj",
    "c_proj": "o_proj (attn.c_proj) or fc2 (mlp.c_proj)",
    "c_fc": "fc1",
}


def check_targets(model, target_modules, caller: str) -> None:
    """Refuse, before any training, LoRA targets on a GPT-2 that its adapter cannot hold
    or that name no layer: ``lm_head`` (the token embedding's weight when tied; PEFT's
    GPT-2 adapters live on the Conv1D layers only), and GPT-2's own names (``c_attn``...),
    which minilora's loaded model does not use."""
    if not is_gpt2(model):
        return
    if any(is_target([t], "lm_head") for t in target_modules):
        tied = (
            ", which GPT-2 ties to the token embedding," if model.config.tie_word_embeddings else ""
        )
        raise ValueError(
            f"{caller}: target_modules {list(target_modules)} adapt lm_head{tied} but PEFT's "
            "GPT-2 adapters target c_attn, c_proj and c_fc (minilora's q_proj, k_proj, "
            "v_proj, o_proj, fc1, fc2): leave lm_head out of target_modules"
        )
    theirs = [t for t in target_modules if t.rsplit(".", 1)[-1] in _OUR_NAMES]
    if theirs:
        names = "; ".join(f"{t} is {_OUR_NAMES[t.rsplit('.', 1)[-1]]}" for t in theirs)
        raise ValueError(
            f"{caller}: target_modules {theirs} are GPT-2's names; minilora loads a GPT-2 "
            f"with its own ({names}), and saves the adapter in GPT-2's names for PEFT"
        )


def adapter_to_gpt2(model, config: LoRAConfig, peft_config: dict) -> tuple[dict, set, dict]:
    """The adapter of ``model`` (a GPT-2 with LoRA layers matching ``config``) in GPT-2's
    names: ({parameter path: host array}, the adapted module paths, adapter_config.json).

    The factors are :func:`lora_factors`' (rank r'). ``lora_alpha`` is rescaled so that
    PEFT's scaling (lora_alpha'/r', or /√r' with rslora) is minilora's."""
    layers = dict(lora_layers(model))
    check_targets(model, list(layers), "save_adapter")
    factors = lora_factors(model, layers)
    parts = set(factors)
    arrays = {}
    for path, (A, B, _) in factors.items():
        arrays[f"{path}.lora_A"] = backend.to_numpy(A)  # (r', in)
        arrays[f"{path}.lora_B"] = backend.to_numpy(B)  # (out, r')
    r, rank = config.r, next(iter(factors.values()))[0].shape[0]  # r' = rank
    arrays.update(_gpt2_biases(model, config.bias, parts))

    ratio = rank / r
    alpha = config.lora_alpha * (math.sqrt(ratio) if config.use_rslora else ratio)
    if rank == r:
        alpha = config.lora_alpha  # unchanged, not recomputed
    elif float(alpha).is_integer():
        alpha = int(alpha)
    peft_config = {
        **peft_config,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": _gpt2_targets(parts, model.config.n_layer),
        "fan_in_fan_out": True,  # Conv1D: PEFT sets it for GPT-2 whatever it is told
    }
    return arrays, parts, peft_config


def lora_factors(model, layers: dict) -> dict:
    """The LoRA factors PEFT holds for ``layers`` ({minilora path: LoRALinear}) of a GPT-2
    model: {GPT-2 module path: (A (r', in), B (out, r'), [(minilora path, its outputs)])},
    every path of an adapted Conv1D listed (``c_attn``'s q, k and v, adapted or not), on
    the layers' device.

    q, k and v with one A (an adapter loaded from PEFT, or combined by
    ``add_weighted_adapter``) share one rank block; each other A gets its own. Each
    Conv1D gets rank r' = the largest any one needs (k·r for a ``c_attn`` whose q, k, v
    have k different A's): the others are padded with zero rows of A and zero columns
    of B, which add nothing."""
    C, L = model.config.n_embd, model.config.n_layer
    r = max(layer.r for layer in layers.values())
    plan = {}  # GPT-2 module path -> (pieces, the distinct A's, each piece's block or None)
    for i in range(L):
        for gpt2, ours in _modules_of_block(C).items():
            pieces = [(f"blocks.{i}.{name}", cols) for name, cols in ours]
            if any(path in layers for path, _ in pieces):
                blocks, where = [], []
                for path, _ in pieces:
                    A = layers[path].lora_A.data if path in layers else None
                    same = [j for j, b in enumerate(blocks) if A is not None and _equal(b, A)]
                    if A is not None and not same:
                        blocks.append(A)
                    where.append(None if A is None else (same or [len(blocks) - 1])[0])
                plan[f"transformer.h.{i}.{gpt2}"] = (pieces, blocks, where)
    rank = r * max(len(blocks) for _, blocks, _ in plan.values())  # r'
    out = {}
    for path, (pieces, blocks, where) in plan.items():
        n_in, n_out = _conv1d_shapes(C)[path.split(".", 3)[3]]
        dtype, device = blocks[0].dtype, backend.device_of(blocks[0])
        A = backend.zeros((rank, n_in), dtype, device)  # (r', in): zero rows past the blocks'
        B = backend.zeros((n_out, rank), dtype, device)  # (out, r'): zero where none writes
        for j, block in enumerate(blocks):
            A[j * r : j * r + block.shape[0]] = block  # (r, in)
        for (mine, cols), j in zip(pieces, where, strict=True):
            if j is not None:  # piece j: rank block j, its outputs
                lora_B = layers[mine].lora_B.data  # (n, r)
                B[cols, j * r : j * r + lora_B.shape[1]] = lora_B
        out[path] = (A, B, pieces)
    return out


def _equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


# add_weighted_adapter combines GPT-2's adapters on the fused c_attn, as PEFT does
multi_adapter.PEFT_FACTORS[GPT2Config] = lora_factors


def _gpt2_biases(model, bias: str, adapted: set) -> dict:
    """The biases PEFT saves for ``bias`` ("all": every bias; "lora_only": those of the
    adapted modules, ``c_attn``'s whole 3C even when not all of q, k, v are adapted), from
    the model's current values, by GPT-2 parameter path."""
    if bias == "none":
        return {}
    xp = backend.module_for("cpu")
    params = {name: backend.to_numpy(p.data) for name, p in model.named_parameters()}
    C, L = model.config.n_embd, model.config.n_layer
    out = {}
    for i in range(L):
        for gpt2, ours in _modules_of_block(C).items():
            path = f"transformer.h.{i}.{gpt2}"
            if bias == "all" or path in adapted:
                pieces = [params[f"blocks.{i}.{name}.bias"] for name, _ in ours]
                out[f"{path}.bias"] = xp.concatenate(pieces)
        if bias == "all":
            for ln, mine in _LAYER_NORMS.items():
                out[f"transformer.h.{i}.{ln}.bias"] = params[f"blocks.{i}.{mine}.bias"]
    if bias == "all":
        out["transformer.ln_f.bias"] = params["ln_f.bias"]
    return out


def _gpt2_targets(adapted: set, n_layer: int) -> list[str]:
    """PEFT target_modules naming exactly the adapted modules: a module kind ("attn.c_proj",
    never the bare "c_proj", which would also match "mlp.c_proj") when every block has it
    adapted, else the full paths."""
    targets = []
    for module in (_ATTN, _ATTN_OUT, _FC, _FC_OUT):
        paths = [f"transformer.h.{i}.{module}" for i in range(n_layer)]
        if all(p in adapted for p in paths):
            targets.append(module)
        else:
            targets += [p for p in paths if p in adapted]
    return targets


def adapter_from_gpt2(model, fields: dict, layers: tuple, tensors: dict, prefix: str):
    """A PEFT adapter of GPT2LMHeadModel as one for ``model`` in minilora's names:
    (fields with ``target_modules`` the full minilora paths, tensors by minilora's PEFT
    keys, problems). ``tensors`` are by PEFT key (``prefix`` + GPT-2 parameter path);
    ``layers``: (layers_to_transform, layers_pattern), applied as PEFT does. A fused
    ``c_attn`` adapter becomes one on each of q, k and v, with A shared and B split by
    rows; nothing is converted unless every key and shape is right."""
    C, L = model.config.n_embd, model.config.n_layer
    convs = [f"h.{i}.{module}" for i in range(L) for module in _conv1d_shapes(C)]
    chosen, problems = _gpt2_chosen(convs, fields["target_modules"], layers)
    r = fields["r"]

    want = {}  # GPT-2 parameter path (no "transformer.") -> shape
    for path in chosen:
        n_in, n_out = _conv1d_shapes(C)[path.split(".", 2)[2]]
        want[f"{path}.lora_A"], want[f"{path}.lora_B"] = (r, n_in), (n_out, r)
    bias = fields.get("bias", "none")
    if bias != "none":
        with_bias = convs if bias == "all" else chosen
        for path in with_bias:
            want[f"{path}.bias"] = (_conv1d_shapes(C)[path.split(".", 2)[2]][1],)
        if bias == "all":
            want["ln_f.bias"] = (C,)
            for i in range(L):
                for ln in _LAYER_NORMS:
                    want[f"h.{i}.{ln}.bias"] = (C,)

    found = {}
    for key, array in tensors.items():
        name = _gpt2_param(key, prefix)
        if name not in want:
            problems.append(f"unexpected key {key!r}")
        elif name in found:
            problems.append(f"{name} is given twice")
        elif tuple(array.shape) != want[name]:
            problems.append(f"{key} has shape {tuple(array.shape)}, expected {want[name]}")
        else:
            found[name] = array
    problems += [f"missing {name!r}" for name in sorted(set(want) - set(found))]
    if problems:
        return fields, {}, problems

    ours, targets = {}, []
    for i in range(L):
        for gpt2, pieces in _modules_of_block(C).items():
            path = f"h.{i}.{gpt2}"
            for name, rows in pieces:
                mine = f"blocks.{i}.{name}"
                if path in chosen:
                    targets.append(mine)
                    ours[f"{mine}.lora_A"] = found[f"{path}.lora_A"]  # (r, in): shared
                    ours[f"{mine}.lora_B"] = found[f"{path}.lora_B"][rows]  # its outputs
                if f"{path}.bias" in found:
                    ours[f"{mine}.bias"] = found[f"{path}.bias"][rows]
        for ln, mine in _LAYER_NORMS.items():
            if f"h.{i}.{ln}.bias" in found:
                ours[f"blocks.{i}.{mine}.bias"] = found[f"h.{i}.{ln}.bias"]
    if "ln_f.bias" in found:
        ours["ln_f.bias"] = found["ln_f.bias"]
    return {**fields, "target_modules": targets}, ours, []


def _gpt2_param(key: str, prefix: str) -> str | None:
    """``prefix`` + ``transformer.h.0.attn.c_attn.lora_A.weight`` -> ``h.0.attn.c_attn.lora_A``;
    PEFT's ``<module>.base_layer.bias`` -> ``<module>.bias``."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix) :].removeprefix("transformer.").replace(".base_layer.", ".")
    owner, _, leaf = name.rpartition(".")
    if owner.endswith((".lora_A", ".lora_B")) and leaf == "weight":
        return owner
    return None if leaf in ("lora_A", "lora_B") else name


def _gpt2_chosen(convs: list[str], targets, layers: tuple) -> tuple[list[str], list[str]]:
    """The GPT-2 modules (``h.{i}.attn.c_attn``...) PEFT adapts for ``target_modules`` and
    (layers_to_transform, layers_pattern), matched on GPT2LMHeadModel's paths."""
    full = {p: f"transformer.{p}" for p in convs}
    if isinstance(targets, str) and targets.lower() == "all-linear":
        chosen = list(convs)  # PEFT leaves out the output layer lm_head
    elif isinstance(targets, str):
        matched, problems = paths_matching(targets, list(full.values()))
        if problems:
            return [], problems
        chosen = [p for p in convs if full[p] in matched]
    else:
        chosen = [p for p in convs if is_target(targets, full[p])]
        heads = [t for t in targets if is_target([t], "lm_head")]
        if heads:
            return [], [
                f"target_modules {heads} adapt lm_head, which GPT-2 ties to the token "
                "embedding; minilora loads GPT-2 adapters on c_attn, c_proj and c_fc"
            ]
    if not chosen:
        return [], [
            f"target_modules={targets!r} matches none of GPT-2's c_attn, c_proj, c_fc layers"
        ]
    wanted, pattern = layers
    if wanted is not None:
        if pattern not in (None, "", [], "h", ["h"]):
            return [], [f"layers_pattern={pattern!r} is not GPT-2's ('h')"]
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        chosen = [p for p in chosen if int(p.split(".")[1]) in wanted]
    return chosen, []
