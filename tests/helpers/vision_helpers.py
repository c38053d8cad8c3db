"""Tiny BLIP-2 vision configs shared by the weight and fidelity tests: two layers of 32 dims each."""

from __future__ import annotations

TINY_VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=224,
    patch_size=14,
)
TINY_QFORMER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    cross_attention_frequency=2,
)
