"""Atomic file writes: a temporary name beside the target, then one rename.

An interrupted run (Ctrl-C, a killed job, a full disk) leaves either the old file or the new
one, never half of one; readers that look for the final name never see a partial file.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def temporary_name(path: Path) -> Path:
    """The hidden name a folder is written under before it is renamed to `path` (one writer at a time)."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a temporary file, then rename it to `path` (its folder is made).

    The temporary name is this call's own, so writers of the same file in several processes (two evals
    that make the same cached GGUF at once) each rename a whole file; the last rename wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) whole or not at all."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` whole or not at all."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def drop_torn_line(path: Path) -> None:
    """Cut a last line that a killed writer left without its newline, so that the next line
    appended starts on a line of its own instead of being glued to the fragment (losing both)."""
    if not path.is_file():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
    log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path, size - keep)
