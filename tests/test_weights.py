"""Weights: HF BLIP-2 layout, the original LAVIS .pth layout and our checkpoints load to the same model."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re

import pytest
import torch
from decode_helpers import prompt_ids
from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaForCausalLM
from vision_helpers import TINY_QFORMER, TINY_VIT

from minigpt4.build import build_model
from minigpt4.config import VisionConfig, load_preset
from minigpt4.errors import ConfigError
from minigpt4.vision import build_vision
from minigpt4.weights import WeightsError, copy_trainable, load_trainable, save_trainable

OPT = dict(
    model_type="opt",
    hidden_size=16,
    ffn_dim=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=64,
    word_embed_proj_dim=16,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory):
    """A tiny BLIP-2 saved by transformers itself (sharded), so the layout is the real one."""
    torch.manual_seed(1)
    config = Blip2Config(
        vision_config=TINY_VIT, qformer_config=TINY_QFORMER, text_config=OPT, num_query_tokens=4
    )
    model = Blip2ForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(directory, max_shard_size="100KB")
    return model, directory


@pytest.fixture
def pixels():
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


def _reference_features(model, pixels):
    """BLIP-2's Q-Former output computed by transformers, with LAVIS's ln_vision eps."""
    model.vision_model.post_layernorm.eps = 1e-5
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.query_tokens.expand(image.shape[0], -1, -1)
        return model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state


def test_hf_layout_reads_only_vision_shards_and_matches_transformers(hf_blip2, pixels):
    model, directory = hf_blip2
    assert len(list(directory.glob("model-*.safetensors"))) > 1, "the fixture should be sharded"
    ours = build_vision(VisionConfig(pretrained=str(directory), num_query_tokens=4), torch.device("cpu"))
    torch.testing.assert_close(ours(pixels), _reference_features(model, pixels))


def _to_lavis(model) -> dict[str, torch.Tensor]:
    """Write a HF BLIP-2 back in the original LAVIS names (what blip2_pretrained_*.pth holds)."""
    return _lavis_names(model.vision_model.state_dict(), model.qformer.state_dict(), model.query_tokens)


def _lavis_names(vit: dict, qformer: dict, query_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in vit.items():
        if key.startswith("post_layernorm."):
            out["ln_vision." + key.removeprefix("post_layernorm.")] = value
            continue
        key = (
            key.replace("embeddings.class_embedding", "cls_token")
            .replace("embeddings.position_embedding", "pos_embed")
            .replace("embeddings.patch_embedding.", "patch_embed.proj.")
            .replace("encoder.layers.", "blocks.")
            .replace("layer_norm1", "norm1")
            .replace("layer_norm2", "norm2")
            .replace("self_attn.projection", "attn.proj")
            .replace("self_attn.qkv", "attn.qkv")
        )
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out["visual_encoder." + key.replace("qkv.bias", "q_bias")] = q
            out["visual_encoder." + key.replace("qkv.bias", "v_bias")] = v
        else:
            out["visual_encoder." + key] = value
    for key, value in qformer.items():
        key = key.replace("layernorm.", "embeddings.LayerNorm.").replace(
            ".attention.attention.", ".attention.self."
        )
        key = key.replace(".crossattention.attention.", ".crossattention.self.")
        out["Qformer.bert." + key] = value
    out["query_tokens"] = query_tokens.detach().clone()
    # Parts of the LAVIS checkpoint MiniGPT-4 does not use.
    out["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(30523, 8)
    out["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 32)
    out["Qformer.cls.predictions.bias"] = torch.zeros(30523)
    out["t5_proj.weight"] = torch.zeros(16, 32)
    return out


def test_lavis_layout_matches_transformers(hf_blip2, pixels, tmp_path):
    model, directory = hf_blip2
    path = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": _to_lavis(model)}, path)
    ours = build_vision(
        VisionConfig(
            lavis_checkpoint=str(path),
            num_query_tokens=4,
            random_init={"vision": TINY_VIT, "qformer": TINY_QFORMER},
        ),
        torch.device("cpu"),
    )
    torch.testing.assert_close(ours(pixels), _reference_features(model, pixels))


def test_separate_eva_vit_file_with_extra_block_loads(hf_blip2, pixels, tmp_path):
    model, _ = hf_blip2
    lavis = _to_lavis(model)
    vit = {k.removeprefix("visual_encoder."): v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    vit.update(
        {"blocks.2.norm1.weight": torch.ones(32), "norm.weight": torch.ones(32)}
    )  # the dropped 40th block
    qformer_only = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    torch.save({"model": qformer_only}, tmp_path / "blip2.pth")
    ours = build_vision(
        VisionConfig(
            lavis_checkpoint=str(tmp_path / "blip2.pth"),
            eva_vit_checkpoint=str(tmp_path / "eva_vit_g.pth"),
            num_query_tokens=4,
            random_init={"vision": TINY_VIT, "qformer": TINY_QFORMER},
        ),
        torch.device("cpu"),
    )
    torch.testing.assert_close(ours(pixels), _reference_features(model, pixels))


def test_missing_tensor_and_wrong_shape_are_named(hf_blip2, tmp_path):
    model, _ = hf_blip2
    lavis = _to_lavis(model)
    cfg = dict(num_query_tokens=4, random_init={"vision": TINY_VIT, "qformer": TINY_QFORMER})
    broken = dict(lavis)
    del broken["ln_vision.weight"]
    torch.save({"model": broken}, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="ln_vision.weight"):
        build_vision(VisionConfig(lavis_checkpoint=str(tmp_path / "missing.pth"), **cfg), torch.device("cpu"))
    broken = dict(lavis, query_tokens=torch.zeros(1, 5, 32))
    torch.save({"model": broken}, tmp_path / "shape.pth")
    with pytest.raises(
        WeightsError, match=r"query_tokens has shape \(1, 5, 32\) in the checkpoint but \(1, 4, 32\)"
    ):
        build_vision(VisionConfig(lavis_checkpoint=str(tmp_path / "shape.pth"), **cfg), torch.device("cpu"))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": {"llama_proj.weight": Evil()}}))
    model = build_model(load_preset("minigpt4_tiny_random").model, "cpu")
    with pytest.raises(WeightsError, match="evil.pth: cannot read this checkpoint"):  # named, not run
        load_trainable(model, path)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(load_preset("minigpt4_tiny_random").model, "cpu")


def test_released_projection_layout_loads(tiny_model, tmp_path):
    weight = torch.randn_like(tiny_model.llama_proj.weight)
    bias = torch.randn_like(tiny_model.llama_proj.bias)
    torch.save(
        {"model": {"llama_proj.weight": weight, "llama_proj.bias": bias}},
        tmp_path / "pretrained_minigpt4.pth",
    )
    load_trainable(tiny_model, tmp_path / "pretrained_minigpt4.pth")
    torch.testing.assert_close(tiny_model.llama_proj.weight.data, weight)
    torch.testing.assert_close(tiny_model.llama_proj.bias.data, bias)


def test_projection_of_the_wrong_size_names_key_and_shapes(tiny_model, tmp_path):
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(4096, 768), "llama_proj.bias": torch.zeros(4096)}},
        tmp_path / "7b.pth",
    )
    with pytest.raises(
        WeightsError, match=r"llama_proj.weight has shape \(4096, 768\) in the checkpoint but \(64, 32\)"
    ):
        load_trainable(tiny_model, tmp_path / "7b.pth")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_projection_holding_nan_or_inf_is_refused_at_load(tiny_model, tmp_path, bad, suffix):
    from safetensors.torch import save_file

    before = tiny_model.llama_proj.weight.detach().clone()
    weight = torch.randn_like(tiny_model.llama_proj.weight)
    weight[3, 5] = bad
    tensors = {"llama_proj.weight": weight, "llama_proj.bias": torch.zeros_like(tiny_model.llama_proj.bias)}
    path = tmp_path / f"proj{suffix}"
    if suffix == ".pth":
        torch.save({"model": tensors}, path)
    else:
        save_file(tensors, str(path))
    with pytest.raises(WeightsError, match=rf"proj{suffix}: llama_proj.weight holds NaN or inf"):
        load_trainable(tiny_model, path)
    assert torch.equal(tiny_model.llama_proj.weight, before)  # nothing was copied in


def test_save_trainable_writes_only_the_projection_and_round_trips(tiny_model, tmp_path):
    path = save_trainable(tiny_model, tmp_path / "proj.safetensors", {"step": 3})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert sorted(fh.keys()) == ["llama_proj.bias", "llama_proj.weight"]
        assert json.loads(fh.metadata()["minigpt4"]) == {"step": 3}
    other = build_model(load_preset("minigpt4_tiny_random", ["model.seed=5"]).model, "cpu")
    assert not torch.equal(other.llama_proj.weight, tiny_model.llama_proj.weight)
    load_trainable(other, path)
    torch.testing.assert_close(other.llama_proj.weight, tiny_model.llama_proj.weight)


def test_a_float16_copy_halves_the_file_and_loads_into_a_float32_model(tiny_model, tmp_path):
    path = save_trainable(tiny_model, tmp_path / "proj.safetensors", {"step": 3})
    half = copy_trainable(path, tmp_path / "half.safetensors", torch.float16)
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(half)).values()} == {torch.float16}
    with safe_open(str(half), framework="pt") as fh:
        assert json.loads(fh.metadata()["minigpt4"]) == {"step": 3, "dtype": "float16"}
    assert half.stat().st_size < 0.6 * path.stat().st_size
    other = build_model(load_preset("minigpt4_tiny_random", ["model.seed=5"]).model, "cpu")
    load_trainable(other, half)
    assert other.llama_proj.weight.dtype == torch.float32
    expected = tiny_model.llama_proj.weight.half().float()
    torch.testing.assert_close(other.llama_proj.weight, expected, rtol=0, atol=0)


def test_a_float16_copy_refuses_values_beyond_its_range(tmp_path):
    from safetensors.torch import save_file

    big = {"llama_proj.weight": torch.full((2, 2), 1e6), "llama_proj.bias": torch.zeros(2)}
    save_file(big, str(tmp_path / "big.safetensors"))
    with pytest.raises(WeightsError, match=r"llama_proj.weight does not fit torch.float16"):
        copy_trainable(tmp_path / "big.safetensors", tmp_path / "half.safetensors", torch.float16)
    assert not (tmp_path / "half.safetensors").exists()


def test_hf_llm_directory_loads_the_same_weights(tiny_model, tmp_path):
    tiny_model.llm.save_pretrained(tmp_path / "llm")
    tiny_model.tokenizer.save_pretrained(tmp_path / "llm")
    cfg = load_preset(
        "minigpt4_tiny_random",
        [
            f"model.llm.pretrained={tmp_path / 'llm'}",
            "model.llm.random_init=null",
            "model.llm.tokenizer=null",
        ],
    )
    loaded = build_model(cfg.model, "cpu")
    assert isinstance(loaded.llm, LlamaForCausalLM)
    ids = torch.tensor([[1, 5, 9, 200]])
    torch.testing.assert_close(loaded.llm(input_ids=ids).logits, tiny_model.llm(input_ids=ids).logits)


def test_lavis_and_released_projection_files_rebuild_the_tiny_model(tiny_model, tmp_path):
    """The whole model from original-layout files gives the directly built model's outputs."""
    vision = tiny_model.vision
    vit = dict(vision.visual_encoder.state_dict())
    vit.update({"post_layernorm." + k: v for k, v in vision.ln_vision.state_dict().items()})
    torch.save(
        {"model": _lavis_names(vit, vision.qformer.state_dict(), vision.query_tokens)}, tmp_path / "blip2.pth"
    )
    proj = {"llama_proj." + k: v for k, v in tiny_model.llama_proj.state_dict().items()}
    torch.save({"model": proj}, tmp_path / "pretrained_minigpt4.pth")
    cfg = load_preset(
        "minigpt4_tiny_random",
        [
            f"model.vision.lavis_checkpoint={tmp_path / 'blip2.pth'}",
            f"model.projection.checkpoint={tmp_path / 'pretrained_minigpt4.pth'}",
            "model.seed=7",
        ],  # another seed: every vision/projection weight must come from the files
    )
    rebuilt = build_model(cfg.model, "cpu")
    rebuilt.llm.load_state_dict(tiny_model.llm.state_dict())
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.tensor([prompt_ids(tiny_model, "<ImageHere> a photo of", 1)])
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(input_ids=ids, pixel_values=pixels).logits,
            tiny_model(input_ids=ids, pixel_values=pixels).logits,
        )


