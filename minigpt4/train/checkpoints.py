"""Training checkpoints: everything needed to continue a run at the exact step it stopped.

    <output_dir>/checkpoints/step-000120/trainable.safetensors   the projection (+LoRA) weights;
                                                                  loads straight into the Chat engine
    <output_dir>/checkpoints/step-000120/state.pt                optimizer, step, data position,
                                                                  RNG states of every process

A checkpoint is written into a temporary folder that is renamed into place, so a run killed while
saving leaves the previous checkpoints intact and never a half-written one. Weights that hold NaN
or inf are refused.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from minigpt4.files import temporary_name
from minigpt4.weights import save_trainable

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
STATE_KEYS = frozenset({"step", "samples", "corrupt", "global_batch", "optimizer", "rng"})
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(path: Path, model: nn.Module, state: dict[str, Any], metadata: dict[str, Any]) -> Path:
    """Write weights + state into `path` atomically; refuse weights that are not finite."""
    for name, tensor in model.trainable_state_dict().items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to write {path}: the weight {name} holds NaN or inf")
    tmp = temporary_name(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    save_trainable(model, tmp / WEIGHTS, metadata)
    torch.save(state, tmp / STATE)
    _remove(path)
    os.replace(tmp, path)
    log.info("checkpoint written: %s", path)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """The state of a checkpoint folder (tensors and plain values only: `weights_only`).

    Both files are read in full first: a truncated or damaged one is a `CheckpointError` naming it.
    """
    file, weights = Path(path) / STATE, Path(path) / WEIGHTS
    if not file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder ({WEIGHTS} + {STATE})")
    try:
        load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{weights} cannot be read, it is truncated or damaged ({exc})") from exc
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # EOFError, RuntimeError, UnpicklingError …: all mean a damaged file
        raise CheckpointError(f"{file} cannot be read, it is truncated or damaged ({exc})") from exc
    missing = sorted(STATE_KEYS - set(state) if isinstance(state, dict) else STATE_KEYS)
    if missing:
        raise CheckpointError(f"{file} is not a training state: it lacks {', '.join(missing)}")
    return state


def load_latest(output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads completely, and its state; a damaged newer one is skipped
    with a warning (a run killed mid-write by something that defeated the atomic rename, a full disk)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load_state(path)
        except CheckpointError as exc:
            log.warning("skipping a damaged checkpoint: %s", exc)
    return None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints."""
    for _, path in list_checkpoints(output_dir)[:-keep]:
        _remove(path)


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, or only the link where a symlink stands in its place (never what
    it points to: that is someone else's folder)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
