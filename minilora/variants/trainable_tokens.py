"""Trainable tokens (PEFT's ``trainable_token_indices``): a few rows of a token embedding
trained in full, the rest of the table frozen.

    W' = W with rows token_indices replaced by trainable_tokens_delta
    W (V, C) frozen,  token_indices (n,) distinct,  trainable_tokens_delta (n, C)

    embedding:  y = W'[ids]                       (..., C)
    tied head:  logits = x W'ᵀ (+ b)              (..., V)

Despite PEFT's name, ``trainable_tokens_delta`` holds the rows' NEW VALUES, not a
difference; it starts as a copy of the rows, so the adapted model starts equal to the
base. W' is built from existing ops, ``cat([W, delta])`` (V + n, C) and a row lookup that
sends row v to V + i when v is token_indices[i], so no new backward is needed: the delta
gets the gradient of its rows, the frozen W none (docs/math.md#trainable-tokens).

A model whose head shares the embedding's weight (GPT-2's ``tie_word_embeddings``) gets
its head wrapped too, with the same ``token_adapter`` (one Parameter): both uses compute
with W', as PEFT's tied ``TrainableTokensWrapper`` does. Merging writes the rows into W,
which is exactly what both uses compute, so it is allowed on a tied table; unmerging
writes back the rows saved when the layer was built (``trainable_tokens_original``).

``import minilora`` registers it with the book's ``lora.py`` (its config check, target
check, model edit, parameter name and layer kinds), so that ``LoRAConfig(
trainable_token_indices=[0, 3, 7])`` adapts the token embedding ``tok_emb``, and
``{"tok_emb": [...]}`` the embeddings the keys name (matched as targets are).
"""

from __future__ import annotations

import warnings

from minilora import backend, lora
from minilora import functional as F
from minilora.autograd import Tensor, is_grad_enabled
from minilora.lora import LoRAConfig, is_target, tied_layers
from minilora.nn import Embedding, Linear, Module, Parameter

TOKEN_EMBEDDING = "tok_emb"  # what the list form adapts: the model's token embedding
DELTA = "trainable_tokens_delta"  # PEFT's name of the new rows, (n, C)


def row_map(V: int, token_indices, xp):
    """rows (V,): rows[v] = V + i where v = token_indices[i], else v, so that the table
    with the rows replaced is ``cat([W, delta])[rows]``."""
    rows = xp.arange(V, dtype=xp.int64)
    n = len(token_indices)
    rows[xp.asarray(token_indices, dtype=xp.int64)] = V + xp.arange(n, dtype=xp.int64)
    return rows


def replaced_table(weight, delta, token_indices) -> Tensor:
    """W' (V, C): ``weight`` (V, C) with rows ``token_indices`` replaced by ``delta`` (n, C)."""
    rows = row_map(weight.shape[0], token_indices, backend.get_array_module(weight.data))  # (V,)
    return F.getitem(F.cat([weight, delta], axis=0), rows)  # [W; delta] (V + n, C), then rows


def token_embedding(ids, weight, delta, token_indices) -> Tensor:
    """W'[ids] (..., C) without building W': the ids are mapped into ``cat([W, delta])``."""
    rows = row_map(weight.shape[0], token_indices, backend.get_array_module(weight.data))  # (V,)
    ids = ids.data if isinstance(ids, Tensor) else ids
    return F.embedding(rows[ids], F.cat([weight, delta], axis=0))


class TrainableTokens(Module):
    """What the wrapped layers share (PEFT's ``TrainableTokensLayer``): ``token_indices``
    (n ints), the Parameter ``trainable_tokens_delta`` (n, C), the new rows, and
    ``trainable_tokens_original`` (n, C), the rows as they were (an array, not trained)."""

    def __init__(self, weight: Parameter, token_indices: list[int]):
        self.token_indices = list(token_indices)
        rows = weight.data[self.token_indices]  # (n, C), a copy (integer indexing)
        self.trainable_tokens_delta = Parameter(rows.copy())  # starts equal to the base
        self.trainable_tokens_original = rows

    def merged_weight(self, weight: Parameter, safe_merge: bool = True):
        """W' as a new array, refused (ValueError) if ``safe_merge`` and not finite."""
        merged = weight.data.copy()
        merged[self.token_indices] = self.trainable_tokens_delta.data
        return lora.check_merged(merged, safe_merge, "W with its trainable tokens")

    def restore(self, weight: Parameter) -> None:
        """Put the original rows back into ``weight`` (in place)."""
        original = backend.to_device(self.trainable_tokens_original, weight.device)
        weight.data[self.token_indices] = original.astype(weight.dtype)

    def extra_repr(self) -> str:
        return f"token_indices={self.token_indices}"


