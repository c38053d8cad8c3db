"""`python -m minigpt4 make-data lite-mix`: the stage-2 mixture of the lite model, in one
`cc_sbu_align` folder with its feature cache.

Each source is a `cc_sbu_align` folder: the closed questions of `make-data lite`, the teacher's
answers of `make-data lite-teach`, the curated detailed descriptions of `curate export`. Their
examples are put side by side (ids prefixed with the source's name, so that they cannot collide),
optionally repeated (`NAME=PATH*2`: each example twice, as two examples; `NAME=PATH*0.5`: a seeded
half of them, `*1.5` all once and a seeded half again), shuffled with a seed,
and the frozen features of every example are written once (`minigpt4.lite.data.write_stage2_features`).
A curated description has no instruction of its own: it gets one of the original's stage-2
instructions (`DETAIL_INSTRUCTIONS`), drawn with the seed.

    <out>/cc_sbu_align/filter_cap.json   every example; "source" names where it came from
    <out>/cc_sbu_align/image/            the sources' pictures (hard links where the disk allows)
    <out>/stage2_features/               the feature cache (`data.features` of the stage-2 config)
    <out>/counts.json                    examples per source
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from minigpt4.commands.common import HelpFormatter
from minigpt4.files import write_text_atomic
from minigpt4.lite.data import FEATURES_DIR, write_stage2_features
from minigpt4.packages import MissingPackageError

# The original's stage-2 instructions (a sample of its list), for examples that have none.
DETAIL_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
_SOURCE = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)=(?P<path>[^*]+)(?:\*(?P<repeat>[0-9]+(?:\.[0-9]+)?))?$")


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    repeat: float = 1

    @classmethod
    def parse(cls, text: str) -> Source:
        """ "teach=data/lite/teach/cc_sbu_align*2" → Source("teach", …, 2.0)."""
        match = _SOURCE.match(text)
        if not match:
            raise ValueError(f"--source {text!r}: expected NAME=PATH or NAME=PATH*REPEAT (NAME: a-z, 0-9, _)")
        repeat = float(match["repeat"] or 1)
        if repeat <= 0:
            raise ValueError(f"--source {text!r}: REPEAT must be above 0")
        return cls(match["name"], Path(match["path"]), repeat)


def _copies(annotations: list[dict], repeat: float, rng: random.Random) -> list[list[dict]]:
    """The copies of a source's examples: `int(repeat)` whole ones, then a seeded sample of the rest
    (`round(fraction × n)` examples, at least one where the fraction is not zero)."""
    whole, fraction = int(repeat), repeat - int(repeat)
    copies = [annotations] * whole
    if fraction > 1e-9:
        copies.append(rng.sample(annotations, max(1, round(fraction * len(annotations)))))
    return copies


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def read_source(source: Source) -> list[dict]:
    path = source.path / "filter_cap.json"
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{source.name}: {path} is not a cc_sbu_align annotation file ({exc})") from exc
    if not annotations:
        raise ValueError(f"{source.name}: {path} holds no example")
    return annotations


def mix(sources: list[Source], out: Path, seed: int) -> dict[str, int]:
    """Write the mixture's annotations and images under `out`; returns examples per source."""
    if len({s.name for s in sources}) != len(sources):
        raise ValueError("each --source needs its own NAME")
    rng = random.Random(seed)
    image_dir = out / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    mixed, counts = [], {}
    for source in sources:
        annotations = read_source(source)
        for a in annotations:
            for key in ("image_id", "cells", "colour"):
                picture = a.get(key)
                if picture and (source.path / "image" / f"{picture}.jpg").exists():
                    _link(
                        source.path / "image" / f"{picture}.jpg", image_dir / f"{source.name}-{picture}.jpg"
                    )
        copies = _copies(annotations, source.repeat, rng)
        for copy, examples in enumerate(copies):
            for a in examples:
                row = dict(a)
                suffix = f"-{copy}" if copy else ""
                row["image_id"] = f"{source.name}-{a['image_id']}{suffix}"
                for key in ("cells", "colour"):
                    if row.get(key):
                        row[key] = f"{source.name}-{row[key]}"
                if "classes" not in row and copy:  # a scene's repeat reads the same picture
                    _link(
                        image_dir / f"{source.name}-{a['image_id']}.jpg", image_dir / f"{row['image_id']}.jpg"
                    )
                row.setdefault("instruction", rng.choice(DETAIL_INSTRUCTIONS))
                row["source"] = source.name
                mixed.append(row)
        counts[source.name] = sum(len(examples) for examples in copies)
    rng.shuffle(mixed)
    write_text_atomic(out / "filter_cap.json", json.dumps({"annotations": mixed}, indent=1))
    return counts


def add_parser(sets: argparse._SubParsersAction) -> None:
    """Register `make-data lite-mix`."""
    p = sets.add_parser(
        "lite-mix",
        formatter_class=HelpFormatter,
        help="the lite stage-2 mixture of several cc_sbu_align sets, with features",
    )
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=PATH[*REPEAT]",
        help="a cc_sbu_align folder and its name; *REPEAT puts each example in REPEAT times, a fraction "
        "(*0.5, *1.5) a seeded sample for the part below one (repeatable)",
    )
    p.add_argument("--out", default="data/lite/mix", help="output folder (default: data/lite/mix)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle's seed")
    p.add_argument(
        "--cfg-path",
        default="train_configs/lite_stage2.yaml",
        help="the stage-2 config whose vision and source name the features are written for",
    )
    p.set_defaults(run=make_mix)


def make_mix(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        sources = [Source.parse(text) for text in args.source]
        counts = mix(sources, out / "cc_sbu_align", args.seed)
        write_stage2_features(out / "cc_sbu_align", out / FEATURES_DIR, args.cfg_path)
    except (ValueError, OSError, MissingPackageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_text_atomic(out / "counts.json", json.dumps(counts, indent=1))
    total = sum(counts.values())
    print(f"mixture: {total} examples → {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
