"""What the PEFT oracle tests share (imported only inside tests that found PyTorch and PEFT):
PEFT's ``LoraConfig`` for a minilora ``LoRAConfig``, and an adapter folder sent both ways."""

from __future__ import annotations

import numpy as np
from helpers import TINY_2x2, logits_of

import minilora as ml
from minilora.interop import peft_adapters


def peft_config(peft, config: ml.LoRAConfig):
    """PEFT's LoraConfig for a minilora LoRAConfig (PEFT spells the kaiming init True)."""
    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias=config.bias,
        use_rslora=config.use_rslora,
        init_lora_weights=True if config.init_lora_weights == "kaiming" else "gaussian",
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        lora_bias=config.lora_bias,
    )


def cross_both_ways(torch, peft, model, config, base, folder, idx, std: float):
    """minilora -> PEFT: ``model``'s adapter (``config``), saved, loads in PEFT on the port of
    ``base`` with ``model``'s logits. PEFT -> minilora: a PEFT adapter of the same config with
    N(0, std²) weights, saved, loads into ``base`` with PEFT's logits. float32, so 1e-4.
    Returns the ``LoRAConfig`` minilora read."""
    from examples.torch_gpt import TorchGPT, load_minilora_state

    peft_adapters.save_adapter(model, folder / "ours", config)
    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base.state_dict())
    loaded = peft.PeftModel.from_pretrained(port, folder / "ours").eval()
    with torch.no_grad():
        want = loaded(torch.tensor(idx))[0].numpy()
    np.testing.assert_allclose(logits_of(model, idx), want, rtol=1e-4, atol=1e-4)

    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base.state_dict())
    theirs = peft.get_peft_model(port, peft_config(peft, config))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    theirs.save_pretrained(folder / "theirs")
    with torch.no_grad():
        want = theirs.eval()(torch.tensor(idx))[0].numpy()
    read = peft_adapters.load_adapter(base, folder / "theirs")
    np.testing.assert_allclose(logits_of(base, idx), want, rtol=1e-4, atol=1e-4)
    return read
