"""The frozen-feature cache on disk: what `cache-features` writes and training with `features:` reads.

    <dir>/part-00000.npy    float array (rows, n_tokens, feature_dim), read memory-mapped
    <dir>/part-00000.json   {"keys": [...], "records": [...]}: the sample key of each row, and for
                            webdataset data every record of the part's shards in order
                            ([source, shard file, member key, caption or null]), so that training
                            with the cache never reads the image tars (written last: a part is
                            complete when its .json exists)
    <dir>/index.json        the vision fingerprint, shapes, dtype and the list of parts (written
                            when every part is done)

A part holds the records [p·part_size, (p+1)·part_size) of a fixed enumeration of the data set, so
an interrupted run resumes at the first missing part.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt4.config import ModelConfig
from minigpt4.errors import ConfigError
from minigpt4.files import write_atomic, write_text_atomic

INDEX = "index.json"
CACHED_TEXT = "__text__"  # the caption of a record read from the cache (None: it was unreadable)


def vision_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """What decides the frozen features: the vision config (and the seed of a random one)."""
    vision = dataclasses.asdict(cfg.vision)
    return {"vision": vision, "seed": cfg.seed} if cfg.vision.random_init is not None else {"vision": vision}


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def write_part(root: Path, index: int, features: np.ndarray, keys: list[str], records: list[list]) -> None:
    """Write one part atomically: the array first, then its key list (which marks it complete)."""
    name = part_name(index)

    def write_array(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, features)

    write_atomic(root / f"{name}.npy", write_array)
    write_text_atomic(root / f"{name}.json", json.dumps({"keys": keys, "records": records}))


def part_done(root: Path, index: int) -> bool:
    return (root / f"{part_name(index)}.json").is_file()


def cache_index(cfg: ModelConfig, vision: Any, dtype: str, parts: int, records: int) -> dict[str, Any]:
    """What `index.json` holds for a finished cache of `vision` (the model's frozen vision side)."""
    return {
        "fingerprint": vision_fingerprint(cfg),
        "n_tokens": vision.n_tokens,
        "feature_dim": vision.feature_dim,
        "dtype": dtype,
        "parts": parts,
        "records": records,
    }


def write_index(root: Path, index: dict[str, Any]) -> None:
    write_text_atomic(root / INDEX, json.dumps(index, indent=1))


class FeatureCache:
    """Read cached features by sample key; arrays are memory-mapped and opened on first use."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]) -> None:
        self.root = Path(root)
        path = self.root / INDEX
        if not path.is_file():
            raise ConfigError(
                f"data.features: {self.root} holds no finished feature cache ({INDEX} missing); "
                "run `python -m minigpt4 cache-features --cfg-path <this config>` first"
            )
        self.index = json.loads(path.read_text())
        if self.index["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise ConfigError(
                f"data.features: the cache in {self.root} was computed with another vision model "
                f"({self.index['fingerprint']}) than this config's ({fingerprint}); recompute it"
            )
        self.rows: dict[str, tuple[int, int]] = {}
        self.shards: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for part in range(self.index["parts"]):
            stored = json.loads((self.root / f"{part_name(part)}.json").read_text())
            self.rows.update((key, (part, row)) for row, key in enumerate(stored["keys"]))
            for source, shard, key, text in stored["records"]:
                record = {"__source__": source, "__url__": shard, "__key__": key, CACHED_TEXT: text}
                self.shards.setdefault((source, shard), []).append(record)
        self._arrays: dict[int, np.ndarray] = {}

    def read_shard(self, source: str, url: str) -> Iterator[dict[str, Any]]:
        """The records of a webdataset shard as the cache saw them, in their order."""
        records = self.shards.get((source, Path(url).name))
        if records is None:
            raise ConfigError(
                f"data.features: shard {url} of source {source!r} is not in the cache {self.root}; "
                "recompute it for this data"
            )
        return (dict(r) for r in records)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> torch.Tensor:
        part, row = self.rows[key]
        if part not in self._arrays:
            self._arrays[part] = np.load(self.root / f"{part_name(part)}.npy", mmap_mode="r")
        return torch.from_numpy(np.array(self._arrays[part][row])).float()
