"""Turn a GGUF model file into a plain Hugging Face folder once, and reuse it on every later start.

transformers reads GGUF by de-quantising every tensor, which takes 15–50 s on a small CPU (and the
tokenizer another few seconds). `converted_dir` does that once and saves the de-quantised weights
(safetensors) with the tokenizer under the user's cache folder; `from_pretrained` on that folder then
takes well under a second.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from minigpt4.packages import require

logger = logging.getLogger(__name__)

CACHE_ENV = "MINIGPT4_CACHE_DIR"
_DONE_MARKER = "conversion-complete"


def cache_root() -> Path:
    """`$MINIGPT4_CACHE_DIR`, else `$XDG_CACHE_HOME/minigpt4`, else `~/.cache/minigpt4`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "minigpt4"


def cache_entry(gguf_path: Path) -> Path:
    """Where this GGUF file's conversion lives; another file or transformers version gets another one."""
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def converted_dir(folder: str | Path, gguf_file: str) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) holding `folder/gguf_file`, converted once."""
    gguf_path = Path(folder) / gguf_file
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    entry = cache_entry(gguf_path)
    if (entry / _DONE_MARKER).is_file():
        logger.info("LLM: using the converted %s from %s", gguf_file, entry)
        return entry
    require("gguf", "reading a GGUF model file")
    logger.info("LLM: converting %s once (later starts load %s)", gguf_file, entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as e:
        logger.warning("cannot write the LLM cache under %s (%s); converting for this run only", entry, e)
        tmp = Path(tempfile.mkdtemp(prefix="minigpt4-gguf-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _convert(gguf_path, tmp)
        return tmp
    try:
        _convert(gguf_path, tmp)
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / _DONE_MARKER).is_file():
                raise
            # Another process finished the same conversion first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _convert(gguf_path: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The tensors are plain de-quantised floats now; only the GGUF marker would stop save_pretrained.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _DONE_MARKER).write_text(f"converted from {gguf_path}\n")
