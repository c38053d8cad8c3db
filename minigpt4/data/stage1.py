"""Stage-1 data: image–caption pairs from webdataset shards, several sources mixed by ratio.

A *stream* is an endless, deterministic sequence of raw samples (undecoded tar members): each
source contributes the shards `i` with `i % n_streams == stream`, read pass after pass in a
seeded order through a seeded shuffle buffer, and the sources are interleaved by a seeded draw
weighted by their ratios (the paper mixes LAION : CC+SBU = 115 : 14). Every choice depends only
on (seed, stream, position), never on the number of processes or workers; that is what makes
resumption exact and data-parallel runs equal to one-process runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, url_opener

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# A member larger than this is not read: its size comes from the tar header, so a small gzip shard
# that unpacks to a 2 GiB ".jpg" costs no memory. The largest image `load_image` takes (40 MP) is
# well under it as a JPEG or PNG.
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members


@dataclass(frozen=True)
class ShardSource:
    name: str
    shards: tuple[str, ...]
    ratio: float


class CorruptSample(ValueError):
    """A sample that cannot be used; it is skipped and counted."""


@dataclass(frozen=True)
class OversizedMember:
    """Stands in a sample for a tar member that was too large to read."""

    size: int
    limit: int


ShardReader = Callable[[str, str], Iterator[dict[str, Any]]]  # (source name, shard) → raw samples


def tar_samples(
    urls: Iterable[str],
    on_error: Callable[[Exception], bool],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[dict[str, Any]]:
    """The samples of webdataset shards, in order: members grouped by key, as webdataset does.

    A member over `max_member_bytes` (by its tar header) is never read: it is an `OversizedMember`
    in its sample, which `sample_caption` / `sample_image_bytes` then refuse (skipped and counted).
    `on_error` sees unreadable shards and tar data (True: go on with the next shard).
    """
    streams = url_opener(({"url": url} for url in urls), handler=on_error)
    return group_by_keys(_shard_members(streams, on_error, max_member_bytes), handler=on_error)


def _shard_members(
    streams: Iterable[dict[str, Any]], on_error: Callable[[Exception], bool], limit: int
) -> Iterator[dict[str, Any]]:
    for source in streams:
        url = source["url"]
        try:
            with tarfile.open(fileobj=source["stream"], mode="r|*") as tar:
                for info in tar:
                    if not info.isreg() or _META_MEMBER.match(info.name):
                        continue
                    if info.size > limit:
                        data: Any = OversizedMember(info.size, limit)  # the stream skips its bytes
                    else:
                        data = tar.extractfile(info).read()
                    yield {"fname": info.name, "data": data, "__url__": url}
                    tar.members = []  # a streamed tar would keep every header otherwise
        except Exception as exc:  # a damaged shard: tarfile, gzip and OS errors alike
            exc.args = (*exc.args, url)
            if not on_error(exc):
                return
        finally:
            source["stream"].close()


def tar_reader(
    on_error: Callable[[Exception], bool], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> ShardReader:
    """Read a shard's samples from its tar file; `on_error` sees unreadable tar data (True: go on)."""

    def read(source: str, url: str) -> Iterator[dict[str, Any]]:
        for sample in tar_samples([url], on_error, max_member_bytes):
            sample["__source__"] = source
            yield sample

    return read


def shard_stream(
    sources: list[ShardSource], stream: int, n_streams: int, seed: int, shuffle_buffer: int, read: ShardReader
) -> Iterator[dict[str, Any]]:
    """The endless raw samples of one stream, each shard's samples coming from `read`."""
    readers = [
        _source_samples(
            src, src.shards[stream::n_streams], f"{seed}/{src.name}/{stream}", shuffle_buffer, read
        )
        for src in sources
    ]
    weights = [src.ratio for src in sources]
    mix = random.Random(f"{seed}/mix/{stream}")
    choices = range(len(sources))
    while True:
        yield next(readers[mix.choices(choices, weights)[0]])


def _source_samples(
    src: ShardSource, shards: tuple[str, ...], seed: str, shuffle_buffer: int, read: ShardReader
) -> Iterator[dict[str, Any]]:
    def passes() -> Iterator[dict[str, Any]]:
        for n_pass in itertools.count():
            order = list(shards)
            random.Random(f"{seed}/pass/{n_pass}").shuffle(order)
            n = 0
            for url in order:
                for sample in read(src.name, url):
                    n += 1
                    yield sample
            if n == 0:
                raise RuntimeError(
                    f"data source {src.name!r} gave no sample in a whole pass over {list(shards)}"
                )

    shuffle = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(f"{seed}/shuffle"))
    return iter(shuffle(passes()))


def sample_key(sample: dict[str, Any]) -> str:
    """A key unique across sources and shards: `source/shard-file/member-key`."""
    return f"{sample['__source__']}/{Path(sample['__url__']).name}/{sample['__key__']}"


def sample_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw sample: `json` {"caption": …} or a plain `txt`."""
    for ext in ("json", "txt"):
        _refuse_oversized(sample, ext)
    try:
        if "json" in sample:
            caption = json.loads(sample["json"])["caption"]
        elif "txt" in sample:
            caption = sample["txt"].decode("utf-8")
        else:
            raise CorruptSample("no json or txt member")
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptSample(f"unreadable caption ({type(exc).__name__}: {exc})") from exc
    if not isinstance(caption, str) or not caption.strip():
        raise CorruptSample("empty caption")
    return caption.strip()


def sample_image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            _refuse_oversized(sample, ext)
            return sample[ext]
    raise CorruptSample(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")


def _refuse_oversized(sample: dict[str, Any], ext: str) -> None:
    member = sample.get(ext)
    if isinstance(member, OversizedMember):
        raise CorruptSample(
            f"its {ext} member is {member.size:,} bytes, over the limit of {member.limit:,} (data.max_member_bytes)"
        )