class TrainableTokensLayer:
    """What both wrapped layers do with their ``token_adapter``: merge (write the rows into
    the weight), unmerge (write the originals back), and refuse to train while merged.
    ``merge_lora``, ``unmerge_lora``, ``merge_and_unload`` and ``disable_adapters`` handle
    them with the LoRA layers (``lora.OTHER_LAYERS``)."""

    base_class = Module  # the plain layer it wraps (and :meth:`get_base_layer` gives back)
    merge_keeps_ties = True  # merged rows are what every use of a tied table computes with

    @classmethod
    def wrap(cls, base: Module, token_adapter: TrainableTokens):
        """``base`` (the same weight object) computing with ``token_adapter``'s rows."""
        layer = cls.__new__(cls)
        vars(layer).update(vars(base))
        layer.token_adapter = token_adapter
        layer.merged = False
        layer.disable_adapters = False
        return layer

    def uses_table(self) -> bool:
        """True when the forward must build W': not merged, not disabled."""
        if self.merged and self.training and is_grad_enabled():
            if self.token_adapter.trainable_tokens_delta.requires_grad:
                raise RuntimeError(
                    f"this {type(self).__name__} is merged, so a gradient would not reach "
                    f"{DELTA}; call unmerge() before training, or eval() for inference"
                )
        return not (self.merged or self.disable_adapters)

    def merged_weight(self, safe_merge: bool = True):
        return self.token_adapter.merged_weight(self.weight, safe_merge)

    def merge(self, safe_merge: bool = True) -> None:
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge(): already merged", stacklevel=2)
            return
        self._set_merged(self.merged_weight(safe_merge))

    def _set_merged(self, merged) -> None:
        self.weight.data[...] = merged  # in place: a tied layer sees it too
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged", stacklevel=2)
            return
        self.token_adapter.restore(self.weight)
        self.merged = False

    def get_base_layer(self) -> Module:
        """The plain layer with the current weight (merge first to keep the rows)."""
        base = self.base_class.__new__(self.base_class)
        adapter = ("token_adapter", "merged", "disable_adapters")
        vars(base).update({k: v for k, v in vars(self).items() if k not in adapter})
        return base


class TrainableTokensEmbedding(TrainableTokensLayer, Embedding):
    """An ``Embedding`` looking its ids up in W': ``y = [W; delta][rows[ids]]`` (..., C),
    with no (V, C) copy of the table (only [W; delta] is built)."""

    base_class = Embedding

    def forward(self, ids) -> Tensor:
        if not self.uses_table():
            return F.embedding(ids, self.weight)
        adapter = self.token_adapter
        return token_embedding(
            ids, self.weight, adapter.trainable_tokens_delta, adapter.token_indices
        )


class TrainableTokensLinear(TrainableTokensLayer, Linear):
    """The head of a tied model: ``logits = x W'ᵀ + b`` (..., V), W' the embedding's."""

    base_class = Linear

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.uses_table():
            adapter = self.token_adapter
            weight = replaced_table(weight, adapter.trainable_tokens_delta, adapter.token_indices)
        return F.linear(x, weight, self.bias)


# --------------------------------------------------------------------------------------
# The config field, its targets, and what apply_lora and the adapter files need
# --------------------------------------------------------------------------------------


def check_config(config: LoRAConfig) -> None:
    """``trainable_token_indices``: None, a list of distinct non-negative ints, or a dict
    from module names to such lists (registered in ``lora.CONFIG_CHECKS``)."""
    spec = config.trainable_token_indices
    lists = spec.values() if isinstance(spec, dict) else [spec]
    names_ok = not isinstance(spec, dict) or all(isinstance(k, str) and k for k in spec)
    if spec is None or (names_ok and spec and all(_indices_ok(v) for v in lists)):
        return
    raise ValueError(
        f"LoRAConfig: trainable_token_indices={spec!r} must be None, a non-empty list of "
        "distinct non-negative token ids such as [0, 3, 7], or a dict from embedding names "
        "to such lists such as {'tok_emb': [1, 2]}"
    )


def _indices_ok(indices) -> bool:
    return (
        isinstance(indices, list)
        and bool(indices)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
        and len(set(indices)) == len(indices)
    )


