"""A Hugging Face LLaMA checkpoint converted to a GGUF file for the llama.cpp runtime.

This does what llama.cpp's `convert_hf_to_gguf.py` does for `LlamaForCausalLM`, for the checkpoints
MiniGPT-4 uses (Vicuna, LLaMA-2-chat), without its repository: the tensors are renamed with gguf's own
map, the query and key rows permuted (`permute_rows`), the hyper-parameters and the tokenizer written
as llama.cpp reads them. 2-D weights are written in float16 (or float32), the 1-D norms in float32;
`q8_0`, `q4_0` and `q4_k_m` are then made from the float16 file by llama.cpp's own quantiser.

The weights stream through: the header, the metadata and the tensor table are written first (each
tensor's shape is read without its data), then each tensor is read, converted and written, its shard
opened for it alone, so that what was written before is let go. Memory holds one tensor and its
converted copy, whatever the model's size. Measured (`resource.getrusage`) on a random LLaMA of 446 MB
float32 weights in one safetensors file, its largest tensor 125 MB: to f16 the process peaked at
446 MB resident, 196 MB above the 250 MB it held after importing torch, transformers and gguf (one
tensor read in float32 and its float16 copy); from float16 .bin shards 69 MB above; q4_k_m 243 MB
above (llama.cpp's quantiser holds a tensor in float32). For a 7B LLaMA (the token embeddings, 250 MB
in float16, are its largest tensor) that is about 0.3 GB above the imports, 1 GB when quantising.

A tokenizer.model is read by sentencepiece (Vicuna and LLaMA-2 ship one); without it tokenizer.json
must be a LLaMA BPE with byte fallback or a byte-level BPE whose pre-tokenizer llama.cpp knows by name
(`BPE_PRE_TOKENIZERS`). llama.cpp splits sentencepiece text as sentencepiece itself (and the original
MiniGPT-4's LLaMA tokenizer) did: every piece between special tokens gets the "▁" prefix, also one that
starts with a space, where transformers 5's converted tokenizer adds none (" hi" is "▁", "▁", "h", "i"
against "▁", "h", "i"). The llama.cpp runtime is given token ids, so its answers do not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minigpt4.decode.llama_cpp import WEIGHT_TYPES, quantize_gguf
from minigpt4.decode.lora_gguf import permute_rows
from minigpt4.errors import ConfigError
from minigpt4.files import write_atomic

log = logging.getLogger(__name__)

# What `convert_llm` writes: plain floats, or a llama.cpp quantisation made from the float16 file.
OUTPUT_TYPES = ("f32", *WEIGHT_TYPES)
# The files of a checkpoint that say how it tokenizes (all are read when present).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Byte-level BPE pre-tokenizers (tokenizer.json's steps, in order) → llama.cpp's name for the same
# split. A step is (type, its settings); "ignore_merges" is the BPE model's flag, which llama.cpp
# sets by the name. convert_hf_to_gguf.py tells them apart by hashing a test string's tokens instead.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_TOKENIZERS = {
    (("ByteLevel", True), ("ignore_merges", False)): "gpt-2",
    (("Digits", True), ("ByteLevel", True), ("ignore_merges", False)): "smollm",  # SmolLM2
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False), ("ignore_merges", True)): "llama-bpe",  # LLaMA-3
}
# Tensors of a checkpoint that GGUF does not hold (llama.cpp computes the rotary frequencies itself).
_SKIPPED = ("rotary_emb.inv_freq",)
_PER_LAYER = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of a checkpoint: its name there, the file that holds it and its shape."""

    name: str
    file: Path
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """The tensor's data; its file is opened for it alone (what was read before is unmapped)."""
        if self.file.suffix == ".safetensors":
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(self.file, framework="pt") as f:
                return f.get_tensor(self.name)
        return torch.load(self.file, map_location="cpu", mmap=True, weights_only=True)[self.name]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path} not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def llama_config(hf_dir: Path) -> dict:
    """The checkpoint's config.json, refused unless it is a LLaMA causal LM."""
    config = _read_json(hf_dir / "config.json")
    architectures = config.get("architectures") or []
    # Early LLaMA conversions (transformers 4.28's development versions) spelled it LLaMAForCausalLM.
    is_llama = [a.lower() for a in architectures] == ["llamaforcausallm"]
    if not is_llama and (architectures or config.get("model_type") != "llama"):
        arch = ", ".join(architectures) or config.get("model_type") or "unknown"
        raise ConfigError(
            f"{hf_dir / 'config.json'}: architecture {arch} is not supported "
            "(convert-llm converts LlamaForCausalLM, model_type llama)"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{hf_dir / 'config.json'}: hidden_act {config['hidden_act']!r}; LLaMA uses silu")
    return config


def weight_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's weight files: its safetensors (shards), else its pytorch_model*.bin shards."""
    for index, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        if (hf_dir / index).is_file():
            names = sorted(set(_read_json(hf_dir / index)["weight_map"].values()))
            missing = [n for n in names if not (hf_dir / n).is_file()]
            if missing:
                raise ConfigError(f"{hf_dir / index} names {', '.join(missing)}, which is not in {hf_dir}")
            return [hf_dir / n for n in names]
        files = sorted(hf_dir.glob(pattern))
        if files:
            return files
    raise ConfigError(f"{hf_dir}: no weights (*.safetensors or pytorch_model*.bin)")


def checkpoint_tensors(hf_dir: Path) -> list[CheckpointTensor]:
    """Every tensor of the checkpoint with its shape, read without the tensors' data."""
    from safetensors import safe_open  # noqa: PLC0415

    tensors = []
    for file in weight_files(hf_dir):
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                tensors += [CheckpointTensor(k, file, tuple(f.get_slice(k).get_shape())) for k in f.keys()]  # noqa: SIM118 (safe_open is not a dict)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            tensors += [CheckpointTensor(k, file, tuple(t.shape)) for k, t in state.items()]
    return [t for t in tensors if not t.name.endswith(_SKIPPED)]


# --- the tokenizer ------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """A tokenizer as GGUF stores it: one text, score and type per token id."""

    model: str  # llama.cpp's tokenizer kind: "llama" (sentencepiece) or "gpt2" (byte-level BPE)
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    pre: str | None = None  # the BPE pre-tokenizer's name
    add_space_prefix: bool | None = None


def _bpe_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (ConfigError if it has none)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            shape.append((kind, step.get("use_regex", True)))
        elif kind == "Digits":
            shape.append((kind, step.get("individual_digits", False)))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            shape.append((kind, step.get("pattern", {}).get("Regex")))
        else:
            shape.append((kind, json.dumps(step, sort_keys=True)))
    shape.append(("ignore_merges", bool(tokenizer_json["model"].get("ignore_merges", False))))
    name = BPE_PRE_TOKENIZERS.get(tuple(shape))
    if name is None or tokenizer_json.get("normalizer") is not None:
        raise ConfigError(
            f"{path}: llama.cpp knows no byte-level BPE pre-tokenizer like this one "
            f"(normalizer {tokenizer_json.get('normalizer')}, pre_tokenizer {pre}); known: "
            f"{', '.join(BPE_PRE_TOKENIZERS.values())}"
        )
    return name


def _added_tokens(hf_dir: Path) -> dict[int, tuple[str, bool]]:
    """The tokenizer's added tokens: id → (text, special), from every file that lists them."""
    added: dict[int, tuple[str, bool]] = {}
    if (hf_dir / "added_tokens.json").is_file():
        added.update({i: (text, False) for text, i in _read_json(hf_dir / "added_tokens.json").items()})
    if (hf_dir / "tokenizer.json").is_file():
        for token in _read_json(hf_dir / "tokenizer.json").get("added_tokens", []):
            added[token["id"]] = (token["content"], bool(token.get("special")))
    if (hf_dir / "tokenizer_config.json").is_file():
        decoder = _read_json(hf_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        for i, token in decoder.items():
            added[int(i)] = (token["content"], bool(token.get("special")))
    return added


def _merge_scores(tokenizer_json: dict) -> dict[str, float]:
    """Scores that make llama.cpp's sentencepiece merging pick pairs in the BPE merges' order: a
    token scores minus the rank of the first merge that makes it (merges ranked by a sentencepiece
    model's scores, as transformers' converter writes them, are that order)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(tokenizer_json["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def gguf_vocab(hf_dir: Path, vocab_size: int) -> GGUFVocab:
    """The checkpoint's tokenizer as `vocab_size` GGUF tokens (ids past the tokenizer's are padding)."""
    from gguf import BpeVocab, LlamaHfVocab, SentencePieceVocab, TokenType  # noqa: PLC0415

    add_space_prefix = pre = None
    if (hf_dir / "tokenizer.model").is_file():
        from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415

        vocab = SentencePieceVocab(hf_dir)
        model = "llama"
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((hf_dir / "tokenizer.model").read_bytes())
        add_space_prefix = proto.normalizer_spec.add_dummy_prefix
        base = list(vocab.all_tokens())
    elif (hf_dir / "tokenizer.json").is_file():
        tokenizer_json = _read_json(hf_dir / "tokenizer.json")
        bpe = tokenizer_json["model"]
        if bpe.get("type") == "BPE" and bpe.get("byte_fallback"):
            vocab, model = LlamaHfVocab(hf_dir), "llama"
            merge_scores = _merge_scores(tokenizer_json)
            base = [
                (
                    text,
                    merge_scores.get(text.decode("utf-8"), 0.0) if kind == TokenType.NORMAL else score,
                    kind,
                )
                for text, score, kind in vocab.all_tokens()
            ]
        else:
            try:
                vocab = BpeVocab(hf_dir)
            except FileNotFoundError as e:
                raise ConfigError(
                    f"{hf_dir / 'tokenizer.json'}: a {bpe.get('type')} tokenizer; convert-llm converts "
                    "sentencepiece (tokenizer.model), LLaMA BPE and byte-level BPE tokenizers"
                ) from e
            model, pre = "gpt2", _bpe_pre_tokenizer(tokenizer_json, hf_dir / "tokenizer.json")
            base = list(vocab.all_tokens())
    else:
        raise ConfigError(
            f"{hf_dir}: no tokenizer file (tokenizer.model or tokenizer.json) beside the weights"
        )
    if len(base) > vocab_size:
        raise ConfigError(
            f"{hf_dir}: the tokenizer has {len(base)} tokens, the model's embeddings {vocab_size}"
        )
    tokens = [t if isinstance(t, bytes) else t.encode("utf-8") for t, _, _ in base]
    scores = [float(s) for _, s, _ in base]
    types = [int(k) for _, _, k in base]
    pad = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]".encode() for i in pad]
    scores += [-1000.0] * len(pad)
    types += [int(TokenType.UNUSED)] * len(pad)
    # Added tokens are matched as whole strings before the text is split (as transformers does):
    # llama.cpp does that for control and user-defined tokens, in their plain text.
    for i, (text, special) in _added_tokens(hf_dir).items():
        if i >= vocab_size:
            raise ConfigError(
                f"{hf_dir}: added token {text!r} has id {i}, past the model's {vocab_size} tokens"
            )
        if not special and model == "llama":
            text = text.replace("\u2581", " ")
        tokens[i] = text.encode("utf-8")
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        scores[i] = -1000.0
    return GGUFVocab(model, tokens, scores, types, pre, add_space_prefix)


def _add_tokenizer(writer, hf_dir: Path, vocab: GGUFVocab) -> None:
    from gguf import SpecialVocab  # noqa: PLC0415

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    # bos / eos / unk / pad ids, whether bos and eos are added, the BPE merges and the chat template.
    special = SpecialVocab(hf_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)


# --- the model ----------------------------------------------------------------------------------------


def _add_hyperparameters(writer, config: dict, hf_dir: Path, ftype: int) -> None:
    from gguf import RopeScalingType  # noqa: PLC0415

    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_name(_checkpoint_name(hf_dir))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise ConfigError(
            f"{hf_dir / 'config.json'}: rope type {kind!r}; convert-llm knows default and linear"
        )
    writer.add_file_type(ftype)


def _gguf_names(tensors: list[CheckpointTensor], n_layers: int, hf_dir: Path) -> dict[str, str]:
    """Checkpoint name → GGUF name of every tensor; an unknown or a missing tensor is named."""
    import gguf  # noqa: PLC0415

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    names = {}
    for tensor in tensors:
        name = mapping.get_name(tensor.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"{hf_dir}: the checkpoint's tensor {tensor.name} has no GGUF name for LLaMA")
        names[tensor.name] = name
    required = ["token_embd.weight", "output_norm.weight"]
    required += [f"blk.{i}.{kind}.weight" for i in range(n_layers) for kind in _PER_LAYER]
    missing = sorted(set(required) - set(names.values()))
    if missing:
        raise ConfigError(f"{hf_dir}: the checkpoint lacks the tensors of {', '.join(missing[:4])}")
    return names


def _gguf_array(tensor: torch.Tensor, gguf_name: str, dtype: torch.dtype, config: dict) -> np.ndarray:
    """A checkpoint tensor as GGUF stores it: norms (1-D) in float32, query and key rows permuted."""
    data = tensor.to(torch.float32 if tensor.ndim == 1 else dtype).numpy()
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if kind == "attn_q":
        data = permute_rows(data, config["num_attention_heads"])
    elif kind == "attn_k":
        data = permute_rows(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    return np.ascontiguousarray(data)


def _write_gguf(hf_dir: Path, out: Path, weights: str) -> None:
    """Write the checkpoint as a float16 (`weights` f16) or float32 GGUF to `out`, tensor by tensor."""
    from gguf import GGUFWriter, LlamaFileType  # noqa: PLC0415

    config = llama_config(hf_dir)
    tensors = checkpoint_tensors(hf_dir)
    names = _gguf_names(tensors, config["num_hidden_layers"], hf_dir)
    vocab = gguf_vocab(hf_dir, config["vocab_size"])
    embeddings = next(t for t in tensors if names[t.name] == "token_embd.weight")
    if embeddings.shape[0] != config["vocab_size"]:
        raise ConfigError(
            f"{hf_dir}: {embeddings.name} has {embeddings.shape[0]} rows, config.json's vocab_size is "
            f"{config['vocab_size']}"
        )
    dtype = torch.float32 if weights == "f32" else torch.float16
    ftype = LlamaFileType.ALL_F32 if weights == "f32" else LlamaFileType.MOSTLY_F16
    writer = GGUFWriter(out, "llama")
    _add_hyperparameters(writer, config, hf_dir, ftype)
    _add_tokenizer(writer, hf_dir, vocab)
    for tensor in tensors:
        itemsize = 4 if len(tensor.shape) == 1 or dtype == torch.float32 else 2
        np_dtype = np.float32 if itemsize == 4 else np.float16
        writer.add_tensor_info(
            names[tensor.name], tensor.shape, np.dtype(np_dtype), itemsize * int(np.prod(tensor.shape))
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for tensor in tqdm(tensors, desc=f"converting {_checkpoint_name(hf_dir)}", unit="tensor"):
            writer.write_tensor_data(_gguf_array(tensor.read(), names[tensor.name], dtype, config))
    finally:
        writer.close()


def convert_llm(hf_dir: Path, out: Path, weights: str = "f16") -> Path:
    """Write the Hugging Face LLaMA checkpoint in `hf_dir` as a GGUF file `out` for llama.cpp.

    `weights` is one of OUTPUT_TYPES: f32 or f16 are written directly; q8_0, q4_0, q4_k_m are
    quantised by llama.cpp from a float16 file written beside `out` first (deleted after).
    The file appears whole or not at all. ConfigError names what the checkpoint lacks or has that
    cannot be converted (another architecture, no tokenizer file, an unknown tensor).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if weights not in OUTPUT_TYPES:
        raise ConfigError(f"weights: {weights!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if weights in ("f32", "f16"):
        write_atomic(out, lambda tmp: _write_gguf(hf_dir, tmp, weights))
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix="-f16.gguf", dir=out.parent)
    os.close(fd)
    f16 = Path(name)
    try:
        _write_gguf(hf_dir, f16, "f16")
        return quantize_gguf(f16, out, weights)
    finally:
        f16.unlink(missing_ok=True)


# --- the cache ----------------------------------------------------------------------------------------


def _checkpoint_name(hf_dir: Path) -> str:
    """A readable name: the folder's, or the repository's for a hub snapshot (…/models--org--name/snapshots/<commit>)."""
    if hf_dir.parent.name == "snapshots":
        return hf_dir.parent.parent.name.removeprefix("models--")
    return hf_dir.name


def checkpoint_digest(hf_dir: Path) -> str:
    """A short hash of what the conversion reads: config.json's text, and the tokenizer and weight
    files' names, sizes and modification times (a changed file gets a new conversion)."""
    digest = hashlib.sha256((hf_dir / "config.json").read_bytes())
    files = [hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()] + weight_files(hf_dir)
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_llm_path(hf_dir: Path, weights: str) -> Path:
    """Where `converted_llm` keeps the conversion of `hf_dir` to `weights`."""
    from minigpt4.gguf_checkpoint import cache_root  # noqa: PLC0415

    hf_dir = Path(hf_dir)
    llama_config(hf_dir)  # another architecture is refused before anything else is read
    return cache_root() / "gguf" / f"{_checkpoint_name(hf_dir)}-{checkpoint_digest(hf_dir)}-{weights}.gguf"


def converted_llm(hf_dir: Path, weights: str) -> Path:
    """The checkpoint in `hf_dir` as a GGUF of `weights` (OUTPUT_TYPES), converted once into the cache.

    A quantised file is made from the cached float16 one when that exists (LoRA merges need it), else
    from a float16 file that is deleted after.
    """
    hf_dir = Path(hf_dir)
    target = cached_llm_path(hf_dir, weights)
    if target.is_file():
        log.info("LLM: using %s, converted from %s before", target.name, hf_dir)
        return target
    log.info("LLM: converting %s to %s once (%s)", hf_dir, weights, target)
    start = time.monotonic()
    f16 = cached_llm_path(hf_dir, "f16")
    if weights in WEIGHT_TYPES and weights != "f16" and f16.is_file():
        quantize_gguf(f16, target, weights)
    else:
        convert_llm(hf_dir, target, weights)
    log.info(
        "LLM: converted %s in %.1f s (%.0f MB)",
        hf_dir.name,
        time.monotonic() - start,
        target.stat().st_size / 2**20,
    )
    return target


# --- a random LLaMA of a real size (for the bench) -------------------------------------------------------

# The shapes of the LLaMA models MiniGPT-4 uses (Vicuna v0 7B / 13B, LLaMA-2-7B-chat), as config.json has them.
LLAMA_SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
    },
}
# Bytes of one block and where its float16 scales sit (a random block keeps them small and finite).
_BLOCKS = {"q8_0": (0, 1), "q4_0": (0, 1), "q4_k": (0, 2), "q6_k": (-1, 1)}  # (first scale, how many)
_RANDOM_FILE_TYPES = {
    "f16": "MOSTLY_F16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_k_m": "MOSTLY_Q4_K_M",
}


