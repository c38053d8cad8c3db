"""Readers of COCO / VQAv2 / POPE files, and the offline eval set they read."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from minigpt4.data import scenes
from minigpt4.eval import evalset
from minigpt4.eval.data import DataError, read_captions, read_followup, read_pope, read_vqa
from minigpt4.eval.photos import COLOUR_OPTIONS, PHOTOS


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_read_captions_groups_references_per_image(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "a.png")
    coco = {
        "images": [{"id": 7, "file_name": "a.png"}],
        "annotations": [{"image_id": 7, "caption": "a red square"}, {"image_id": 7, "caption": "red"}],
    }
    [sample] = read_captions(_write(tmp_path / "c.json", coco), tmp_path / "img")
    assert sample.image_id == 7
    assert sample.image == tmp_path / "img" / "a.png"
    assert sample.references == ("a red square", "red")


def test_read_captions_errors_name_the_file_and_entry(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    bad_field = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1}]}
    with pytest.raises(DataError, match=r"c\.json annotations\[0\]: missing field 'caption'"):
        read_captions(_write(tmp_path / "c.json", bad_field), tmp_path)
    unknown_image = {"images": [], "annotations": [{"image_id": 3, "caption": "x"}]}
    with pytest.raises(DataError, match="image_id 3 is not in 'images'"):
        read_captions(_write(tmp_path / "c.json", unknown_image), tmp_path)
    missing_file = {
        "images": [{"id": 1, "file_name": "gone.png"}],
        "annotations": [{"image_id": 1, "caption": "x"}],
    }
    with pytest.raises(DataError, match=r"gone\.png does not exist"):
        read_captions(_write(tmp_path / "c.json", missing_file), tmp_path)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        read_captions(tmp_path / "broken.json", tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_captions(tmp_path / "absent.json", tmp_path)


def test_read_vqa_uses_coco_image_names_without_an_images_list(tmp_path: Path) -> None:
    _image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = {
        "data_subtype": "val2014",
        "questions": [{"question_id": 420, "image_id": 42, "question": "Why?"}],
    }
    annotations = {
        "annotations": [{"question_id": 420, "answer_type": "other", "answers": [{"answer": "because"}] * 10}]
    }
    [sample] = read_vqa(
        _write(tmp_path / "q.json", questions), _write(tmp_path / "a.json", annotations), tmp_path / "val2014"
    )
    assert sample.image.name == "COCO_val2014_000000000042.jpg"
    assert sample.question == "Why?" and sample.answers == ("because",) * 10 and sample.answer_type == "other"


def test_read_vqa_rejects_a_question_without_annotation(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    questions = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "questions": [{"question_id": 5, "image_id": 1, "question": "What?"}],
    }
    annotations = {"annotations": [{"question_id": 6, "answers": [{"answer": "x"}]}]}
    with pytest.raises(DataError, match="question_id 5 has no entry"):
        read_vqa(_write(tmp_path / "q.json", questions), _write(tmp_path / "a.json", annotations), tmp_path)


def test_read_pope_checks_labels_and_keeps_categories(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    lines = [
        {"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "Yes", "category": "random"},
        {"question_id": 2, "image": "a.png", "text": "Is there a dog?", "label": "no"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    first, second = read_pope(path, tmp_path)
    assert (first.label, first.category, second.label, second.category) == ("yes", "random", "no", "")
    path.write_text(json.dumps({**lines[0], "label": "maybe"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: label must be 'yes' or 'no'"):
        read_pope(path, tmp_path)


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("evalset")
    return out, evalset.write_eval_set(out, n_scenes=4, seed=3)


def test_eval_set_reads_back_in_all_three_formats(eval_set: tuple[Path, dict[str, int]]) -> None:
    out, counts = eval_set
    images = out / evalset.IMAGES_DIR
    caps = read_captions(out / evalset.CAPTIONS_FILE, images)
    vqa = read_vqa(out / evalset.VQA_QUESTIONS_FILE, out / evalset.VQA_ANNOTATIONS_FILE, images)
    pope = read_pope(out / evalset.POPE_FILE, images)
    assert counts["images"] == len(caps) == 4 + len(PHOTOS)
    assert counts["vqa"] == len(vqa) and counts["pope"] == len(pope)
    assert all(len(s.answers) == 10 for s in vqa)
    assert {s.category for s in pope} == {"random", "adversarial", "photo"}
    # POPE probes are balanced between present and absent objects in every category.
    for category in ("random", "adversarial"):
        labels = [s.label for s in pope if s.category == category]
        assert labels.count("yes") == labels.count("no") > 0
    photo_names = {s.image.name for s in caps if s.image.name.startswith("photo_")}
    assert photo_names == {f"photo_{p.file_name}" for p in PHOTOS}
    # Scene questions carry their closed answer set, photo questions none.
    for s in vqa:
        scene = s.image.name.startswith("scene_")
        assert bool(s.options) == scene
        if scene:
            assert s.answers[0] in s.options
    # Photos carry the words that name their main object; scenes none.
    objects = {s.image.name: s.objects for s in caps}
    assert all(objects[f"photo_{p.file_name}"] == p.objects and p.objects for p in PHOTOS)
    assert all(not words for name, words in objects.items() if not name.startswith("photo_"))


def test_eval_set_scene_text_matches_what_was_drawn(eval_set: tuple[Path, dict[str, int]]) -> None:
    out, _ = eval_set
    images = out / evalset.IMAGES_DIR
    first = read_captions(out / evalset.CAPTIONS_FILE, images)[0]
    pope = [s for s in read_pope(out / evalset.POPE_FILE, images) if s.image == first.image]
    # Re-render the first scene from the same seed: its caption and its POPE answers must agree.
    scene = scenes.render_scene(random.Random(3))
    assert first.references[0] == scenes.caption(scene)
    present = {o.name for o in scene.objects}
    for probe in pope:
        named = probe.question.removeprefix("Is there a ").removeprefix("n ").removesuffix(" in the image?")
        assert (named in present) == (probe.label == "yes"), probe
    with Image.open(first.image) as drawn:
        assert list(drawn.getdata()) == list(scene.image.getdata())


def test_eval_set_is_deterministic(eval_set: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    out, _ = eval_set
    evalset.write_eval_set(tmp_path, n_scenes=4, seed=3)
    for name in (
        evalset.CAPTIONS_FILE,
        evalset.VQA_QUESTIONS_FILE,
        evalset.VQA_ANNOTATIONS_FILE,
        evalset.POPE_FILE,
        evalset.FOLLOWUP_FILE,
    ):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_eval_set_followups_ask_about_what_was_drawn(eval_set: tuple[Path, dict[str, int]]) -> None:
    out, counts = eval_set
    samples = read_followup(out / evalset.FOLLOWUP_FILE, out / evalset.IMAGES_DIR)
    assert counts["followup"] == len(samples) == 4 + len(PHOTOS)
    assert all(s.first_question == "What is in this image?" for s in samples)
    scene_samples = [s for s in samples if s.category == "scene"]
    # One follow-up per scene, the kinds in turn, each with one right answer from its closed set.
    assert [s.kind for s in scene_samples] == ["colour", "position", "count", "colour"]
    assert all(len(s.answers) == 1 and s.options == scenes.answer_options(s.question) for s in scene_samples)
    # The answers agree with the first scene, re-rendered from the same seed.
    scene = scenes.render_scene(random.Random(3))
    colour = scene_samples[0]
    shape = colour.question.removeprefix("What colour is the ").split()[0].rstrip("?")
    assert colour.answers[0] in {o.colour for o in scene.objects if o.shape == shape}
    assert colour.image.name == "scene_000.png"
    # Photos: "What colour is it?" with the colours written in photos.py.
    photo_samples = {s.image.name: s for s in samples if s.category == "photo"}
    for photo in PHOTOS:
        sample = photo_samples[f"photo_{photo.file_name}"]
        assert (sample.question, sample.kind) == ("What colour is it?", "colour")
        assert sample.answers == photo.colour and sample.options == COLOUR_OPTIONS
    assert photo_samples["photo_motorcycle_left.png"].answers == ("red",)


def test_scene_followups_name_one_object_and_answer_from_its_ground_truth() -> None:
    rng = random.Random(5)
    for _ in range(30):
        scene = scenes.render_scene(rng)
        for kind in scenes.FOLLOWUP_KINDS:
            question, answer = scenes.followup(scene, kind, rng)
            assert scenes.question_kind(question) == kind and answer in scenes.answer_options(question)
            if kind == "colour":
                matches = [o for o in scene.objects if f"the {o.shape}" in question]
                if "in the" in question:
                    matches = [o for o in matches if question.endswith(f"in the {o.position}?")]
                assert [o.colour for o in matches] == [answer], question
            elif kind == "position":
                named = question.removeprefix("Where is the ").removesuffix("?")
                assert [o.position for o in scene.objects if named in (o.shape, o.name)] == [answer]
            else:
                shape = question.removeprefix("How many ").removesuffix(" are there?")
                assert answer == str(sum(scenes.plural(o.shape) == shape for o in scene.objects))
    with pytest.raises(ValueError, match="unknown follow-up kind 'size'"):
        scenes.followup(scene, "size", rng)


def test_read_followup_checks_the_answers_are_options(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    line = {
        "question_id": 1,
        "image": "a.png",
        "first_question": "What is in this image?",
        "question": "What colour is it?",
        "kind": "colour",
        "answers": ["red"],
        "options": ["red", "blue"],
    }
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    [sample] = read_followup(path, tmp_path)
    assert (sample.answers, sample.options, sample.category) == (("red",), ("red", "blue"), "")
    path.write_text(json.dumps({**line, "answers": ["green"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: 'answers' must be one or more of 'options'"):
        read_followup(path, tmp_path)
    del line["first_question"]
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing field 'first_question'"):
        read_followup(path, tmp_path)


def test_make_data_eval_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from minigpt4.__main__ import main

    assert main(["make-data", "eval", "--out", str(tmp_path), "--scenes", "2", "--no-photos"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert len(read_pope(tmp_path / evalset.POPE_FILE, tmp_path / evalset.IMAGES_DIR)) == 8
    assert main(["make-data", "eval", "--out", str(tmp_path / "x"), "--scenes", "-1"]) == 2
    assert "n_scenes must be at least 0" in capsys.readouterr().err