def token_targets(model: Module, config: LoRAConfig) -> tuple[dict, list[str]]:
    """({embedding path: token indices} that ``config.trainable_token_indices`` names, the
    problems found): the list form is ``tok_emb``'s; a dict's keys are matched as targets
    are (a leaf name, a suffix or a full path)."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}, []
    spec = spec if isinstance(spec, dict) else {TOKEN_EMBEDDING: spec}
    embeddings = [p for p, m in model.named_modules() if isinstance(m, Embedding) and p]
    out, problems = {}, []
    for key, indices in spec.items():
        matched = [p for p in embeddings if is_target([key], p)]
        if not matched:
            problems.append(
                f"trainable_token_indices names {key!r}, which matches no Embedding in the "
                f"model; its embeddings are {embeddings}"
            )
        out.update(dict.fromkeys(matched, indices))
    return out, problems


def token_problems(model: Module, paths, config: LoRAConfig) -> list[str]:
    """What stops the trainable tokens of ``config`` on ``model`` (registered in
    ``lora.TARGET_CHECKS``; ``paths``: the LoRA targets), before anything changes."""
    targets, problems = token_targets(model, config)
    for path, indices in targets.items():
        module = model.get_submodule(path)
        V = module.weight.shape[0]
        beyond = [i for i in indices if i >= V]
        if beyond:
            problems.append(
                f"trainable_token_indices {beyond} for {path} are out of range: its table has "
                f"{V} rows (token ids 0 to {V - 1})"
            )
        if path in paths or type(module) not in (Embedding, TrainableTokensEmbedding):
            problems.append(
                f"{path} is in target_modules (or adapted otherwise) and in "
                "trainable_token_indices; minilora puts one adapter on a layer"
            )
        elif (
            isinstance(module, TrainableTokensEmbedding)
            and module.token_adapter.token_indices != indices
        ):
            problems.append(
                f"{path} has trainable tokens {module.token_adapter.token_indices} already, "
                f"not {indices}"
            )
        if is_target(config.modules_to_save or [], path):
            problems.append(
                f"{path} is in modules_to_save and in trainable_token_indices: train the "
                "whole table or some of its rows, not both (as PEFT refuses)"
            )
        tied = tied_layers(model, [path]).get(path, [])
        plain = (Linear, TrainableTokensLinear)
        heads = [p for p in tied if p in paths or type(model.get_submodule(p)) not in plain]
        if heads:
            problems.append(
                f"{heads} share {path}'s weight and are adapted; trainable tokens on a tied "
                "table replace its rows in the plain head only"
            )
    return problems


def add_trainable_tokens(model: Module, config: LoRAConfig) -> None:
    """Wrap each embedding ``config.trainable_token_indices`` names, and every plain
    ``Linear`` sharing its weight (a tied head), around one ``TrainableTokens``
    (registered in ``lora.MODEL_EDITS``; :func:`token_problems` checked first). A layer
    that has these tokens already keeps them."""
    targets, _ = token_targets(model, config)
    for path, indices in targets.items():
        embedding = model.get_submodule(path)
        if isinstance(embedding, TrainableTokensEmbedding):
            continue
        adapter = TrainableTokens(embedding.weight, indices)
        for other in tied_layers(model, [path]).get(path, []):
            head = model.get_submodule(other)
            model.set_submodule(other, TrainableTokensLinear.wrap(head, adapter))
        model.set_submodule(path, TrainableTokensEmbedding.wrap(embedding, adapter))


def token_layers(model: Module) -> dict:
    """{path: TrainableTokensEmbedding} of the model."""
    return {p: m for p, m in model.named_modules() if isinstance(m, TrainableTokensEmbedding)}


def expected_arrays(model: Module, config: LoRAConfig) -> dict:
    """{parameter path: shape} of the deltas an adapter file with ``config`` holds:
    ``<embedding path>.token_adapter.trainable_tokens_delta`` (n, C)."""
    targets, _ = token_targets(model, config)
    return {
        f"{path}.token_adapter.{DELTA}": (len(indices), model.get_submodule(path).weight.shape[1])
        for path, indices in targets.items()
    }


def existing_problems(model: Module, config: LoRAConfig) -> list[str]:
    """Ways in which the model's trainable tokens differ from what ``config`` describes
    (for a save, and a load into a model that has adapter layers)."""
    targets, problems = token_targets(model, config)
    layers = token_layers(model)
    for path in sorted(set(targets) | set(layers)):
        has = layers[path].token_adapter.token_indices if path in layers else None
        if has != targets.get(path):
            problems.append(
                f"config says trainable_token_indices {targets.get(path)} for {path}, but the "
                f"model has {has} there"
            )
        elif layers[path].merged:
            problems.append(f"the trainable tokens of {path} are merged; call unmerge_lora first")
    return problems


lora.CONFIG_CHECKS.append(check_config)
lora.TARGET_CHECKS.append(token_problems)
lora.MODEL_EDITS.append(add_trainable_tokens)
lora.ADAPTER_PARAMETERS.add(DELTA)
lora.OTHER_LAYERS.append(TrainableTokensLayer)
