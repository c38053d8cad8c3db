"""The lite model's stage-2 mixture: teacher answers kept by the instruct rules, replay, and the mix."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from minigpt4.commands.make_data import main as make_data
from minigpt4.eval import instruct
from minigpt4.lite import data, mix, teach


def _images(tmp_path: Path, seed: int = 0, scenes: int = 4, classes: int = 8) -> teach.TeachImages:
    return teach.make_images(random.Random(seed), scenes, classes, tmp_path / "image")


def test_training_instructions_leave_out_the_held_out_kinds_and_never_use_an_eval_phrasing() -> None:
    phrasings = [p for ps in teach.TRAIN_KINDS.values() for p in ps]
    assert len(phrasings) >= 40 and len(set(phrasings)) == len(phrasings)
    eval_phrasings = {p for kind in instruct.KINDS for p in kind.phrasings}
    assert not set(phrasings) & eval_phrasings
    # Nor do the closed class examples that open with the picture's colours (`make-data lite`).
    assert not set(data.COLOURS_QUESTIONS) & (eval_phrasings | set(phrasings))
    assert not set(teach.TRAIN_KINDS) & set(instruct.HELD_OUT)
    scored = set(teach.TRAIN_KINDS) & set(instruct.KIND_NAMES)
    assert len(scored) >= 8 and set(teach.TRAIN_KINDS) - scored  # also kinds the eval does not score
    # Replay asks nothing of the held-out kinds either (no haiku, advert or question).
    assert not any(word in t.lower() for t in teach.REPLAY_TASKS for word in ("haiku", "advert", "slogan"))


def test_class_facts_name_the_class_hedge_when_unsure_and_name_only_a_shown_colour() -> None:
    sure = teach.class_truth(285, 0.9, "orange")  # Egyptian cat
    assert sure.facts.startswith("The image shows ") and sure.facts.endswith(" It is mostly orange.")
    assert sure.colours == ("orange",) and sure.animals and not sure.people
    assert "cat" in sure.objects
    unsure = teach.class_truth(948, 0.2, None)  # Granny Smith
    assert unsure.facts == "The image seems to show a Granny Smith." and unsure.colours == ()
    assert not unsure.animals


def test_plan_asks_different_kinds_per_image_and_no_colours_of_an_image_without_colour(
    tmp_path: Path,
) -> None:
    images = _images(tmp_path, scenes=6, classes=30)
    asked = teach.plan(images, random.Random(1), n_replay=10)
    per_image: dict[str, list[str]] = {}
    for a in asked:
        if a.kind != "replay":
            per_image.setdefault(a.image_id, []).append(a.kind)
            assert a.instruction in teach.TRAIN_KINDS[a.kind] and a.facts == a.truth.facts
    assert set(per_image) == set(images.truths)
    assert all(len(kinds) == teach.PER_IMAGE == len(set(kinds)) for kinds in per_image.values())
    for image_id, kinds in per_image.items():
        if not images.truths[image_id].colours:
            assert "colours" not in kinds
    replay = [a for a in asked if a.kind == "replay"]
    assert len(replay) == 10 and all(a.facts == "" and a.truth is None for a in replay)
    # The annotations carry what the feature writer needs: a class example's top-5 and its pictures.
    for image_id, annotation in images.annotations.items():
        if image_id.startswith("tclass"):
            assert len(annotation["classes"]) == 5
            for key in ("cells", "colour"):
                assert annotation[key] is None or (tmp_path / "image" / f"{annotation[key]}.jpg").exists()
            assert (annotation["colour"] is None) == (images.truths[image_id].colours == ())
        else:
            assert (tmp_path / "image" / f"{image_id}.jpg").exists()


def test_plan_with_kinds_asks_only_those_and_the_command_refuses_an_unknown_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path, scenes=6, classes=30)
    asked = teach.plan(images, random.Random(1), n_replay=3, kinds=["colours", "poem"])
    by_image: dict[str, list[str]] = {}
    for a in asked:
        if a.kind != "replay":
            by_image.setdefault(a.image_id, []).append(a.kind)
    assert set(by_image) == set(images.truths)
    for image_id, kinds in by_image.items():
        # An image without a colour has one kind left to ask: it gets that one, once.
        expected = ["colours", "poem"] if images.truths[image_id].colours else ["poem"]
        assert sorted(kinds) == expected
    assert sum(a.kind == "replay" for a in asked) == 3

    with pytest.raises(SystemExit):
        make_data(["lite-teach", "--out", str(tmp_path / "t"), "--kinds", "poem,limerick"])
    err = capsys.readouterr().err
    assert "unknown kind(s) limerick" in err and "colours" in err
    assert not (tmp_path / "t").exists()


def test_kept_answers_pass_every_rule_and_talk_about_the_picture_not_the_facts() -> None:
    truth = instruct.Truth("The image shows a red apple.", ("apple",), ("red",), False, False)
    asked = [teach.Asked(f"a/{n}", "a", kind, "…", truth.facts, truth) for n, kind in enumerate(
        ["poem", "title", "story", "mood", "colours"]
    )]  # fmt: skip
    answers = [
        "A red apple in the sun,\nIts skin so round and bright,\nA snack for everyone.",  # kept
        "The Apple That a Man Forgot",  # invents a man
        "Based on the description you gave, the apple was red. It sat there. It waited.",  # meta
        "Calm and fresh: this apple feels like a quiet autumn morning.",  # kept (a kind the eval lacks)
        "It is blue.",  # invents a colour, names none shown
    ]
    rows = teach.keep(asked, answers)
    assert [r["passed"] for r in rows] == [True, False, False, True, False]
    assert rows[1]["invented"] == ["man"] and rows[2]["meta"] and rows[4]["invented"] == ["blue"]
    # A replay answer only needs to be a real answer.
    replay = teach.Asked("a/r0", "a", "replay", "Write a short poem about snow.", "", None)
    assert [r["passed"] for r in teach.keep([replay, replay], ["Snow falls softly on the town.", "Ok."])] == [
        True,
        False,
    ]


def test_an_answer_that_quotes_the_facts_is_not_kept_and_stored_answers_meet_todays_rules(
    tmp_path: Path,
) -> None:
    truth = instruct.Truth("The image shows a red apple.", ("apple",), ("red",), False, False)
    asked = [teach.Asked(f"a/{n}", "a", "colours", "Which colours?", truth.facts, truth) for n in range(3)]
    answers = [
        'The image shows a red apple. The original text says "a red apple".',
        "This red apple is the only colour in the original photo.",  # an original photo is not meta
        "The apple is red. The sentence says red, so it is red.",
    ]
    assert [r["meta"] for r in teach.keep(asked, answers)] == [True, False, True]
    # A row stored as kept before a rule existed is read back as failed, and a rerun asks it again.
    out = tmp_path / "answers.jsonl"
    row = {"key": "a/0", "kind": "colours", "answer": answers[0], "passed": True, "meta": False, "try": 1}
    out.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert teach.read_answers(out)["a/0"] == row | {"passed": False, "meta": True, "symbols": False}
    rows = teach.teach(
        lambda prompts, sample: ["A red apple: red all over."] * len(prompts), asked[:1], out, tries=2
    )
    assert rows["a/0"]["passed"] and rows["a/0"]["try"] == 2


def test_an_answer_that_runs_into_a_line_of_emoji_is_not_kept() -> None:
    truth = instruct.Truth("The image shows a red apple.", ("apple",), ("red",), False, False)
    asked = [
        teach.Asked(f"a/{n}", "a", "tweet", "Write a tweet about this picture.", truth.facts, truth)
        for n in range(2)
    ]
    answers = [
        "🍎 A red apple, fresh from the market: the best snack of the day! 🍏",  # two emoji: kept
        "🍎 A red apple for the weekend! 🌟🍽️🎉💡🔬📐😊💖💜💵💪💵💵💵💵",
    ]
    rows = teach.keep(asked, answers)
    assert [r["passed"] for r in rows] == [True, False] and rows[1]["symbols"] and rows[1]["form"]
    replay = teach.Asked("a/r0", "a", "replay", "Write a post about the sea.", "", None)
    assert not teach.keep([replay], ["The sea is calm today 🌊🌊🌊🌊🌊🌊🌊🌊"])[0]["passed"]


def test_two_kinds_the_eval_does_not_score_must_not_get_the_same_answer() -> None:
    truth = instruct.Truth("The image shows a red apple.", ("apple",), ("red",), False, False)
    same = "This red apple reminds me of a crisp autumn morning at the market."
    asked = [
        teach.Asked(f"a/{n}", "a", kind, "…", truth.facts, truth)
        for n, kind in enumerate(["mood", "compare"])
    ]
    rows = teach.keep(asked, [same, same])
    assert [r["diverse"] for r in rows] == [False, False] and not any(r["passed"] for r in rows)
    other = teach.Asked("b/0", "b", "compare", "…", truth.facts, truth)  # another image may repeat it
    assert teach.keep([asked[0], other], [same, same])[0]["passed"]


def test_teacher_is_asked_each_instruction_once_and_a_rerun_asks_only_what_is_missing(tmp_path: Path) -> None:
    images = _images(tmp_path)
    asked = teach.plan(images, random.Random(2), n_replay=4)
    prompts_seen: list[str] = []

    def answer(prompts, sample):
        assert sample is None  # one try: greedy
        prompts_seen.extend(prompts)
        return [
            f"A picture of a circle, a square, number {len(prompts_seen) - len(prompts) + i}."
            for i in range(len(prompts))
        ]

    out = tmp_path / "answers.jsonl"
    first = teach.teach(answer, asked[:7], out, batch_size=4)
    assert len(first) == 7 and len(prompts_seen) == 7
    # The facts come first, in the instruct eval's upper-bound words; replay is asked bare.
    by_prompt = dict(zip(prompts_seen, asked[:7], strict=True))
    for prompt, a in by_prompt.items():
        assert prompt == (f"{a.facts} {a.instruction}" if a.facts else a.instruction)
    with out.open("a") as f:
        f.write('{"key": "torn')  # a kill mid-line
    rows = teach.teach(answer, asked, out, batch_size=4)
    assert len(prompts_seen) == len(asked) and set(rows) == {a.key for a in asked}
    # The set holds one example per image with kept answers, the rest of them as turns.
    counts = teach.write_set(images, asked, rows, tmp_path)
    annotations = json.loads((tmp_path / "filter_cap.json").read_text())["annotations"]
    kept = {k for k, r in rows.items() if r["passed"]}
    assert (
        sum(1 + len(a["turns"]) for a in annotations) == len(kept) == sum(c["kept"] for c in counts.values())
    )
    assert sum(c["asked"] for c in counts.values()) == len(asked)


def test_a_failed_answer_is_asked_again_sampled_and_a_rerun_goes_on_at_its_try(tmp_path: Path) -> None:
    truth = instruct.Truth("The image shows a red apple.", ("apple",), ("red",), False, False)
    asked = [teach.Asked(f"a/{n}", "a", kind, f"ask {kind}", truth.facts, truth) for n, kind in enumerate(
        ["poem", "title", "mood"]
    )]  # fmt: skip
    poem = "A red apple in the sun,\nIts skin so round and bright,\nA snack for everyone."
    calls: list[tuple[list[str], object]] = []
    replies = iter(
        [
            [poem, "It is blue.", "Calm: the red apple feels like an autumn morning."],  # title fails
            ["The Blue Apple"],  # try 2 of the title: invents a colour again
        ]
    )

    def answer(prompts, sample):
        calls.append((list(prompts), sample))
        return next(replies)

    out = tmp_path / "answers.jsonl"
    rows = teach.teach(answer, asked, out, batch_size=8, tries=2)
    assert [c[1] is None for c in calls] == [True, False]  # greedy first, then sampled
    assert calls[1][0] == [f"{truth.facts} ask title"] and calls[1][1].seed > 0
    assert rows["a/1"]["try"] == 2 and not rows["a/1"]["passed"] and rows["a/0"]["try"] == 1
    # A rerun with one more try asks only the title, sampled with that try's own seed; an answer the
    # same as an already kept one about the image fails the diversity rule.
    replies = iter([[poem]])
    rows = teach.teach(answer, asked, out, batch_size=8, tries=3)
    assert calls[2][0] == [f"{truth.facts} ask title"] and calls[2][1].seed != calls[1][1].seed
    assert rows["a/1"]["try"] == 3 and not rows["a/1"]["diverse"]
    replies = iter([["A Red Apple at Dawn"]])
    rows = teach.teach(answer, asked, out, batch_size=8, tries=4)
    assert rows["a/1"]["passed"] and teach.read_answers(out)["a/1"]["answer"] == "A Red Apple at Dawn"
    assert teach.teach(answer, asked, out, batch_size=8, tries=4) == teach.read_answers(out)  # nothing left
    assert len(calls) == 4


def test_make_data_lite_teach_no_ask_rebuilds_the_same_images_and_set(tmp_path: Path) -> None:
    out = tmp_path / "teach"
    argv = [
        "lite-teach",
        "--out",
        str(out),
        "--scenes",
        "3",
        "--classes",
        "4",
        "--replay",
        "2",
        "--describe",
        "2",
    ]
    rng = random.Random(8000)  # the command's default seed: the same images and instructions
    images = teach.make_images(rng, 3, 4, tmp_path / "probe")
    asked = teach.plan(images, rng, 2)
    out.mkdir()
    rows = [{"key": a.key, "kind": a.kind, "answer": "x", "passed": False} for a in asked]
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert make_data([*argv, "--no-ask"]) == 0
    first = sorted(p.name for p in (out / "cc_sbu_align" / "image").iterdir())
    assert len(first) >= 3 and len(list((out / "describe").iterdir())) == 2
    facts = [json.loads(line) for line in (out / "describe_facts.jsonl").read_text().splitlines()]
    assert [f["image_id"] for f in facts] == ["d00000", "d00001"] and all(f["facts"] for f in facts)
    for f in facts:  # the truth the filter's facts rule checks: words the facts sentence uses
        truth = instruct.Truth.from_words(f["truth"])
        assert instruct.found(f["facts"], truth.objects)
        assert not truth.people and not truth.animals
    counts = json.loads((out / "counts.json").read_text())
    assert sum(c["asked"] for c in counts.values()) == len(asked)


def _set(folder: Path, annotations: list[dict], pictures: list[str]) -> Path:
    (folder / "image").mkdir(parents=True)
    for name in pictures:
        (folder / "image" / f"{name}.jpg").write_bytes(b"jpeg " + name.encode())
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return folder


def test_mix_prefixes_ids_repeats_and_gives_curated_descriptions_an_instruction(tmp_path: Path) -> None:
    closed = _set(
        tmp_path / "closed",
        [
            {"image_id": "00001", "instruction": "What colour is it?", "caption": "Red.", "turns": []},
            {"image_id": "class00001", "instruction": "What is this?", "caption": "A cat.", "classes": [[1, 0.9]],
             "cells": "00001", "colour": "blob00001"},
        ],
        ["00001", "blob00001"],
    )  # fmt: skip
    curated = _set(tmp_path / "curated", [{"image_id": "00001", "caption": "A long description."}], ["00001"])
    counts = mix.mix(
        [mix.Source("closed", closed), mix.Source.parse(f"curated={curated}*2")], tmp_path / "out", seed=0
    )
    assert counts == {"closed": 2, "curated": 2}
    rows = {
        a["image_id"]: a
        for a in json.loads((tmp_path / "out" / "filter_cap.json").read_text())["annotations"]
    }
    assert set(rows) == {"closed-00001", "closed-class00001", "curated-00001", "curated-00001-1"}
    assert rows["closed-class00001"]["cells"] == "closed-00001"
    assert rows["closed-class00001"]["colour"] == "closed-blob00001"
    for key in ("curated-00001", "curated-00001-1"):
        assert rows[key]["instruction"] in mix.DETAIL_INSTRUCTIONS and rows[key]["source"] == "curated"
    images = tmp_path / "out" / "image"
    # Same-named pictures of two sources stay apart; a repeat reads its source's picture.
    assert (images / "closed-00001.jpg").read_bytes() == (images / "curated-00001.jpg").read_bytes()
    assert (images / "curated-00001-1.jpg").exists() and (images / "closed-blob00001.jpg").exists()


def test_a_fractional_repeat_adds_a_seeded_sample_of_the_part_below_one(tmp_path: Path) -> None:
    rows = [{"image_id": f"{i:05d}", "instruction": "What is it?", "caption": f"A {i}."} for i in range(10)]
    source = _set(tmp_path / "closed", rows, [r["image_id"] for r in rows])

    def mixed(repeat: str, seed: int) -> list[str]:
        out = tmp_path / f"out{repeat}-{seed}"
        counts = mix.mix([mix.Source.parse(f"closed={source}*{repeat}")], out, seed=seed)
        ids = [a["image_id"] for a in json.loads((out / "filter_cap.json").read_text())["annotations"]]
        assert counts == {"closed": len(ids)}
        return ids

    half = mixed("0.5", seed=1)
    assert len(half) == 5 and len(set(half)) == 5
    assert sorted(half) == sorted(mixed("0.5", seed=1))  # the same seed, the same sample
    once_and_a_half = mixed("1.5", seed=2)
    assert len(once_and_a_half) == 15
    again = [i for i in once_and_a_half if i.endswith("-1")]
    assert len(again) == 5 and all(i.removesuffix("-1") in once_and_a_half for i in again)
    assert (tmp_path / "out1.5-2" / "image" / f"{again[0]}.jpg").exists()  # a repeat reads its picture


@pytest.mark.parametrize(
    ("text", "message"),
    [("nodata", "expected NAME=PATH"), ("Closed=x", "expected NAME=PATH"), ("=x", "expected NAME=PATH"),
     ("a=x*-1", "expected NAME=PATH"), ("a=x*0", "above 0"), ("a=x*0.0", "above 0")],
)  # fmt: skip
def test_a_bad_source_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mix.Source.parse(text)


def test_make_data_lite_mix_names_a_broken_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "filter_cap.json").write_text("{not json")
    assert make_data(["lite-mix", "--source", f"teach={broken}", "--out", str(tmp_path / "out")]) == 2
    assert "teach:" in capsys.readouterr().err
