"""`python -m minigpt4 make-data lite-teach`: open instructions answered by a teacher LLM told the
image's facts in words, and the teacher's answers to instructions about other things (replay).

This is LLaVA-Instruct's recipe with a local teacher. Each training image is a rendered scene or a
class example (what the frozen classifier says of an ImageNet class, with the object-colour token of
a colour blob, or no colour), and its facts are known: the scene's shapes, colours and places, or
the class's name and, where the image has one, its colour. The teacher (the lite LLM itself, with
no image and no LoRA: `minigpt4_lite_frozen`'s LLM) is told those facts in one sentence before an
instruction (`told_prompt`, the same words as the instruct eval's upper bound) and its answer is
kept only when it passes the instruct eval's rules (`minigpt4.eval.instruct`: the form asked for,
the main object named, no person, animal or colour the facts exclude, not the same answer as to
another kind about the same image) and does not talk about being told ("the description you gave")
or run into a line of emoji.
With `--tries N` an answer that fails is asked again, sampled, up to N times in all.
Stage 2 then learns to give, from the image, what the LLM gives from the facts: the skill it already
has, not a new style.

`TRAIN_KINDS` has its own phrasings (none is an eval phrasing) of the eval's kinds except
`instruct.HELD_OUT`, which training leaves out to see whether the skill transfers, and kinds the eval
does not score. Replay (`REPLAY_TASKS` × `REPLAY_TOPICS`): instructions that are not about the image,
answered by the teacher with no facts, asked in training with an image in the prompt (the stage-2
format always holds one): what the LLM knew stays what it answers.

    <out>/answers.jsonl                  every teacher answer with its checks (a rerun skips those done)
    <out>/cc_sbu_align/filter_cap.json   the kept answers: one example per image, its other kept
                                         answers as turns; class examples as in `make-data lite`
    <out>/cc_sbu_align/image/<id>.jpg    the scenes and colour blobs
    <out>/describe/<id>.jpg              scenes for `curate` (the paper's detailed descriptions)
    <out>/describe_facts.jsonl           {"image_id", "facts"} of each: what `curate refine --facts` reads
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minigpt4.commands.common import HelpFormatter, at_least
from minigpt4.data import scenes
from minigpt4.eval import instruct
from minigpt4.eval.answer import Sampling
from minigpt4.eval.upper_bound import told_prompt
from minigpt4.files import drop_torn_line, write_bytes_atomic, write_text_atomic
from minigpt4.images import jpeg_bytes
from minigpt4.lite import data
from minigpt4.lite.vision import N_CLASSES, class_names

log = logging.getLogger(__name__)

# The training phrasings of each kind: the eval's kinds (but HELD_OUT) in other words, and kinds the
# eval does not score. 16 kinds, 48 phrasings.
TRAIN_KINDS: dict[str, tuple[str, ...]] = {
    "describe": (
        "Please provide a detailed description of the picture.",
        "Take a look at this image and describe what you notice.",
        "Describe everything in this picture as fully as you can.",
    ),
    "poem": (
        "Write a poem about this picture.",
        "Write four lines of verse about what this image shows.",
        "Could you turn this image into a little poem?",
    ),
    "story": (
        "Write a story about what is in this picture.",
        "Tell a short tale that begins with this image.",
        "Invent a short story about the thing in this photo.",
    ),
    "ideas": (
        "What could I do with what this picture shows?",
        "List some ways to use the thing in this image.",
        "Suggest a few things someone could do with this.",
    ),
    "child": (
        "Explain this picture to a little child.",
        "Tell a young child what this image shows, in simple words.",
        "How would you describe this photo to a kid?",
    ),
    "colours": (
        "What colours does this image have?",
        "Tell me the colours you see in this picture.",
        "Which colours appear in this photo?",
    ),
    "happening": (
        "What is going on in this picture?",
        "Describe what is happening in this image.",
        "What is this picture about?",
    ),
    "title": (
        "Give this picture a short title.",
        "What title would you give this image?",
        "Name this picture with a title.",
    ),
    "tweet": (
        "Write a short post about this image for social media.",
        "Write a tweet about what this picture shows.",
        "Share this picture in a short social media post.",
    ),
    "mood": (
        "What feeling does this picture give you?",
        "Describe the mood of this image.",
        "How does this picture make you feel?",
    ),
    "list": (
        "List the things you can see in this image.",
        "What can you see in this picture? Make a list.",
        "Name the things that are in this image.",
    ),
    "next": (
        "What might happen next in this picture?",
        "Imagine what happens after this picture was taken.",
        "What could happen next to the thing in this image?",
    ),
    "fact": (
        "Tell me an interesting fact about what this image shows.",
        "Share a fun fact about the thing in this picture.",
        "What is something interesting to know about this?",
    ),
    "name": (
        "Give the main thing in this picture a fun name.",
        "Suggest a friendly name for what this image shows.",
        "What would be a good nickname for the thing in this picture?",
    ),
    "compare": (
        "What does the thing in this picture remind you of?",
        "What is the main thing in this image similar to?",
        "Compare what this picture shows with something else.",
    ),
    "note": (
        "Write a short thank-you note to the thing in this picture.",
        "Write a short letter to the main thing in this image.",
        "Write a friendly note about what this picture shows.",
    ),
}
# The rules of the kinds the eval does not score (the eval's own rules score the others).
_EXTRA_FORM: dict[str, Callable[[str], bool]] = {
    "mood": lambda a: len(instruct.words(a)) >= 8,
    "list": lambda a: len(instruct.words(a)) >= 3,
    "next": lambda a: len(instruct.words(a)) >= 8,
    "fact": lambda a: len(instruct.words(a)) >= 10,
    "name": lambda a: 1 <= len(instruct.words(a)) <= 40,
    "compare": lambda a: len(instruct.words(a)) >= 8,
    "note": lambda a: len(instruct.words(a)) >= 15,
}
REPLAY_TASKS = (
    "Write a short poem about {topic}.",
    "Explain {topic} to a child.",
    "Give me three tips about {topic}.",
    "Tell me an interesting fact about {topic}.",
    "Write a short story about {topic}.",
    "What is good about {topic}?",
    "Describe {topic} in a few sentences.",
    "Write a tweet about {topic}.",
)
REPLAY_TOPICS = (
    "the ocean", "autumn leaves", "a rainy day", "friendship", "the moon", "baking bread",
    "a city at night", "mountains", "learning to ride a bike", "coffee", "a library", "gardening",
    "winter", "trains", "the stars", "music", "a birthday party", "the desert", "honey bees",
    "a quiet morning", "football", "the rainforest", "a lighthouse", "cooking pasta", "rivers",
    "the first day of school", "volcanoes", "a picnic", "snow", "old castles", "painting",
    "the wind", "a market", "clouds", "breakfast", "a long walk", "robots", "the seasons",
    "recycling", "a train journey",
)  # fmt: skip
# An answer that talks about having been told the facts instead of about the picture.
_META = re.compile(
    r"\b(described|description (you|provided|given)|you (have |'ve )?(mentioned|provided|described|given|shared)"
    r"|description|based on (the|your)|as an ai|i'?m sorry|i cannot|i can'?t"
    r"|(the )?original (text|sentence|statement)|the (text|sentence|statement) (says|said|mentions|states))\b"
    r"|\[[a-z_ ]+\]",
    re.IGNORECASE,
)
# ImageNet classes 0–397 are animals; 981–983 are people (ballplayer, groom, scuba diver).
_ANIMALS = range(398)
_PEOPLE = range(981, 984)
PER_IMAGE = 2  # instructions of different kinds asked about each image
MAX_SYMBOLS = 5  # emoji and other symbols a kept answer may hold


@dataclass(frozen=True)
class Asked:
    """One instruction about one image (or, for replay, about nothing in it)."""

    key: str  # "<image_id>/<n>"
    image_id: str
    kind: str  # a TRAIN_KINDS key, or "replay"
    instruction: str
    facts: str  # "" for replay
    truth: instruct.Truth | None  # None for replay


def form_passes(kind: str, answer: str) -> bool:
    return (instruct.FORM_RULES.get(kind) or _EXTRA_FORM[kind])(answer)


def talks_about_being_told(answer: str) -> bool:
    return bool(_META.search(answer))


def strings_symbols(answer: str) -> bool:
    """Whether `answer` holds more than MAX_SYMBOLS emoji or other symbols: the teacher's social-media
    posts sometimes run into a line of them, and a model trained on one repeats it without end."""
    return sum(unicodedata.category(ch) == "So" for ch in answer) > MAX_SYMBOLS


def class_truth(c: int, confidence: float, colour: str | None) -> instruct.Truth:
    """Facts of a class example: its class (hedged when the classifier is unsure) and its colour."""
    name = class_names()[c]
    seen = "seems to show" if confidence < data.HEDGE_BELOW else "shows"
    facts = f"The image {seen} {scenes._article(name)} {name}."
    if colour is not None:
        facts += f" It is mostly {colour}."
    words = name.lower().split()
    objects = (name.lower(), words[-1]) if len(words) > 1 else (name.lower(),)
    colours = (colour,) if colour else ()
    return instruct.Truth(facts, objects, colours, people=c in _PEOPLE, animals=c in _ANIMALS)


def keep(asked: Sequence[Asked], answers: Sequence[str]) -> list[dict]:
    """Each answer with its checks; `passed` when every rule holds (replay: a real answer, no meta).

    The instruct eval's rules, applied with each instruction's own kind: the eval's kinds use its form
    rules, the others `_EXTRA_FORM`, and diversity compares the answers of different kinds about one image.
    """
    answers = [answer.strip() for answer in answers]
    # Replay answers (no truth) sit apart, each under its own key: they are not compared.
    groups = [a.image_id if a.truth is not None else a.key for a in asked]
    is_diverse = instruct.diverse_by_image(answers, [a.kind for a in asked], groups)
    rows = []
    for a, answer, diverse in zip(asked, answers, is_diverse, strict=True):
        meta, symbols = talks_about_being_told(answer), strings_symbols(answer)
        if a.truth is None:
            passed = len(instruct.words(answer)) >= 5 and not meta and not symbols
            rows.append({"key": a.key, "kind": a.kind, "answer": answer, "passed": passed})
            continue
        form = bool(instruct.words(answer)) and form_passes(a.kind, answer)
        grounded = instruct.grounded(a.kind, answer, a.truth)
        invented = instruct.invented(answer, a.truth)
        rows.append(
            {
                "key": a.key,
                "kind": a.kind,
                "answer": answer,
                "passed": form and grounded and not invented and diverse and not meta and not symbols,
                "form": form,
                "grounded": grounded,
                "invented": invented,
                "diverse": diverse,
                "meta": meta,
                "symbols": symbols,
            }
        )
    return rows


@dataclass
class TeachImages:
    """The images the teacher is asked about: annotations (as `make-data lite` writes them, minus
    instruction and answer), their facts, and the pictures to write."""

    annotations: dict[str, dict]
    truths: dict[str, instruct.Truth]


def make_images(rng: random.Random, n_scenes: int, n_classes: int, image_dir: Path) -> TeachImages:
    """Render `n_scenes` scenes and `n_classes` class examples (half with a colour blob) into `image_dir`."""
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations: dict[str, dict] = {}
    truths: dict[str, instruct.Truth] = {}
    scene_ids = []
    for i in tqdm(range(n_scenes), desc="teacher scenes", unit="image", file=sys.stderr):
        scene = scenes.render_scene(rng)
        image_id = f"t{i:05d}"
        write_bytes_atomic(image_dir / f"{image_id}.jpg", jpeg_bytes(scene.image))
        annotations[image_id] = {"image_id": image_id}
        truths[image_id] = instruct.scene_truth(scene)
        scene_ids.append(image_id)
    for i in tqdm(range(n_classes), desc="teacher class examples", unit="example", file=sys.stderr):
        c = rng.randrange(N_CLASSES)
        classes = data.class_probabilities(c, rng)
        colour_name = rng.choice(sorted(data.BLOB_COLOURS)) if rng.random() < 0.5 else None
        image_id = f"tclass{i:05d}"
        # With a colour: the blob's token, and its cells or (as a photo's cells mix object and
        # background) a scene's. Without: no colour token and the cells' places only, so that nothing
        # in the image shows a colour the facts do not name.
        colour: str | None = None
        cells: str | None = None
        if colour_name is not None:
            colour = f"tblob{i:05d}"
            write_bytes_atomic(image_dir / f"{colour}.jpg", jpeg_bytes(data.render_blob(rng, colour_name)))
            elsewhere = scene_ids and rng.random() < data.CELLS_ELSEWHERE
            cells = rng.choice(scene_ids) if elsewhere else colour
        annotations[image_id] = {"image_id": image_id, "classes": classes, "cells": cells, "colour": colour}
        truths[image_id] = class_truth(c, classes[0][1], colour_name)
    return TeachImages(annotations, truths)


def plan(
    images: TeachImages, rng: random.Random, n_replay: int, kinds: Sequence[str] | None = None
) -> list[Asked]:
    """PER_IMAGE instructions of different kinds per image (of `kinds` only, when given: a set aimed at
    the kinds a model fails), and `n_replay` replay instructions, each about a random image."""
    asked = []
    kinds = sorted(kinds or TRAIN_KINDS)
    for image_id, truth in images.truths.items():
        # No colour is known of an image without a colour token: the colours kind could not pass.
        choices = kinds if truth.colours else [k for k in kinds if k != "colours"]
        for n, kind in enumerate(rng.sample(choices, min(PER_IMAGE, len(choices)))):
            instruction = rng.choice(TRAIN_KINDS[kind])
            asked.append(Asked(f"{image_id}/{n}", image_id, kind, instruction, truth.facts, truth))
    ids = sorted(images.truths)
    replay = [task.format(topic=topic) for task in REPLAY_TASKS for topic in REPLAY_TOPICS]
    for n, instruction in enumerate(rng.sample(replay, min(n_replay, len(replay)))):
        image_id = rng.choice(ids)
        asked.append(Asked(f"{image_id}/r{n}", image_id, "replay", instruction, "", None))
    return asked


def read_answers(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    drop_torn_line(path)
    rows = {row["key"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    for row in rows.values():  # stored answers meet today's meta and symbol rules (they may be newer)
        meta, symbols = talks_about_being_told(row["answer"]), strings_symbols(row["answer"])
        if meta or symbols:
            row.update(passed=False, meta=meta, symbols=symbols)
    return rows


def teach(
    answer: Callable[[Sequence[str], Sampling | None], list[str]],
    asked: Sequence[Asked],
    out: Path,
    batch_size: int = 32,
    tries: int = 1,
) -> dict[str, dict]:
    """Ask the teacher every instruction not yet in `out` (answers.jsonl); returns every row by key.

    The instructions of one image are asked in one batch, so that the diversity rule sees them together.
    An answer that fails a rule is asked again, sampled with a seed of its try, up to `tries` times in
    all; the diversity rule then compares it with the answers already kept about its image. Each row
    says its try, so a rerun goes on at the try each instruction reached.
    """
    done = read_answers(out)
    by_key = {a.key: a for a in asked}
    with out.open("a", encoding="utf-8") as f:
        for attempt in range(1, tries + 1):
            todo = [a for a in asked if _asked_in_try(done.get(a.key), attempt)]
            if not todo:
                continue
            kept_by_image: dict[str, list[Asked]] = {}
            for key, row in done.items():
                if row["passed"] and key in by_key and by_key[key].truth is not None:
                    kept_by_image.setdefault(by_key[key].image_id, []).append(by_key[key])
            sample = None if attempt == 1 else Sampling(seed=attempt * 1_000_003)
            desc = "teacher answers" if attempt == 1 else f"teacher answers, try {attempt}"
            with tqdm(total=len(todo), desc=desc, unit="answer", file=sys.stderr) as bar:
                for batch in _image_batches(todo, batch_size):
                    prompts = [
                        told_prompt(a.facts, a.instruction) if a.facts else a.instruction for a in batch
                    ]
                    answers = answer(prompts, sample)
                    # The answers already kept about these images take part in the diversity rule.
                    context = [
                        c
                        for image in dict.fromkeys(a.image_id for a in batch)
                        for c in kept_by_image.get(image, [])
                    ]
                    rows = keep([*context, *batch], [*(done[c.key]["answer"] for c in context), *answers])
                    for row in rows[len(context) :]:
                        row["try"] = attempt
                        f.write(json.dumps(row) + "\n")
                        done[row["key"]] = row
                    f.flush()
                    bar.update(len(batch))
    return done


def _image_batches(todo: Sequence[Asked], batch_size: int) -> Iterator[list[Asked]]:
    """`todo` in batches of about `batch_size`, each image's instructions whole in one batch."""
    by_image: dict[str, list[Asked]] = {}
    for a in todo:
        by_image.setdefault(a.image_id, []).append(a)
    batch: list[Asked] = []
    for group in by_image.values():
        batch += group
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _asked_in_try(row: dict | None, attempt: int) -> bool:
    """Whether an instruction is asked in try `attempt`: never answered (the first try), or failed in
    the try before (rows written before tries were counted are first tries)."""
    if row is None:
        return attempt == 1
    return not row["passed"] and row.get("try", 1) == attempt - 1


