"""Stage-2 data: the `cc_sbu_align` layout of curated image descriptions.

    <root>/filter_cap.json   {"annotations": [{"image_id": "2", "caption": "The image shows …"}, …]}
                             (an annotation may carry its own "instruction"; others draw one from the
                             prompts file; "turns": [[question, answer], …] go on the conversation
                             about the same image after the first answer)
    <root>/image/<image_id>.jpg

The stream is endless: pass after pass over the annotations, each pass in a seeded order.
Records stay lazy (a path, not pixels) so that skipping ahead costs nothing.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minigpt4.errors import ConfigError


def read_annotations(root: str | Path, source: str) -> list[dict[str, Any]]:
    """The records of a cc_sbu_align folder: key, image path and caption, in file order."""
    root = Path(root)
    path = root / "filter_cap.json"
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not a cc_sbu_align annotation file ({type(exc).__name__}: {exc})"
        ) from exc
    records = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ConfigError(f"{path}: annotations[{i}] needs image_id and caption, got {ann!r}")
        if not isinstance(ann.get("instruction") or "", str):
            raise ConfigError(
                f"{path}: annotations[{i}].instruction must be a string, got {ann['instruction']!r}"
            )
        turns = ann.get("turns") or []
        if not isinstance(turns, list) or not all(
            isinstance(t, list | tuple) and len(t) == 2 and all(isinstance(x, str) and x for x in t)
            for t in turns
        ):
            raise ConfigError(
                f"{path}: annotations[{i}].turns must be a list of [question, answer] strings, got {turns!r}"
            )
        image_id = str(ann["image_id"])
        records.append(
            {
                "__source__": source,
                "__key__": image_id,
                "image_path": root / "image" / f"{image_id}.jpg",
                "caption": ann["caption"],
                "instruction": ann.get("instruction"),
                "turns": [tuple(t) for t in turns],
            }
        )
    if not records:
        raise ConfigError(f"{path}: no annotations")
    return records


def annotation_stream(records: list[dict[str, Any]], seed: int) -> Iterator[dict[str, Any]]:
    """Endless passes over `records`, each pass shuffled by (seed, pass)."""
    for n_pass in itertools.count():
        order = list(records)
        random.Random(f"{seed}/pass/{n_pass}").shuffle(order)
        yield from order
