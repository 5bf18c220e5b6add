"""LoRA on a token embedding (PEFT's ``lora.Embedding``):

    y = W[ids] + s · Aᵀ[ids] Bᵀ,   W (V, C) frozen,  A (r, V),  B (C, r),  s = lora_alpha / r

An embedding is a linear layer applied to a one-hot vector, ``W[i] = e_iᵀ W``, so the update
ΔW = s · (B A)ᵀ (V, C) has the same low-rank form as a ``Linear``'s; the lookup picks rows of
Aᵀ instead of multiplying by A. PEFT's names and layouts: ``lora_embedding_A`` (r, V) and
``lora_embedding_B`` (C, r), and PEFT's init, the reverse of a ``Linear``'s: A zero and B
normal N(0, 1), so the adapted model starts equal to the base. PEFT applies no dropout to an
embedding's bypass; neither does this layer. ``import minilora`` registers it with the
book's ``apply_lora`` (``lora.LORA_LAYERS``, ``lora.TARGET_CHECKS``), so an embedding's name in
``target_modules`` adapts it. Derivation: docs/math.md#lora-on-the-token-embedding.
"""

from __future__ import annotations

import warnings

from minilora import backend, lora
from minilora import functional as F
from minilora.autograd import Function, Tensor, is_grad_enabled
from minilora.lora import LoRAConfig, LoRALayer
from minilora.nn import Embedding, Module, Parameter

mm = backend.matmul


class LoRAEmbeddingFunction(Function):
    """y = W[ids] + s · (Aᵀ[ids]) @ Bᵀ, ids (...) integers in [0, V).

    W (V, C), A (r, V), B (C, r). Flatten the ids to N; u = Aᵀ[ids] (N, r) is the low-rank
    code (a lookup, no matmul). With g (N, C):

        dW  = scatter-add of g into the rows ids        (V, C)   only if W trains
        dB  = s · gᵀ @ u                                 (C, r)
        dAᵀ = scatter-add of s · g @ B into rows ids     (V, r),  dA = (dAᵀ)ᵀ (r, V)

    A token that appears several times gets the sum of its rows' gradients, as in
    ``functional.EmbeddingFunction``. The ids get no gradient.
    """

    def __init__(self, scaling: float):
        self.s = float(scaling)

    def forward(self, ids, weight, lora_A, lora_B):
        if not backend.is_integer(ids):
            raise TypeError(f"lora_embedding: ids must be integers, got dtype {ids.dtype}")
        V, C = weight.shape
        r = lora_A.shape[0]
        if lora_A.shape != (r, V) or lora_B.shape != (C, r):
            raise ValueError(
                f"lora_embedding: lora_embedding_A has shape {tuple(lora_A.shape)} and "
                f"lora_embedding_B {tuple(lora_B.shape)}; for weight {tuple(weight.shape)} "
                f"expected ({r}, {V}) and ({C}, {r})"
            )
        flat = ids.reshape(-1)  # (N,)
        u = lora_A.T[flat]  # (N, r)
        y = weight[flat] + self.s * mm(u, lora_B.T, "lora_embedding.B")  # (N, C)
        _, need_w, need_A, need_B = self.needs_input_grad
        self.ids, self.V = flat, V
        self.u = u if need_B else None
        self.B = lora_B if need_A else None
        return y.reshape(*ids.shape, C)

    def backward(self, g):
        _, need_w, need_A, need_B = self.needs_input_grad
        xp = backend.get_array_module(g)
        g2 = g.reshape(len(self.ids), -1)  # (N, C)
        dw = dA = dB = None
        if need_w:
            dw = xp.zeros((self.V, g2.shape[1]), dtype=g.dtype)  # (V, C)
            xp.add.at(dw, self.ids, g2)
        if need_B:
            dB = self.s * mm(g2.T, self.u, "lora_embedding.dB")  # (C, r)
        if need_A:
            gu = self.s * mm(g2, self.B, "lora_embedding.dA")  # (N, r)
            dAT = xp.zeros((self.V, gu.shape[1]), dtype=g.dtype)  # (V, r)
            xp.add.at(dAT, self.ids, gu)
            dA = dAT.T  # (r, V)
        return None, dw, dA, dB


def lora_embedding(ids, weight, lora_A, lora_B, scaling: float) -> Tensor:
    """``weight[ids] + scaling * lora_A.T[ids] @ lora_B.T``."""
    return LoRAEmbeddingFunction(scaling)(F.as_tensor(ids), weight, lora_A, lora_B)