def write_set(images: TeachImages, asked: Sequence[Asked], rows: dict[str, dict], out_dir: Path) -> dict:
    """filter_cap.json of the kept answers: per image, the first kept answer and the rest as turns."""
    per_image: dict[str, list[tuple[str, str]]] = {}
    for a in asked:
        row = rows.get(a.key)
        if row and row["passed"]:
            per_image.setdefault(a.image_id, []).append((a.instruction, row["answer"]))
    annotations = []
    for image_id, pairs in per_image.items():
        (instruction, answer), *turns = pairs
        annotations.append(
            {**images.annotations[image_id], "instruction": instruction, "caption": answer, "turns": turns}
        )
    write_text_atomic(out_dir / "filter_cap.json", json.dumps({"annotations": annotations}, indent=1))
    counts: dict[str, list[int]] = {}
    for a in asked:
        row = rows.get(a.key)
        if row:
            counts.setdefault(a.kind, [0, 0])[0] += 1
            counts[a.kind][1] += row["passed"]
    return {kind: {"asked": n, "kept": k} for kind, (n, k) in sorted(counts.items())}


def write_describe_set(rng: random.Random, n: int, out: Path) -> None:
    """`n` scenes to describe the paper's way, and their facts for the refine step."""
    folder = out / "describe"
    folder.mkdir(parents=True, exist_ok=True)
    facts = []
    for i in range(n):
        scene = scenes.render_scene(rng)
        image_id = f"d{i:05d}"
        write_bytes_atomic(folder / f"{image_id}.jpg", jpeg_bytes(scene.image))
        truth = instruct.scene_truth(scene)
        facts.append(json.dumps({"image_id": image_id, "facts": truth.facts, "truth": truth.words()}))
    write_text_atomic(out / "describe_facts.jsonl", "\n".join(facts) + "\n")


