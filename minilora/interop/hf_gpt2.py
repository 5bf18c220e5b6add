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
``fan_in_fan_out=True``, and ``wte``, ``wpe``, ``lm_head`` as they are): a rank-r adapter on
the fused ``c_attn`` is a rank-r adapter on each of q, k and v (A shared, B and DoRA's
magnitude split by rows), and adapters on q, k and v are one adapter on ``c_attn`` (one A
when they share it, else the A's stacked and the B's placed block by block). Per-module
ranks and alphas travel as ``rank_pattern`` / ``alpha_pattern`` by full path;
``modules_to_save`` of the LayerNorms, embeddings and head by GPT-2 name; trainable tokens
(``trainable_token_indices``) of ``wte`` as ``tok_emb``'s; VeRA, with ``c_attn``'s one λ_d
shared by q, k and v. Why each is exact, and what is refused: docs/porting.md, "GPT-2
checkpoints and their PEFT adapters".

This module maps names, shapes and arrays; reading and writing the files is model_files.py's
and peft_adapters.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minilora import backend
from minilora.lora import LoRAConfig, adapted_layers, is_target
from minilora.model import GPTConfig
from minilora.variants import multi_adapter, pissa, trainable_tokens
from minilora.variants.patterns import in_layers, paths_matching, pattern_value

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
    "wte": "tok_emb",
    "wpe": "pos_emb",
}


def check_targets(model, target_modules, caller: str) -> None:
    """Refuse, before any training, LoRA targets on a GPT-2 that name no layer: GPT-2's
    own names (``c_attn``, ``wte``...), which minilora's loaded model does not use."""
    if not is_gpt2(model):
        return
    theirs = [t for t in target_modules if t.rsplit(".", 1)[-1] in _OUR_NAMES]
    if theirs:
        names = "; ".join(f"{t} is {_OUR_NAMES[t.rsplit('.', 1)[-1]]}" for t in theirs)
        raise ValueError(
            f"{caller}: target_modules {theirs} are GPT-2's names; minilora loads a GPT-2 "
            f"with its own ({names}), and saves the adapter in GPT-2's names for PEFT"
        )


def gpt2_modules(config: GPTConfig) -> dict:
    """Every module PEFT's LoRA can adapt on GPT2LMHeadModel, by its path there, and how
    minilora holds it: {path: (kind, (n_in, n_out), [(minilora layer, its rows of the
    output)])}. kind: "conv1d" (``h.{i}...``, fan_in_fan_out), "embedding" (``wte``,
    ``wpe``: n_in is the table's rows) or "linear" (``lm_head``, tied to ``wte``)."""
    C, L = config.n_embd, config.n_layer
    V, T = config.vocab_size, config.block_size
    every = slice(None)
    out = {
        "transformer.wte": ("embedding", (V, C), [("tok_emb", every)]),
        "transformer.wpe": ("embedding", (T, C), [("pos_emb", every)]),
    }
    for i in range(L):
        for gpt2, ours in _modules_of_block(C).items():
            pieces = [(f"blocks.{i}.{name}", rows) for name, rows in ours]
            out[f"transformer.h.{i}.{gpt2}"] = ("conv1d", _conv1d_shapes(C)[gpt2], pieces)
    out["lm_head"] = ("linear", (C, V), [("lm_head", every)])
    return out


def _adapter_names(kind: str) -> tuple[str, str]:
    """PEFT's names of A and B: an embedding's are ``lora_embedding_A``/``_B``."""
    return ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")


