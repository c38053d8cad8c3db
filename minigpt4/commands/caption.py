"""`python -m minigpt4 caption IMAGES_OR_DIRS… --out captions.jsonl`: describe many images.

Writes one JSON line per image ({"image", "caption", "prompt", "preset"}), flushed as each is
done. Re-running with the same --out skips images already described, so an interrupted run
continues where it stopped. Unreadable images are reported and skipped; the exit status is 1
if any were.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from minigpt4.commands.common import add_generation_args, add_model_args, chat_from_args, params_from_args
from minigpt4.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image."


def find_images(items: Iterable[str]) -> list[Path]:
    """Files as given, and the image files inside directories (recursively, sorted)."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found


def done_images(out: Path) -> set[str]:
    """Images already in an output file (a torn last line from a killed run is ignored)."""
    if not out.is_file():
        return set()
    done = set()
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            done.add(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minigpt4 caption",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files or directories")
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"question asked about each image ({DEFAULT_PROMPT!r})"
    )
    parser.add_argument("--out", type=Path, help="JSONL output (default: standard output)")
    add_model_args(parser)
    add_generation_args(parser)
    args = parser.parse_args(argv)

    images = find_images(args.images)
    done = done_images(args.out) if args.out else set()
    todo = [p for p in images if str(p) not in done]
    if len(todo) < len(images):
        log.info("%d of %d images already in %s: skipped", len(images) - len(todo), len(images), args.out)
    if not todo:
        return 0
    chat = chat_from_args(args)
    params = params_from_args(chat, args)
    failed = 0
    out = args.out.open("a", encoding="utf-8") if args.out else sys.stdout
    try:
        for path in tqdm(todo, desc="captioning", unit="img", disable=None):
            session = chat.new_session()
            try:
                chat.upload_image(session, path)
                chat.ask(session, args.prompt)
                caption = chat.answer(session, params)
            except InputError as exc:
                failed += 1
                log.error("%s: skipped: %s", path, exc)
                continue
            record = {
                "image": str(path),
                "caption": caption,
                "prompt": args.prompt,
                "preset": chat.preset_name,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        log.error("%d of %d images could not be read", failed, len(todo))
    return 1 if failed else 0
