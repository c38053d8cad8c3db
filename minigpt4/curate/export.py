"""Step 5: approved records → the `cc_sbu_align` layout that stage-2 training reads (docs/method.md §4).

    OUT/filter_cap.json   {"annotations": [{"image_id": …, "caption": …}, …]}
    OUT/image/{image_id}.jpg

JPEG sources are copied byte for byte, others converted. Images already there are kept, each is
written under a temporary name first, and `filter_cap.json` is replaced in one step at the end, so
a killed export restarted finishes the job without redoing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from minigpt4.curate.records import CurateError, WorkDir, latest_by_id, read_jsonl
from minigpt4.files import write_atomic, write_text_atomic

log = logging.getLogger(__name__)


def approved_captions(work: WorkDir, include_undecided: bool = False) -> list[dict[str, str]]:
    """`{"image_id", "image", "caption"}` of each approved record (and of each undecided record that
    passed the filter, when `include_undecided`), in the order they were generated."""
    generated = latest_by_id(read_jsonl(work.require(work.generate, "generate")))
    judged = latest_by_id(read_jsonl(work.filter))
    decisions = latest_by_id(read_jsonl(work.review))
    chosen = []
    for image_id, gen in generated.items():
        decision = decisions.get(image_id)
        verdict = judged.get(image_id)
        if decision and decision["decision"] == "approved":
            caption = decision["text"]
        elif include_undecided and not (decision and decision["decision"]) and verdict and verdict["passed"]:
            caption = decision["text"] if decision else verdict["text"]
        else:
            continue
        if not caption.strip():
            log.warning("%s was approved with an empty description; left out", image_id)
            continue
        chosen.append({"image_id": image_id, "image": gen["image"], "caption": caption.strip()})
    return chosen


def write_jpeg(source: Path, target: Path) -> None:
    """`source` as a JPEG at `target`, never leaving a partial file behind."""

    def write(tmp: Path) -> None:
        with Image.open(source) as image:
            if image.format == "JPEG":
                shutil.copyfile(source, tmp)
            else:
                image.convert("RGB").save(tmp, "JPEG", quality=95)

    try:
        write_atomic(target, write)
    except OSError as e:
        raise CurateError(f"cannot export {source}: {e}") from e


def export(work: WorkDir, out: Path, include_undecided: bool = False) -> list[dict[str, str]]:
    """Write the `cc_sbu_align` folder; returns its annotations."""
    chosen = approved_captions(work, include_undecided)
    if not chosen:
        hint = "approve some in `curate review`" + (
            "" if include_undecided else " or pass --include-undecided"
        )
        raise CurateError(f"no records to export: {hint}")
    image_dir = out / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    for record in tqdm(chosen, desc="export", unit="img"):
        target = image_dir / f"{record['image_id']}.jpg"
        if not target.exists():
            write_jpeg(Path(record["image"]), target)
    annotations = [{"image_id": r["image_id"], "caption": r["caption"]} for r in chosen]
    write_text_atomic(
        out / "filter_cap.json", json.dumps({"annotations": annotations}, ensure_ascii=False, indent=1)
    )
    extra = {p.stem for p in image_dir.glob("*.jpg")} - {r["image_id"] for r in annotations}
    if extra:
        log.info(
            "%d images in %s are no longer approved; filter_cap.json leaves them out", len(extra), image_dir
        )
    return annotations


def pipeline_summary(work: WorkDir, exported: int) -> list[tuple[str, int, int, str]]:
    """(step, records in, records out, note) for each step of the work folder."""
    generated = latest_by_id(read_jsonl(work.generate)).values()
    refined = latest_by_id(read_jsonl(work.refine)).values()
    judged = latest_by_id(read_jsonl(work.filter)).values()
    ids_passed = {r["image_id"] for r in judged if r["passed"]}
    decided = [
        r["decision"] for r in latest_by_id(read_jsonl(work.review)).values() if r["image_id"] in ids_passed
    ]
    described = sum("raw" in r for r in generated)
    n_refined = sum("refined" in r for r in refined)
    approved, rejected = decided.count("approved"), decided.count("rejected")
    return [
        ("generate", len(generated), described, f"{len(generated) - described} unreadable"),
        ("refine", described, n_refined, f"{len(refined) - n_refined} refused by the server"),
        ("filter", len(judged), len(ids_passed), f"{len(judged) - len(ids_passed)} rejected by rules"),
        (
            "review",
            len(ids_passed),
            approved,
            f"{rejected} rejected, {len(ids_passed) - approved - rejected} undecided",
        ),
        ("export", exported, exported, ""),
    ]


def format_pipeline_summary(rows: list[tuple[str, int, int, str]]) -> str:
    lines = [f"{'step':<9} {'in':>6} {'out':>6}  note"]
    lines += [f"{step:<9} {n_in:>6} {n_out:>6}  {note}".rstrip() for step, n_in, n_out, note in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="the cc_sbu_align folder to write")
    parser.add_argument(
        "--include-undecided",
        action="store_true",
        help="also export records that passed the filter and were not reviewed (skips the manual check)",
    )


def run(args: argparse.Namespace, work: WorkDir) -> int:
    """`curate export`: write the approved records as a cc_sbu_align folder."""
    annotations = export(work, args.out, args.include_undecided)
    print(format_pipeline_summary(pipeline_summary(work, len(annotations))))
    print(f"export: {len(annotations)} image-text pairs → {args.out}")
    return 0
