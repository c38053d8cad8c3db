"""Reading and writing weights: HF BLIP-2 safetensors, the original LAVIS `.pth` files, our checkpoints.

Every loader goes through `assign_tensors`, which names a key whose shape differs (with both
shapes), and reports keys that were missing or left unused. `torch.load` always runs with
`weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from minigpt4.config import VisionConfig, resolve_path
from minigpt4.files import write_atomic

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
HF_BLIP2_PREFIXES = ("vision_model.", "qformer.", "query_tokens")
VISION_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "layer_norm_eps",
    "qkv_bias",
)
QFORMER_CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "cross_attention_frequency",
    "layer_norm_eps",
)


class WeightsError(ValueError):
    """A checkpoint does not fit the model: wrong shapes, missing or unexpected keys."""


def assign_tensors(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, require_all: bool = False
) -> tuple[list[str], list[str]]:
    """Copy `tensors` into `module`'s parameters by name; return (missing, unexpected) keys.

    A shape mismatch raises `WeightsError` naming the key and both shapes. With `require_all`,
    a parameter the checkpoint does not hold raises too.
    """
    own = module.state_dict()
    unexpected = sorted(k for k in tensors if k not in own)
    used = {}
    for key, value in tensors.items():
        if key not in own:
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise WeightsError(
                f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[key].shape)} in the model"
            )
        used[key] = value.to(own[key].dtype) if value.is_floating_point() else value
    # A module made on the meta device takes the tensors themselves as its weights.
    module.load_state_dict(used, strict=False, assign=any(t.is_meta for t in own.values()))
    missing = sorted(k for k in own if k not in tensors)
    if missing and require_all:
        raise WeightsError(f"{source}: {len(missing)} weights missing from the checkpoint: {_short(missing)}")
    if unexpected:
        log.info("%s: %d tensors not used by the model: %s", source, len(unexpected), _short(unexpected))
    return missing, unexpected


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


# --- BLIP-2 in Hugging Face layout -------------------------------------------------------------


def _hf_file(source: str, filename: str, required: bool = True) -> Path | None:
    """A file of a local HF directory or of a hub repo (downloaded on demand); None if absent.

    Offline, a file the cache lacks cannot be said to be absent: for a `required` file that is
    an error saying so, not a missing file.
    """
    local = resolve_path(source)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download  # noqa: PLC0415
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return Path(hf_hub_download(source, filename))
    except LocalEntryNotFoundError as exc:  # before its base class, EntryNotFoundError
        if not required:
            return None
        raise WeightsError(offline_message(source, filename)) from exc
    except EntryNotFoundError:
        return None


def offline_message(repo: str, filename: str) -> str:
    return (
        f"{repo}: {filename} is not in the local Hugging Face cache and the hub cannot be reached "
        "(offline: HF_HUB_OFFLINE is set or there is no network); download it once with network "
        "access, or name a local copy in the config"
    )


def read_blip2_config(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ViT and Q-Former architecture of a BLIP-2 model (its config.json)."""
    path = _hf_file(source, "config.json")
    if path is None:
        raise WeightsError(f"{source}: no config.json")
    config = json.loads(path.read_text())
    vision = {k: v for k, v in config.get("vision_config", {}).items() if k in VISION_CONFIG_KEYS}
    qformer = {k: v for k, v in config.get("qformer_config", {}).items() if k in QFORMER_CONFIG_KEYS}
    return vision, qformer


