"""The curation work folder: one append-only JSONL file per step, keyed by `image_id`.

Every step appends one record per finished item and flushes it to disk at once, so a run that is
killed loses at most the item in flight. A kill in the middle of a write leaves a partial last line:
reading skips it and opening for append cuts it off, so the restarted run redoes exactly that item.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt4.errors import InputError
from minigpt4.files import drop_torn_line

log = logging.getLogger(__name__)


class CurateError(InputError):
    """Something the user gave the curation pipeline is wrong; the message says what and where."""


@dataclass(frozen=True)
class WorkDir:
    """Where each step of one curation run keeps its records."""

    root: Path

    @property
    def generate(self) -> Path:
        return self.root / "generate.jsonl"

    @property
    def refine(self) -> Path:
        return self.root / "refine.jsonl"

    @property
    def filter(self) -> Path:
        return self.root / "filter.jsonl"

    @property
    def review(self) -> Path:
        return self.root / "review.jsonl"

    @property
    def images(self) -> Path:
        """Images unpacked from webdataset shards (folder inputs are referenced in place)."""
        return self.root / "images"

    def require(self, path: Path, step: str) -> Path:
        """`path`, or a CurateError telling which step makes it."""
        if not path.is_file():
            raise CurateError(f"{path} does not exist: run `python -m minigpt4 curate {step}` first")
        return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of `path` ([] when it does not exist).

    A partial last line (a write cut by a kill) is skipped with a warning; a bad line anywhere else
    is damage this module never causes, so it is an error naming the line.
    """
    if not path.exists():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                log.warning("%s: ignoring a partial last line (an interrupted write)", path)
                continue
            raise CurateError(f"{path}:{number} is not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("image_id"), str):
            raise CurateError(f"{path}:{number} is not a record with a string 'image_id'")
        records.append(record)
    return records


def latest_by_id(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each image_id, in the order the ids first appeared."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["image_id"]] = record
    return latest


class JsonlWriter:
    """Appends records to a JSONL file, each flushed and synced before `write` returns.

    Thread-safe. Opening cuts off a partial last line left by a killed writer, so new records never
    join onto it.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_line(path)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_WORD = re.compile(r"\S+")


def count_words(text: str) -> int:
    """Whitespace-separated words, the unit of the paper's 80-word rule."""
    return len(_WORD.findall(text))