# --- the LLaMA-2 variant: ln_vision is the identity LayerNorm ---------------------------------------


@pytest.fixture(scope="module")
def trained_ln_blip2(hf_blip2, tmp_path_factory):
    """The tiny BLIP-2 with a post_layernorm that is not the identity (as a trained one is), saved."""
    import copy

    model = copy.deepcopy(hf_blip2[0])
    torch.manual_seed(3)
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
        model.vision_model.post_layernorm.bias.normal_()
    directory = tmp_path_factory.mktemp("blip2_trained_ln")
    model.save_pretrained(directory, max_shard_size="100KB")
    return model, directory


def _identity_ln_patches(model, pixels):
    """The original LLaMA-2 variant's features: ViT → a fresh LayerNorm(eps 1e-5) → 4-patch groups."""
    with torch.no_grad():
        patches = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    patches = torch.nn.functional.layer_norm(patches, (patches.shape[-1],), eps=1e-5)[:, 1:]
    return patches.reshape(patches.shape[0], -1, 4 * patches.shape[-1])


@pytest.mark.parametrize("source", ["hf", "lavis", "eva_vit"])
def test_llama2_variant_keeps_the_identity_ln_vision_from_every_source(
    trained_ln_blip2, pixels, tmp_path, source
):
    model, directory = trained_ln_blip2
    lavis = _to_lavis(model)
    if source == "hf":
        cfg = VisionConfig(kind="blip2_patches", pretrained=str(directory))
    elif source == "lavis":
        torch.save({"model": lavis}, tmp_path / "blip2.pth")
        cfg = VisionConfig(
            kind="blip2_patches",
            lavis_checkpoint=str(tmp_path / "blip2.pth"),
            random_init={"vision": TINY_VIT},
        )
    else:  # eva_vit_g.pth holds the ViT only: no ln_vision at all
        vit = {
            k.removeprefix("visual_encoder."): v for k, v in lavis.items() if k.startswith("visual_encoder.")
        }
        torch.save(vit, tmp_path / "eva_vit_g.pth")
        cfg = VisionConfig(
            kind="blip2_patches",
            eva_vit_checkpoint=str(tmp_path / "eva_vit_g.pth"),
            random_init={"vision": TINY_VIT},
        )
    ours = build_vision(cfg, torch.device("cpu"))
    assert torch.equal(ours.ln_vision.weight, torch.ones(32)) and torch.equal(
        ours.ln_vision.bias, torch.zeros(32)
    )
    assert ours.ln_vision.eps == 1e-5
    torch.testing.assert_close(ours(pixels), _identity_ln_patches(model, pixels))


