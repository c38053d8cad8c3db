"""The GGUF conversion cache: converted once, reused after, rebuilt when the file changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minigpt4 import gguf_checkpoint


@pytest.fixture
def calls() -> list[Path]:
    return []


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, calls) -> Path:
    """A stand-in GGUF file and a conversion that only records its calls (the real one takes ~30 s)."""
    monkeypatch.setenv(gguf_checkpoint.CACHE_ENV, str(tmp_path / "cache"))

    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(gguf_path)
        (out / "config.json").write_text("{}")
        (out / gguf_checkpoint._DONE_MARKER).write_text("ok")

    monkeypatch.setattr(gguf_checkpoint, "_convert", convert)
    path = tmp_path / "pkg" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_second_load_uses_the_cache(fake_gguf, calls):
    first = gguf_checkpoint.converted_dir(fake_gguf.parent, fake_gguf.name)
    second = gguf_checkpoint.converted_dir(fake_gguf.parent, fake_gguf.name)
    assert first == second
    assert (first / "config.json").is_file()
    assert len(calls) == 1
    assert first.is_relative_to(gguf_checkpoint.cache_root())
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folder left behind


def test_changed_file_is_converted_again(fake_gguf, calls):
    first = gguf_checkpoint.converted_dir(fake_gguf.parent, fake_gguf.name)
    fake_gguf.write_bytes(b"GGUF" + bytes(80))
    os.utime(fake_gguf, ns=(1, 1))
    second = gguf_checkpoint.converted_dir(fake_gguf.parent, fake_gguf.name)
    assert second != first
    assert len(calls) == 2


def test_failed_conversion_leaves_no_cache(fake_gguf, monkeypatch):
    def broken(gguf_path: Path, out: Path) -> None:
        (out / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_checkpoint, "_convert", broken)
    with pytest.raises(OSError, match="disk full"):
        gguf_checkpoint.converted_dir(fake_gguf.parent, fake_gguf.name)
    assert list((gguf_checkpoint.cache_root() / "gguf").iterdir()) == []


def test_unwritable_cache_still_loads(fake_gguf, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(gguf_checkpoint.CACHE_ENV, str(blocker))
    folder = gguf_checkpoint.converted_dir(fake_gguf.parent, fake_gguf.name)
    assert (folder / "config.json").is_file()
    assert not folder.is_relative_to(blocker)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        gguf_checkpoint.converted_dir(tmp_path, "absent.gguf")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf_checkpoint.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_checkpoint.cache_root() == tmp_path / "minigpt4"
    monkeypatch.setenv(gguf_checkpoint.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert gguf_checkpoint.cache_root() == tmp_path / "elsewhere"
