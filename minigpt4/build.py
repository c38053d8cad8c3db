"""Build a `MiniGPT4` from a `ModelConfig`: vision side, LLM (+LoRA), projection, trained weights."""

from __future__ import annotations

import logging
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from minigpt4.config import LLMConfig, ModelConfig, resolve_path
from minigpt4.decode.half_weights import add_half_decode_weights
from minigpt4.decode.kv_budget import KVBudget, default_kv_positions, kv_bytes_per_position
from minigpt4.decode.runtime import DecodeRuntime, TorchRuntime
from minigpt4.errors import ConfigError, MessageError
from minigpt4.gguf_checkpoint import converted_dir
from minigpt4.model import DeferredLLM, MiniGPT4
from minigpt4.packages import resolve_package_path
from minigpt4.vision import build_vision
from minigpt4.weights import load_trainable, read_trainable

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str | None = None) -> torch.device:
    """The device asked for, or CUDA when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def llm_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.llm.dtype: unknown dtype {name!r} (known: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def _source(value: str) -> str:
    """A hub id stays as it is; a local path is resolved against the cwd, then the project root."""
    path = resolve_path(value)
    return str(path) if path.exists() else value


def _pretrained(cfg: LLMConfig, name: str) -> tuple[str, dict]:
    """from_pretrained's source and kwargs for `name`: a `package:` folder resolved, a local GGUF file
    converted once into the user's cache (fast later starts), a GGUF file on the hub read as it is."""
    source = _source(resolve_package_path(name, "model.llm.pretrained"))
    if not cfg.gguf_file:
        return source, {}
    if (Path(source) / cfg.gguf_file).is_file():
        return str(converted_dir(source, cfg.gguf_file)), {}
    return source, {"gguf_file": cfg.gguf_file}


# The original MiniGPT-4 ran transformers 4.28 / 4.30, whose LLaMA tokenizer split text at special
# tokens and gave every piece sentencepiece's "▁" prefix: "<s>[INST]" → "<s>", "▁[", … Newer
# transformers default to legacy=False ("<s>", "["), so its templates ask for the old behaviour.
LEGACY_TOKENIZER_TEMPLATES = ("vicuna0", "llama2")


def load_tokenizer(cfg: LLMConfig, template: str | None = None):
    """The LLM's tokenizer; for the original's templates, LLaMA tokenizers tokenize as it did."""
    name = cfg.tokenizer or cfg.pretrained
    if name is None:
        raise ConfigError("model.llm.tokenizer is required when the LLM is randomly initialised")
    source, kwargs = _pretrained(cfg, name) if not cfg.tokenizer else (_source(name), {})
    if template in LEGACY_TOKENIZER_TEMPLATES:
        kwargs["legacy"] = True  # read by LLaMA (sentencepiece) tokenizers only
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_low_resource(cfg: LLMConfig, device: torch.device) -> None:
    """`low_resource` (8-bit weights) needs CUDA and bitsandbytes: say so before anything loads."""
    if not cfg.low_resource:
        return
    if device.type != "cuda":
        raise ConfigError(
            "model.llm.low_resource: 8-bit loading needs a CUDA GPU (bitsandbytes); "
            "set low_resource: false to run on the CPU"
        )
    if find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.llm.low_resource: 8-bit loading needs the bitsandbytes package: "
            "pip install bitsandbytes (or set low_resource: false for fp16)"
        )


