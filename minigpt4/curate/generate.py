"""Step 1: describe every image with the stage-1 model, the paper's way (docs/method.md §5).

Under `torchrun` / `accelerate launch` each process describes its share (`minigpt4.commands.ranks`).
The model is asked the paper's prompt; while the joined answer has fewer than `min_words` words it is
asked "Continue" in the same conversation, for at most `max_rounds` answers in all.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt4.chat import Chat
from minigpt4.commands.common import add_generation_args, add_model_args, chat_from_args
from minigpt4.commands.ranks import Rank, RankedJsonl, RowSink, job_digest
from minigpt4.conversation import Conversation
from minigpt4.curate.records import CurateError, WorkDir, count_words, latest_by_id, read_jsonl
from minigpt4.curate.sources import SourceImage, iter_source
from minigpt4.errors import InputError
from minigpt4.eval.answer import BatchAnswerer
from minigpt4.files import write_bytes_atomic
from minigpt4.images import load_image

log = logging.getLogger(__name__)

GENERATE_PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_PROMPT = "Continue"


@dataclass(frozen=True)
class GenerateSettings:
    min_words: int = 80
    max_rounds: int = 3
    # Decoding settings passed to Chat.answer (max_new_tokens, temperature, …); the rest: the preset's.
    overrides: tuple[tuple[str, Any], ...] = ()
    batch_size: int = 1  # above 1: images decoded together, greedily

    def __post_init__(self) -> None:
        if self.min_words < 0:
            raise CurateError(f"min_words must be >= 0, got {self.min_words}")
        if self.max_rounds < 1:
            raise CurateError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.batch_size < 1:
            raise CurateError(f"batch_size must be >= 1, got {self.batch_size}")
        sampling = sorted({name for name, _ in self.overrides} - {"max_new_tokens", "do_sample"})
        if self.batch_size > 1 and sampling:
            raise CurateError(f"a batch is decoded greedily: {', '.join(sampling)} needs batch size 1")


def describe(chat: Chat, image: Path, settings: GenerateSettings) -> list[str]:
    """The model's answers about `image`: the first, then one per "Continue" while under `min_words`."""
    session = chat.new_session()
    chat.upload_image(session, image)
    chat.add_question(session, GENERATE_PROMPT)
    answers = [chat.answer(session, **dict(settings.overrides)).strip()]
    while _wants_more(answers, settings):
        chat.add_question(session, CONTINUE_PROMPT)
        answers.append(chat.answer(session, **dict(settings.overrides)).strip())
    return answers


def describe_batch(chat: Chat, images: list[Path], settings: GenerateSettings) -> list[list[str]]:
    """`describe` for several images at once, greedily: each round decodes the images still short."""
    max_new_tokens = dict(settings.overrides).get("max_new_tokens", chat.defaults.max_new_tokens)
    answerer = BatchAnswerer(chat, max_new_tokens)
    conversations = [Conversation(chat.processor.template) for _ in images]
    for conversation in conversations:
        conversation.add_image()
        conversation.add_user(GENERATE_PROMPT)
    answers: list[list[str]] = [[] for _ in images]
    active = list(range(len(images)))
    while active:
        replies = answerer.answer_conversations(
            [images[i] for i in active], [conversations[i] for i in active]
        )
        for i, reply in zip(active, replies, strict=True):
            answers[i].append(reply.strip())
            conversations[i].add_assistant(reply.strip())
            conversations[i].add_user(CONTINUE_PROMPT)
        active = [i for i in active if _wants_more(answers[i], settings)]
    return answers


def _wants_more(answers: list[str], settings: GenerateSettings) -> bool:
    return count_words(" ".join(answers)) < settings.min_words and len(answers) < settings.max_rounds


def describe_records(
    chat: Chat, batch: list[SourceImage], settings: GenerateSettings
) -> list[dict[str, Any]]:
    """One record per image of `batch`: its answers joined as `raw`, or the `error` that stopped it."""
    records = {item.image_id: {"image_id": item.image_id, "image": str(item.path)} for item in batch}
    started = time.perf_counter()
    results: dict[str, list[str]] = {}
    readable = []
    for item in batch:
        try:
            if settings.batch_size == 1:
                results[item.image_id] = describe(chat, item.path, settings)
            else:
                load_image(item.path, chat.max_image_pixels)  # one bad image must not sink the batch
                readable.append(item)
        except InputError as e:
            log.warning("%s: %s", item.path, e)
            records[item.image_id]["error"] = str(e)
    if readable:
        answers = describe_batch(chat, [item.path for item in readable], settings)
        results.update(zip([item.image_id for item in readable], answers, strict=True))
    for image_id, answers in results.items():
        raw = " ".join(a for a in answers if a)
        records[image_id].update(raw=raw, answers=answers, words=count_words(raw), preset=chat.preset_name)
    for record in records.values():
        record["seconds"] = round((time.perf_counter() - started) / len(batch), 3)
    return list(records.values())


