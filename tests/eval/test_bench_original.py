"""`bench original`: one variant measured at a small size (the real 7B files are not made in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vision_helpers import TINY_QFORMER, TINY_VIT

from minigpt4.eval import bench_original

pytest.importorskip("llama_cpp")

SMALL_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_VISION = [
    "model.vision.pretrained=null",
    f"model.vision.random_init={json.dumps({'vision': TINY_VIT, 'qformer': TINY_QFORMER})}",
    "model.max_context_tokens=256",
]


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    from minigpt4.decode.convert_llm import random_llama_gguf

    return random_llama_gguf(SMALL_SHAPE, tmp_path_factory.mktemp("gguf") / "small-q4_0.gguf", "q4_0")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_variant_measures_the_presets_prompt_and_reports_every_figure(small_gguf, dtype):
    result = bench_original.measure_variant("minigpt4_vicuna0_7b_cpu", TINY_VISION, small_gguf, dtype, 1, 4)
    before, after = bench_original.PROMPT_TOKENS
    assert result["image_positions"] == 32 and result["prompt_positions"] == 1 + before + 32 + after
    assert result["vision_dtype"] == dtype and result["gguf"] == small_gguf.name
    for key in ("encode_s", "ttft_s", "decode_tok_s", "limit_tok_s", "peak_rss_gb", "gguf_gb"):
        assert result[key] > 0, key
    assert result["bandwidth_fraction"] == pytest.approx(result["decode_tok_s"] / result["limit_tok_s"])


def test_the_random_vision_is_built_in_the_presets_precision_at_the_configs_shape():
    from minigpt4.config import load_preset

    cfg = load_preset("minigpt4_vicuna0_7b_cpu", ["model.projection.checkpoint=null", *TINY_VISION]).model
    vision = bench_original.random_vision(cfg.vision, "bfloat16")
    assert vision.vit_stored_dtype == torch.bfloat16 and vision.vit_half_dtype is None
    assert vision.visual_encoder.config.hidden_size == TINY_VIT["hidden_size"]
    assert all(not p.is_meta for p in vision.parameters())
    assert bench_original.llm_shape(cfg) == "7b"
    assert (
        bench_original.llm_shape(
            load_preset("minigpt4_vicuna0_13b_cpu", ["model.projection.checkpoint=null"]).model
        )
        == "13b"
    )


def test_wrong_choices_and_presets_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        bench_original.main(["--weights", "q3_k"])
    assert "choose from q4_0, q4_k_m, q8_0, f16" in capsys.readouterr().err
    assert bench_original.main(["--cfg-path", "minigpt4_lite"]) == 2
    assert "bench original measures the CPU presets" in capsys.readouterr().err
