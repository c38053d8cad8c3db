"""`make-data lite`: the rendered-scene training data of the lite bridge."""

from __future__ import annotations

import json
import random

import webdataset as wds

from minigpt4.data import scenes
from minigpt4.data.loader import BatchPlan, build_loader
from minigpt4.lite import data

pytest_plugins = ["train_helpers"]  # fixtures: tiny_config, tiny_model


def test_positional_caption_says_what_is_where():
    scene = scenes.render_scene(random.Random(3), n_objects=3)
    caption = data.positional_caption(scene)
    for obj in scene.objects:
        assert f"{obj.colour} {obj.shape} in the {obj.position}" in caption
    assert caption.count(" and ") == 1


def test_stage2_examples_cover_every_kind_and_match_the_scene():
    rng = random.Random(0)
    seen = {"describe": 0, "short": 0, "hint": 0}
    for _ in range(200):
        scene = scenes.render_scene(rng)
        instruction, answer = data.stage2_example(scene, rng)
        if instruction in data.DESCRIBE_INSTRUCTIONS:
            assert answer == scenes.describe(scene)
            seen["describe"] += 1
        elif instruction == data.ONE_SENTENCE:
            assert answer == data.short_answer(data.positional_caption(scene))
        else:
            assert answer.endswith(".") and answer[0] == answer[0].upper() and len(answer.split()) <= 2
            seen["short"] += 1
            seen["hint"] += instruction.endswith(data.SHORT_ANSWER_HINT)
    assert min(seen.values()) > 10


def test_written_sets_read_back(tmp_path):
    rng = random.Random(1)
    data.write_stage1(tmp_path / "stage1", rng, n_shards=2, per_shard=3)
    data.write_stage2(tmp_path / "cc_sbu_align", rng, n=4)

    samples = list(wds.WebDataset(str(tmp_path / "stage1" / "shard-{00000..00001}.tar"), shardshuffle=False))
    assert len(samples) == 6
    assert all(json.loads(s["json"])["caption"] for s in samples)
    assert len({s["__key__"] for s in samples}) == 6

    annotations = json.loads((tmp_path / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    assert [set(a) for a in annotations] == [{"image_id", "instruction", "caption"}] * 4
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