def add_parser(sets: argparse._SubParsersAction) -> None:
    """Register `make-data lite-teach`."""
    p = sets.add_parser(
        "lite-teach",
        formatter_class=HelpFormatter,
        help="open instructions answered by the teacher LLM told the facts",
    )
    p.add_argument("--out", default="data/lite/teach", help="output folder (default: data/lite/teach)")
    p.add_argument("--seed", type=int, default=8000, help="image seed (others than make-data lite's)")
    p.add_argument("--scenes", type=int, default=300, help="scenes asked about (default: 300)")
    p.add_argument("--classes", type=int, default=600, help="class examples asked about (default: 600)")
    p.add_argument("--replay", type=int, default=300, help="replay instructions (default: 300, at most 320)")
    p.add_argument("--describe", type=int, default=150, help="scenes written for curate (default: 150)")
    p.add_argument(
        "--teacher",
        default="minigpt4_lite_frozen",
        help="the preset whose LLM answers (without image or LoRA; default: minigpt4_lite_frozen)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="instructions per call (default: 32)")
    p.add_argument(
        "--tries",
        type=at_least(1),
        default=1,
        help="times an instruction is asked while its answer fails a rule (greedy first, then sampled)",
    )
    p.add_argument(
        "--kinds",
        type=_kinds,
        help=f"ask only these kinds, comma-separated (default: all {len(TRAIN_KINDS)} training kinds)",
    )
    p.add_argument(
        "--no-ask",
        action="store_true",
        help="ask nothing: write the set from the answers already in <out>/answers.jsonl (a run stopped early)",
    )
    p.set_defaults(run=make_teach)


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TRAIN_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(unknown) or '(none given)'}; the training kinds: {', '.join(sorted(TRAIN_KINDS))}"
        )
    return kinds


