"""The offline eval set: rendered scenes with known content plus a few real photos, in standard formats.

`write_eval_set(out)` writes, with no download:

    out/images/            scene_000.png … (synthetic) and photo_*.png|jpg (scikit-image's photos)
    out/captions.json      COCO captions: {"images": [...], "annotations": [{"image_id", "caption"}]}
    out/vqa_questions.json VQAv2 questions (with a COCO-style "images" list naming each file)
    out/vqa_annotations.json VQAv2 annotations, ten answers per question
    out/pope.jsonl         POPE probes; category "random" / "adversarial" (scenes) or "photo"
    out/instruct.jsonl     open instructions ("Write a haiku about it."), every kind of
                           `minigpt4.eval.instruct.KINDS` about every image (photos: two phrasings),
                           with the image's truth (facts, object words, colours, people, animals)
    out/followup.jsonl     two-turn conversations: "What is in this image?", then one follow-up about
                           colour, position or count with its closed answer set; category "scene" / "photo"

Scene ground truth comes from `minigpt4.data.scenes`; photo annotations from `minigpt4.eval.photos`.
The same seed gives the same files on every machine.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt4.data import scenes
from minigpt4.eval import instruct
from minigpt4.eval.data import write_json
from minigpt4.eval.photos import COLOUR_OPTIONS, PHOTOS
from minigpt4.files import write_text_atomic

CAPTIONS_FILE = "captions.json"
VQA_QUESTIONS_FILE = "vqa_questions.json"
VQA_ANNOTATIONS_FILE = "vqa_annotations.json"
POPE_FILE = "pope.jsonl"
FOLLOWUP_FILE = "followup.jsonl"
INSTRUCT_FILE = "instruct.jsonl"
FIRST_QUESTION = "What is in this image?"
PHOTO_FOLLOWUP = "What colour is it?"
# Scene i gets a follow-up of kind i % 3 (`scenes.FOLLOWUP_KINDS`), so the kinds are balanced.
IMAGES_DIR = "images"
_PHOTO_ID_START = 1001
_QUESTIONS_PER_SCENE = 3
# Phrasings of each instruction kind per image: the photos are few, so they get more.
_INSTRUCT_PHRASINGS = {"scene": 1, "photo": 2}


@dataclass
class _Entry:
    image_id: int
    file_name: str
    captions: list[str]
    qa: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=list
    )  # (q, answers, options)
    probes: list[tuple[str, str, str]] = field(default_factory=list)  # (question, label, category)
    objects: tuple[str, ...] = ()  # words naming the main object (photos)
    followup: dict | None = None  # question, kind, answers (the right options), options, category
    truth: instruct.Truth | None = None  # for open instructions
    category: str = "scene"


def _answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() else "other"


def _probe_question(obj: str) -> str:
    return f"Is there {'an' if obj[0] in 'aeiou' else 'a'} {obj} in the image?"


def _followup(
    question: str, kind: str, answers: Sequence[str], options: Sequence[str], category: str
) -> dict[str, Any]:
    return {
        "question": question,
        "kind": kind,
        "answers": list(answers),
        "options": list(options),
        "category": category,
    }


def _scene_entries(images: Path, n_scenes: int, seed: int) -> list[_Entry]:
    rng = random.Random(seed)
    # A stream of its own, so the follow-ups leave the other files as they were for the same seed.
    followup_rng = random.Random(f"followup {seed}")
    entries = []
    for i in range(n_scenes):
        scene = scenes.render_scene(rng)
        file_name = f"scene_{i:03d}.png"
        scene.image.save(images / file_name)
        short = scenes.caption(scene)
        entry = _Entry(
            image_id=i + 1,
            file_name=file_name,
            captions=[
                short,
                f"{short} on a {scene.background} background",
                scenes.describe(scene).split(". ")[0],
            ],
        )
        chosen = rng.sample(scenes.questions(scene, rng), _QUESTIONS_PER_SCENE)
        entry.qa = [(q, (a,) * 10, scenes.answer_options(q)) for q, a in chosen]
        for category, adversarial in (("random", False), ("adversarial", True)):
            probes = scenes.pope_probes(scene, rng, n_per_answer=1, adversarial=adversarial)
            entry.probes += [(q, label, category) for q, label in probes]
        kind = scenes.FOLLOWUP_KINDS[i % len(scenes.FOLLOWUP_KINDS)]
        question, answer = scenes.followup(scene, kind, followup_rng)
        entry.followup = _followup(question, kind, [answer], scenes.answer_options(question), "scene")
        entry.truth = instruct.scene_truth(scene)
        entries.append(entry)
    return entries


def _photo_entries(images: Path) -> list[_Entry]:
    from skimage import data_dir

    entries = []
    for i, photo in enumerate(PHOTOS):
        file_name = f"photo_{photo.file_name}"
        shutil.copyfile(Path(data_dir) / photo.file_name, images / file_name)
        qa = [(q, answers, ()) for q, answers in photo.questions]  # open questions
        entry = _Entry(_PHOTO_ID_START + i, file_name, list(photo.captions), qa, objects=photo.objects)
        entry.truth, entry.category = instruct.photo_truth(photo), "photo"
        entry.probes = [(_probe_question(obj), label, "photo") for obj, label in photo.probes]
        if photo.colour:
            entry.followup = _followup(PHOTO_FOLLOWUP, "colour", photo.colour, COLOUR_OPTIONS, "photo")
        entries.append(entry)
    return entries


def write_eval_set(out: Path, n_scenes: int = 24, seed: int = 0, photos: bool = True) -> dict[str, int]:
    """Write the eval set under `out` (see the module docstring); return how many items of each kind."""
    if n_scenes < 0:
        raise ValueError(f"n_scenes must be at least 0, got {n_scenes}")
    images = out / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    entries = _scene_entries(images, n_scenes, seed) + (_photo_entries(images) if photos else [])
    if not entries:
        raise ValueError("an eval set needs at least one scene or the photos")
    image_list = [{"id": e.image_id, "file_name": e.file_name} for e in entries]
    captioned = [
        i | ({"objects": list(e.objects)} if e.objects else {})
        for i, e in zip(image_list, entries, strict=True)
    ]

    pairs = [(e.image_id, c) for e in entries for c in e.captions]
    captions = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(pairs)]
    write_json(out / CAPTIONS_FILE, {"images": captioned, "annotations": captions})

    questions, annotations = [], []
    for e in entries:
        for k, (question, answers, choices) in enumerate(e.qa):
            qid = e.image_id * 100 + k
            questions.append({"question_id": qid, "image_id": e.image_id, "question": question})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": e.image_id,
                    "answer_type": _answer_type(answers[0]),
                    "multiple_choice_answer": max(set(answers), key=answers.count),
                    "answers": [{"answer_id": j + 1, "answer": a} for j, a in enumerate(answers)],
                }
                | ({"answer_options": list(choices)} if choices else {})
            )
    write_json(
        out / VQA_QUESTIONS_FILE, {"data_subtype": "evalset", "images": image_list, "questions": questions}
    )
    write_json(out / VQA_ANNOTATIONS_FILE, {"annotations": annotations})

    probes = [
        {
            "question_id": e.image_id * 100 + k,
            "image": e.file_name,
            "text": q,
            "label": label,
            "category": cat,
        }
        for e in entries
        for k, (q, label, cat) in enumerate(e.probes)
    ]
    write_text_atomic(out / POPE_FILE, "".join(json.dumps(p) + "\n" for p in probes))

    followups = [
        {"question_id": e.image_id, "image": e.file_name, "first_question": FIRST_QUESTION} | e.followup
        for e in entries
        if e.followup
    ]
    write_text_atomic(out / FOLLOWUP_FILE, "".join(json.dumps(f) + "\n" for f in followups))

    asked = [
        {
            "question_id": e.image_id * 100 + k,
            "image": e.file_name,
            "category": e.category,
            "kind": kind,
            "instruction": instruction,
            **dataclasses.asdict(e.truth),
        }
        for j, e in enumerate(entries)
        for k, (kind, instruction) in enumerate(instruct.instructions(j, _INSTRUCT_PHRASINGS[e.category]))
    ]
    write_text_atomic(out / INSTRUCT_FILE, "".join(json.dumps(a) + "\n" for a in asked))
    return {
        "images": len(entries),
        "captions": len(captions),
        "vqa": len(questions),
        "pope": len(probes),
        "followup": len(followups),
        "instruct": len(asked),
    }
