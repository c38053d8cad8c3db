"""The training data pipeline: generated sets, streams, batch layout, labels, corrupt samples."""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from decode_helpers import prompt_ids

from minigpt4.conversation import get_template
from minigpt4.data import scenes
from minigpt4.data.config import source_shards
from minigpt4.data.labels import TextBuilder, pad_batch, supervised_tokens
from minigpt4.data.loader import BatchPlan, build_loader
from minigpt4.data.stage1 import ShardSource, shard_stream, tar_reader
from minigpt4.errors import ConfigError
from minigpt4.images import jpeg_bytes
from minigpt4.model import IGNORE_INDEX, IMAGE_TOKEN_ID
from minigpt4.train.config import check_batch_layout

pytest_plugins = ["train_helpers"]  # fixtures: tiny_data, tiny_config, tiny_model, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _raise(exc: Exception) -> bool:
    raise exc


# --- the generated sets --------------------------------------------------------------------------


def test_make_data_writes_webdataset_shards_and_a_cc_sbu_align_folder(tiny_data):
    shards = sorted((tiny_data / "stage1" / "shapes").glob("*.tar"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.tar" for i in range(4)]
    samples = list(wds.WebDataset(str(shards[0]), shardshuffle=False).decode("pil").to_tuple("jpg", "json"))
    assert len(samples) == 16
    image, meta = samples[0]
    assert image.size == (224, 224) and meta["caption"].startswith("a ")
    txt = list(wds.WebDataset(str(tiny_data / "stage1/shapes_txt/shard-00000.tar"), shardshuffle=False))
    assert len(txt) == 16 and txt[0]["txt"].decode().startswith("a ")
    annotations = json.loads((tiny_data / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    assert len(annotations) == 24
    for ann in annotations:
        assert (tiny_data / "cc_sbu_align" / "image" / f"{ann['image_id']}.jpg").is_file()
        assert ann["caption"].startswith("The image shows")


# --- streams and batch layout --------------------------------------------------------------------


@pytest.mark.parametrize("streams", [1, 2, 4])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_processes_together_take_exactly_the_one_process_batch(world, streams):
    def positions(plan, j):
        return {(s, p) for s, lo, hi in plan.slices(j) for p in range(lo, hi)}

    for j in (0, 1, 7):
        one = positions(BatchPlan(8, streams), j)
        parts = [positions(BatchPlan(8, streams, rank, world), j) for rank in range(world)]
        assert set().union(*parts) == one and sum(map(len, parts)) == 8, "a partition of the same records"
        assert one == {
            (s, p) for s in range(streams) for p in range(j * 8 // streams, (j + 1) * 8 // streams)
        }
        if streams % world == 0:
            own = [{s for s, _ in part} for part in parts]
            assert all(not (a & b) for a, b in itertools.combinations(own, 2)), (
                "each rank has its own streams"
            )


def test_a_stream_reads_only_its_shards_and_mixes_sources_by_ratio(tiny_data):
    shapes = tuple(source_shards_of(tiny_data / "stage1" / "shapes"))
    texts = tuple(source_shards_of(tiny_data / "stage1" / "shapes_txt"))
    sources = [ShardSource("shapes", shapes, 3.0), ShardSource("shapes_txt", texts, 1.0)]
    for stream in (0, 1):
        samples = list(itertools.islice(shard_stream(sources, stream, 2, 0, 8, tar_reader(_raise)), 240))
        shard_numbers = {int(Path(s["__url__"]).stem.split("-")[1]) for s in samples}
        assert {n % 2 for n in shard_numbers} == {stream}
        share = sum(s["__source__"] == "shapes" for s in samples) / len(samples)
        assert share == pytest.approx(0.75, abs=0.08)
    again = [
        s["__key__"] for s in itertools.islice(shard_stream(sources, 0, 2, 0, 8, tar_reader(_raise)), 40)
    ]
    other_seed = [
        s["__key__"] for s in itertools.islice(shard_stream(sources, 0, 2, 1, 8, tar_reader(_raise)), 40)
    ]
    assert again == [
        s["__key__"] for s in itertools.islice(shard_stream(sources, 0, 2, 0, 8, tar_reader(_raise)), 40)
    ]
    assert again != other_seed


def source_shards_of(folder: Path) -> list[str]:
    from minigpt4.data.config import SourceConfig

    return source_shards(SourceConfig("x", str(folder)))


def _batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def _assert_same_batches(a, b):
    assert [x["index"] for x in a] == [x["index"] for x in b]
    for x, y in zip(a, b, strict=True):
        for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
            assert torch.equal(x[key], y[key]), key


def test_workers_and_resumption_give_the_same_batches(tiny_config, tiny_model, tmp_path):
    cfg = tiny_config(1, tmp_path)
    plan = BatchPlan(8, 2)
    reference = _batches(build_loader(cfg.data, cfg.model, tiny_model, plan, seed=5), 5)
    assert [b["index"] for b in reference] == [0, 1, 2, 3, 4]
    assert all(b["pixel_values"].shape == (8, 3, 224, 224) for b in reference)
    cfg.data.num_workers = 2
    _assert_same_batches(_batches(build_loader(cfg.data, cfg.model, tiny_model, plan, seed=5), 5), reference)
    _assert_same_batches(
        _batches(build_loader(cfg.data, cfg.model, tiny_model, plan, seed=5, start=2), 3), reference[2:]
    )


def test_two_ranks_together_see_the_one_process_samples(tiny_config, tiny_model, tmp_path):
    cfg = tiny_config(2, tmp_path)

    def rows(batch):  # each sample's unpadded tokens and labels
        keep = batch["attention_mask"].bool()
        return {
            (tuple(i[m].tolist()), tuple(lab[m].tolist()))
            for i, lab, m in zip(batch["input_ids"], batch["labels"], keep, strict=True)
        }

    one = _batches(build_loader(cfg.data, cfg.model, tiny_model, BatchPlan(4, 1), seed=0), 3)
    ranks = [
        _batches(build_loader(cfg.data, cfg.model, tiny_model, BatchPlan(4, 1, r, 2), seed=0), 3)
        for r in (0, 1)
    ]
    for j in range(3):
        assert rows(ranks[0][j]) | rows(ranks[1][j]) == rows(one[j])
        assert len(ranks[0][j]["labels"]) == len(ranks[1][j]["labels"]) == 2


# --- corrupt samples -----------------------------------------------------------------------------


def _write_shard(path: Path, members: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for member in members:
            sink.write(member)


def _one_source_config(tiny_config, folder, tmp_path):
    return tiny_config(
        1,
        tmp_path,
        f"data.sources=[{{name: x, path: '{folder}'}}]",
        "data.streams=1",
        "data.shuffle_buffer=1",
    )


def test_corrupt_samples_are_skipped_counted_and_named(tiny_config, tiny_model, tmp_path, caplog):
    good = scenes.render_scene(random.Random(0))
    jpg, caption = jpeg_bytes(good.image), json.dumps({"caption": scenes.caption(good)})
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_shard(
        folder / "shard-00000.tar",
        [
            {"__key__": "good0", "jpg": jpg, "json": caption},
            {"__key__": "badjpg", "jpg": b"\xff\xd8 not a jpeg", "json": caption},
            {"__key__": "nocaption", "jpg": jpg, "json": json.dumps({"text": "x"})},
            {"__key__": "good1", "jpg": jpg, "json": caption},
            {"__key__": "noimage", "json": caption},
            {"__key__": "good2", "jpg": jpg, "txt": "a caption in txt"},
        ],
    )
    cfg = _one_source_config(tiny_config, folder, tmp_path)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(build_loader(cfg.data, cfg.model, tiny_model, BatchPlan(6, 1), seed=0)))
    assert batch["corrupt"] == 3 and batch["labels"].shape[0] == 3
    skipped = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(skipped) == 3
    for key in ("badjpg", "nocaption", "noimage"):
        assert any(f"shard-00000.tar/{key}" in m for m in skipped), key


def test_a_truncated_shard_is_counted_and_its_readable_part_used(tiny_config, tiny_model, tmp_path, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    members = []
    for i in range(4):
        scene = scenes.render_scene(random.Random(i))
        members.append({"__key__": f"s{i}", "jpg": jpeg_bytes(scene.image), "txt": scenes.caption(scene)})
    _write_shard(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmembers()[4]  # cut inside the third sample's image
    (folder / "shard-00000.tar").write_bytes(data[: third.offset_data + 100])
    cfg = _one_source_config(tiny_config, folder, tmp_path)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(build_loader(cfg.data, cfg.model, tiny_model, BatchPlan(4, 1), seed=0)))
    assert batch["corrupt"] >= 1
    assert any("unreadable shard data" in r.getMessage() for r in caplog.records)
    texts = {tiny_model.tokenizer.decode([t for t in row if t >= 0]) for row in batch["labels"].tolist()}
    assert texts <= {scenes.caption(scenes.render_scene(random.Random(i))) + "\n" for i in range(2)}


# --- labels --------------------------------------------------------------------------------------


def _builder(model, stage, max_tokens):
    return TextBuilder(
        lambda text, n: prompt_ids(model, text, n),
        model.tokenizer,
        get_template("vicuna0"),
        stage,
        max_tokens,
    )


def test_stage1_golden_labels_supervise_the_caption_and_newline_only(tiny_model):
    ids, labels = _builder(tiny_model, 1, 32).build("a red circle")
    n = tiny_model.n_image_tokens
    assert ids == [1] + [IMAGE_TOKEN_ID] * n + [70, 725, 293, 468, 72, 333, 204]
    assert labels == [IGNORE_INDEX] * (1 + n) + [70, 725, 293, 468, 72, 333, 204]
    assert tiny_model.tokenizer.decode(labels[1 + n :]) == "a red circle\n"


def test_stage2_golden_labels_mask_the_prompt_and_image(tiny_model):
    ids, labels = _builder(tiny_model, 2, 160).build(
        "The image shows one shape.", "Describe this image in detail."
    )
    mask = "".join("1" if label != IGNORE_INDEX else "0" for label in labels)
    assert mask == "0" * 53 + "1" * 10
    assert ids[14:22] == [IMAGE_TOKEN_ID] * 8
    tok = tiny_model.tokenizer
    assert tok.decode(ids[:14]) == "<s>###Human: <Img>"
    assert tok.decode(ids[22:53]) == "</Img> Describe this image in detail. ###Assistant: "
    assert tok.decode(labels[53:]) == "The image shows one shape.###"


def test_text_is_cut_at_the_stage_limit(tiny_model):
    long = " ".join(["a red circle and a blue square"] * 20)
    for stage, limit in ((1, 32), (2, 160)):
        _, labels = _builder(tiny_model, stage, limit).build(long, "Describe this image in detail.")
        assert sum(label != IGNORE_INDEX for label in labels) == limit


def test_follow_up_turns_supervise_every_answer_and_mask_every_question(tiny_model):
    turns = [("What colour is it?", "Red."), ("Where is it?", "Top left.")]
    ids, labels = _builder(tiny_model, 2, 160).build("A circle.", "What is in this image?", turns)
    tok = tiny_model.tokenizer
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "A circle.###Red.###Top left.###"
    text = tok.decode([t for t in ids if t != IMAGE_TOKEN_ID])
    assert text.endswith(
        "What is in this image? ###Assistant: A circle.###Human: What colour is it? ###Assistant: Red.###"
        "Human: Where is it? ###Assistant: Top left.###"
    )
    masked = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX and t > 0])
    assert "Human: What colour is it? ###Assistant: " in masked and "Red." not in masked


def test_follow_ups_past_the_text_limit_are_left_out(tiny_model):
    builder = _builder(tiny_model, 2, 16)
    turns = [("Where?", "Left."), ("And?", " ".join(["a red circle"] * 10)), ("Colour?", "Red.")]
    _, labels = builder.build("A circle.", "What is it?", turns)
    assert tiny_model.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "A circle.###Left.###"


def test_padding_is_masked_and_counted_out():
    input_ids, attention_mask, labels = pad_batch([([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])], pad_id=3)
    assert input_ids.tolist() == [[1, 5, 6], [1, 7, 3]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert supervised_tokens(labels) == 3


# --- configuration -------------------------------------------------------------------------------


def test_config_errors_name_the_key(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.bogus"):
        tiny_config(1, tmp_path, "data.bogus=1")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.path.*not found"):
        tiny_config(1, tmp_path, "data.sources=[{name: a, path: 'nowhere/shard-{0..3}.tar'}]")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.path.*filter_cap\.json"):
        tiny_config(2, tmp_path, f"data.sources=[{{name: a, path: '{tmp_path}'}}]")
    with pytest.raises(ConfigError, match=r"data\.prompts_file"):
        tiny_config(2, tmp_path, "data.prompts_file=null")
    with pytest.raises(ConfigError, match=r"run\.batch_size"):
        check_batch_layout(tiny_config(1, tmp_path, "run.batch_size=3"), world_size=1)


@pytest.mark.parametrize(
    "turns",
    [["What colour?", "Red."], [["What colour?"]], [["What colour?", 3]], [["", "Red."]], "What colour?"],
)
def test_malformed_follow_up_turns_name_the_annotation(tmp_path, turns):
    from minigpt4.data.stage2 import read_annotations

    ann = [
        {"image_id": "1", "caption": "A.", "instruction": "Q?"},
        {"image_id": "2", "caption": "B.", "turns": turns},
    ]
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": ann}))
    with pytest.raises(ConfigError, match=r"annotations\[1\]\.turns must be a list of \[question, answer\]"):
        read_annotations(tmp_path, "x")


def test_follow_up_turns_reach_the_record(tmp_path):
    from minigpt4.data.stage2 import read_annotations

    ann = [{"image_id": "1", "caption": "A.", "instruction": "Q?", "turns": [["Where?", "Left."]]}]
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": ann}))
    assert read_annotations(tmp_path, "x")[0]["turns"] == [("Where?", "Left.")]