def test_llama2_presets_documented_eva_vit_fallback_loads(trained_ln_blip2, pixels, tmp_path):
    model, _ = trained_ln_blip2
    vit = {
        k.removeprefix("visual_encoder."): v
        for k, v in _to_lavis(model).items()
        if k.startswith("visual_encoder.")
    }
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    cfg = load_preset(
        "minigpt4_llama2_7b",
        [
            "model.vision.pretrained=null",
            f"model.vision.eva_vit_checkpoint={tmp_path / 'eva_vit_g.pth'}",
            "model.projection.checkpoint=null",  # the released projection is not here
        ],
    )
    assert cfg.model.vision.pretrained is None
    # The preset's ViT is EVA ViT-g (1B weights): build its vision side at the tiny test size.
    tiny = dataclasses.replace(cfg.model.vision, random_init={"vision": TINY_VIT})
    torch.testing.assert_close(
        build_vision(tiny, torch.device("cpu"))(pixels), _identity_ln_patches(model, pixels)
    )
    with pytest.raises(
        ConfigError, match="model.vision needs one of pretrained, lavis_checkpoint, eva_vit_checkpoint"
    ):
        load_preset(
            "minigpt4_llama2_7b", ["model.vision.pretrained=null", "model.projection.checkpoint=null"]
        )


