"""`python -m minigpt4 cache-features --cfg-path train_configs/X.yaml`: pre-compute frozen features.

The vision encoder and Q-Former are frozen in both stages, so their output for an image never
changes. This command runs them once over every record of the config's data (every shard of every
source, or every cc_sbu_align annotation) and stores the features; a training run with
`data.features: <dir>` then reads them instead of decoding and encoding images. The LLM is not
loaded. An interrupted run continues at the first part it had not finished.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from minigpt4.build import pick_device
from minigpt4.commands.common import HelpFormatter, add_config_args, at_least, config_overrides
from minigpt4.config import ModelConfig, resolve_path
from minigpt4.data import stage2
from minigpt4.data.config import DataConfig, source_shards
from minigpt4.data.feature_cache import cache_index, part_done, write_index, write_part
from minigpt4.data.loader import record_image, record_key
from minigpt4.data.stage1 import CorruptSample, sample_caption, tar_samples
from minigpt4.errors import ConfigError
from minigpt4.train.config import load_train_config
from minigpt4.vision import build_vision

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "float16": np.float16}


def all_records(cfg: DataConfig, on_error) -> Iterator[dict[str, Any]]:
    """Every record of the data, once, in a fixed order (sources in turn, shards sorted)."""
    for source in cfg.sources:
        if cfg.format == "cc_sbu_align":
            yield from stage2.read_annotations(resolve_path(source.path), source.name)
            continue
        urls = sorted(source_shards(source))
        for sample in tar_samples(urls, on_error, cfg.max_member_bytes):
            sample["__source__"] = source.name
            yield sample


def _shard_record(sample: dict[str, Any]) -> list:
    """[source, shard file, member key, caption or None] of a webdataset sample."""
    try:
        text = sample_caption(sample)
    except CorruptSample:
        text = None
    return [sample["__source__"], Path(sample["__url__"]).name, sample["__key__"], text]


def frozen_vision(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """The frozen vision side alone, initialised exactly as `build_model` does it."""
    torch.manual_seed(cfg.seed)
    return build_vision(cfg.vision, device).eval()


def cache_features(
    cfg_data: DataConfig,
    cfg_model: ModelConfig,
    out: Path,
    batch_size: int = 64,
    part_size: int = 4096,
    dtype: str = "float32",
    device: str | None = None,
) -> dict[str, Any]:
    """Compute and store the frozen features of every record; returns the cache's index."""
    if part_size % batch_size:
        raise ValueError(f"--part-size ({part_size}) must be a multiple of --batch-size ({batch_size})")
    out.mkdir(parents=True, exist_ok=True)
    torch_device = pick_device(device)
    vision = frozen_vision(cfg_model, torch_device)
    stream_errors = []
    records = all_records(cfg_data, lambda exc: stream_errors.append(exc) or True)
    n_parts, n_records, corrupt = 0, 0, 0
    bar = tqdm(desc="cache-features", unit="img")
    for part in itertools.count():
        chunk = list(itertools.islice(records, part_size))
        if not chunk:
            break
        n_parts, n_records = part + 1, n_records + len(chunk)
        if part_done(out, part):
            bar.update(len(chunk))
            continue
        errors_before = len(stream_errors)
        keys, feats = [], []
        shard_records = [_shard_record(r) for r in chunk if "image_path" not in r]
        for start in range(0, len(chunk), batch_size):
            batch_keys, images = [], []
            for record in chunk[start : start + batch_size]:
                try:
                    images.append(record_image(record, cfg_data.max_image_pixels))
                    batch_keys.append(record_key(record))
                except CorruptSample as exc:
                    corrupt += 1
                    log.warning("skipping corrupt sample %s: %s", record_key(record), exc)
            if images:
                with torch.no_grad():
                    pixels = vision.preprocess(images).to(torch_device)
                    feats.append(vision(pixels).float().cpu().numpy().astype(DTYPES[dtype]))
                keys += batch_keys
            bar.update(len(chunk[start : start + batch_size]))
        corrupt += len(stream_errors) - errors_before
        array = (
            np.concatenate(feats)
            if feats
            else np.zeros((0, vision.n_tokens, vision.feature_dim), DTYPES[dtype])
        )
        write_part(out, part, array, keys, shard_records)
    bar.close()
    index = cache_index(cfg_model, vision, dtype, n_parts, n_records)
    write_index(out, index)
    if corrupt:
        log.warning("%d corrupt records were skipped (they are skipped in training too)", corrupt)
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="python -m minigpt4 cache-features",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--cfg-path", required=True, help="the train YAML whose data and vision model to use")
    parser.add_argument("--out", default=None, help="output folder (default: the config's data.features)")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="images encoded at once")
    parser.add_argument("--part-size", type=int, default=4096, help="records per stored part")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="dtype the features are stored in"
    )
    add_config_args(parser, "data.features=data/feats")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Pre-compute the frozen features of a training config's data; see `cache-features --help`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = config_overrides(parser, args)
    try:
        cfg = load_train_config(args.cfg_path, overrides)
        out = args.out or cfg.data.features
        if out is None:
            raise ConfigError("give --out, or set data.features in the config")
        index = cache_features(
            cfg.data, cfg.model, Path(out), args.batch_size, args.part_size, args.dtype, args.device
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cached features of {index['records']} records in {out}; train with data.features={out}")
    return 0
