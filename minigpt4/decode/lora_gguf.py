"""LoRA for the llama.cpp runtime: the adapters' deltas merged into a copy of the float16 GGUF.

llama.cpp decodes the GGUF file, which knows nothing of the peft adapters on the transformers model.
`merged_gguf` writes `W + scaling · B @ A` (what peft's own merge adds) into each adapted weight of a
copy of the float16 file, once: the copy is cached beside it under a hash of the LoRA tensors, so a
changed checkpoint gets a new file and the same one reuses it. Only the `KEEP_MERGED` newest copies of
a base file are kept (each is as large as the model), with what was converted from them.

GGUF's LLaMA layout differs from Hugging Face's in one way that matters here: llama.cpp's converter
permutes the rows of the query and key weights (`LlamaModel.permute` in `convert_hf_to_gguf.py`, the
rotary halves interleaved per head), so their deltas are permuted the same way before they are added.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minigpt4.errors import ConfigError
from minigpt4.files import write_atomic

log = logging.getLogger(__name__)

# HF module (within a decoder layer) → GGUF tensor of llama.cpp's LLaMA architecture.
GGUF_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Merged copies of one base file kept in the cache (the newest; older ones are deleted when one is written).
KEEP_MERGED = 3
# The GGUF tensors whose rows llama.cpp's converter permutes, and the metadata key of their head count.
_PERMUTED = {"attn_q": "head_count", "attn_k": "head_count_kv"}


@dataclass(frozen=True)
class LoraWeight:
    """One adapted Linear of the LLM: its weight gains `scaling · B @ A` (A: (r, in), B: (out, r))."""

    module: str  # the Hugging Face module name, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def delta(self) -> np.ndarray:
        return (self.scaling * (self.b.detach().float() @ self.a.detach().float())).cpu().numpy()


def lora_weights(llm: torch.nn.Module) -> list[LoraWeight]:
    """The active LoRA adapters of a peft model, one entry per adapted Linear and adapter."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415 (peft only matters with model.lora)

    found = []
    for name, module in llm.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                found.append(LoraWeight(name, a, b, float(module.scaling[adapter])))
    return found


_PEFT_KEY = re.compile(r"llm\.base_model\.model\.(.+)\.lora_([AB])\.default\.weight")


def checkpoint_lora_weights(tensors: dict[str, torch.Tensor], scaling: float) -> list[LoraWeight]:
    """The LoRA adapters in a trained-weights file (peft's key names), without building the peft model.

    `scaling` is the config's `alpha / r`, what peft gives each adapted Linear.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    incomplete = sorted(m for m, p in pairs.items() if len(p) != 2)
    if incomplete:
        raise ConfigError(
            f"model.lora: the checkpoint has only half of the adapters of {', '.join(incomplete)}"
        )
    return [LoraWeight(module, p["A"], p["B"], scaling) for module, p in sorted(pairs.items())]


def gguf_tensor_name(module: str) -> str:
    """The GGUF tensor (LLaMA architecture) that holds the weight of the HF module `module`."""
    match = _LAYER_MODULE.fullmatch(module)
    if match is None or match.group(2) not in GGUF_TENSORS:
        raise ConfigError(
            f"model.lora: no GGUF tensor is known for the adapted module {module!r} "
            f"(known: model.layers.N.{{{', '.join(GGUF_TENSORS)}}})"
        )
    return f"blk.{match.group(1)}.{GGUF_TENSORS[match.group(2)]}.weight"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → GGUF row order of a query or key weight (`LlamaModel.permute` of llama.cpp's converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def lora_digest(weights: list[LoraWeight]) -> str:
    """A short hash of the adapters' modules, scalings and tensors: the merged file's identity."""
    digest = hashlib.sha256()
    for w in sorted(weights, key=lambda w: w.module):
        digest.update(f"{w.module}|{w.scaling!r}|{tuple(w.a.shape)}|{tuple(w.b.shape)}".encode())
        for tensor in (w.a, w.b):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def merged_gguf(f16_path: Path, weights: list[LoraWeight]) -> Path:
    """`f16_path` with the LoRA deltas added to its weights, written once beside it and cached."""
    from gguf import GGMLQuantizationType, GGUFReader  # noqa: PLC0415 (optional, as llama.cpp is)

    target = f16_path.with_name(f"{f16_path.stem}-lora-{lora_digest(weights)}.gguf")
    if target.is_file():
        log.info("LLM decode: using %s (LoRA merged in before)", target.name)
        return target
    modules = sorted({w.module.rpartition(".")[2] for w in weights})
    log.info(
        "LLM decode: merging %d LoRA weights (%s) into a copy of %s once (%s)",
        len(weights),
        ", ".join(modules),
        f16_path.name,
        target,
    )

    def write(tmp: Path) -> None:
        shutil.copyfile(f16_path, tmp)
        reader = GGUFReader(tmp, "r+")
        tensors = {t.name: t for t in reader.tensors}
        arch = reader.fields["general.architecture"].contents()
        if arch != "llama":
            raise ConfigError(
                f"model.lora: merging LoRA into a GGUF knows the llama layout; {f16_path} is {arch}"
            )
        for w in weights:
            name = gguf_tensor_name(w.module)
            tensor = tensors.get(name)
            if tensor is None:
                raise ConfigError(f"model.lora: {f16_path} has no tensor {name} for {w.module}")
            if tensor.tensor_type not in (GGMLQuantizationType.F16, GGMLQuantizationType.F32):
                raise ConfigError(
                    f"model.lora: {f16_path}: {name} is {tensor.tensor_type.name}; LoRA merges into F16 or F32"
                )
            delta = w.delta()
            kind = name.split(".")[2]  # blk.N.<kind>.weight
            if kind in _PERMUTED:
                n_head = reader.fields[f"llama.attention.{_PERMUTED[kind]}"].contents()
                delta = permute_rows(delta, int(n_head))
            if delta.shape != tensor.data.shape:
                raise ConfigError(
                    f"model.lora: {w.module}'s delta is {delta.shape}, {name} is {tensor.data.shape}"
                )
            tensor.data[...] = (tensor.data.astype(np.float32) + delta).astype(tensor.data.dtype)
        reader.data.flush()

    write_atomic(target, write)
    prune_merged(target, f16_path, KEEP_MERGED)
    return target


def prune_merged(newest: Path, f16_path: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest merged copies of `f16_path` (`newest` among them, whatever the
    file times say), and the files converted from them.

    Returns what was deleted. A file that cannot be deleted (in use, on some systems) is left and logged.
    """
    merged = re.compile(rf"{re.escape(f16_path.stem)}-lora-[0-9a-f]{{16}}\.gguf")
    files = sorted(f16_path.parent.iterdir())
    copies = sorted(
        (p for p in files if merged.fullmatch(p.name)),
        key=lambda p: (p == newest, p.stat().st_mtime_ns),
        reverse=True,
    )
    deleted = []
    for old in copies[keep:]:
        for path in (p for p in files if p.name.startswith(old.stem)):
            try:
                path.unlink()
            except OSError as exc:
                log.warning("LLM decode: could not delete the old merged copy %s: %s", path, exc)
                continue
            deleted.append(path)
    if deleted:
        log.info(
            "LLM decode: deleted %d older LoRA-merged files: %s",
            len(deleted),
            ", ".join(p.name for p in deleted),
        )
    return deleted