def adapter_to_gpt2(model, config: LoRAConfig, peft_config: dict) -> tuple[dict, set, dict]:
    """The adapter of ``model`` (a GPT-2 with LoRA layers matching ``config``) in GPT-2's
    names: ({parameter path: host array}, the adapted module paths, adapter_config.json).

    The Conv1D layers' factors are :func:`lora_factors`' (rank r', q, k and v sharing a
    block of A where they share A); ``wte``, ``wpe`` and ``lm_head`` keep theirs, padded
    to r' with zero rows of A and zero columns of B, which add nothing. Each module's
    ``lora_alpha`` is chosen so that PEFT's scaling (α/r', or α/√r' with rslora) is its
    first adapted piece's (``alpha_pattern`` by full path where modules differ); a piece
    of ``c_attn`` with another scaling has it folded into its rows of B (and of
    ``lora_bias``'s bias on B). DoRA's magnitudes are placed by rows like B (a piece
    without an adapter gets its rows' norms: m / ‖W‖ = 1)."""
    layers = dict(adapted_layers(model))
    check_targets(model, list(layers), "save_adapter")
    modules = gpt2_modules(model.config)
    pieces_of_convs = {
        p for kind, _, pieces in modules.values() if kind == "conv1d" for p, _ in pieces
    }
    convs = {p: m for p, m in layers.items() if p in pieces_of_convs}
    factors = lora_factors(model, convs) if convs else {}
    rank = max([A.shape[0] for A, _, _ in factors.values()] + [m.r for m in layers.values()])
    arrays, alphas = {}, {}
    for path, (kind, _, pieces) in modules.items():
        mine = [(layers[p], rows) for p, rows in pieces if p in layers]
        if not mine:
            continue
        first = mine[0][0]
        a_name, b_name = _adapter_names(kind)
        if path in factors:
            A, B = (backend.to_numpy(f) for f in factors[path][:2])  # (r', in), (out, r')
        else:
            A, B = _padded(first, a_name, b_name, rank)
        B = B.copy()
        for layer, rows in mine:  # 1 unless the pieces' scalings differ
            B[rows] *= layer.scaling / first.scaling
        arrays[f"{path}.{a_name}"], arrays[f"{path}.{b_name}"] = A, B
        if config.lora_bias:  # lora_B's bias by rows like B (zero for a piece without one)
            arrays[f"{path}.lora_B_bias"] = _fused_lora_bias(mine, first, B)
        if config.use_dora and kind != "embedding":
            arrays[f"{path}.lora_magnitude_vector"] = _fused_magnitude(model, pieces, layers)
        ratio = rank / first.r
        alpha = first.lora_alpha * (math.sqrt(ratio) if config.use_rslora else ratio)
        alphas[path] = int(alpha) if float(alpha).is_integer() else alpha
    adapted = set(alphas)
    arrays.update(_gpt2_biases(model, config.bias, adapted))
    saved = _saved_to_gpt2(model, config.modules_to_save)
    arrays.update(saved)
    tokens, token_arrays = _tokens_to_gpt2(model, config)
    arrays.update(token_arrays)

    alpha = next(iter(alphas.values()))
    peft_config = {
        **peft_config,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "layers_to_transform": None,
        "layers_pattern": None,
        "target_modules": _gpt2_targets(adapted, model.config.n_layer),
        "fan_in_fan_out": True,  # Conv1D: PEFT sets it for GPT-2 whatever it is told
        "modules_to_save": sorted({n.rpartition(".")[0] for n in saved}) or None,
        "trainable_token_indices": tokens,
    }
    return arrays, adapted, peft_config


_TOKEN_DELTA = f"token_adapter.{trainable_tokens.DELTA}"  # after the embedding's path


def _gpt2_embeddings(config: GPTConfig) -> dict:
    """{GPT-2 path: minilora path} of the embeddings (``transformer.wte``: ``tok_emb``)."""
    modules = gpt2_modules(config)
    return {p: pieces[0][0] for p, (kind, _, pieces) in modules.items() if kind == "embedding"}


def _tokens_to_gpt2(model, config: LoRAConfig) -> tuple:
    """The model's trainable tokens in GPT-2's names: (``trainable_token_indices`` as PEFT
    reads it, {GPT-2 parameter path: host array}). The list form is the input
    embedding's in both (``tok_emb``, ``wte``); a dict's keys become GPT-2's leaf names."""
    spec = config.trainable_token_indices
    theirs = {mine: path for path, mine in _gpt2_embeddings(model.config).items()}
    targets, _ = trainable_tokens.token_targets(model, config)  # checked by the caller
    arrays = {}
    for path in targets:
        delta = model.get_submodule(path).token_adapter.trainable_tokens_delta
        arrays[f"{theirs[path]}.{_TOKEN_DELTA}"] = backend.to_numpy(delta.data)
    if isinstance(spec, dict):
        spec = {theirs[p].rsplit(".", 1)[-1]: indices for p, indices in targets.items()}
    return spec, arrays


