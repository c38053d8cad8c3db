"""Training configuration: one flat YAML per stage, loaded into typed dataclasses.

A train YAML holds a complete `model:` section (the same schema as the eval presets), a `data:`
section (what to read and how to turn it into token sequences: `minigpt4/data/config.py`) and a `run:` section (batch,
schedule, checkpoints, logging). Unknown keys, wrong types and missing data files are errors
that name the key and the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minigpt4.config import ModelConfig, check_model_files, from_dict, read_yaml, resolve_path
from minigpt4.data.config import DataConfig, check_data_files
from minigpt4.errors import ConfigError

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
# Accelerate's trackers (`accelerate.utils.LoggerType`, less "all"): run.log_with / train --log-with.
TRACKERS = ("tensorboard", "wandb", "trackio", "aim", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")


@dataclass
class RunConfig:
    """Batch, the original's schedule (docs/method.md §4: linear warmup, then cosine), checkpoints, logging."""

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
    log_with: list[str] = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard]
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
        unknown = [name for name in self.log_with if name not in TRACKERS]
        if unknown:
            raise ConfigError(
                f"run.log_with: unknown tracker {', '.join(map(repr, unknown))} (known: {', '.join(TRACKERS)})"
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


def prepare_training(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The preamble of every command that trains: quiet tokenizer threads, then the loaded config.

    Batches are a few short texts, tokenized in data workers or between steps: the tokenizer's
    thread pool only adds overhead (and HF warns when workers fork after it started).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return load_train_config(path, overrides)


def _resolve_train_config(name: str | Path) -> Path:
    candidates = [resolve_path(name)]
    if not str(name).endswith((".yaml", ".yml")):
        candidates.append(resolve_path(Path("train_configs") / f"{name}.yaml"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no train config {str(name)!r}: not a file, and not a name in train_configs/")


def check_batch_layout(cfg: TrainConfig, world_size: int) -> int:
    """The size of a global micro-batch (all processes), checked against the data streams."""
    global_micro = cfg.run.batch_size * world_size
    if global_micro % cfg.data.streams:
        raise ConfigError(
            f"run.batch_size × processes = {global_micro} must be a multiple of "
            f"data.streams = {cfg.data.streams} (each stream gives an equal share of a batch)"
        )
    return global_micro
