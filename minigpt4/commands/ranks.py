"""Batch jobs over several processes: `caption`, `curate generate` / `refine` and `eval` run
unchanged under `torchrun` or `accelerate launch` (any number of processes, one GPU each, several
nodes with a shared file system).

Each process (rank) takes a deterministic share of the inputs, `inputs[rank::world]`, and appends
its rows to a part file of its own beside the output (`<out>.part-00001-of-00004`), flushed row by
row; a re-run skips the rows its part already holds, so a crash of one rank costs only that rank's
unfinished rows. When a rank is done it writes a marker naming the job; rank 0 waits for every
marker of this job, then merges the parts into the one output a single process would have written
(its rows in input order, each once) and removes them. Rank 0 draws one progress bar for all
ranks, from the counts each rank keeps beside its part.

The processes never talk to each other except through these files, so no process group is needed
and a job of one process works exactly as before (`world == 1`: no parts at all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from minigpt4.files import drop_torn_line, write_text_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = dict[str, Any]

POLL_S = 0.5  # how often rank 0 looks for the other ranks' markers while it waits


@dataclass(frozen=True)
class Rank:
    """Which process of a job this is (from torchrun's / accelerate's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Rank:
        def number(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            return int(value) if value.isdigit() else default

        rank = cls(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0))
        if not 0 <= rank.rank < rank.world:
            raise ValueError(f"RANK={rank.rank} is outside WORLD_SIZE={rank.world}")
        return rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"rank {self.rank}/{self.world}"

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's inputs: every `world`-th, from its own offset (shares differ by one at most)."""
        return list(items[self.rank :: self.world])

    def device(self, requested: str | None) -> str | None:
        """The device a rank runs on: `requested`, else its own GPU when several ranks share a node."""
        if requested is not None or self.world == 1:
            return requested
        import torch  # noqa: PLC0415 (only once a command runs)

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else None


class RankedJsonl:
    """The JSONL output of a job, written by one or several ranks (see the module docstring).

    `key(row)` names the input a row belongs to; `order` lists every input's key in input order.
    """

    def __init__(self, out: Path, rank: Rank, key: Callable[[Row], Hashable], job: str) -> None:
        self.out = out
        self.rank = rank
        self.key = key
        self.job = job  # what the markers name: a digest of the inputs and the settings

    def part(self, rank: int | None = None) -> Path:
        r = self.rank.rank if rank is None else rank
        return self.out.with_name(f"{self.out.name}.part-{r:05d}-of-{self.rank.world:05d}")

    def _marker(self, rank: int) -> Path:
        return self.part(rank).with_name(self.part(rank).name + ".done")

    def _count_file(self, rank: int) -> Path:
        return self.part(rank).with_name(self.part(rank).name + ".count")

    def done_keys(self) -> set[Hashable]:
        """Inputs already written to parts: this rank's, and those a run with another number of
        processes left behind (no rank of this run writes those). The caller judges the output's
        own rows, which it reads anyway."""
        files = [self.part()] + [p for p in self._parts() if _is_stale_part(p, self.rank.world)]
        return {self.key(row) for path in files for row in read_rows(path)}

    @contextmanager
    def rows(self, total: int | None, desc: str, unit: str) -> Iterator[RowSink]:
        """Write this rank's rows; one progress bar (`total` inputs, on rank 0 for all ranks).

        Rows go to this rank's part (the output itself when alone), one flushed line each. On leaving,
        the rank marks itself done and rank 0 waits, its bar still counting, until every rank of
        this job is; then call `merge` on rank 0.
        """
        # Alone, rows go straight to the output, unless a job of several processes left parts: then
        # into a part too, so that the merge puts every row in input order.
        alone = self.rank.world == 1 and not self._parts()
        path = self.out if alone else self.part()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not alone:
            self._marker(self.rank.rank).unlink(missing_ok=True)
        drop_torn_line(path)
        label = desc if self.rank.world == 1 else f"{desc} (all {self.rank.world} ranks)"
        with (
            path.open("a", encoding="utf-8") as f,
            tqdm(total=total, desc=label, unit=unit, file=sys.stderr, disable=not self.rank.main) as bar,
        ):
            sink = RowSink(f, bar, None if alone else self)
            sink.handled = 0 if alone else len(read_rows(path))  # rows of an earlier run count too
            yield sink
            if alone:
                return
            sink.publish()
            write_text_atomic(self._marker(self.rank.rank), self.job)
            while self.rank.main and not all(
                _read_text(self._marker(r)) == self.job for r in range(self.rank.world)
            ):
                sink.refresh()
                time.sleep(POLL_S)
            sink.refresh()

    def _parts(self) -> list[Path]:
        found = sorted(self.out.parent.glob(f"{self.out.name}.part-*-of-*"))
        return [p for p in found if not p.name.endswith((".done", ".count"))]

    def global_count(self) -> int:
        return sum(_read_count(self._count_file(r)) for r in range(self.rank.world))

    def publish_count(self, rows: int) -> None:
        write_text_atomic(self._count_file(self.rank.rank), str(rows))

    def merge(self, order: Sequence[Hashable]) -> int:
        """Append every part's rows to the output in input order, each input once, then remove the parts."""
        parts = self._parts()
        if not parts:
            return 0
        rows: dict[Hashable, Row] = {}
        for path in parts:
            for row in read_rows(path):
                rows.setdefault(self.key(row), row)
        already = {self.key(row) for row in read_rows(self.out)}
        merged = [rows[k] for k in order if k in rows and k not in already]
        drop_torn_line(self.out)
        with self.out.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in merged)
            f.flush()
            os.fsync(f.fileno())  # on disk before the parts go: a crash here re-merges, never loses
        for path in parts:
            for extra in (path, path.with_name(path.name + ".done"), path.with_name(path.name + ".count")):
                extra.unlink(missing_ok=True)
        log.info("merged %d rows from %d parts into %s", len(merged), len(parts), self.out)
        return len(merged)


class RowSink:
    """Where a rank writes its rows and says how far it is (see `RankedJsonl.rows`)."""

    def __init__(self, file: Any, bar: tqdm, ranked: RankedJsonl | None, sync: bool = True) -> None:
        self.file = file
        self.sync = sync
        self.bar = bar
        self.ranked = ranked  # None when the job runs alone
        self.handled = 0  # inputs this rank has handled (written or skipped)
        self._published = 0.0

    def write(self, row: Row) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.sync:
            os.fsync(self.file.fileno())  # a row written is a row kept, whatever stops the job next

    def advance(self, n: int = 1) -> None:
        """`n` more inputs handled (written or skipped)."""
        self.handled += n
        if self.ranked is None:
            self.bar.update(n)
        elif time.monotonic() - self._published > POLL_S:
            self.publish()
            self.refresh()

    def publish(self) -> None:
        assert self.ranked is not None
        self._published = time.monotonic()
        self.ranked.publish_count(self.handled)

    def refresh(self) -> None:
        if self.ranked is not None and not self.bar.disable:
            count = self.ranked.global_count()
            self.bar.n = count if self.bar.total is None else min(count, self.bar.total)
            self.bar.refresh()


def job_digest(*parts: Any) -> str:
    """A short digest of a job's inputs and settings: what a rank's marker says it finished."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_rows(path: Path) -> Iterable[Row]:
    """The JSON rows of a file (none if it is missing; a torn last line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _is_stale_part(path: Path, world: int) -> bool:
    return not path.name.endswith(f"-of-{world:05d}")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _read_count(path: Path) -> int:
    text = _read_text(path)
    return int(text) if text and text.isdigit() else 0
