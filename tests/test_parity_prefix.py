"""Prefix tuning against the PyTorch port (examples/torch_gpt.py, ``TorchPrefixGPT``): the
same base weights and prefix give the same logits, loss and gradients, on all four kinds
(prefix-layer, prefix-embedding, each plain or reparameterised by the MLP), with the same
parameters trainable and the frozen base getting no gradient on either side. Tolerances
are tests/test_parity_model.py's for a whole GPT. Skipped without PyTorch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import gpt_configs, token_batches

import minilora as ml
from minilora.relatives.prefix import PrefixConfig, apply_prefix_tuning

torch = pytest.importorskip("torch", reason="parity tests need PyTorch: pip install -e '.[oracle]'")

from test_parity_model import DTYPES, TORCH_DTYPE, randomize, run_both  # noqa: E402

from examples.torch_gpt import TorchPrefixGPT, load_minilora_state  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("ops")]  # both op paths

KINDS = [("layer", False), ("layer", True), ("embedding", False), ("embedding", True)]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k[0]}{'-mlp' if k[1] else ''}")
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=8)  # 16 cases of 8 models: a few seconds
@given(data=st.data())
def test_prefix_gpt_matches_the_pytorch_port(kind, dtype, data):
    config = data.draw(gpt_configs())
    P = data.draw(st.integers(1, min(3, config.block_size - 1)))
    prefix = PrefixConfig(kind[0], P, kind[1], data.draw(st.integers(1, 5)))
    ml.manual_seed(0)
    model = ml.GPT(config, dtype=dtype)
    apply_prefix_tuning(model, prefix)
    randomize(model, data.draw(st.integers(0, 2**16)))  # the prefix too: std 0.3
    port = TorchPrefixGPT(config, prefix).to(TORCH_DTYPE[dtype])
    load_minilora_state(port, model.state_dict())
    port.requires_grad_(False)
    port.prefix.requires_grad_(True)
    idx, targets = data.draw(token_batches(config))
    T = min(idx.shape[1], model.context_length)
    run_both(model, port, idx[:, :T], targets[:, :T], dtype)
