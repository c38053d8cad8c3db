"""The `data:` section of a train config: which sources to read, in which format, and how.

It lives with the datasets (the loader reads it); the training config embeds it. Unknown keys,
wrong types and missing data files are errors that name the key and the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from minigpt4.config import resolve_path
from minigpt4.data.stage1 import DEFAULT_MAX_MEMBER_BYTES
from minigpt4.errors import ConfigError

FORMATS = ("webdataset", "cc_sbu_align")


@dataclass
class SourceConfig:
    """One data source. For webdataset, `path` is a brace pattern of shards or a folder of .tar files."""

    name: str
    path: str
    ratio: float = 1.0

    def __post_init__(self) -> None:
        if not self.ratio > 0:
            raise ConfigError(f"data.sources: {self.name}: ratio must be > 0, got {self.ratio}")


@dataclass
class DataConfig:
    """What the model reads. Stage 1: caption + "\\n", no prompt. Stage 2: the template's prompt."""

    stage: int
    format: str
    sources: list[SourceConfig]
    max_text_tokens: int = 32
    prompts_file: str | None = None  # stage 2: one instruction per line
    # A global micro-batch takes an equal slice from each of `streams` independent shard streams
    # (webdataset). With a multiple of the process count, every rank reads its own shards.
    streams: int = 1
    shuffle_buffer: int = 1000
    num_workers: int = 0
    prefetch_factor: int = 2
    features: str | None = None  # a `cache-features` folder: train on cached frozen features
    max_image_pixels: int = 40_000_000
    # A shard member larger than this (by its tar header) is skipped and counted, never read.
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"data.stage must be 1 or 2, got {self.stage}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if not self.sources:
            raise ConfigError("data.sources must name at least one source")
        if self.format == "cc_sbu_align" and (len(self.sources) != 1 or self.streams != 1):
            raise ConfigError("data: cc_sbu_align reads one source as one stream (data.streams: 1)")
        if self.stage == 2 and self.prompts_file is None:
            raise ConfigError("data.prompts_file is required for stage 2 (one instruction per line)")
        for key in ("max_text_tokens", "streams", "shuffle_buffer", "max_member_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be ≥ 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be ≥ 0, got {self.num_workers}")


def source_shards(source: SourceConfig) -> list[str]:
    """The shard files of a webdataset source: a brace pattern, or every .tar in a folder (sorted)."""
    folder = resolve_path(source.path)
    if folder.is_dir():
        return [str(p) for p in sorted(folder.glob("*.tar"))]
    return [str(resolve_path(url)) for url in expand_urls(source.path)]


def check_data_files(cfg: DataConfig, where: str) -> None:
    """Every shard, annotation file and prompts file the data section names must exist."""
    for i, source in enumerate(cfg.sources):
        key = f"data.sources[{i}].path"
        if cfg.format == "webdataset":
            shards = source_shards(source)
            missing = [s for s in shards if not Path(s).is_file()]
            if not shards or missing:
                raise ConfigError(
                    f"{where}: {key}: no shards at {source.path!r}"
                    if not shards
                    else f"{where}: {key}: {len(missing)} of {len(shards)} shards not found, e.g. {missing[0]}"
                    + " (`python -m minigpt4 make-data train` writes the tiny sets)"
                )
            if len(shards) < cfg.streams:
                raise ConfigError(
                    f"{where}: {key}: {len(shards)} shards cannot feed data.streams={cfg.streams} "
                    "streams (each stream needs at least one shard of every source)"
                )
        elif not (resolve_path(source.path) / "filter_cap.json").is_file():
            raise ConfigError(
                f"{where}: {key}: no filter_cap.json in {source.path!r} (the cc_sbu_align layout); "
                "`python -m minigpt4 make-data train` writes a tiny one"
            )
    if cfg.prompts_file is not None and not resolve_path(cfg.prompts_file).is_file():
        raise ConfigError(f"{where}: data.prompts_file: {cfg.prompts_file!r} not found")