class LoRAEmbedding(Embedding, LoRALayer):
    """An ``Embedding`` with a LoRA bypass: keeps ``weight`` (V, C) and adds
    ``lora_embedding_A`` (r, V) and ``lora_embedding_B`` (C, r). Build it with
    :meth:`from_embedding` (``lora.apply_lora`` does, for a target that names an embedding)."""

    @classmethod
    def from_embedding(
        cls, embedding: Embedding, config: LoRAConfig, generator=None
    ) -> LoRAEmbedding:
        """Wrap ``embedding`` (the same weight object) with ``config``'s r, lora_alpha and
        use_rslora, checked by the caller. PEFT's init: A zero, B ~ N(0, 1)."""
        layer = cls.__new__(cls)
        vars(layer).update(vars(embedding))
        gen = generator or backend.default_generator()
        V, C = layer.weight.shape
        dtype, device = layer.weight.dtype, layer.weight.device
        r = config.r
        layer.r, layer.lora_alpha, layer.scaling = r, config.lora_alpha, config.scaling
        layer.use_rslora = config.use_rslora
        layer.lora_embedding_A = Parameter(backend.zeros((r, V), dtype, device))  # (r, V)
        layer.lora_embedding_B = Parameter(gen.normal((C, r), 1.0, dtype, device))  # (C, r)
        layer.merged = False
        layer.disable_adapters = False
        return layer

    def forward(self, ids) -> Tensor:
        if self.merged or self.disable_adapters:
            if self.merged and self.training and is_grad_enabled():
                if self.lora_embedding_A.requires_grad or self.lora_embedding_B.requires_grad:
                    raise RuntimeError(
                        "this LoRAEmbedding is merged, so a gradient would not reach its "
                        "adapter; call unmerge() before training, or eval() for inference"
                    )
            return F.embedding(ids, self.weight)
        return lora_embedding(
            ids, self.weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling
        )

    def get_delta_weight(self):
        """ΔW = s · (B A)ᵀ = s · Aᵀ Bᵀ, shape (V, C): what merging adds to the table."""
        A, B = self.lora_embedding_A.data, self.lora_embedding_B.data
        return self.scaling * mm(A.T, B.T, "lora_embedding.merge")

    def merged_weight(self, safe_merge: bool = True):
        """W + ΔW as a new array, refused (ValueError) if ``safe_merge`` and not finite."""
        merged = self.weight.data + self.get_delta_weight()
        return lora.check_merged(merged, safe_merge, "W + s·(B·A)ᵀ")

    def merge(self, safe_merge: bool = True) -> None:
        if self.merged:
            warnings.warn("LoRAEmbedding.merge(): already merged; nothing was done", stacklevel=2)
            return
        self._set_merged(self.merged_weight(safe_merge))

    def _set_merged(self, merged) -> None:
        self.weight.data[...] = merged
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("LoRAEmbedding.unmerge(): not merged; nothing was done", stacklevel=2)
            return
        self.weight.data -= self.get_delta_weight()
        self.merged = False

    def get_base_layer(self) -> Embedding:
        """A plain ``Embedding`` with the current weight (merge first to keep the adapter)."""
        emb = Embedding.__new__(Embedding)
        kept = ("num_embeddings", "embedding_dim", "weight", "training")
        vars(emb).update({k: v for k, v in vars(self).items() if k in kept})
        return emb

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}"


def embedding_problems(model: Module, paths, config: LoRAConfig) -> list[str]:
    """What stops LoRA on the embeddings among ``paths`` (registered in
    ``lora.TARGET_CHECKS``): DoRA and PiSSA are implemented for ``LoRALinear`` only (for
    the config's own rank and alpha there: :meth:`LoRAConfig.for_module`). A tied
    embedding is adapted, as PEFT adapts it; ``merge_lora`` refuses to merge it."""
    chosen = [p for p in paths if isinstance(model.get_submodule(p), Embedding)]
    problems = []
    if chosen and (config.use_dora or config.init_lora_weights == "pissa"):
        problems.append(
            f"{chosen} are embeddings, and minilora implements use_dora={config.use_dora!r} "
            f"and init_lora_weights={config.init_lora_weights!r} for Linear layers only; adapt "
            "the embeddings with plain LoRA (use_dora=False, init 'gaussian' or 'kaiming')"
        )
    return problems


lora.LORA_LAYERS[Embedding] = LoRAEmbedding.from_embedding
lora.TARGET_CHECKS.append(embedding_problems)