def _tokens_from_gpt2(model, spec) -> tuple:
    """PEFT's ``trainable_token_indices`` of GPT2LMHeadModel in minilora's names: (the
    field, {GPT-2 parameter path: (minilora parameter path, shape)}, problems)."""
    if spec is None:
        return None, {}, []
    embeddings = _gpt2_embeddings(model.config)
    named = spec if isinstance(spec, dict) else {"transformer.wte": spec}  # PEFT: the input's
    field, arrays, problems = {}, {}, []
    for key, indices in named.items():
        matched = [p for p in embeddings if is_target([key], p)]
        if not matched:
            problems.append(
                f"trainable_token_indices names {key!r}, which is none of GPT-2's "
                "embeddings (wte, wpe)"
            )
        for path in matched:
            field[embeddings[path]] = indices
            shape = (len(indices), model.config.n_embd)
            arrays[f"{path}.{_TOKEN_DELTA}"] = (f"{embeddings[path]}.{_TOKEN_DELTA}", shape)
    return (field if isinstance(spec, dict) else spec), arrays, problems


def _padded(layer, a_name: str, b_name: str, rank: int) -> tuple:
    """(A (rank, in), B (out, rank)) of one layer's adapter, zero-padded to ``rank``, on
    the host."""
    xp = backend.module_for("cpu")
    A0 = backend.to_numpy(getattr(layer, a_name).data)  # (r, in)
    B0 = backend.to_numpy(getattr(layer, b_name).data)  # (out, r)
    A = xp.zeros((rank, A0.shape[1]), dtype=A0.dtype)
    B = xp.zeros((B0.shape[0], rank), dtype=B0.dtype)
    A[: A0.shape[0]], B[:, : B0.shape[1]] = A0, B0
    return A, B


def _saved_to_gpt2(model, names) -> dict:
    """The parameters of the modules ``names`` (minilora's ``modules_to_save``) by GPT-2
    parameter path, or a ValueError for one GPT-2 does not hold alike."""
    ours = {mine: path for path, mine in saved_modules(model.config).items()}
    out = {}
    for path, module in model.named_modules():
        if not path or not is_target(names or [], path):
            continue
        if path not in ours:
            raise ValueError(
                f"save_adapter: modules_to_save names {path}, which GPT-2 computes in a "
                "Conv1D layer; minilora saves modules_to_save of a GPT-2 on the LayerNorms, "
                "tok_emb, pos_emb and lm_head"
            )
        for leaf in ("weight", "bias"):
            p = vars(module).get(leaf)
            if p is not None:
                out[f"{ours[path]}.{leaf}"] = backend.to_numpy(p.data)
    return out


def _fused_lora_bias(mine: list, first, B):
    """``lora_bias``'s bias of one GPT-2 module (out,): each adapted piece's ``lora_B_bias``
    in its rows, rescaled like its rows of B to the scaling of the module's ``first`` piece."""
    bias = backend.module_for("cpu").zeros(B.shape[0], dtype=B.dtype)
    for layer, rows in mine:
        bias[rows] = backend.to_numpy(layer.lora_B_bias.data) * (layer.scaling / first.scaling)
    return bias


