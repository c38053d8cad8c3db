"""`model.llm.decode_dtype`: one-token steps read half-precision weight copies; prompts stay float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minigpt4.build import build_model
from minigpt4.config import load_preset
from minigpt4.decode.half_weights import (
    DECODE_DTYPES,
    HalfDecodeLinear,
    add_half_decode_weights,
    float32_decode,
    has_half_decode_weights,
)
from minigpt4.errors import ConfigError


def _models(tiny_cfg_path):
    plain = build_model(load_preset(tiny_cfg_path).model, "cpu")
    half = build_model(load_preset(tiny_cfg_path, ["model.llm.decode_dtype=float16"]).model, "cpu")
    return plain, half


def test_decode_steps_use_half_weights_and_prompts_stay_exact(tiny_cfg_path):
    plain, half = _models(tiny_cfg_path)
    linears = [m for m in half.llm.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is HalfDecodeLinear for m in linears)
    assert all(m.weight_half.dtype == torch.float16 for m in linears)
    assert not any(isinstance(m, HalfDecodeLinear) for m in plain.llm.modules())

    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        prompt_plain = plain.llm(input_ids=ids).logits
        prompt_half = half.llm(input_ids=ids).logits
        step_plain = plain.llm(input_ids=ids[:, :1]).logits
        step_half = half.llm(input_ids=ids[:, :1]).logits
    assert torch.equal(prompt_plain, prompt_half)  # 12 rows: the float32 weights
    assert step_half.dtype == torch.float32
    assert not torch.equal(step_plain, step_half)  # one row: the float16 copies...
    torch.testing.assert_close(step_half, step_plain, atol=2e-2, rtol=2e-2)  # ...which are close
    with torch.no_grad(), float32_decode():
        assert torch.equal(half.llm(input_ids=ids[:, :1]).logits, step_plain)
    assert has_half_decode_weights(half.llm) and not has_half_decode_weights(plain.llm)


def test_greedy_answers_match_float32(tiny_cfg_path):
    plain, half = _models(tiny_cfg_path)
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad():
        a = plain.llm.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        b = half.llm.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(a, b)


def test_training_uses_the_float32_weights():
    layer = nn.Linear(4, 3)
    add_half_decode_weights(layer, "float16")
    x = torch.randn(1, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_an_overflowing_product_is_redone_in_float32():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1e3)
    add_half_decode_weights(layer, "float16")
    x = torch.tensor([[100.0, 100.0]])  # 2e5: past float16's 65504
    with torch.no_grad():
        assert layer(x).item() == pytest.approx(2e5)


def test_unknown_decode_dtype_is_a_config_error(tiny_cfg_path):
    with pytest.raises(ConfigError, match="decode_dtype"):
        load_preset(tiny_cfg_path, ["model.llm.decode_dtype=int4"])
    for name in DECODE_DTYPES:  # the config accepts every dtype the copies can take
        assert load_preset(tiny_cfg_path, [f"model.llm.decode_dtype={name}"]).model.llm.decode_dtype == name
