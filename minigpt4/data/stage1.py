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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardSource:
    name: str
    shards: tuple[str, ...]
    ratio: float


class CorruptSample(ValueError):
    """A sample that cannot be used; it is skipped and counted."""


ShardReader = Callable[[str, str], Iterator[dict[str, Any]]]  # (source name, shard) → raw samples


def tar_reader(on_error: Callable[[Exception], bool]) -> ShardReader:
    """Read a shard's samples from its tar file; `on_error` sees unreadable tar data (True: go on)."""

    def read(source: str, url: str) -> Iterator[dict[str, Any]]:
        for sample in wds.tarfile_samples(iter([{"url": url}]), handler=on_error):
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
            return sample[ext]
    raise CorruptSample(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
