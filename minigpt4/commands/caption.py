"""`python -m minigpt4 caption IMAGES_OR_DIRS… --out captions.jsonl`: describe many images.

Writes one JSON line per image ({"image", "caption", "prompt", "preset"}), flushed as each is
done. Re-running with the same --out skips images already described, so an interrupted run
continues where it stopped. Only JSON lines go to standard output; progress (one step per image),
messages and errors go to standard error. Unreadable images are reported and skipped; the exit
status is then 1. A wrong flag, preset, `--options` key, device, `--out` or checkpoint stops the
command before any image is read, with one line naming it and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from minigpt4.commands.common import (
    CommandParser,
    add_generation_args,
    add_model_args,
    add_threads_arg,
    chat_or_exit,
    check_generation_args,
    check_model_args,
    params_from_args,
)
from minigpt4.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image."


def find_images(items: Iterable[str]) -> list[Path]:
    """Files as given, and the image files inside directories (recursively, sorted); a file named
    twice, or by two spellings (`a.jpg`, `./a.jpg`, a link to it), is kept once, where it first came."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    seen: set[Path] = set()
    unique = []
    for path in found:
        if (identity := _identity(path)) not in seen:
            seen.add(identity)
            unique.append(path)
    return unique


def _identity(path: Path | str) -> Path:
    """One name for one file, whatever the spelling it was given by."""
    return Path(path).resolve()


def done_images(out: Path) -> set[Path]:
    """The files already captioned in an output file (a torn last line from a killed run is ignored)."""
    if not out.is_file():
        return set()
    done = set()
    for line in out.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            done.add(_identity(json.loads(line)["image"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError):
            continue
    return done


def drop_torn_line(out: Path) -> None:
    """Cut a last line that a killed run left without its newline, so the next record starts on a
    line of its own instead of being glued to the fragment (which would lose both)."""
    if not out.is_file():
        return
    with out.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
        log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", out, size - keep)


def check_out(out: Path | None) -> str | None:
    """Why `--out` cannot be written to (None when it can): tried by opening it, since permission
    bits do not tell root, or a file system such as /sys, what it may write."""
    if out is None:
        return None
    if out.is_dir():
        return f"--out {out}: is a folder; give a file name such as {out / 'captions.jsonl'}"
    if not out.parent.is_dir():
        return f"--out {out}: the folder {out.parent} does not exist"
    existed = out.exists()
    try:
        with out.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"--out {out}: cannot be written ({exc.strerror or exc})"
    if not existed:
        out.unlink()
    return None


def main(argv: list[str]) -> int:
    parser = CommandParser(
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
    add_threads_arg(parser)
    add_generation_args(parser)
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error("--prompt is empty: give the question to ask about each image")
    problem = check_out(args.out)
    if problem:
        parser.error(problem)
    cfg = check_model_args(parser, args)
    check_generation_args(parser, args, cfg)
    if len(args.prompt.strip()) > cfg.max_message_chars:
        parser.error(
            f"--prompt is {len(args.prompt):,} characters long; the limit is {cfg.max_message_chars:,}"
        )

    images = find_images(args.images)
    if not images:
        parser.error(f"no image files in {' '.join(args.images)}")
    done = done_images(args.out) if args.out else set()
    todo = [p for p in images if _identity(p) not in done]
    if len(todo) < len(images):
        log.info("%d of %d images already in %s: skipped", len(images) - len(todo), len(images), args.out)
    if not todo:
        return 0
    chat = chat_or_exit(args)
    params = params_from_args(chat, args)
    failed = 0
    if args.out:
        drop_torn_line(args.out)
    out = args.out.open("a", encoding="utf-8") if args.out else sys.stdout
    try:
        for path in tqdm(todo, desc="captioning", unit="img", file=sys.stderr, disable=False):
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
