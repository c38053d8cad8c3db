"""Step 1: describe every image with the stage-1 model, the paper's way (DESIGN §5.2).

The model is asked the paper's prompt; while the joined answer has fewer than `min_words` words it is
asked "Continue" in the same conversation, for at most `max_rounds` answers in all.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minigpt4.commands.common import add_generation_args, add_model_args, chat_from_args
from minigpt4.curate.records import JsonlWriter, WorkDir, count_words, latest_by_id, read_jsonl
from minigpt4.curate.sources import SourceImage, iter_source
from minigpt4.errors import InputError

log = logging.getLogger(__name__)

GENERATE_PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_PROMPT = "Continue"


@dataclass(frozen=True)
class GenerateSettings:
    min_words: int = 80
    max_rounds: int = 3
    overrides: tuple[
        tuple[str, Any], ...
    ] = ()  # decoding settings passed to Chat.answer; others: the preset's

    def __post_init__(self) -> None:
        if self.min_words < 0:
            raise ValueError(f"min_words must be >= 0, got {self.min_words}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")


def describe(chat: Any, image: Path, settings: GenerateSettings) -> list[str]:
    """The model's answers about `image`: the first, then one per "Continue" while under `min_words`."""
    session = chat.new_session()
    chat.upload_image(session, image)
    chat.ask(session, GENERATE_PROMPT)
    answers = [chat.answer(session, **dict(settings.overrides)).strip()]
    while count_words(" ".join(answers)) < settings.min_words and len(answers) < settings.max_rounds:
        chat.ask(session, CONTINUE_PROMPT)
        answers.append(chat.answer(session, **dict(settings.overrides)).strip())
    return answers


def generate(
    load_chat: Callable[[], Any],
    images: Iterator[SourceImage],
    work: WorkDir,
    settings: GenerateSettings,
    total: int | None = None,
    limit: int | None = None,
) -> dict[str, int]:
    """Describe each image not yet in `work.generate`, appending one record per image as it finishes.

    `load_chat` is called only when there is an image left to describe. An image the model cannot
    read gets a record with its `error`. Returns counts: done before, described, errors.
    """
    done = set(latest_by_id(read_jsonl(work.generate)))
    counts = {"already_done": 0, "described": 0, "errors": 0}
    chat = None
    with JsonlWriter(work.generate) as out, tqdm(total=total, desc="generate", unit="img") as bar:
        for item in images:
            bar.update()
            if item.image_id in done:
                counts["already_done"] += 1
                continue
            if limit is not None and counts["described"] + counts["errors"] >= limit:
                break
            if item.data is not None:
                _write_once(item.path, item.data)
            chat = chat or load_chat()
            record: dict[str, Any] = {"image_id": item.image_id, "image": str(item.path)}
            started = time.perf_counter()
            try:
                answers = describe(chat, item.path, settings)
            except InputError as e:
                log.warning("%s: %s", item.path, e)
                record["error"] = str(e)
                counts["errors"] += 1
            else:
                raw = " ".join(a for a in answers if a)
                record.update(raw=raw, answers=answers, words=count_words(raw), preset=chat.preset_name)
                counts["described"] += 1
            record["seconds"] = round(time.perf_counter() - started, 3)
            out.write(record)
    return counts


def _write_once(path: Path, data: bytes) -> None:
    """Unpack a shard image; written under a temporary name first so a kill never leaves half a file."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    add_model_args(parser)
    add_generation_args(parser)


def run(args: argparse.Namespace, work: WorkDir) -> int:
    """`curate generate`: describe the images of a folder or of webdataset shards."""
    chosen = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False if args.greedy else None,
    }
    overrides = tuple((k, v) for k, v in chosen.items() if v is not None)
    settings = GenerateSettings(args.min_words, args.max_rounds, overrides)
    images, total = iter_source(args.source, work.images)
    counts = generate(lambda: chat_from_args(args), images, work, settings, total=total, limit=args.limit)
    print(
        f"generate: {counts['described']} described, {counts['errors']} unreadable, "
        f"{counts['already_done']} already done → {work.generate}"
    )
    return 0
