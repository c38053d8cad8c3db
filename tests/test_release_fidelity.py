"""The release presets behave as the original MiniGPT-4 code does, checked on tiny models.

Each test here guards one difference a desk check against the original code found (precision,
which weights load, checkpoint layout, prompt token ids, load-time errors and memory). The real
release weights are never available to the tests: docs/original.md says what only they can show.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from decode_helpers import prompt_ids
from safetensors.torch import save_file
from vision_helpers import TINY_QFORMER, TINY_VIT

from minigpt4.build import build_model
from minigpt4.config import VisionConfig, load_preset
from minigpt4.errors import ConfigError
from minigpt4.train import loop
from minigpt4.vision import build_vision
from minigpt4.weights import WeightsError

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["train_helpers"]  # fixtures: tiny_data, tiny_config, tiny_model, one_thread


# --- training -------------------------------------------------------------------------------------


def test_deterministic_run_sets_the_cublas_workspace_before_it_turns_determinism_on(
    tiny_config, tmp_path, monkeypatch, one_thread
):
    seen = []
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(
        torch,
        "use_deterministic_algorithms",
        lambda on: seen.append((on, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))),
    )
    loop.train(tiny_config(2, tmp_path, "run.deterministic=true"), stop_after=1, cpu=True)
    assert seen == [(True, ":4096:8")]


def test_a_cublas_workspace_already_set_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on: None)
    loop.use_deterministic_algorithms()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one state per process; a run in another precision needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_puts_an_auto_dtype_llm_in_bfloat16(
    tiny_config, tmp_path, monkeypatch, one_thread, fresh_accelerator_state
):
    built = []

    def recording_build(cfg, device=None):
        built.append(build_model(cfg, device))
        return built[-1]

    monkeypatch.setattr(loop, "build_model", recording_build)
    cfg = tiny_config(2, tmp_path, "model.llm.dtype=auto", "run.mixed_precision=bf16")
    loop.train(cfg, stop_after=1, cpu=True)
    assert built[0].llm.get_input_embeddings().weight.dtype == torch.bfloat16
    fp32 = tiny_config(2, tmp_path / "fp32", "model.llm.dtype=float32", "run.mixed_precision=bf16")
    assert loop.model_config_for(fp32.run, fp32.model).llm.dtype == "float32"  # an explicit dtype is kept


def test_lora_dropout_runs_in_training_while_the_frozen_llm_stays_in_eval_mode():
    cfg = load_preset("minigpt4_tiny_random", ["model.lora={r: 4, alpha: 8, dropout: 0.5}"])
    model = build_model(cfg.model, "cpu")
    model.train()
    modes = {name: m.training for name, m in model.llm.named_modules()}
    dropouts = [name for name in modes if name.endswith("lora_dropout.default")]
    assert dropouts and all(modes[name] for name in dropouts)
    assert not any(mode for name, mode in modes.items() if "lora_dropout" not in name)
    x = torch.randn(1, 16, model.llm_hidden)
    layer = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # LoRA starts at zero: give it an output
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(first, layer(x)), "dropout changes the adapter's input in training"
    model.eval()
    assert torch.equal(layer(x), layer(x))


# --- load-time errors ------------------------------------------------------------------------------


def test_low_resource_without_bitsandbytes_stops_before_any_weights_load(monkeypatch):
    from minigpt4 import build

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(build, "find_spec", lambda name: None)
    monkeypatch.setattr(build, "build_vision", no_weights)
    monkeypatch.setattr(build, "load_llm", no_weights)
    cfg = load_preset(
        "minigpt4_tiny_random",
        ["model.llm.low_resource=true", "model.llm.pretrained=org/model", "model.llm.random_init=null"],
    )
    with pytest.raises(ConfigError, match="needs the bitsandbytes package"):
        build_model(cfg.model, "cuda")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_model(cfg.model, "cpu")


@pytest.mark.parametrize("read", ["blip2", "projection"])
def test_offline_without_the_file_in_the_cache_says_so(monkeypatch, read):
    from huggingface_hub import constants

    from minigpt4.weights import read_hf_blip2_tensors, read_trainable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never the network, whatever the environment
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache") as info:
        if read == "blip2":
            read_hf_blip2_tensors("minigpt4-tests/not-in-any-cache")
        else:
            read_trainable("hf://minigpt4-tests/not-in-any-cache/pretrained_minigpt4.pth")
    assert "safetensors weights are required" not in str(info.value)


# --- the ViT's precision and how it loads -------------------------------------------------------------


def _tiny_blip2_vision():
    torch.manual_seed(0)
    cfg = VisionConfig(num_query_tokens=4, random_init={"vision": TINY_VIT, "qformer": TINY_QFORMER})
    return build_vision(cfg, torch.device("cpu"))


def test_vit_halves_only_conv_and_linear_weights_and_matches_the_originals_autocast_recipe():
    reference = _tiny_blip2_vision()
    ours = copy.deepcopy(reference)
    ours.halve_vit(torch.bfloat16)  # float16 on CUDA; on the CPU autocast computes in bfloat16
    owners = dict(ours.visual_encoder.named_modules())
    for name, param in ours.visual_encoder.named_parameters():
        halved = isinstance(owners[name.rpartition(".")[0]], (torch.nn.Conv2d, torch.nn.Linear))
        assert param.dtype == (torch.bfloat16 if halved else torch.float32), name
    assert {p.dtype for p in [*ours.ln_vision.parameters(), *ours.qformer.parameters()]} == {torch.float32}

    residual = []
    ours.visual_encoder.encoder.layers[0].register_forward_hook(lambda m, i, o: residual.append(o.dtype))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = ours(pixels)
        # The original's encode_img: fp32 weights, one autocast block around ViT, ln_vision, Q-Former.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            patches = reference.ln_vision(reference.visual_encoder(pixel_values=pixels).last_hidden_state)
            queries = reference.query_tokens.expand(2, -1, -1)
            expected = reference.qformer(
                query_embeds=queries, encoder_hidden_states=patches
            ).last_hidden_state
        everything_halved = copy.deepcopy(reference)
        everything_halved.visual_encoder.to(torch.bfloat16)
        drifted = everything_halved(pixels)
    assert residual == [torch.float32], "the residual stream stays fp32"
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    assert (drifted - expected).abs().max() > 100 * (got - expected).abs().max() + 1e-4


def test_the_vit_is_halved_before_it_moves_to_the_gpu(monkeypatch):
    from minigpt4.vision import Blip2Vision

    moved = []
    to = torch.nn.Module.to

    def record_moves(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(self, Blip2Vision) and isinstance(target, torch.device) and target.type == "cuda":
            moved.append(self.visual_encoder.embeddings.patch_embedding.weight.dtype)
            return self  # no GPU here: the move is only recorded
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", record_moves)
    cfg = VisionConfig(num_query_tokens=4, random_init={"vision": TINY_VIT, "qformer": TINY_QFORMER})
    vision = build_vision(cfg, torch.device("cuda"))
    assert moved == [torch.float16]
    assert vision.ln_vision.weight.dtype == torch.float32


def _save_as_hf_blip2(vision, directory):
    """A `Blip2Vision`'s weights in the HF BLIP-2 layout (names and config.json), as the hub has them."""
    directory.mkdir()
    names = {"visual_encoder.": "vision_model.", "ln_vision.": "vision_model.post_layernorm."}
    tensors = {}
    for key, value in vision.state_dict().items():
        prefix = next((p for p in names if key.startswith(p)), "")
        tensors[names.get(prefix, "") + key.removeprefix(prefix)] = value.contiguous()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps({"vision_config": TINY_VIT, "qformer_config": TINY_QFORMER})
    )
    return directory


