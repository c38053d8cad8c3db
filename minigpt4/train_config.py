"""Training configuration: one flat YAML per stage, loaded into typed dataclasses.

A train YAML holds a complete `model:` section (the same schema as the eval presets), a `data:`
section (what to read and how to turn it into token sequences) and a `run:` section (batch,
schedule, checkpoints, logging). Unknown keys, wrong types and missing data files are errors
that name the key and the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from minigpt4.config import ModelConfig, check_model_files, from_dict, read_yaml, resolve_path
from minigpt4.errors import ConfigError

FORMATS = ("webdataset", "cc_sbu_align")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


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
        for key in ("max_text_tokens", "streams", "shuffle_buffer"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be ≥ 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be ≥ 0, got {self.num_workers}")


@dataclass
class RunConfig:
    """Batch, the schedule of DESIGN §4 (linear warmup, then cosine), checkpoints and logging."""

    output_dir: str
    batch_size: int  # per process, per micro-batch
    max_epoch: int
    iters_per_epoch: int  # optimizer steps per epoch
    init_lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    grad_accum_steps: int = 1
    weight_decay: float = 0.05
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # auto: fp16 on CUDA, none on the CPU
    seed: int = 42
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_epoch", "iters_per_epoch", "grad_accum_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be ≥ 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "save_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"run.{key} must be ≥ 0, got {getattr(self, key)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints must be ≥ 1, got {self.keep_checkpoints}")
        if not 0 <= self.min_lr <= self.init_lr or self.warmup_lr < 0:
            raise ConfigError(
                f"run: need 0 ≤ min_lr ≤ init_lr and warmup_lr ≥ 0; got min_lr={self.min_lr}, "
                f"init_lr={self.init_lr}, warmup_lr={self.warmup_lr}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"run.mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {self.mixed_precision!r}"
            )

    @property
    def total_steps(self) -> int:
        return self.max_epoch * self.iters_per_epoch


@dataclass
class TrainConfig:
    name: str
    model: ModelConfig
    data: DataConfig
    run: RunConfig


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a train YAML (a path, or a name in train_configs/) with `key.sub=value` overrides."""
    path = _resolve_train_config(path)
    data = read_yaml(path, overrides)
    data.setdefault("name", path.stem)
    cfg = from_dict(TrainConfig, data, where=str(path))
    check_model_files(cfg.model, where=str(path))
    check_data_files(cfg.data, where=str(path))
    return cfg


def _resolve_train_config(name: str | Path) -> Path:
    candidates = [resolve_path(name)]
    if not str(name).endswith((".yaml", ".yml")):
        candidates.append(resolve_path(Path("train_configs") / f"{name}.yaml"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no train config {str(name)!r}: not a file, and not a name in train_configs/")


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


def check_batch_layout(cfg: TrainConfig, world_size: int) -> int:
    """The size of a global micro-batch (all processes), checked against the data streams."""
    global_micro = cfg.run.batch_size * world_size
    if global_micro % cfg.data.streams:
        raise ConfigError(
            f"run.batch_size × processes = {global_micro} must be a multiple of "
            f"data.streams = {cfg.data.streams} (each stream gives an equal share of a batch)"
        )
    return global_micro