def _fused_magnitude(model, pieces: list, layers: dict):
    """DoRA's magnitude of one GPT-2 module (out,): each adapted piece's, and the row norms
    of the weight of a piece without an adapter (so that PEFT's m / ‖W‖ is 1 there)."""
    xp = backend.module_for("cpu")
    parts = []
    for path, _ in pieces:
        if path in layers:
            parts.append(backend.to_numpy(layers[path].lora_magnitude_vector.data))
        else:
            W = backend.to_numpy(model.get_submodule(path).weight.data)  # (out, in)
            parts.append(xp.sqrt((W.astype(xp.float64) ** 2).sum(axis=1)).astype(W.dtype))
    return xp.concatenate(parts)


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
    adapted, else the full paths; ``wte``, ``wpe``, ``lm_head`` by name."""
    targets = [name for name in ("wte", "wpe") if f"transformer.{name}" in adapted]
    for module in (_ATTN, _ATTN_OUT, _FC, _FC_OUT):
        paths = [f"transformer.h.{i}.{module}" for i in range(n_layer)]
        if all(p in adapted for p in paths):
            targets.append(module)
        else:
            targets += [p for p in paths if p in adapted]
    return targets + (["lm_head"] if "lm_head" in adapted else [])


def saved_modules(config: GPTConfig) -> dict:
    """The modules PEFT's ``modules_to_save`` can copy on GPT2LMHeadModel that minilora
    holds alike (the LayerNorms, the embeddings, the head), by GPT-2 path: {path:
    minilora path}. (The Conv1D layers would need c_attn split and transposes.)"""
    out = {"transformer.wte": "tok_emb", "transformer.wpe": "pos_emb"}
    for i in range(config.n_layer):
        for ln, mine in _LAYER_NORMS.items():
            out[f"transformer.h.{i}.{ln}"] = f"blocks.{i}.{mine}"
    return {**out, "transformer.ln_f": "ln_f", "lm_head": "lm_head"}


def _saved_from_gpt2(model, names) -> tuple[dict, list[str], list[str]]:
    """({GPT-2 parameter path: shape} of the modules PEFT's ``modules_to_save`` (``names``,
    matched as PEFT matches them: a module path that ends with one) copies, their minilora
    paths, problems)."""
    table = saved_modules(model.config)
    names = names or []
    chosen = [p for p in table if any(p.endswith(n) for n in names)]
    unmatched = [n for n in names if not any(p.endswith(n) for p in table)]
    problems = []
    if unmatched:
        problems.append(
            f"modules_to_save {unmatched} match none of the GPT-2 modules minilora holds "
            "alike (ln_1, ln_2, ln_f, wte, wpe, lm_head); a Conv1D layer's copy is not supported"
        )
    want = {}
    for path in chosen:
        module = model.get_submodule(table[path])
        for leaf in ("weight", "bias"):
            p = vars(module).get(leaf)
            if p is not None:
                want[f"{path}.{leaf}"] = tuple(p.shape)
    return want, [table[p] for p in chosen], problems


def adapter_from_gpt2(model, fields: dict, selection: dict, tensors: dict, prefix: str):
    """A PEFT adapter of GPT2LMHeadModel as one for ``model`` in minilora's names:
    (fields with ``target_modules`` the full minilora paths and ``rank_pattern`` /
    ``alpha_pattern`` by those paths, tensors by minilora's PEFT keys, problems).
    ``tensors`` are by PEFT key (``prefix`` + GPT-2 parameter path); ``selection``: the
    file's ``layers_to_transform``, ``layers_pattern``, ``exclude_modules``,
    ``rank_pattern`` and ``alpha_pattern``, applied as PEFT applies them to GPT-2's module
    paths. A fused ``c_attn`` adapter becomes one on each of q, k and v, with A shared and
    B (and DoRA's magnitude, ``lora_bias``'s bias on B) split by rows; nothing is
    converted unless every key and shape is right."""
    modules = gpt2_modules(model.config)
    chosen, problems = _gpt2_chosen(list(modules), fields["target_modules"], selection)
    r, alpha = fields["r"], fields["lora_alpha"]
    ranks = {p: pattern_value(selection["rank_pattern"], p, r) for p in chosen}
    alphas = {p: pattern_value(selection["alpha_pattern"], p, alpha) for p in chosen}
    want = _gpt2_expected(model, chosen, ranks, fields)
    saved, saved_paths, found_problems = _saved_from_gpt2(model, fields.get("modules_to_save"))
    want.update(saved)
    problems += found_problems
    tokens, token_arrays, found_problems = _tokens_from_gpt2(
        model, fields.get("trainable_token_indices")
    )
    want.update({name: shape for name, (_, shape) in token_arrays.items()})
    problems += found_problems
    if "lm_head" in chosen and model.config.tie_word_embeddings and "lm_head.weight" not in want:
        want["lm_head.weight"] = None  # PEFT may save the tied weight: it must be wte's
    found = {}
    for key, array in tensors.items():
        name = _gpt2_param(key, prefix)
        if name not in want:
            problems.append(_unexpected(key, name, modules, fields["target_modules"]))
        elif name in found:
            problems.append(f"{name} is given twice")
        elif want[name] is None:
            problems += _tied_head_problems(model, key, array)
        elif tuple(array.shape) != want[name]:
            problems.append(f"{key} has shape {tuple(array.shape)}, expected {want[name]}")
        else:
            found[name] = array
    want = {k: v for k, v in want.items() if v is not None}
    problems += [f"missing {name!r}" for name in sorted(set(want) - set(found))]
    if problems:
        return fields, {}, problems

    ours, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
    for path, (kind, _, pieces) in modules.items():
        if path in chosen:
            for mine, rows in pieces:
                targets.append(mine)
                for leaf in _adapter_names(kind):  # A shared, B split by rows
                    part = found[f"{path}.{leaf}"]
                    ours[f"{mine}.{leaf}"] = part if leaf.endswith("A") else part[rows]
                if f"{path}.lora_B.bias" in found:  # lora_bias: split by rows like B
                    ours[f"{mine}.lora_B_bias"] = found[f"{path}.lora_B.bias"][rows]
                if f"{path}.lora_magnitude_vector" in found:
                    ours[f"{mine}.lora_magnitude_vector"] = found[f"{path}.lora_magnitude_vector"][
                        rows
                    ]
                if ranks[path] != r:
                    rank_pattern[mine] = ranks[path]
                if alphas[path] != alpha:
                    alpha_pattern[mine] = alphas[path]
        for mine, rows in pieces:
            if f"{path}.bias" in found:
                ours[f"{mine}.bias"] = found[f"{path}.bias"][rows]
    for name, array in found.items():  # the LayerNorms' biases
        if name.rsplit(".", 2)[-2].startswith("ln_") and name not in saved:
            ours[_ln_bias(name)] = array
    table = saved_modules(model.config)
    for name in saved:  # the modules PEFT copied: minilora's parameter paths
        owner, _, leaf = name.rpartition(".")
        ours[f"{table[owner]}.{leaf}"] = found[name]
    for name, (mine, _) in token_arrays.items():
        ours[mine] = found[name]
    fields = {**fields, "target_modules": targets, "modules_to_save": saved_paths or None}
    fields["trainable_token_indices"] = tokens
    return {**fields, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}, ours, []


def _ln_bias(name: str) -> str:
    """``transformer.h.0.ln_1.bias`` -> ``blocks.0.ln1.bias``; ``transformer.ln_f.bias``."""
    name = name.removeprefix("transformer.")
    if name == "ln_f.bias":
        return name
    _, i, ln, _ = name.split(".")
    return f"blocks.{i}.{_LAYER_NORMS[ln]}.bias"


def _gpt2_expected(model, chosen: list[str], ranks: dict, fields: dict) -> dict:
    """{GPT-2 parameter path: shape} of what a PEFT adapter of ``chosen`` holds."""
    modules = gpt2_modules(model.config)
    C, L = model.config.n_embd, model.config.n_layer
    want = {}
    for path in chosen:
        kind, (n_in, n_out), _ = modules[path]
        a_name, b_name = _adapter_names(kind)
        want[f"{path}.{a_name}"], want[f"{path}.{b_name}"] = (
            (ranks[path], n_in),
            (n_out, ranks[path]),
        )
        if fields.get("use_dora") and kind != "embedding":
            want[f"{path}.lora_magnitude_vector"] = (n_out,)
        if fields.get("lora_bias") and kind != "embedding":
            want[f"{path}.lora_B.bias"] = (n_out,)
    bias = fields.get("bias", "none")
    if bias != "none":
        convs = [p for p, (kind, _, _) in modules.items() if kind == "conv1d"]
        for path in convs if bias == "all" else [p for p in chosen if p in convs]:
            want[f"{path}.bias"] = (modules[path][1][1],)
        if bias == "all":
            want["transformer.ln_f.bias"] = (C,)
            for i in range(L):
                for ln in _LAYER_NORMS:
                    want[f"transformer.h.{i}.{ln}.bias"] = (C,)
    return want


def _tied_head_problems(model, key: str, array) -> list[str]:
    """PEFT saves the tied head's weight with an ``lm_head`` adapter; it must be this
    model's token embedding, or the adapter was trained on another base."""
    wte = backend.to_numpy(model.tok_emb.weight.data)
    if array.shape == wte.shape and (array == wte.astype(array.dtype)).all():
        return []
    return [
        f"{key} is the tied head's weight (GPT-2's wte), and it differs from this model's "
        "token embedding: the adapter was saved on another base model"
    ]


def _unexpected(key: str, name, modules: dict, targets) -> str:
    """Why ``key`` is not expected: the module it is on is not a target, or the key is
    not one PEFT's LoRA writes."""
    if name is None:
        return f"unexpected key {key!r}: not a PEFT LoRA key of GPT2LMHeadModel"
    owner = name.rsplit(".", 1)[0]
    if owner in modules:
        return (
            f"unexpected key {key!r}: {owner} is not adapted by target_modules={targets!r} "
            "(with layers_to_transform and exclude_modules), so this adapter file and its "
            "adapter_config.json disagree"
        )
    return f"unexpected key {key!r}: GPT2LMHeadModel has no LoRA module {owner!r}"


def _gpt2_param(key: str, prefix: str) -> str | None:
    """``prefix`` + ``transformer.h.0.attn.c_attn.lora_A.weight`` ->
    ``transformer.h.0.attn.c_attn.lora_A``; PEFT's ``<module>.base_layer.bias`` ->
    ``<module>.bias``; keys without ``transformer.`` get it (an ``lm_head`` has none)."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix) :].replace(".base_layer.", ".")
    if not name.startswith(("transformer.", "lm_head.")):
        name = f"transformer.{name}"
    owner, _, leaf = name.rpartition(".")
    if owner.endswith((".lora_A", ".lora_B")) and leaf == "weight":
        return owner
    return None if leaf in ("lora_A", "lora_B") else name


def _gpt2_chosen(paths: list[str], targets, selection: dict) -> tuple[list[str], list[str]]:
    """The GPT-2 modules PEFT adapts for ``target_modules`` and the ``selection``
    (layers_to_transform, layers_pattern, exclude_modules), matched on GPT2LMHeadModel's
    paths as PEFT matches them."""
    if isinstance(targets, str) and targets.lower() == "all-linear":
        chosen = [p for p in paths if ".h." in p]  # PEFT leaves out the output layer lm_head
    elif isinstance(targets, str):
        chosen, problems = paths_matching(targets, paths)
        if problems:
            return [], problems
    else:
        chosen = [p for p in paths if is_target(targets, p)]
    if not chosen:
        return [], [
            f"target_modules={targets!r} matches none of GPT-2's LoRA modules (c_attn, "
            "c_proj, c_fc, wte, wpe, lm_head)"
        ]
    exclude = selection["exclude_modules"]
    if isinstance(exclude, str):
        excluded, problems = paths_matching(exclude, chosen)
        if problems:
            return [], [p.replace("target_modules", "exclude_modules") for p in problems]
    else:
        excluded = [p for p in chosen if is_target(exclude or [], p)]
    chosen = [p for p in chosen if p not in excluded]
    wanted, pattern = selection["layers_to_transform"], selection["layers_pattern"]
    if wanted is not None and not isinstance(targets, str):  # PEFT ignores it for a regex
        if pattern not in (None, "", [], "h", ["h"]):
            return [], [f"layers_pattern={pattern!r} is not GPT-2's ('h')"]
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        chosen = [p for p in chosen if in_layers(p, list(wanted), "h")]
    return chosen, []


# ======================================================================================
# VeRA adapters: PEFT's on GPT2LMHeadModel, c_attn as q, k and v with one λ_d
# ======================================================================================


_VERA_FUSED = (
    "PEFT's VeRA adapts GPT-2's fused c_attn as one layer: one vera_lambda_d for its 3C "
    "outputs, which read rows [0, 3C) of vera_B. Adapt q_proj, k_proj and v_proj together "
    "as that layer, with apply_vera(model, config, fused=hf_gpt2.vera_fused(model)) (or "
    "load_vera of a PEFT adapter), or leave c_attn out: o_proj, fc1, fc2 and lm_head cross alone"
)


def vera_fused(model) -> list[list[str]]:
    """The groups of minilora layers that are one layer of GPT-2 (each block's q, k and v:
    its ``c_attn``), as ``apply_vera``'s ``fused`` takes them."""
    modules = gpt2_modules(model.config).values()
    return [[p for p, _ in pieces] for _, _, pieces in modules if len(pieces) > 1]


def vera_names(model, paths) -> tuple[dict, list[str]]:
    """({GPT-2 module path: [minilora paths of its VeRA layers]} for the VeRA layers at
    ``paths``, the problems): a layer of its own reads vera_B from row 0 with a λ_d of its
    own; the pieces of ``c_attn`` are all adapted, share one λ_d and read rows from 0, C
    and 2C (see ``_VERA_FUSED``)."""
    names, wrong = {}, []
    lambda_d = {p: id(model.get_submodule(p).vera_lambda_d) for p in paths}
    for gpt2, (_, _, pieces) in gpt2_modules(model.config).items():
        mine = [p for p, _ in pieces if p in paths]
        if not mine:
            continue
        ours = {lambda_d[p] for p in mine}  # one, used by no layer outside the module
        alone = len(ours) == 1 and sum(lambda_d[p] in ours for p in paths) == len(mine)
        rows = [model.get_submodule(p).vera_offset for p in mine]
        if alone and mine == [p for p, _ in pieces] and rows == [r.start for _, r in pieces]:
            names[gpt2] = mine
        else:
            wrong += mine
    if not wrong:
        return names, []
    return names, [f"the VeRA layers {wrong} are not laid out as PEFT's: {_VERA_FUSED}"]


def vera_targets_from_gpt2(model, targets) -> tuple[dict, list[str]]:
    """({GPT-2 module path: [(minilora path, its rows of the module's outputs)]} of the
    layers PEFT's VeRA ``target_modules`` adapts on GPT2LMHeadModel, the problems)."""
    modules = gpt2_modules(model.config)
    paths = [p for p, (kind, _, _) in modules.items() if kind != "embedding"]
    none = {"layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}
    chosen, problems = _gpt2_chosen(paths, targets, none)
    return {p: modules[p][2] for p in chosen}, problems


def fused_pissa_residuals(model, config: LoRAConfig) -> dict:
    """PiSSA on GPT-2's fused ``c_attn`` as PEFT computes it when it loads the adapter: the
    SVD of the whole (3C, C) weight [W_q; W_k; W_v] (out, in), whose residual
    ``W - s·B0·A0`` is split by rows: {minilora path: residual (C, C)} for each ``c_attn``
    whose q, k and v ``config`` adapts. (minilora's own init would take the SVD of q, k
    and v apart: another residual.) Read from the model before it changes."""
    xp = backend.get_array_module(model.tok_emb.weight.data)
    out = {}
    for _, (_, _, pieces) in gpt2_modules(model.config).items():
        paths = [p for p, _ in pieces]
        if len(paths) == 1 or not all(config.adapts(p) for p in paths):
            continue
        own = config.for_module(paths[0])  # one r and alpha: they came from one c_attn
        W = xp.concatenate([model.get_submodule(p).weight.data for p in paths])  # (3C, C)
        _, _, residual = pissa.pissa_init(W, own.r, own.scaling)
        for path, rows in pieces:
            out[path] = residual[rows]
    return out


def pissa_problems(model) -> list[str]:
    """Why the model's PiSSA adapter would load differently in PEFT, which redoes the SVD
    of each adapted module at the file's rank when it loads, of the fused ``c_attn`` as a
    whole: the q, k and v pieces must hold the fused module's residual
    (``fused_residual``, set by ``load_adapter``; ``apply_lora`` takes three SVDs) and
    still share one ``lora_A`` (three A's stack to rank 3r, a different SVD)."""
    layers = dict(adapted_layers(model))
    apart, unshared = [], []
    for path, (_, _, pieces) in gpt2_modules(model.config).items():
        mine = [layers[p] for p, _ in pieces if p in layers]
        if len(pieces) == 1 or not mine:
            continue
        if not all(getattr(layer, "fused_residual", False) for layer in mine):
            apart.append(path)
        elif not all((m.lora_A.data == mine[0].lora_A.data).all() for m in mine):
            unshared.append(path)
    problems = []
    ranks = sorted({layer.r for layer in layers.values()})
    if len(ranks) > 1:
        problems.append(
            f"the PiSSA layers have ranks {ranks}: saved, every module is padded to the "
            "largest, and PEFT would take each SVD at that rank when it loads the adapter"
        )
    if apart:
        problems.append(
            f"the PiSSA residuals of q, k and v in {apart} are three SVDs (apply_lora), but "
            "PEFT takes the SVD of GPT-2's fused c_attn when it loads the adapter"
        )
    if unshared:
        problems.append(
            f"q, k and v of {unshared} have different lora_A (trained apart in minilora): "
            "saved, they stack to a c_attn adapter of rank 3r, and PEFT would take the SVD "
            "at rank 3r when it loads the adapter"
        )
    return problems