def load_llm(cfg: LLMConfig, tokenizer, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The frozen causal LM: random (from `random_init`), or `from_pretrained` (hub id, dir, GGUF)."""
    dtype = llm_dtype(cfg.dtype, device)
    if cfg.random_init is not None:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **cfg.random_init,
        )
        llm = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    else:
        source, kwargs = _pretrained(cfg, cfg.pretrained)
        kwargs["dtype"] = dtype
        if cfg.low_resource:
            check_low_resource(cfg, device)
            from transformers import BitsAndBytesConfig  # noqa: PLC0415

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if device.type == "cuda":
            # Straight onto the GPU: a 13B model never passes through host memory in full.
            kwargs["device_map"] = {"": device.index or 0}
        llm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if device.type != "cuda":
            llm = llm.to(device)
    llm.requires_grad_(False)
    return llm.eval()


def build_runtime(cfg: ModelConfig, model: MiniGPT4) -> DecodeRuntime:
    """Where a preset's answers are decoded: `model.llm.runtime` (llama_cpp only on the CPU).

    The GGUF is the preset's `gguf_file`, or its Hugging Face checkpoint converted once (cached).
    With LoRA, llama.cpp decodes the float16 GGUF with the adapters merged in (made once, cached),
    quantised afterwards when `runtime_weights` asks for q8_0, q4_0 or q4_k_m.
    """
    llm = cfg.llm
    if decodes_elsewhere(cfg, model.device):
        from minigpt4.decode.llama_cpp import LlamaCppRuntime, converted_gguf  # noqa: PLC0415 (optional)
        from minigpt4.decode.lora_gguf import merged_gguf  # noqa: PLC0415

        weights = llm.runtime_weights
        if llm.gguf_file:
            folder = Path(_source(resolve_package_path(llm.pretrained, "model.llm.pretrained")))
            source = path = folder / llm.gguf_file

            def convert(to: str) -> Path:
                return converted_gguf(source, to)
        else:  # a Hugging Face checkpoint, converted once (convert-llm) into the cache
            from minigpt4.decode.convert_llm import converted_llm  # noqa: PLC0415

            checkpoint = checkpoint_dir(llm.pretrained)
            weights = weights or "f16"

            def convert(to: str) -> Path:
                return converted_llm(checkpoint, to)

        if cfg.lora is not None:
            path = merged_gguf(convert("f16"), _lora_weights(cfg, model))
            if weights not in (None, "f16"):
                path = converted_gguf(path, weights)
        elif weights is not None:
            path = convert(weights)
        return LlamaCppRuntime(path, cfg.max_context_tokens, llm.max_sequences)
    if llm.runtime == "llama_cpp":
        log.info(
            "model.llm.runtime: llama_cpp is for the CPU; on %s decoding with transformers", model.device
        )
    return TorchRuntime(model.llm, llm.max_sequences, kv_budget(cfg, model))


# The files of a Hugging Face LLM checkpoint that the converter reads (weights in one format only).
_CHECKPOINT_FILES = ("*.json", "tokenizer.model", "*.txt")


def checkpoint_dir(pretrained: str) -> Path:
    """The local folder of an LLM checkpoint: a path as it is, a hub id downloaded (once, into the
    hub's cache: config, tokenizer, and the safetensors weights, else the `.bin` shards)."""
    source = _source(resolve_package_path(pretrained, "model.llm.pretrained"))
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import list_repo_files, snapshot_download  # noqa: PLC0415

    files = list_repo_files(source)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    log.info("LLM: downloading %s (%s) for llama.cpp", source, weights)
    return Path(snapshot_download(source, allow_patterns=[*_CHECKPOINT_FILES, weights]))


def _lora_weights(cfg: ModelConfig, model: MiniGPT4) -> list:
    """The trained LoRA adapters: from the LLM when it is loaded, else from the checkpoint file."""
    from minigpt4.decode.lora_gguf import checkpoint_lora_weights, lora_weights  # noqa: PLC0415

    if model.llm_loaded:
        return lora_weights(model.llm)
    if cfg.projection.checkpoint is None:
        return []  # untrained adapters add nothing
    return checkpoint_lora_weights(read_trainable(cfg.projection.checkpoint), cfg.lora.alpha / cfg.lora.r)


def build_beam_runtime(cfg: ModelConfig, model: MiniGPT4) -> TorchRuntime:
    """The transformers runtime beam search runs on when the preset decodes elsewhere (llama.cpp).

    Beam search needs the transformers copy of the LLM, which such a preset has not loaded: when that
    copy would not fit in the memory the machine has free (a 7B LLM is 27 GB in float32), the request
    is refused with a message (MessageError) instead of the process being killed for memory.
    """
    if not model.llm_loaded:
        needed, free = transformers_llm_bytes(cfg.llm, model.llm_dtype), available_memory()
        if free is not None and needed > free:
            raise MessageError(
                f"beam search would load a second, transformers copy of the LLM ({needed / 1e9:.1f} GB); "
                f"{free / 1e9:.1f} GB of memory is free: use num_beams 1 (this preset decodes with llama.cpp)"
            )
    return TorchRuntime(model.llm, cfg.llm.max_sequences, kv_budget(cfg, model))


def transformers_llm_bytes(cfg: LLMConfig, dtype: torch.dtype) -> int:
    """The bytes of the LLM's weights as transformers would load them in `dtype` (counted on the meta
    device, from its config alone)."""
    source, kwargs = _pretrained(cfg, cfg.pretrained)
    config = AutoConfig.from_pretrained(source, **kwargs)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in llm.parameters()) * torch.empty((), dtype=dtype).element_size()


def available_memory() -> int | None:
    """The memory the machine can give without swapping (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    value = fields.get("MemAvailable", "").split()
    return int(value[0]) * 1024 if value else None


def kv_budget(cfg: ModelConfig, model: MiniGPT4) -> KVBudget:
    """The cap on cached key/value positions: `model.llm.kv_cache_positions`, or one sized to the
    device (room for `max_sequences` whole contexts, fewer where the free GPU memory holds fewer)."""
    llm = model.llm
    per_position = kv_bytes_per_position(llm.config, llm.get_input_embeddings().weight.dtype)
    positions = cfg.llm.kv_cache_positions
    if positions is None:
        free = torch.cuda.mem_get_info(model.device)[0] if model.device.type == "cuda" else None
        positions = default_kv_positions(cfg.max_context_tokens, cfg.llm.max_sequences, per_position, free)
    elif positions < cfg.max_context_tokens:
        raise ConfigError(
            f"model.llm.kv_cache_positions ({positions:,}) must hold at least one whole context "
            f"(model.max_context_tokens: {cfg.max_context_tokens:,})"
        )
    log.info("KV budget: %d positions (%.2f GB)", positions, positions * per_position / 1e9)
    return KVBudget(positions)


def decodes_elsewhere(cfg: ModelConfig, device: torch.device) -> bool:
    """Whether answers are decoded from the LLM's own GGUF (llama.cpp), not by the transformers copy."""
    return cfg.llm.runtime == "llama_cpp" and device.type == "cpu"


def _llm_with_lora(cfg: ModelConfig, tokenizer, device: torch.device) -> torch.nn.Module:
    """The frozen LLM, its decode weights and its LoRA adapters (untrained: the checkpoint fills them)."""
    llm = load_llm(cfg.llm, tokenizer, device, seed=cfg.seed)
    if cfg.llm.decode_dtype is not None and cfg.llm.runtime != "llama_cpp":
        if device.type == "cpu":
            add_half_decode_weights(llm, cfg.llm.decode_dtype)
        else:
            log.info("model.llm.decode_dtype is for the CPU; on %s the LLM keeps its dtype", device)
    if cfg.lora is None:
        return llm
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5.24 a deprecated question; nothing a user can act on.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(llm, lora)


def _deferred_llm(cfg: ModelConfig, tokenizer, device: torch.device) -> DeferredLLM:
    """The LLM as far as the model needs it without its weights: its width, dtype and end ids."""
    source, kwargs = _pretrained(cfg.llm, cfg.llm.pretrained)
    config = AutoConfig.from_pretrained(source, **kwargs)
    try:
        eos = GenerationConfig.from_pretrained(source, **kwargs).eos_token_id
    except OSError:  # no generation_config.json: the model config's own
        eos = config.eos_token_id
    eos_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    checkpoint = cfg.projection.checkpoint
    return DeferredLLM(
        hidden=config.hidden_size,
        dtype=llm_dtype(cfg.llm.dtype, device),
        eos_token_ids=eos_ids,
        load=lambda: _llm_with_lora(cfg, tokenizer, device),
        checkpoint=None if checkpoint is None else str(checkpoint),
    )


def build_model(
    cfg: ModelConfig, device: str | torch.device | None = None, defer_llm: bool = False
) -> MiniGPT4:
    """Everything a model config names, loaded and frozen; only the projection (+LoRA) trains.

    With `defer_llm`, a preset that decodes with llama.cpp gets its transformers LLM only when
    something asks for `model.llm` (beam search, the bench): the chat needs only its GGUF.
    """
    device = pick_device(str(device) if device is not None else None)
    check_low_resource(cfg.llm, device)
    tokenizer = load_tokenizer(cfg.llm, cfg.template)
    torch.manual_seed(cfg.seed)
    vision = build_vision(cfg.vision, device)
    if defer_llm and decodes_elsewhere(cfg, device):
        llm = _deferred_llm(cfg, tokenizer, device)
    else:
        llm = _llm_with_lora(cfg, tokenizer, device)
    torch.manual_seed(cfg.seed)
    model = MiniGPT4(vision, llm, tokenizer)
    model.llama_proj.to(device)
    if cfg.projection.checkpoint is not None:
        load_trainable(model, cfg.projection.checkpoint)
    return model.eval()
