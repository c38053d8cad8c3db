"""Atomic writes (`minigpt4.files`): whole files or none, also with several writers of one file."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt4.files import write_atomic, write_bytes_atomic


def test_a_second_writer_of_the_same_file_does_not_break_the_first(tmp_path):
    """Two processes making the same cached file at once: each renames its own whole temporary file.

    The second writer runs inside the first one's write, the interleaving that broke two evals which
    merged the same LoRA GGUF together (one shared temporary name: the first rename took the other's
    file, and the other's rename then failed).
    """
    target = tmp_path / "merged.gguf"

    def first(tmp: Path) -> None:
        tmp.write_bytes(b"first half, ")
        write_bytes_atomic(target, b"the second writer's whole file")
        with tmp.open("ab") as f:
            f.write(b"first second half")

    write_atomic(target, first)
    assert target.read_bytes() == b"first half, first second half"
    assert [p.name for p in tmp_path.iterdir()] == ["merged.gguf"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]
