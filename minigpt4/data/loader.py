"""From data streams to training batches: the same batches on 1 or N processes, resumable anywhere.

A *global micro-batch* `j` (all processes together) takes `per_stream` consecutive records from each
stream: records [j·per_stream, (j+1)·per_stream). Process `rank` owns the slice
[rank·b, (rank+1)·b) of that concatenation, b = batch size per process. So the data seen in a step
depends only on the global batch, and the position after `k` micro-batches is just `k`:

* N processes see, together, exactly what one process sees with an N× batch (or N× accumulation);
* when `streams` is a multiple of the process count, each process reads only its own streams,
  hence its own shards;
* a resumed run rebuilds the streams and skips undecoded records up to its position.

DataLoader workers each build whole micro-batches (decode, preprocess, tokenize, pad): worker `w`
makes micro-batches start+w, start+w+W, …, which the DataLoader hands out in order.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minigpt4.config import ModelConfig, resolve_path
from minigpt4.conversation import get_template
from minigpt4.data import stage1, stage2
from minigpt4.data.config import DataConfig, source_shards
from minigpt4.data.feature_cache import CACHED_TEXT, FeatureCache, vision_fingerprint
from minigpt4.data.labels import TextBuilder, pad_batch
from minigpt4.data.stage1 import CorruptSample
from minigpt4.errors import ImageError
from minigpt4.images import load_image
from minigpt4.processor import tokenize_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """How global micro-batches are cut from the streams and shared among processes."""

    global_micro: int  # records in a global micro-batch, all processes together
    n_streams: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.global_micro % self.n_streams or self.global_micro % self.world:
            raise ValueError(
                f"a global micro-batch of {self.global_micro} cannot be split evenly over "
                f"{self.n_streams} streams and {self.world} processes"
            )

    @property
    def per_stream(self) -> int:
        return self.global_micro // self.n_streams

    @property
    def per_rank(self) -> int:
        return self.global_micro // self.world

    def slices(self, j: int) -> list[tuple[int, int, int]]:
        """(stream, start, stop) record positions of this process's part of micro-batch `j`."""
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        out = []
        for s in range(self.n_streams):
            s_lo, s_hi = max(lo, s * self.per_stream), min(hi, (s + 1) * self.per_stream)
            if s_lo < s_hi:
                base = j * self.per_stream - s * self.per_stream
                out.append((s, base + s_lo, base + s_hi))
        return out

    def streams(self) -> list[int]:
        return [s for s, _, _ in self.slices(0)]


class _Cursor:
    """A stream read forward by position: skip records cheaply, or take the next one."""

    def __init__(self, records: Iterator[dict[str, Any]]) -> None:
        self.records = records
        self.position = 0

    def skip_to(self, position: int) -> None:
        if position < self.position:
            raise RuntimeError(f"stream cursor at {self.position} cannot go back to {position}")
        for _ in range(position - self.position):
            next(self.records)
        self.position = position

    def next(self) -> dict[str, Any]:
        record = next(self.records)
        self.position += 1
        return record


@dataclass
class Example:
    text: str
    instruction: str | None = None  # stage 2
    turns: tuple[tuple[str, str], ...] = ()  # stage 2: follow-up (question, answer) pairs
    image: Image.Image | None = None
    features: torch.Tensor | None = None


class TrainBatches(IterableDataset):
    """Endless padded micro-batches of this process, from micro-batch `start` on.

    Each batch is a dict with input_ids, attention_mask, labels, pixel_values or features, and
    `index` (the global micro-batch number) and `corrupt` (records skipped while making it).
    """

    def __init__(
        self,
        plan: BatchPlan,
        open_stream: Callable[[int, Callable[[Exception], bool]], Iterator[dict[str, Any]]],
        make_example: Callable[[dict[str, Any], int, int], Example],
        text: TextBuilder,
        preprocess: Callable[[list[Image.Image]], torch.Tensor] | None,
        pad_id: int,
        start: int = 0,
    ) -> None:
        self.plan = plan
        self.open_stream = open_stream
        self.make_example = make_example
        self.text = text
        self.preprocess = preprocess
        self.pad_id = pad_id
        self.start = start
        self._counting = False
        self._stream_errors = 0

    def _on_stream_error(self, exc: Exception) -> bool:
        # Each raw position is taken by exactly one (process, worker); only that one counts it.
        if self._counting:
            self._stream_errors += 1
            log.warning("skipping unreadable shard data: %s", exc)
        return True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        cursors = {s: _Cursor(self.open_stream(s, self._on_stream_error)) for s in self.plan.streams()}
        for j in itertools.count(self.start + worker, n_workers):
            yield self._batch(j, cursors)

    def _batch(self, j: int, cursors: dict[int, _Cursor]) -> dict[str, Any]:
        examples: list[Example] = []
        corrupt = 0
        self._stream_errors = 0
        for s, start, stop in self.plan.slices(j):
            cursors[s].skip_to(start)
            for position in range(start, stop):
                self._counting = True
                record = cursors[s].next()
                self._counting = False
                try:
                    examples.append(self.make_example(record, s, position))
                except CorruptSample as exc:
                    corrupt += 1
                    log.warning("skipping corrupt sample %s: %s", record_key(record), exc)
        corrupt += self._stream_errors
        if not examples:
            raise RuntimeError(f"every record of micro-batch {j} on this process was corrupt ({corrupt})")
        sequences = self.text.build_many([(e.text, e.instruction, e.turns) for e in examples])
        input_ids, attention_mask, labels = pad_batch(sequences, self.pad_id)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "index": j,
            "corrupt": corrupt,
        }
        if examples[0].features is not None:
            batch["features"] = torch.stack([e.features for e in examples])
        else:
            batch["pixel_values"] = self.preprocess([e.image for e in examples])
        return batch


