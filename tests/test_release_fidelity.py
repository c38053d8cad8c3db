"""The release presets behave as the original MiniGPT-4 code does, checked on tiny models.

Each test here guards one difference a desk check against the original code found (precision,
which weights load, checkpoint layout, prompt token ids, load-time errors and memory). The real
release weights are never available to the tests: see the README for what only they can show.
"""

from __future__ import annotations

import os

import pytest
import torch

from minigpt4.build import build_model
from minigpt4.config import load_eval_config
from minigpt4.errors import ConfigError
from minigpt4.train import loop
from minigpt4.weights import WeightsError

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
    cfg = load_eval_config("minigpt4_tiny_random", ["model.lora={r: 4, alpha: 8, dropout: 0.5}"])
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
    cfg = load_eval_config(
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
