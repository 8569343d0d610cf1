"""LoRA adapters (peft) on a frozen base network: a fake-score critic that shares the teacher's
weights (SwiftBrush), and the switch that turns the adapters off to call the plain teacher."""
from __future__ import annotations

import contextlib

from torch import nn


def add_lora(net: nn.Module, rank: int = 8, alpha: float = 32.0, targets: list[str] | None = None,
             dropout: float = 0.0) -> nn.Module:
    """Inject zero-initialised LoRA adapters (B = 0, so the critic equals the base at step 0) into
    the Linear layers named in ``targets`` (default: the embedded DiT's attention ``qkv``/``proj``)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or ["qkv", "proj"], lora_dropout=dropout,
                     init_lora_weights=True)
    return inject_adapter_in_model(cfg, net)


def lora_parameters(net: nn.Module) -> list:
    ps = [p for n, p in net.named_parameters() if "lora_" in n]
    if not ps:
        raise ValueError("the network has no LoRA parameters; call add_lora first")
    return ps


@contextlib.contextmanager
def adapters_disabled(net: nn.Module):
    """Call the base (teacher) network: every LoRA layer of ``net`` bypassed inside the block."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield net
    finally:
        for m in layers:
            m.enable_adapters(True)
