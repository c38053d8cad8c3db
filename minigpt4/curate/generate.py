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

from minigpt4.curate.records import JsonlWriter, WorkDir, count_words, latest_by_id, read_jsonl
from minigpt4.curate.sources import SourceImage, iter_source

log = logging.getLogger(__name__)

GENERATE_PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_PROMPT = "Continue"


@dataclass(frozen=True)
class GenerateSettings:
    min_words: int = 80
    max_rounds: int = 3
    overrides: tuple[tuple[str, Any], ...] = ()  # generation overrides passed to Chat.answer

    def __post_init__(self) -> None:
        if self.min_words < 0:
            raise ValueError(f"min_words must be >= 0, got {self.min_words}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")


def describe(chat: Any, image: Path, settings: GenerateSettings) -> list[str]:
    """The model's answers about `image`: the first, then one per "Continue" while under `min_words`."""
    overrides = dict(settings.overrides)
    session = chat.new_session()
    chat.upload_image(session, image)
    chat.ask(session, GENERATE_PROMPT)
    answers = [chat.answer(session, **overrides).strip()]
    while count_words(" ".join(answers)) < settings.min_words and len(answers) < settings.max_rounds:
        chat.ask(session, CONTINUE_PROMPT)
        answers.append(chat.answer(session, **overrides).strip())
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
    from minigpt4.errors import InputError

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
        "--preset", default=None, help="model preset name or eval-config path (default: the embedded one)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset key, e.g. model.projection.checkpoint=stage1.safetensors",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda when available)")
    parser.add_argument(
        "--min-words", type=int, default=80, help="ask 'Continue' while the answer is shorter (paper: 80)"
    )
    parser.add_argument(
        "--max-rounds", type=int, default=3, help="at most this many answers per image, 'Continue' included"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per answer (default: the preset's)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the preset's")
    parser.add_argument("--num-beams", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--limit", type=int, default=None, help="describe at most this many new images in this run"
    )


def run(args: argparse.Namespace, work: WorkDir) -> int:
    """`curate generate`: describe the images of a folder or of webdataset shards."""
    from minigpt4.chat import load_chat

    overrides = tuple(
        (name, value)
        for name, value in (
            ("max_new_tokens", args.max_new_tokens),
            ("temperature", args.temperature),
            ("num_beams", args.num_beams),
        )
        if value is not None
    )
    settings = GenerateSettings(args.min_words, args.max_rounds, overrides)
    images, total = iter_source(args.source, work.images)
    counts = generate(
        lambda: load_chat(args.preset, device=args.device, overrides=args.overrides),
        images,
        work,
        settings,
        total=total,
        limit=args.limit,
    )
    print(
        f"generate: {counts['described']} described, {counts['errors']} unreadable, "
        f"{counts['already_done']} already done → {work.generate}"
    )
    return 0
