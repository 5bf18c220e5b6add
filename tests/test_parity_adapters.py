"""Adapter layers against their PyTorch port (examples/torch_gpt.py): with the same
weights, the same logits, loss and gradients, and the same parameters trainable.

Skipped, with the reason, when PyTorch is not installed. Tolerances: tests/test_parity_model.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import gpt_configs

import minilora as ml
from minilora.relatives.adapters import AdapterConfig, apply_adapters

torch = pytest.importorskip("torch", reason="parity tests need PyTorch: pip install -e '.[oracle]'")

from test_parity_model import DTYPES, TORCH_DTYPE, ignored_targets, randomize, run_both  # noqa: E402

from examples import torch_gpt  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("ops")]  # both op paths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adapter_type", ["houlsby", "lin"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_gpt_with_adapters_matches_the_pytorch_port(dtype, adapter_type, data):
    """Random model shapes, bottleneck, nonlinearity and layer-norm training; every weight
    random (the up-projections too, so the adapters change the output)."""
    config = data.draw(gpt_configs())
    adapters = AdapterConfig(
        adapter_type,
        data.draw(st.integers(1, 4)),
        data.draw(st.sampled_from(["gelu", "relu"])),
        train_layer_norms=data.draw(st.booleans()),
    )
    ml.manual_seed(0)
    model = ml.GPT(config, dtype=dtype)
    paths = apply_adapters(model, adapters)
    randomize(model, data.draw(st.integers(0, 2**16)))
    port = torch_gpt.TorchGPT(config).to(TORCH_DTYPE[dtype])
    port_paths = torch_gpt.apply_adapters(
        port, adapter_type, adapters.bottleneck, adapters.nonlinearity, adapters.train_layer_norms
    )
    assert port_paths == paths
    torch_gpt.load_minilora_state(port, model.state_dict())
    run_both(model, port, *data.draw(ignored_targets(config)), dtype)


def test_port_adapters_are_the_identity_at_insertion():
    config = ml.GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=1, n_embd=4)
    port = torch_gpt.TorchGPT(config).double()
    idx = torch.tensor([[1, 2, 3, 0]])
    before = port(idx)[0]
    torch_gpt.apply_adapters(port, "houlsby", 2)
    assert torch.equal(port(idx)[0], before)