def make_teach(args: argparse.Namespace) -> int:
    from minigpt4.chat import load_chat  # noqa: PLC0415 (the model only when the command runs)
    from minigpt4.config import load_preset  # noqa: PLC0415
    from minigpt4.eval.upper_bound import BareLLM  # noqa: PLC0415

    out = Path(args.out)
    rng = random.Random(args.seed)
    # The images and instructions follow from the seed and the counts alone: a rerun with the same
    # arguments asks only what answers.jsonl lacks.
    images = make_images(rng, args.scenes, args.classes, out / "cc_sbu_align" / "image")
    asked = plan(images, rng, args.replay, args.kinds)
    write_describe_set(rng, args.describe, out)
    if args.no_ask:
        rows = read_answers(out / "answers.jsonl")
    else:
        try:
            cfg = load_preset(args.teacher)
            chat = load_chat(args.teacher)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        teacher = BareLLM(chat, cfg.model, args.max_new_tokens)
        rows = teach(teacher.answer_prompts, asked, out / "answers.jsonl", args.batch_size, args.tries)
    counts = write_set(images, asked, rows, out / "cc_sbu_align")
    write_text_atomic(out / "counts.json", json.dumps(counts, indent=1))
    kept = sum(c["kept"] for c in counts.values())
    print(f"teacher: {kept} of {len(asked)} answers kept → {out / 'cc_sbu_align'}")
    for kind, c in counts.items():
        print(f"  {kind:<10} {c['kept']:>4} / {c['asked']}")
    return 0