def read_hf_blip2_tensors(source: str) -> dict[str, torch.Tensor]:
    """Only the vision, Q-Former and query-token tensors of a BLIP-2 checkpoint.

    With a sharded checkpoint only the shards that hold them are read (or downloaded): the LLM
    half of a BLIP-2 model (~20 GB for Flan-T5-XXL) is never touched.
    """
    index_path = _hf_file(source, "model.safetensors.index.json", required=False)
    if index_path is not None:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(HF_BLIP2_PREFIXES)})
    else:
        shards = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = _hf_file(source, shard)
        if path is None:
            raise WeightsError(f"{source}: {shard} not found (safetensors weights are required)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.startswith(HF_BLIP2_PREFIXES):
                        tensors[key] = fh.get_tensor(key)
        except Exception as exc:
            raise _unreadable(path, exc) from exc
    return tensors


def hf_blip2_to_ours(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Blip2 names → names inside `Blip2Vision` (its post_layernorm is our ln_vision)."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key.removeprefix("vision_model.post_layernorm.")] = value
        elif key.startswith("vision_model."):
            out["visual_encoder." + key.removeprefix("vision_model.")] = value
        else:
            out[key] = value
    return out


# --- BLIP-2 in the original LAVIS layout (the key map: docs/method.md §2) ----------------------

_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]
_QFORMER_UNUSED = re.compile(
    r"^(embeddings\.(word_embeddings|position_embeddings|position_ids)|encoder\.layer\.\d+\.(intermediate|output)\.)"
)


def lavis_vit_to_hf(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVA ViT keys (LAVIS `visual_encoder.*` without the prefix) → HF `Blip2VisionModel` keys.

    LAVIS keeps separate q and v biases and no k bias; HF has one fused qkv bias, so it is
    `cat(q_bias, zeros, v_bias)`. Unmapped keys are kept under their own name (reported as unused).
    """
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        bias = re.match(r"^blocks\.(\d+)\.attn\.([qv])_bias$", key)
        if bias:
            biases.setdefault(bias.group(1), {})[bias.group(2)] = value
            continue
        for pattern, repl in _VIT_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out["unused." + key] = value
    for block, qv in biases.items():
        if set(qv) != {"q", "v"}:
            raise WeightsError(f"blocks.{block}.attn has a q or v bias without the other")
        out[f"encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            [qv["q"], torch.zeros_like(qv["q"]), qv["v"]]
        )
    return out


def lavis_qformer_to_hf(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `Qformer.bert.*` keys (prefix removed) → HF `Blip2QFormerModel` keys; text-only parts dropped."""
    out = {}
    for key, value in tensors.items():
        if _QFORMER_UNUSED.match(key):
            continue
        key = key.replace("embeddings.LayerNorm.", "layernorm.").replace(".self.", ".attention.")
        out[key] = value
    return out


def lavis_blip2_to_ours(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LAVIS BLIP-2 state dict (`blip2_pretrained_flant5xxl.pth`) → names inside `Blip2Vision`."""
    vit = {
        k.removeprefix("visual_encoder."): v for k, v in tensors.items() if k.startswith("visual_encoder.")
    }
    qformer = {
        k.removeprefix("Qformer.bert."): v for k, v in tensors.items() if k.startswith("Qformer.bert.")
    }
    out = {"visual_encoder." + k: v for k, v in lavis_vit_to_hf(vit).items()}
    out.update({"qformer." + k: v for k, v in lavis_qformer_to_hf(qformer).items()})
    for key, value in tensors.items():
        if key.startswith(("ln_vision.", "query_tokens")):
            out[key] = value
        elif not key.startswith(("visual_encoder.", "Qformer.bert.")):
            out["unused." + key] = value
    return out


def _unreadable(path: str | Path, exc: Exception) -> WeightsError:
    """Whatever a reader raised for a damaged file (EOFError, IndexError, a safetensors header
    error …), as one error on one line that names the file."""
    # torch's unpickling message advises weights_only=False: wrong for a file that is not weights.
    lines = [] if isinstance(exc, pickle.UnpicklingError) else str(exc).splitlines()
    detail = next((line for line in lines if line.strip()), "")
    reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return WeightsError(
        f"{path}: cannot read this checkpoint (damaged, truncated or not a weights file; {reason})"
    )


def torch_load(path: str | Path) -> dict[str, torch.Tensor]:
    """`torch.load` with `weights_only=True`; unwraps the `{"model": …}` layout of LAVIS/MiniGPT-4 files."""
    try:
        # Memory-mapped: a tensor is read from the file when used, not all of them up front.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # mmap needs the zip format of torch ≥ 1.6: read older files whole
            raise _unreadable(path, exc) from exc
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc2:  # damaged in another way too
            raise _unreadable(path, exc2) from exc2
    except Exception as exc:  # a damaged file can fail in any of the unpickler's ways
        raise _unreadable(path, exc) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def has_blip2_weights(cfg: VisionConfig) -> bool:
    """Whether a vision config names weights to load (else it is randomly initialised)."""
    return any(p is not None for p in (cfg.pretrained, cfg.eva_vit_checkpoint, cfg.lavis_checkpoint))


def load_blip2_weights(module: nn.Module, cfg: VisionConfig) -> None:
    """Fill a `Blip2Vision` from whatever the config names (HF, LAVIS, EVA .pth); random otherwise.

    The module may live on the meta device: the tensors, cast to its dtypes as they are taken,
    become its weights. For `blip2_patches` (the LLaMA-2 variant) `ln_vision` is the identity
    LayerNorm whatever the files hold: the original never loads BLIP-2 for that variant, so its
    `ln_vision` is a fresh, frozen LayerNorm (weight 1, bias 0) and its projection was trained on
    features normalised by it.
    """
    tensors: dict[str, torch.Tensor] = {}
    sources = []
    if cfg.pretrained is not None:
        tensors.update(hf_blip2_to_ours(read_hf_blip2_tensors(cfg.pretrained)))
        sources.append(cfg.pretrained)
    if cfg.eva_vit_checkpoint is not None:
        vit = lavis_vit_to_hf(torch_load(resolve_path(cfg.eva_vit_checkpoint)))
        tensors.update({"visual_encoder." + k: v for k, v in vit.items()})
        sources.append(cfg.eva_vit_checkpoint)
    if cfg.lavis_checkpoint is not None:
        tensors.update(lavis_blip2_to_ours(torch_load(resolve_path(cfg.lavis_checkpoint))))
        sources.append(cfg.lavis_checkpoint)
    if not sources:
        return  # random initialisation (tiny presets)
    if cfg.kind == "blip2_patches":
        unused = ("qformer.", "query_tokens", "ln_vision.")
        ignored = sorted(k for k in tensors if k.startswith("ln_vision."))
        if ignored:
            log.info("blip2_patches: %s left out: ln_vision is the identity LayerNorm", ", ".join(ignored))
        tensors = {k: v for k, v in tensors.items() if not k.startswith(unused)}
        width = module.ln_vision.normalized_shape[0]
        tensors["ln_vision.weight"], tensors["ln_vision.bias"] = torch.ones(width), torch.zeros(width)
    own = module.state_dict()
    for key, value in tensors.items():  # one tensor at a time, while this dict is its only holder
        if key in own and value.is_floating_point():
            tensors[key] = value.to(own[key].dtype)
    assign_tensors(module, tensors, " + ".join(sources), require_all=True)
    log.info("vision weights loaded from %s", " + ".join(sources))


# --- trainable weights (the projection, LoRA) -----------------------------------------------------


def save_trainable(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write only the trainable weights to safetensors, atomically (temp file, then rename)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    return write_trainable(tensors, path, metadata or {})


def write_trainable(tensors: dict[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Safetensors with our metadata (`checkpoint_metadata` reads it back), written atomically."""
    path = Path(path)
    meta = {"minigpt4": json.dumps(dict(metadata))}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def copy_trainable(src: str | Path, dst: str | Path, dtype: torch.dtype) -> Path:
    """Copy a trainable-weights file to safetensors with its floating-point tensors cast to `dtype`.

    How a trained result becomes a shipped file at half the size (float16): models load it into their
    own dtype, so only the stored precision changes. Metadata is kept, with the dtype added. A value
    that does not fit `dtype` (inf after the cast) is refused.
    """
    if not dtype.is_floating_point:
        raise WeightsError(f"copy_trainable: {dtype} is not a floating-point dtype")
    tensors = {}
    for key, value in read_trainable(src).items():
        cast = value.to(dtype).contiguous() if value.is_floating_point() else value
        if cast.is_floating_point() and not torch.isfinite(cast).all():
            raise WeightsError(f"{src}: {key} does not fit {dtype} (values beyond its range)")
        tensors[key] = cast
    return write_trainable(
        tensors, dst, {**checkpoint_metadata(src), "dtype": str(dtype).removeprefix("torch.")}
    )


def hub_file(spec: str) -> Path:
    """`hf://org/repo/path/in/repo` → the file, downloaded once into the HF cache."""
    from huggingface_hub import hf_hub_download  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    parts = spec.removeprefix(HF_PREFIX).split("/")
    if len(parts) < 3:
        raise WeightsError(f"{spec}: expected hf://org/repo/file")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError as exc:
        raise WeightsError(offline_message(repo, filename)) from exc


def read_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a trainable-weights file: our .safetensors or the original release's .pth.

    `path` may be local or `hf://org/repo/file` (a file in a hub repository).
    """
    path = hub_file(path) if str(path).startswith(HF_PREFIX) else resolve_path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise _unreadable(path, exc) from exc
    else:
        tensors = torch_load(path)
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsError(f"{path}: {key} holds NaN or inf values (a diverged or damaged checkpoint)")
    return tensors


# The original saves a checkpoint as its state dict less the frozen *parameters*: the buffers of its
# frozen modules stay (BERT's position_ids, the rotary inv_freq of the LLaMA of its transformers).
ORIGINAL_FROZEN_MODULES = ("visual_encoder.", "ln_vision.", "Qformer.", "llama_model.")
ORIGINAL_BUFFER_NAMES = ("position_ids", "inv_freq")


def _is_buffer(key: str, own_buffers: set[str]) -> bool:
    """A buffer of our model, or one the original's frozen modules hold."""
    if key in own_buffers:
        return True
    return key.startswith(ORIGINAL_FROZEN_MODULES) and key.rpartition(".")[2] in ORIGINAL_BUFFER_NAMES


def load_trainable(model: nn.Module, path: str | Path) -> None:
    """Load projection (and LoRA) weights into `model`, checking names and shapes.

    Accepts the released MiniGPT-4 files (`{"model": {"llama_proj.weight", "llama_proj.bias"}}`,
    buffers of the original's frozen modules ignored and logged by name) and the safetensors written
    by `save_trainable`. Any other unexpected key, and weights holding NaN or inf, are refused.
    """
    tensors = read_trainable(path)
    if not getattr(model, "llm_loaded", True):  # a deferred LLM gets its weights when it is loaded
        deferred = sorted(k for k in tensors if k.startswith("llm."))
        if deferred:
            log.info("%s: %d LLM weights wait for the LLM to be loaded", path, len(deferred))
        tensors = {k: v for k, v in tensors.items() if not k.startswith("llm.")}
    expected = set(model.trainable_state_dict())
    own_buffers = {name for name, _ in model.named_buffers()}
    buffers = sorted(k for k in set(tensors) - expected if _is_buffer(k, own_buffers))
    if buffers:
        log.info("%s: %d buffers ignored (not trained weights): %s", path, len(buffers), ", ".join(buffers))
        tensors = {k: v for k, v in tensors.items() if k not in buffers}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        hint = (
            " (LoRA weights: enable model.lora in the config)" if any("lora" in k for k in unexpected) else ""
        )
        raise WeightsError(f"{path}: keys the model does not have{hint}: {_short(unexpected)}")
    missing, _ = assign_tensors(model, tensors, str(path))
    missing_trainable = sorted(expected & set(missing))
    if any(k.startswith("llama_proj.") for k in missing_trainable):
        raise WeightsError(f"{path}: the projection weights are missing: {_short(missing_trainable)}")
    if missing_trainable:
        log.warning(
            "%s: %d trainable weights not in the checkpoint: %s",
            path,
            len(missing_trainable),
            _short(missing_trainable),
        )
    log.info("trainable weights loaded from %s", path)


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata `save_trainable` wrote (empty for other files)."""
    path = resolve_path(path)
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("minigpt4", "{}"))