def test_a_checkpoint_saved_as_the_original_does_loads_and_its_buffers_are_named(
    tiny_model, tmp_path, caplog
):
    """The original's saving code drops frozen parameters only: the buffers of its modules remain."""
    weight = torch.randn_like(tiny_model.llama_proj.weight)
    buffers = {
        "Qformer.bert.embeddings.position_ids": torch.arange(512).unsqueeze(0),
        "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8),
        "llama_model.model.layers.1.self_attn.rotary_emb.inv_freq": torch.rand(8),
    }
    state = {"llama_proj.weight": weight, "llama_proj.bias": torch.zeros(64), **buffers}
    torch.save({"model": state, "epoch": 3, "config": {"run": {"amp": True}}}, tmp_path / "checkpoint_3.pth")
    with caplog.at_level("INFO", logger="minigpt4.weights"):
        load_trainable(tiny_model, tmp_path / "checkpoint_3.pth")
    torch.testing.assert_close(tiny_model.llama_proj.weight.data, weight)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(key in logged for key in buffers)
    for extra in ("Qformer.bert.encoder.layer.0.attention.self.query.weight", "llama_proj.inv_freq"):
        torch.save({"model": {**state, extra: torch.zeros(8)}}, tmp_path / "extra.pth")
        with pytest.raises(WeightsError, match=f"keys the model does not have: {re.escape(extra)}"):
            load_trainable(tiny_model, tmp_path / "extra.pth")


def test_pth_files_load_memory_mapped_and_in_the_legacy_torch_format(tiny_model, tmp_path):
    weight = torch.randn_like(tiny_model.llama_proj.weight)
    state = {"model": {"llama_proj.weight": weight, "llama_proj.bias": torch.zeros(64)}}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # torch < 1.6 files
    for name in ("zip.pth", "legacy.pth"):
        load_trainable(tiny_model, tmp_path / name)
        torch.testing.assert_close(tiny_model.llama_proj.weight.data, weight)