def test_vision_weights_are_assigned_into_a_module_made_on_the_meta_device(tmp_path, monkeypatch):
    """No randomly initialised fp32 copy is made beside the checkpoint's tensors."""
    from minigpt4 import vision as vision_module

    reference = _tiny_blip2_vision()
    directory = _save_as_hf_blip2(reference, tmp_path / "blip2")
    made_on = []
    original_init = vision_module.Blip2Vision.__init__

    def record(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made_on.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(vision_module.Blip2Vision, "__init__", record)
    loaded = build_vision(VisionConfig(pretrained=str(directory), num_query_tokens=4), torch.device("cpu"))
    assert made_on == [{"meta"}]
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    expected = reference.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from minigpt4.config import VisionConfig
from minigpt4.vision import build_vision

def rss(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

base = rss("VmRSS:")
build_vision(VisionConfig(kind="blip2_patches", pretrained=sys.argv[2]), torch.device("cpu"))
print(rss("VmHWM:") - base)
"""


def test_loading_the_vision_never_holds_two_copies_of_its_weights(tmp_path):
    """Peak memory of a load, measured in a fresh process: at most one copy of the weights."""
    import subprocess
    import sys

    from transformers import Blip2VisionConfig, Blip2VisionModel

    vit = dict(TINY_VIT, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8)
    model = Blip2VisionModel(Blip2VisionConfig(**vit))
    directory = tmp_path / "blip2"
    directory.mkdir()
    save_file(
        {"vision_model." + k: v.contiguous() for k, v in model.state_dict().items()},
        str(directory / "model.safetensors"),
    )
    (directory / "config.json").write_text(json.dumps({"vision_config": vit}))
    size = (directory / "model.safetensors").stat().st_size  # about 100 MB
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(ROOT), str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = int(out.stdout.split()[-1])
    assert peak < 1.3 * size, f"loading {size / 2**20:.0f} MB of weights peaked at {peak / 2**20:.0f} MB"


# --- prompt token ids -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory):
    """A tiny LLaMA tokenizer: sentencepiece BPE trained here with LLaMA's settings, saved as the hub's
    LLaMA repositories hold it (tokenizer.model + a config that says legacy: false, as newer ones do)."""
    import io

    import sentencepiece as spm

    lines = [
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
        "provide it to you. Please answer my questions.",
        "###Human: <Img></Img> Describe this image in detail. ###Assistant: A red square on a table.",
        "[INST] <Img></Img> What is in the picture? [/INST] The colour is red, the shape a square.",
    ] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("llama_tokenizer")
    (directory / "tokenizer.model").write_bytes(proto.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory, spm.SentencePieceProcessor(model_proto=proto.getvalue())


def _original_ids(sp, prompt: str, n_image_tokens: int) -> list[int]:
    """The ids the original's LLaMA tokenizer (transformers 4.28 / 4.30) gave a prompt: each text
    segment split at the special tokens' text and each piece encoded by sentencepiece; BOS first."""
    from minigpt4.model import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID

    special = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    ids = [sp.bos_id()]
    for i, segment in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            ids += [IMAGE_TOKEN_ID] * n_image_tokens
        for piece in re.split("(<s>|</s>|<unk>)", segment):
            ids += [special[piece]] if piece in special else sp.encode(piece) if piece else []
    return ids


@pytest.mark.parametrize("template", ["vicuna0", "llama2"])
def test_prompt_token_ids_match_the_originals_llama_tokenizer(llama_tokenizer_dir, template):
    from minigpt4.conversation import Conversation, get_template

    directory, sp = llama_tokenizer_dir
    cfg = load_preset(
        "minigpt4_tiny_random", [f"model.llm.tokenizer={directory}", f"model.template={template}"]
    )
    model = build_model(cfg.model, "cpu")
    conversation = Conversation(get_template(template))
    conversation.add_image()
    conversation.add_user("What is in the picture?")
    conversation.add_assistant("A red square.")
    conversation.add_user("And its colour?")
    prompt = conversation.render(model.tokenizer)
    assert prompt.count("<s>") == (2 if template == "llama2" else 0)
    assert prompt_ids(model, prompt, 1) == _original_ids(sp, prompt, model.n_image_tokens)


# --- the memory table of docs/original.md ---------------------------------------------------------

CUDA_CONTEXT_GB = 0.5


def test_the_memory_table_adds_up():
    """Weights (LLM fp16 or 8-bit, fp16 ViT, fp32 Q-Former), CUDA context, and KV at 2,000 tokens."""
    from transformers import (
        Blip2QFormerConfig,
        Blip2QFormerModel,
        Blip2VisionConfig,
        Blip2VisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from minigpt4.decode.kv_budget import kv_bytes_per_position
    from minigpt4.vision import EVA_VIT_G, QFORMER_BASE

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        vit_gb = count(Blip2VisionModel(Blip2VisionConfig(**EVA_VIT_G))) * 2 / 1e9
        qformer = Blip2QFormerModel(Blip2QFormerConfig(encoder_hidden_size=1408, **QFORMER_BASE))
        qformer_gb = (count(qformer) + 32 * 768) * 4 / 1e9
        sizes = {
            "7b": LlamaConfig(),
            "13b": LlamaConfig(
                hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
            ),
        }
        llms = {}
        for name, config in sizes.items():
            llm = LlamaForCausalLM(config)
            total = count(llm)
            int8 = sum(m.weight.numel() for m in llm.model.layers.modules() if isinstance(m, torch.nn.Linear))
            kv = kv_bytes_per_position(config, torch.float16) * 2000 / 1e9
            llms[name] = (
                total * 2 / 1e9,
                (int8 + 2 * (total - int8)) / 1e9,
                kv,
            )  # 8-bit: embeddings stay fp16
    projection_llama2 = 5632 * 4096 * 4 / 1e9
    vision = {
        "vicuna0_7b": vit_gb + qformer_gb,
        "vicuna0_13b": vit_gb + qformer_gb,
        "llama2_7b": vit_gb + projection_llama2,
    }
    rows = {
        line.split("|")[1]: [float(re.search(r"([\d.]+) GB", cell).group(1)) for cell in line.split("|")[2:6]]
        for line in (ROOT / "docs" / "original.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `minigpt4_") and line.count("GB") >= 4
    }
    checked = set()
    for label, figures in rows.items():
        preset = re.search(r"minigpt4_(vicuna0_7b|vicuna0_13b|llama2_7b)", label).group(1)
        fp16, int8, kv = llms["13b" if "13b" in preset else "7b"]
        base = vision[preset] + CUDA_CONTEXT_GB
        expected = [fp16 + base, fp16 + base + kv, int8 + base, int8 + base + kv]
        assert figures == pytest.approx(expected, abs=0.3), label
        checked.add(preset)
    assert checked == set(vision)


def test_vision_dtype_bfloat16_stores_the_vit_in_half_on_the_cpu_and_computes_in_float32():
    torch.manual_seed(0)
    random_init = {"vision": TINY_VIT, "qformer": TINY_QFORMER}
    stored = build_vision(
        VisionConfig(num_query_tokens=4, random_init=random_init, dtype="bfloat16"), torch.device("cpu")
    )
    assert stored.vit_stored_dtype == torch.bfloat16 and stored.vit_half_dtype is None  # no autocast
    assert stored.visual_encoder.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert {p.dtype for p in stored.qformer.parameters()} == {torch.float32}
    assert stored.ln_vision.weight.dtype == torch.float32
    # The same numbers as a float32 ViT holding the bfloat16-rounded weights: only storage is halved.
    reference = copy.deepcopy(stored)
    for module in reference.visual_encoder.modules():
        if isinstance(module, torch.nn.Linear):
            module.__class__ = torch.nn.Linear
            module.float()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(stored(pixels), reference(pixels))
    assert set(stored.state_dict()) == set(reference.state_dict())  # checkpoints load the same keys
    for name in ("auto", "float32"):
        plain = build_vision(
            VisionConfig(num_query_tokens=4, random_init=random_init, dtype=name), torch.device("cpu")
        )
        assert plain.vit_half_dtype is None and plain.vit_stored_dtype is None
    with pytest.raises(ConfigError, match="float16 is for CUDA"):
        build_vision(
            VisionConfig(num_query_tokens=4, random_init=random_init, dtype="float16"), torch.device("cpu")
        )
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        build_vision(
            VisionConfig(num_query_tokens=4, random_init=random_init, dtype="fp8"), torch.device("cpu")
        )


@pytest.mark.parametrize(
    ("cpu", "gpu"),
    [
        ("minigpt4_vicuna0_7b_cpu", "minigpt4_vicuna0_7b"),
        ("minigpt4_vicuna0_13b_cpu", "minigpt4_vicuna0_13b"),
        ("minigpt4_llama2_7b_cpu", "minigpt4_llama2_7b"),
        ("minigpt4_space_cpu", "minigpt4_space"),
    ],
)
def test_cpu_presets_load_the_gpu_presets_weights_through_llama_cpp(cpu, gpu):
    no_projection = ["model.projection.checkpoint=null"]  # the released file is not here
    ours, theirs = load_preset(cpu, no_projection), load_preset(gpu, no_projection)
    with open(ROOT / "eval_configs" / f"{cpu}.yaml", encoding="utf-8") as f:
        assert f"base: {gpu}.yaml" in f.read()  # the same weights, by construction
    assert (ours.model.llm.runtime, ours.model.llm.gguf_file) == ("llama_cpp", None)  # converted from HF
    assert ours.model.llm.runtime_weights == "q4_0" and ours.model.vision.dtype == "bfloat16"
    assert ours.model.llm.pretrained == theirs.model.llm.pretrained
    assert ours.model.vision.pretrained == theirs.model.vision.pretrained
    assert ours.model.template == theirs.model.template and ours.generation == theirs.generation
    assert (
        theirs.model.llm.runtime == "transformers" and theirs.model.vision.dtype == "auto"
    )  # GPU presets as before