def generate(
    load_chat: Callable[[], Chat],
    images: Iterator[SourceImage],
    work: WorkDir,
    settings: GenerateSettings,
    total: int | None = None,
    limit: int | None = None,
    rank: Rank | None = None,
    job: str = "",
) -> dict[str, int]:
    """Describe each image not yet in `work.generate`, appending each record as its batch finishes.

    `load_chat` is called only when there is an image left to describe. An image the model cannot
    read gets a record with its `error`. With several processes (`rank`), each describes every
    `world`-th of the images not yet described into its part, and the first merges the parts (see
    `minigpt4.commands.ranks`; `job` names the run in the markers). Returns counts: done before,
    described, errors.
    """
    rank = rank or Rank()
    in_out = set(latest_by_id(read_jsonl(work.generate)))
    ranked = RankedJsonl(work.generate, rank, lambda record: record.get("image_id"), job)
    done = in_out | ranked.done_keys()
    counts = {"already_done": 0, "described": 0, "errors": 0}
    order: list[str] = []
    chat = None
    with ranked.rows(total if rank.world == 1 else None, "generate", "img") as sink:
        for batch in _pending_batches(
            images, in_out, done, rank, settings.batch_size, limit, counts, order, sink
        ):
            chat = chat or load_chat()
            for record in describe_records(chat, batch, settings):
                sink.write(record)
                counts["errors" if "error" in record else "described"] += 1
            sink.advance(len(batch))
    if rank.main:
        ranked.merge(order)
    return counts


def _pending_batches(
    images: Iterator[SourceImage],
    in_out: set[str],
    done: set,
    rank: Rank,
    batch_size: int,
    limit: int | None,
    counts: dict[str, int],
    order: list[str],
    sink: RowSink,
) -> Iterator[list[SourceImage]]:
    """Batches of this rank's images not done yet (shard images unpacked).

    The images not yet in the output are numbered in source order (`order`), at most `limit` of
    them; this rank takes every `world`-th and skips those its part (or an older run's) holds.
    """
    batch: list[SourceImage] = []
    for item in images:
        if item.image_id in in_out:
            counts["already_done"] += 1
            if rank.world == 1:
                sink.advance()
            continue
        if limit is not None and len(order) >= limit:
            break
        order.append(item.image_id)
        if (len(order) - 1) % rank.world != rank.rank:
            continue
        if item.image_id in done:
            counts["already_done"] += 1
            sink.advance()
            continue
        if item.data is not None:
            _write_once(item.path, item.data)
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_once(path: Path, data: bytes) -> None:
    """Unpack a shard image; written under a temporary name first so a kill never leaves half a file."""
    if path.exists():
        return
    write_bytes_atomic(path, data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="a folder of images, or webdataset shards (a .tar, a folder of them, a {000..009} pattern)",
    )
    parser.add_argument(
        "--min-words", type=int, default=80, help="ask 'Continue' while the answer is shorter (paper: 80)"
    )
    parser.add_argument(
        "--max-rounds", type=int, default=3, help="at most this many answers per image, 'Continue' included"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="describe at most this many new images in this run"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images decoded together (greedy; default 1: one Chat conversation per image, the preset's sampling)",
    )
    add_model_args(parser)
    add_generation_args(parser)


def run(args: argparse.Namespace, work: WorkDir) -> int:
    """`curate generate`: describe the images of a folder or of webdataset shards."""
    chosen = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False if args.greedy else (True if args.sample else None),
    }
    overrides = tuple((k, v) for k, v in chosen.items() if v is not None)
    settings = GenerateSettings(args.min_words, args.max_rounds, overrides, args.batch_size)
    images, total = iter_source(args.source, work.images)
    rank = Rank.from_env()
    args.device = rank.device(args.device)
    job = job_digest(args.source, settings, args.limit, args.cfg_path, args.options, rank.world)
    counts = generate(
        lambda: chat_from_args(args),
        images,
        work,
        settings,
        total=total,
        limit=args.limit,
        rank=rank,
        job=job,
    )
    if not rank.main:
        return 0
    print(
        f"generate: {counts['described']} described, {counts['errors']} unreadable, "
        f"{counts['already_done']} already done → {work.generate}"
    )
    return 0
