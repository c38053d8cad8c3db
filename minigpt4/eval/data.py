"""Readers for the standard evaluation formats.

- Captions, COCO style: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`.
- VQA, VQAv2 style: a questions file `{"questions": [{"question_id", "image_id", "question"}],
  "data_subtype": "val2014"}` and an annotations file `{"annotations": [{"question_id", "answers":
  [{"answer"}], "answer_type"}]}`. Images are named as in COCO (`COCO_val2014_000000000042.jpg`)
  unless the questions file carries a COCO-style `"images"` list.
- POPE: JSON lines `{"question_id", "image", "text", "label": "yes"|"no"}`, optionally `"category"`.
- Follow-ups (this project's): JSON lines `{"question_id", "image", "first_question", "question",
  "kind", "answers", "options"}`, optionally `"category"`: `answers` are the right ones of `options`.
- Open instructions (this project's): JSON lines `{"question_id", "image", "kind", "instruction",
  "category", "facts", "objects", "colours", "people", "animals"}`: the instruction's kind (one of
  `minigpt4.eval.instruct.KINDS`) and what the image is known to show (`instruct.Truth`).

Each reader checks the fields it needs and raises `DataError` naming the file and the entry.
Writers write whole files or nothing (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt4.eval.instruct import KIND_NAMES, Truth
from minigpt4.files import write_text_atomic

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """An evaluation file is missing, malformed, or refers to something that does not exist."""


@dataclass(frozen=True)
class CaptionSample:
    image_id: int | str
    image: Path
    references: tuple[str, ...]
    objects: tuple[str, ...] = ()  # words naming the main object (an "objects" list in `images`)


@dataclass(frozen=True)
class VQASample:
    question_id: int | str
    image: Path
    question: str
    answers: tuple[str, ...]
    answer_type: str
    options: tuple[str, ...] = ()  # a closed answer set ("answer_options" in the annotation), if any


@dataclass(frozen=True)
class POPESample:
    question_id: int | str
    image: Path
    question: str
    label: str
    category: str


@dataclass(frozen=True)
class FollowupSample:
    question_id: int | str
    image: Path
    first_question: str  # asked first; the model's own answer stays in the conversation
    question: str  # the follow-up, scored
    kind: str  # "colour", "position", "count", ...
    answers: tuple[str, ...]  # the right options
    options: tuple[str, ...]  # the closed answer set
    category: str = ""


@dataclass(frozen=True)
class InstructSample:
    question_id: int | str
    image: Path
    kind: str  # one of `instruct.KIND_NAMES`
    instruction: str
    category: str  # "scene" / "photo"
    truth: Truth


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def _field(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: missing field {key!r}")
    return entry[key]


def _list_field(data: Any, key: str, path: Path) -> list:
    value = _field(data, key, str(path))
    if not isinstance(value, list):
        raise DataError(f"{path}: {key!r} must be a list")
    return value


def _image_path(image_root: Path, file_name: str, where: str) -> Path:
    path = image_root / file_name
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    return path


def _image_names(data: dict, path: Path) -> dict[Any, str]:
    return {
        _field(img, "id", f"{path} images[{i}]"): _field(img, "file_name", f"{path} images[{i}]")
        for i, img in enumerate(_list_field(data, "images", path))
    }


def read_captions(path: Path, image_root: Path) -> list[CaptionSample]:
    """One sample per image of a COCO-style caption file, with all its reference captions."""
    data = _load_json(path)
    names = _image_names(data, path)
    refs: dict[Any, list[str]] = {}
    for i, ann in enumerate(_list_field(data, "annotations", path)):
        where = f"{path} annotations[{i}]"
        image_id = _field(ann, "image_id", where)
        if image_id not in names:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        refs.setdefault(image_id, []).append(str(_field(ann, "caption", where)))
    unannotated = [i for i in names if i not in refs]
    if unannotated:
        logger.warning("%s: %d images have no caption and are skipped", path, len(unannotated))
    objects = {img.get("id"): tuple(map(str, img.get("objects") or ())) for img in data["images"]}
    return [
        CaptionSample(
            image_id,
            _image_path(image_root, names[image_id], str(path)),
            tuple(captions),
            objects.get(image_id, ()),
        )
        for image_id, captions in refs.items()
    ]


def read_vqa(questions_path: Path, annotations_path: Path, image_root: Path) -> list[VQASample]:
    """One sample per question of a VQAv2-style questions file, with its annotators' answers."""
    qdata = _load_json(questions_path)
    adata = _load_json(annotations_path)
    names = _image_names(qdata, questions_path) if "images" in qdata else None
    subtype = qdata.get("data_subtype", "val2014")
    answers: dict[Any, dict] = {}
    for i, ann in enumerate(_list_field(adata, "annotations", annotations_path)):
        where = f"{annotations_path} annotations[{i}]"
        given = [str(_field(a, "answer", where)) for a in _field(ann, "answers", where)]
        if not given:
            raise DataError(f"{where}: no answers")
        answers[_field(ann, "question_id", where)] = {
            "answers": tuple(given),
            "type": ann.get("answer_type", ""),
            "options": tuple(map(str, ann.get("answer_options") or ())),
        }
    samples = []
    for i, q in enumerate(_list_field(qdata, "questions", questions_path)):
        where = f"{questions_path} questions[{i}]"
        qid, image_id = _field(q, "question_id", where), _field(q, "image_id", where)
        if qid not in answers:
            raise DataError(f"{where}: question_id {qid!r} has no entry in {annotations_path}")
        if names is None:
            file_name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
        elif image_id in names:
            file_name = names[image_id]
        else:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        ann = answers[qid]
        image = _image_path(image_root, file_name, where)
        question = str(_field(q, "question", where))
        samples.append(VQASample(qid, image, question, ann["answers"], ann["type"], ann["options"]))
    few = sum(len(s.answers) < 10 for s in samples)
    if few:
        logger.warning("%d questions have fewer than 10 answers: VQA accuracy is built for 10", few)
    return samples


