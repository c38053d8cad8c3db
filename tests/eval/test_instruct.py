"""The instruct task: its scoring rules on hand-written answers, its eval-set file, its upper bound
(the LLM without image or LoRA) and the task end to end on the tiny preset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minigpt4.chat import load_chat
from minigpt4.config import load_preset
from minigpt4.data import scenes
from minigpt4.eval import evalset, instruct, run
from minigpt4.eval.answer import BatchAnswerer, Sampling
from minigpt4.eval.data import DataError, read_instruct
from minigpt4.eval.instruct import (
    FORM_RULES,
    HELD_OUT,
    KIND_NAMES,
    Truth,
    check_answers,
    grounded,
    instruct_metrics,
    invented,
)
from minigpt4.eval.photos import PHOTOS
from minigpt4.eval.upper_bound import BareLLM, told_prompt

# A scene with a red circle and a blue star on grey; a photo of a cameraman (people, no animals).
SCENE = Truth(
    "The image shows a red circle and a blue star on a plain gray background.",
    instruct.SHAPE_WORDS["circle"] + instruct.SHAPE_WORDS["star"],
    ("blue", "gray", "grey", "red"),
    people=False,
    animals=False,
)
CAMERA = instruct.photo_truth(next(p for p in PHOTOS if p.file_name == "camera.png"))

POEM = """A red circle rests on grey,
a blue star keeps it company,
two shapes alone at the end of day,
quiet as a picture can be."""
HAIKU = "Red circle, blue star\nresting on a quiet grey\nshapes that never move"
STORY = (
    "Once upon a time a red circle lived on a grey page. One day a blue star came to visit. "
    "The circle was shy, but the star smiled and said hello. They looked at the empty page and "
    "decided to stay together, and from then on the page never felt empty again."
)
DESCRIPTION = (
    "The image shows two shapes on a plain grey background. A red circle sits in the top left "
    "corner, and a blue star with five points is in the bottom right. The rest of the picture is "
    "empty, so the two shapes stand out clearly against the flat grey colour around them."
)


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("describe", DESCRIPTION, "A red circle."),
        ("poem", POEM, "The image shows a red circle and a blue star on a grey background."),
        ("haiku", HAIKU, "Imagery is a concise word or phrase that evokes an image or mood in the reader."),
        ("story", STORY, DESCRIPTION),
        (
            "ideas",
            "You could use the circle as a logo.\nYou could also cut the star out and hang it up.",
            "You could cook lemon.",
        ),
        (
            "child",
            "This picture has a red circle. It is round like a ball. There is also a blue star.",
            "Red.",
        ),
        ("colours", "Red, blue and grey.", "A circle and a star."),
        ("advert", "Bring home the brightest red circle in town!", POEM),
        ("happening", "A red circle and a blue star sit on a grey background.", "Circle."),
        ("title", '"Circle Meets Star"', DESCRIPTION),
        ("title", "Title: Two Shapes at Rest", "Title:\nTwo\nShapes"),
        ("question", "Why is the star blue?", "The star is blue."),
        ("tweet", "Just saw the cutest red circle hanging out with a blue star #shapes", STORY + STORY),
    ],
)
def test_form_rules_tell_the_form_asked_for_from_other_answers(kind: str, good: str, bad: str) -> None:
    assert FORM_RULES[kind](good)
    assert not FORM_RULES[kind](bad)


def test_every_kind_has_a_form_rule_several_phrasings_and_held_out_kinds_are_kinds() -> None:
    assert set(FORM_RULES) == set(KIND_NAMES) and len(KIND_NAMES) >= 10
    assert all(len(set(k.phrasings)) >= 3 for k in instruct.KINDS)
    assert set(HELD_OUT) < set(KIND_NAMES)


def test_a_poem_on_one_line_with_slashes_counts_its_lines() -> None:
    assert FORM_RULES["poem"]("Red circle glows / blue star shines / on a field of grey")
    assert FORM_RULES["haiku"]("Red circle glows / blue star shines / on grey")


def test_invented_counts_people_animals_and_colours_the_truth_excludes() -> None:
    assert invented("A man looks at the red circle.", SCENE) == ["man"]
    assert invented("Two dogs chase a blue star.", SCENE) == ["dog"]
    assert invented("A green circle and a golden star.", SCENE) == ["golden", "green"]
    assert invented("A red circle and a blue star on grey.", SCENE) == []  # grey = gray
    assert invented("Someone could hang it up; people like stars.", SCENE) == []  # generic words
    # The cameraman photo has a man in it, and no animal; it is black and white.
    assert invented("A man films with his camera.", CAMERA) == []
    assert invented("A man films his dog in a red coat.", CAMERA) == ["dog", "red"]


def test_grounding_accepts_synonyms_and_plurals_and_colours_for_the_colours_kind() -> None:
    assert grounded("poem", "A round red shape on grey.", SCENE)  # "round" names the circle
    assert grounded("poem", "Two stars shine.", SCENE)
    assert not grounded("poem", "A red shape and a blue shape.", SCENE)
    assert not grounded("poem", "She started to stare.", SCENE)  # whole words only
    coins = instruct.photo_truth(next(p for p in PHOTOS if p.file_name == "coins.png"))
    assert grounded("title", "Rows of Old Coins", coins)
    assert grounded("colours", "Blue and red.", SCENE)
    assert not grounded("colours", "Green and yellow.", SCENE)


def test_the_same_answer_to_different_kinds_about_one_image_fails_diversity() -> None:
    same = "The image shows a red circle and a blue star on a plain gray background."
    checks = check_answers(["describe", "poem", "story"], [same, same, STORY], [SCENE] * 3, ["a", "a", "a"])
    assert [c.diverse for c in checks] == [False, False, True]
    assert not any(c.passed for c in checks[:2])
    # The same answer about different images, or to two phrasings of one kind, is no repeat.
    assert all(c.diverse for c in check_answers(["poem", "story"], [same, same], [SCENE] * 2, ["a", "b"]))
    assert all(c.diverse for c in check_answers(["poem", "poem"], [same, same], [SCENE] * 2, ["a", "a"]))


def test_an_answer_passes_when_every_rule_holds_and_an_empty_one_fails_all() -> None:
    poem, man_poem, empty = check_answers(
        ["poem", "story", "title"],
        [POEM, STORY.replace("a blue star", "a man"), "  "],
        [SCENE] * 3,
        ["a"] * 3,
    )
    assert poem.passed and poem.form and poem.grounded and poem.diverse and not poem.invented
    assert man_poem.form and man_poem.invented == ("man",) and not man_poem.passed
    assert not (empty.form or empty.grounded or empty.diverse or empty.passed)


def test_metrics_give_scores_ratios_and_invented_rates_per_kind_and_category() -> None:
    good, bad = check_answers(["poem", "poem"], [POEM, "A man."], [SCENE] * 2, ["a", "b"])
    model = [good, bad, bad, bad]
    upper = [good, good, good, bad]
    metrics = instruct_metrics(["poem", "poem", "title", "title"], ["scene", "photo"] * 2, model, upper)
    assert metrics["instruct_score"] == 0.25 and metrics["upper_bound_score"] == 0.75
    assert metrics["instruct_ratio"] == pytest.approx(1 / 3)
    assert metrics["invented_rate"] == 0.75 and metrics["upper_bound_invented_rate"] == 0.25
    assert metrics["per_kind"]["poem"]["instruct_ratio"] == 0.5
    assert metrics["per_kind"]["title"]["instruct_score"] == 0.0
    assert metrics["per_category"]["photo"]["instruct_ratio"] == 0.0
    assert metrics["per_category"]["scene"]["n"] == 2
    # No upper-bound pass: the ratio is not a number.
    assert instruct_metrics(["poem"], ["scene"], [bad], [bad])["instruct_ratio"] is None
    assert set(metrics["held_out_kinds"]) == set(HELD_OUT)
    rows = instruct.table(metrics).splitlines()
    assert any(row.split()[:5] == ["poem", "2", "0.50", "1.00", "0.50"] for row in rows)
    assert any(row.startswith("overall") for row in rows)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evalset")
    evalset.write_eval_set(out, n_scenes=3, seed=1, photos=False)
    return out


def test_eval_set_asks_every_kind_about_every_image_with_its_truth(tmp_path: Path) -> None:
    counts = evalset.write_eval_set(tmp_path, n_scenes=3, seed=5)
    samples = read_instruct(tmp_path / evalset.INSTRUCT_FILE, tmp_path / evalset.IMAGES_DIR)
    n_kinds = len(KIND_NAMES)
    assert counts["instruct"] == len(samples) == 3 * n_kinds + 2 * len(PHOTOS) * n_kinds
    by_image: dict[str, list] = {}
    for s in samples:
        by_image.setdefault(s.image.name, []).append(s)
    for name, asked in by_image.items():
        per_kind = 1 if name.startswith("scene_") else 2
        assert sorted(s.kind for s in asked) == sorted(KIND_NAMES * per_kind)
        assert len({s.instruction for s in asked}) == len(asked)  # photos: two different phrasings
    # Every phrasing is asked somewhere.
    asked = {s.instruction for s in samples}
    assert all(p in asked for k in instruct.KINDS for p in k.phrasings)
    # A scene's truth is what was drawn; a photo's is the hand-written one.
    scene = scenes.render_scene(random.Random(5))
    first = by_image["scene_000.png"][0]
    assert first.truth == instruct.scene_truth(scene) and first.category == "scene"
    assert all(o.shape in first.truth.objects and o.colour in first.truth.colours for o in scene.objects)
    assert (
        first.truth.facts
        == f"The image shows {scenes.caption(scene)} on a plain {scene.background} background."
    )
    cat = by_image["photo_chelsea.png"][0]
    assert cat.category == "photo" and cat.truth.animals and not cat.truth.people
    assert "cat" in cat.truth.objects and "blue" not in cat.truth.colours


def test_read_instruct_names_the_line_of_a_bad_entry(small_set: Path, tmp_path: Path) -> None:
    lines = (small_set / evalset.INSTRUCT_FILE).read_text().splitlines()
    entry = json.loads(lines[0]) | {"kind": "sonnet"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[1] + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(DataError, match="line 2: unknown kind 'sonnet'"):
        read_instruct(bad, small_set / evalset.IMAGES_DIR)


@pytest.fixture
def use_tiny_chat(tiny_chat, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(run, "chat_from_args", lambda args: tiny_chat)
    return tiny_chat


def test_eval_instruct_on_the_tiny_preset_writes_scores_and_the_upper_bound(
    use_tiny_chat, small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "instruct.json"
    args = ["--cfg-path", "minigpt4_tiny_random", "--task", "instruct", "--data", str(small_set)]
    assert run.main([*args, "--out", str(out), "--max-new-tokens", "6", "--limit", "14"]) == 0
    results = json.loads(out.read_text())
    metrics, preds = results["metrics"], results["predictions"]
    assert results["n"] == len(preds) == 14
    for key in ("instruct_score", "upper_bound_score", "instruct_ratio", "invented_rate", "rules"):
        assert key in metrics
    assert set(metrics["per_kind"]) == set(KIND_NAMES)
    assert set(metrics["per_category"]) == {"scene"}
    assert results["config"]["upper_bound"] == {
        "image": False,
        "lora": False,
        "prompt": "{facts} {instruction}",
    }
    # The scores are those of the recorded answers.
    assert metrics["instruct_score"] == pytest.approx(sum(p["passed"] for p in preds) / 14)
    assert metrics["upper_bound_score"] == pytest.approx(sum(p["upper_bound"]["passed"] for p in preds) / 14)
    first = preds[0]
    assert first["upper_bound"]["prompt"] == f"{first['truth']['facts']} {first['instruction']}"
    assert [p["held_out"] for p in preds] == [p["kind"] in HELD_OUT for p in preds]
    # The model's answer is the chat's with the image; the upper bound's, the chat's with no image.
    session = use_tiny_chat.new_session()
    use_tiny_chat.upload_image(session, small_set / evalset.IMAGES_DIR / first["image"])
    use_tiny_chat.add_question(session, first["instruction"])
    assert use_tiny_chat.answer(session, do_sample=False, max_new_tokens=6) == first["answer"]
    session = use_tiny_chat.new_session()
    use_tiny_chat.add_question(session, first["upper_bound"]["prompt"])
    assert use_tiny_chat.answer(session, do_sample=False, max_new_tokens=6) == first["upper_bound"]["answer"]
    printed = capsys.readouterr().out
    assert "upper" in printed and "overall" in printed and "haiku*" in printed


def test_the_upper_bound_runs_the_llm_without_its_lora(tiny_cfg_path: Path, tiny_chat) -> None:
    lora = "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    chat = load_chat(tiny_cfg_path, device="cpu", overrides=[lora])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero: an adapter that would change nothing
        for name, weight in chat.model.llm.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    cfg = load_preset(tiny_cfg_path, [lora])
    facts, asked = (
        ["The image shows a red circle."] * 2,
        ["Write a haiku about it.", "Give this image a title."],
    )
    told = [told_prompt(f, a) for f, a in zip(facts, asked, strict=True)]
    with_lora = BatchAnswerer(chat, 8).answer_texts(told)
    bare = BareLLM(chat, cfg.model, 8).answer(facts, asked)
    assert bare == BatchAnswerer(tiny_chat, 8).answer_texts(told)  # the same LLM, never adapted
    assert bare != with_lora
    assert BatchAnswerer(chat, 8).answer_texts(told) == with_lora  # the adapters are on again after


def test_sampled_answers_follow_their_seed_and_greedy_ones_stay_greedy(tiny_chat) -> None:
    answerer = BatchAnswerer(tiny_chat, 12)
    asked = ["The image shows a red circle. Write a haiku about it."] * 2 + ["Give this image a title."]
    first, again = (
        answerer.answer_texts(asked, Sampling(seed=5)),
        answerer.answer_texts(asked, Sampling(seed=5)),
    )
    assert first == again  # the same seed, the same draws
    assert first[0] != first[1]  # prompt i draws from seed + i: one prompt asked twice differs
    assert answerer.answer_texts(asked, Sampling(seed=6)) != first
    greedy = answerer.answer_texts(asked)
    assert greedy[0] == greedy[1] and greedy != first