# --- records: the raw samples of both formats ------------------------------------------------------


def record_key(record: dict[str, Any]) -> str:
    """A key unique across sources and shards (the feature cache's key)."""
    if "image_path" in record:
        return f"{record['__source__']}/{record['__key__']}"
    return stage1.sample_key(record)


def record_text(record: dict[str, Any]) -> str:
    if "image_path" in record:
        return record["caption"]
    if CACHED_TEXT in record:
        if record[CACHED_TEXT] is None:
            raise CorruptSample("no readable caption (found when the feature cache was made)")
        return record[CACHED_TEXT]
    return stage1.sample_caption(record)


def record_image(record: dict[str, Any], max_pixels: int) -> Image.Image:
    source = record["image_path"] if "image_path" in record else stage1.sample_image_bytes(record)
    try:
        return load_image(source, max_pixels)
    except ImageError as exc:
        raise CorruptSample(str(exc)) from exc


def read_prompts(path: str | Path) -> list[str]:
    """Stage-2 instructions, one per line (blank lines and `#` comments skipped)."""
    lines = [line.strip() for line in resolve_path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no instruction in the prompts file")
    return prompts


def process_shards(cfg: DataConfig, plan: BatchPlan) -> list[str]:
    """The shard files this process reads (webdataset), for the log."""
    if cfg.format != "webdataset":
        return []
    return sorted(
        Path(shard).name if len(cfg.sources) == 1 else f"{src.name}/{Path(shard).name}"
        for src in cfg.sources
        for s in plan.streams()
        for shard in source_shards(src)[s :: cfg.streams]
    )


def stream_opener(
    cfg: DataConfig, seed: int, cache: FeatureCache | None
) -> Callable[[int, Callable[[Exception], bool]], Iterator[dict[str, Any]]]:
    """A function that opens stream `s` of the configured data.

    With a feature cache, webdataset shards are read from the cache's record lists (same samples,
    same order), so training never touches the image tars.
    """
    if cfg.format == "cc_sbu_align":
        source = cfg.sources[0]
        records = stage2.read_annotations(resolve_path(source.path), source.name)
        return lambda s, on_error: stage2.annotation_stream(records, seed)
    sources = [stage1.ShardSource(src.name, tuple(source_shards(src)), src.ratio) for src in cfg.sources]

    def open_stream(s: int, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        read = cache.read_shard if cache is not None else stage1.tar_reader(on_error, cfg.max_member_bytes)
        return stage1.shard_stream(sources, s, cfg.streams, seed, cfg.shuffle_buffer, read)

    return open_stream


def example_maker(
    cfg: DataConfig, seed: int, cache: FeatureCache | None
) -> Callable[[dict[str, Any], int, int], Example]:
    """A function turning a raw record at (stream, position) into an Example."""
    prompts = read_prompts(cfg.prompts_file) if cfg.stage == 2 else None

    def make(record: dict[str, Any], stream: int, position: int) -> Example:
        # The instruction depends on the record's place in its stream only: the same on any layout.
        instruction = record.get("instruction") or (
            prompts[random.Random(f"{seed}/prompt/{stream}/{position}").randrange(len(prompts))]
            if prompts
            else None
        )
        text = record_text(record)
        turns = tuple(tuple(t) for t in record.get("turns") or ())
        if cache is None:
            return Example(text, instruction, turns, image=record_image(record, cfg.max_image_pixels))
        key = record_key(record)
        if key not in cache:
            raise CorruptSample("no cached features (the image was unreadable when the cache was made)")
        return Example(text, instruction, turns, features=cache.get(key))

    return make


def text_builder(cfg: DataConfig, model_cfg: ModelConfig, model: Any) -> TextBuilder:
    return TextBuilder(
        tokenize_prompt=lambda prompt, n_images: tokenize_prompt(
            model.tokenizer, prompt, n_images, model.n_image_tokens
        ),
        tokenizer=model.tokenizer,
        template=get_template(model_cfg.template),
        stage=cfg.stage,
        max_text_tokens=cfg.max_text_tokens,
    )


def build_loader(
    cfg: DataConfig, model_cfg: ModelConfig, model: Any, plan: BatchPlan, seed: int, start: int = 0
) -> DataLoader:
    """The DataLoader of this process's micro-batches, from global micro-batch `start` on."""
    cache = FeatureCache(resolve_path(cfg.features), vision_fingerprint(model_cfg)) if cfg.features else None
    dataset = TrainBatches(
        plan,
        stream_opener(cfg, seed, cache),
        example_maker(cfg, seed, cache),
        text_builder(cfg, model_cfg, model),
        preprocess=None if cfg.features else model.vision.preprocess,
        pad_id=model.tokenizer.pad_token_id,
        start=start,
    )
    extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers else {}
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        **extra,
    )