def _json_lines(path: Path) -> list[tuple[str, Any]]:
    """(where, entry) for each non-empty line of a JSON-lines file; `where` names the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            entries.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from e
    if not entries:
        raise DataError(f"{path}: no questions")
    return entries


def read_pope(path: Path, image_root: Path) -> list[POPESample]:
    """One sample per line of a POPE-style JSON-lines file."""
    samples = []
    for where, entry in _json_lines(path):
        label = str(_field(entry, "label", where)).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{where}: label must be 'yes' or 'no', got {entry['label']!r}")
        samples.append(
            POPESample(
                question_id=_field(entry, "question_id", where),
                image=_image_path(image_root, str(_field(entry, "image", where)), where),
                question=str(_field(entry, "text", where)),
                label=label,
                category=str(entry.get("category", "")),
            )
        )
    return samples


def read_followup(path: Path, image_root: Path) -> list[FollowupSample]:
    """One two-turn conversation per line of a follow-up JSON-lines file (see the module docstring)."""
    samples = []
    for where, entry in _json_lines(path):
        answers = tuple(map(str, _field(entry, "answers", where)))
        options = tuple(map(str, _field(entry, "options", where)))
        wrong = [a for a in answers if a not in options]
        if not answers or wrong:
            raise DataError(f"{where}: 'answers' must be one or more of 'options', got {list(answers)}")
        samples.append(
            FollowupSample(
                question_id=_field(entry, "question_id", where),
                image=_image_path(image_root, str(_field(entry, "image", where)), where),
                first_question=str(_field(entry, "first_question", where)),
                question=str(_field(entry, "question", where)),
                kind=str(_field(entry, "kind", where)),
                answers=answers,
                options=options,
                category=str(entry.get("category", "")),
            )
        )
    return samples


def read_instruct(path: Path, image_root: Path) -> list[InstructSample]:
    """One open instruction per line of an instruct JSON-lines file (see the module docstring)."""
    samples = []
    for where, entry in _json_lines(path):
        kind = str(_field(entry, "kind", where))
        if kind not in KIND_NAMES:
            raise DataError(f"{where}: unknown kind {kind!r}; known: {', '.join(KIND_NAMES)}")
        people, animals = _field(entry, "people", where), _field(entry, "animals", where)
        if not isinstance(people, bool) or not isinstance(animals, bool):
            raise DataError(f"{where}: 'people' and 'animals' must be true or false")
        truth = Truth(
            facts=str(_field(entry, "facts", where)),
            objects=tuple(map(str, _field(entry, "objects", where))),
            colours=tuple(map(str, _field(entry, "colours", where))),
            people=people,
            animals=animals,
        )
        if not truth.objects:
            raise DataError(f"{where}: 'objects' must name the main object (one word or more)")
        samples.append(
            InstructSample(
                question_id=_field(entry, "question_id", where),
                image=_image_path(image_root, str(_field(entry, "image", where)), where),
                kind=kind,
                instruction=str(_field(entry, "instruction", where)),
                category=str(entry.get("category", "")),
                truth=truth,
            )
        )
    return samples
