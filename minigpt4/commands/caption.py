"""`python -m minigpt4 caption IMAGES_OR_DIRS… --out captions.jsonl`: describe many images.

Writes one JSON line per image ({"image", "caption", "prompt", "preset"}), flushed as each is
done. Re-running with the same --out skips images already described, so an interrupted run
continues where it stopped. Under `torchrun --nproc_per_node N` (or `accelerate launch`) each
process captions its share into a part beside --out, and the first merges them into --out. Only
JSON lines go to standard output; progress (one step per image), messages and errors go to
standard error. Unreadable images are reported and skipped; the exit
status is then 1. A wrong flag, preset, `--options` key, device, `--out` or checkpoint stops the
command before any image is read, with one line naming it and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from minigpt4.commands.common import (
    CommandParser,
    HelpFormatter,
    add_generation_args,
    add_model_args,
    add_threads_arg,
    chat_or_exit,
    check_generation_args,
    check_model_args,
    params_from_args,
)
from minigpt4.commands.ranks import Rank, RankedJsonl, RowSink, job_digest, read_rows
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


def image_key(row: dict) -> Path | None:
    """The file a caption row is about (None for a row that names none)."""
    try:
        return _identity(row["image"])
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _other_job(out: Path, rows: Iterable[dict], prompt: str, preset: str) -> str | None:
    """Why the `rows` already in `out` cannot be resumed by this run (None when they can): they were
    made with another prompt or preset, so skipping their images would keep answers to another
    question."""
    for row in rows:
        made = (row.get("prompt"), row.get("preset"))
        if made != (prompt, preset):
            return (
                f"--out {out} holds captions made with --prompt {made[0]!r} and preset {made[1]!r}, not "
                f"{prompt!r} and {preset!r}: give another --out, or the same prompt and preset to continue it"
            )
    return None


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
        out.unlink(missing_ok=True)  # the other ranks of a job try the same file at the same time
    return None


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="python -m minigpt4 caption",
        description=__doc__,
        formatter_class=HelpFormatter,
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

    missing = [item for item in args.images if not Path(item).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    images = find_images(args.images)
    if not images:
        parser.error(f"no image files in {' '.join(args.images)}")
    written = read_rows(args.out) if args.out is not None else []
    if problem := _other_job(args.out, written, args.prompt, cfg.name):
        parser.error(problem)
    rank = Rank.from_env()
    if rank.world > 1 and args.out is None:
        parser.error(f"--out is required with {rank.world} processes (each writes a part beside it)")
    if args.out is None:
        return _caption(args, images, images, None, rank)
    job = job_digest([str(p) for p in images], args.prompt, args.cfg_path, args.options, rank.world)
    ranked = RankedJsonl(args.out, rank, image_key, job)
    in_out = {image_key(row) for row in written}
    pending = [p for p in images if _identity(p) not in in_out]
    if len(pending) < len(images):
        log.info("%d of %d images already in %s: skipped", len(images) - len(pending), len(images), args.out)
    done = in_out | ranked.done_keys()
    todo = [p for p in rank.share(images) if _identity(p) not in done]
    failed = _caption(args, pending, todo, ranked, rank)
    if rank.main:  # alone too: rows a job of several processes left in parts join --out
        ranked.merge([_identity(p) for p in images])
    return failed


def _caption(
    args: argparse.Namespace, pending: list[Path], todo: list[Path], ranked: RankedJsonl | None, rank: Rank
) -> int:
    """Caption `todo` (this rank's share of the `pending` images) into its file; the exit status."""
    if rank.world > 1:
        log.info(
            "%s: %d images of its share to caption (%d pending in all)", rank.name, len(todo), len(pending)
        )
    chat = None
    if todo:
        args.device = rank.device(args.device)
        chat = chat_or_exit(args)
        params = params_from_args(chat, args)
    failed = 0
    started = time.perf_counter()
    with _sink(ranked, len(pending)) as sink:
        for path in todo:
            session = chat.new_session()
            try:
                chat.upload_image(session, path)
                chat.add_question(session, args.prompt)
                caption = chat.answer(session, params)
            except InputError as exc:
                failed += 1
                log.error("%s: skipped: %s", path, exc)
                sink.advance()
                continue
            record = {
                "image": str(path),
                "caption": caption,
                "prompt": args.prompt,
                "preset": chat.preset_name,
            }
            sink.write(record)
            sink.advance()
    if todo:
        seconds = time.perf_counter() - started
        log.info(
            "%s: %d images in %.1f s (%.2f images/s)", rank.name, len(todo), seconds, len(todo) / seconds
        )
    if failed:
        log.error("%d of %d images could not be read", failed, len(todo))
    return 1 if failed else 0


@contextmanager
def _sink(ranked: RankedJsonl | None, total: int) -> Iterator[RowSink]:
    """Rows to standard output (no --out), or to --out / this rank's part."""
    if ranked is not None:
        with ranked.rows(total, "captioning", "img") as sink:
            yield sink
        return
    with tqdm(total=total, desc="captioning", unit="img", file=sys.stderr) as bar:
        yield RowSink(sys.stdout, bar, None, sync=False)