def _random_types(weights: str, n_layers: int) -> Callable[[str], str]:
    """The type of each 2-D tensor: one type, or llama.cpp's q4_k_m mix (q6_k for the output layer and
    for attn_v / ffn_down in the first and last eighth of the layers and every third in between)."""
    if weights != "q4_k_m":
        return lambda name: weights

    def q4_k_m(name: str) -> str:
        if name == "output.weight":
            return "q6_k"
        if name.endswith(("attn_v.weight", "ffn_down.weight")):
            i = int(name.split(".")[1])
            eighth = n_layers // 8
            if i < eighth or i >= 7 * n_layers // 8 or (i - eighth) % 3 == 2:
                return "q6_k"
        return "q4_k"

    return q4_k_m


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Random values of `kind` for `shape`: float32 / float16 normals, or quantised blocks of random
    bytes whose float16 scales are 1e-3 (so every value is finite)."""
    if kind in ("f32", "f16"):
        values = rng.standard_normal(shape, dtype=np.float32) * 0.02
        return values.astype(np.float16 if kind == "f16" else np.float32)
    block_weights, block_bytes = _quant_size(kind)
    n_blocks = int(np.prod(shape)) // block_weights
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    first, count = _BLOCKS[kind]
    start = first * 2 if first >= 0 else block_bytes - 2
    scale = np.frombuffer(np.float16(1e-3).tobytes() * count, dtype=np.uint8)
    blocks[:, start : start + 2 * count] = scale
    return blocks.reshape(-1)


def _random_vocab(vocab_size: int) -> GGUFVocab:
    """A sentencepiece-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then plain pieces."""
    from gguf import TokenType  # noqa: PLC0415

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)] + [
        int(TokenType.BYTE)
    ] * 256
    pieces = range(vocab_size - len(tokens))
    tokens += [f"\u2581w{i}".encode() for i in pieces]
    types += [int(TokenType.NORMAL)] * len(pieces)
    return GGUFVocab("llama", tokens, [-float(i) for i in range(vocab_size)], types, add_space_prefix=True)


def random_llama_gguf(shape: str | dict, out: Path, weights: str = "q4_0", seed: int = 0) -> Path:
    """A GGUF of a LLaMA of `shape` (a LLAMA_SHAPES key, or such a dict) with random weights of type
    `weights` (f16, q8_0, q4_0 or q4_k_m), written as `convert_llm` writes a checkpoint, tensor by
    tensor: decode speed and memory do not depend on the values, so this measures a real size without
    the real weights."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType  # noqa: PLC0415

    if (isinstance(shape, str) and shape not in LLAMA_SHAPES) or weights not in _RANDOM_FILE_TYPES:
        raise ConfigError(
            f"random LLaMA: shape {shape!r} (known: {', '.join(LLAMA_SHAPES)}), weights {weights!r} "
            f"(known: {', '.join(_RANDOM_FILE_TYPES)})"
        )
    label = shape if isinstance(shape, str) else f"{shape['hidden_size']}x{shape['num_hidden_layers']}"
    dims = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
    config = {**dims, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
    hidden, ffn, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tensors = {"token_embd.weight": (config["vocab_size"], hidden), "output_norm.weight": (hidden,)}
    for i in range(n_layers):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"blk.{i}.{kind}.weight"] = (hidden, hidden)
        tensors |= {f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden)}
        tensors |= {f"blk.{i}.ffn_down.weight": (hidden, ffn)}
        tensors |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,)}
    tensors["output.weight"] = (config["vocab_size"], hidden)
    type_of = _random_types(weights, n_layers)
    rng = np.random.default_rng(seed)

    def write(tmp: Path) -> None:
        writer = GGUFWriter(tmp, "llama")
        _add_hyperparameters(
            writer, config, Path(f"llama-{label}-random"), LlamaFileType[_RANDOM_FILE_TYPES[weights]]
        )
        vocab = _random_vocab(config["vocab_size"])
        writer.add_tokenizer_model(vocab.model)
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_add_space_prefix(True)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        kinds = {name: "f32" if len(dims) == 1 else type_of(name) for name, dims in tensors.items()}
        for name, dims in tensors.items():
            kind = kinds[name]
            if kind in ("f32", "f16"):
                itemsize = 4 if kind == "f32" else 2
                writer.add_tensor_info(
                    name,
                    dims,
                    np.dtype(np.float32 if kind == "f32" else np.float16),
                    itemsize * int(np.prod(dims)),
                )
            else:
                block_weights, block_bytes = _quant_size(kind)
                nbytes = int(np.prod(dims)) // block_weights * block_bytes
                writer.add_tensor_info(
                    name, dims, np.dtype(np.float32), nbytes, raw_dtype=GGMLQuantizationType[kind.upper()]
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for name, dims in tqdm(tensors.items(), desc=f"random LLaMA {label} ({weights})", unit="tensor"):
                writer.write_tensor_data(_random_tensor(rng, dims, kinds[name]))
        finally:
            writer.close()

    write_atomic(Path(out), write)
    return Path(out)


def _quant_size(kind: str) -> tuple[int, int]:
    import gguf  # noqa: PLC0415

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
