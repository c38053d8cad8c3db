"""Faster CPU decoding: a half-precision copy of each Linear weight, used for one-token steps only.

Decoding one token multiplies a single row by every weight matrix, so its speed is set by how many
bytes of weights stream from memory: a float16 copy halves them and, on a 2-core CPU, nearly doubles
tokens per second. Prompts (many rows) stay on the float32 weights, because half-precision matrix
products are several times slower than float32 ones on CPUs without native half-precision units.
Activations stay float32 throughout: only the weights are read in half precision, and a product that
overflows float16 is redone in float32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DECODE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Inputs with at most this many rows (batch × new tokens) use the half-precision copy.
MAX_ROWS = 2
_enabled = True


class HalfDecodeLinear(nn.Linear):
    """An nn.Linear that also holds `weight_half` and uses it for inputs of at most MAX_ROWS rows."""

    weight_half: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _enabled or torch.is_grad_enabled() or x.numel() > MAX_ROWS * x.shape[-1]:
            return super().forward(x)
        out = F.linear(x.to(self.weight_half.dtype), self.weight_half).to(x.dtype)
        if not torch.isfinite(out).all():
            return super().forward(x)
        return out if self.bias is None else out + self.bias


def add_half_decode_weights(model: nn.Module, dtype: str) -> int:
    """Give every float32 nn.Linear of `model` a `dtype` (a DECODE_DTYPES key) copy for decode steps.

    Returns how many layers got one. `LLMConfig` checks `model.llm.decode_dtype` against the same keys.
    The float32 weights stay (prompts and training use them), so memory grows by half of the Linear
    weights. Only for the CPU: on a GPU, load the model in half precision instead.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            module.__class__ = HalfDecodeLinear
            module.register_buffer(
                "weight_half", module.weight.detach().to(DECODE_DTYPES[dtype]), persistent=False
            )
            count += 1
    log.info("LLM: %d Linear layers decode from %s copies of their weights", count, dtype)
    return count


def decode_weight_tensors(model: object) -> list[torch.Tensor]:
    """The weight tensors one decode step streams from memory: what bounds its tokens per second.

    An object with its own `decode_weight_tensors()` method (another LLM runtime, e.g. a quantised
    one that returns its raw uint8 weight buffers) answers for itself. For a torch module: the
    half-precision decode copy of each HalfDecodeLinear (its float32 weight inside `float32_decode`),
    else the weight of each nn.Linear (lm_head included), each tensor once (tied weights are one). Left out: the embedding table (a step reads
    one row of it), norms and biases (vectors, a tiny share of the bytes).
    """
    provider = getattr(model, "decode_weight_tensors", None)
    if callable(provider):
        return list(provider())
    if not isinstance(model, nn.Module):
        raise TypeError(f"cannot tell which weights a {type(model).__name__} reads per decode step")
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, HalfDecodeLinear) and _enabled:
            weight = module.weight_half
        elif isinstance(module, nn.Linear):
            weight = module.weight
        else:
            continue
        if weight.data_ptr() not in seen:
            seen.add(weight.data_ptr())
            tensors.append(weight.detach())
    return tensors


def has_half_decode_weights(model: nn.Module) -> bool:
    return any(isinstance(m, HalfDecodeLinear) for m in model.modules())


@contextlib.contextmanager
def float32_decode() -> Iterator[None]:
    """Within the block, every HalfDecodeLinear uses its float32 weights (for side-by-side timing)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
