"""Helpers shared by the decoding tests."""

from __future__ import annotations

import torch


def greedy_tokens(runtime, embeds: torch.Tensor, n: int) -> list[int]:
    """The `n` greedy token ids a runtime decodes after prefilling `embeds` (its sequence released)."""
    seq = runtime.new_sequence()
    logits = runtime.prefill(seq, embeds, 0)
    tokens = []
    for _ in range(n):
        tokens.append(int(logits.argmax()))
        logits = runtime.step([seq], [tokens[-1]])[0]
    runtime.release(seq)
    return tokens
