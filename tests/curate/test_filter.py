"""`curate filter`: each rule rejects what it should, with its reason, and passes clean text."""

from __future__ import annotations

from pathlib import Path

import pytest
from curate_helpers import GOOD_TEXT, read_records, write_jsonl

from minigpt4.curate import main
from minigpt4.curate.filter import FilterSettings, judge, reason_name
from minigpt4.curate.records import WorkDir
from minigpt4.eval.instruct import Truth

S = FilterSettings()


def reasons(text: str, settings: FilterSettings = S) -> list[str]:
    return [reason_name(r) for r in judge(text, settings)]


def test_clean_description_passes() -> None:
    assert judge(GOOD_TEXT, S) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("A dog on grass.", "too_few_words"),
        ("The dog is brown. " * 60, "too_many_words"),
        (
            "Das Bild zeigt einen kleinen braunen Hund, der auf einem grünen Rasen vor einem weißen Holzzaun sitzt. "
            "Der Hund hat Schlappohren und ein rotes Halsband und schaut mit offenem Maul in die Kamera.",
            "non_english",
        ),
        (
            "图片显示一只小棕狗坐在绿色草坪上，身后是白色木栅栏。狗有一个红色项圈，正抬头看着镜头。" * 2,
            "non_english",
        ),
        (" ".join(["qz ing tion blor ka mmm vex ul pra zo"] * 4), "non_english"),
        (
            GOOD_TEXT
            + " The image shows a small brown dog sitting on a green lawn in front of a white wooden fence.",
            "repeated_sentence",
        ),
        ("a dog on the grass " * 8, "repeated_ngram"),
        (GOOD_TEXT + " ###Human: Continue ###Assistant:", "template_tokens"),
        (GOOD_TEXT + " </s>", "template_tokens"),
        ("<|im_start|>assistant " + GOOD_TEXT, "template_tokens"),
        ("Here is the corrected paragraph: " + GOOD_TEXT, "explanation"),
        ("Sure! " + GOOD_TEXT, "explanation"),
        (GOOD_TEXT + " I removed the repeating sentences from the given paragraph.", "explanation"),
    ],
)
def test_each_rule_names_its_reason(text: str, expected: str) -> None:
    assert expected in reasons(text)


def test_thresholds_come_from_the_settings() -> None:
    assert "too_few_words" in reasons(GOOD_TEXT, FilterSettings(min_words=100))
    assert "too_many_words" in reasons(GOOD_TEXT, FilterSettings(max_words=30))
    assert "repeated_ngram" not in reasons(
        "a dog on the grass " * 3, FilterSettings(min_words=1, max_ngram_repeats=5)
    )


def refined_work(root: Path, texts: dict[str, str]) -> WorkDir:
    work = WorkDir(root)
    write_jsonl(work.refine, [{"image_id": k, "raw": t, "refined": t} for k, t in texts.items()])
    write_jsonl(work.refine, [{"image_id": "refused", "raw": "x", "error": "HTTP 400"}])
    return work


def table_rows(out: str) -> dict[str, int]:
    lines = out.strip().splitlines()
    assert lines[0].split() == ["reason", "count"]
    return {line.split()[0]: int(line.split()[-1]) for line in lines[2:]}


def test_filter_step_prints_a_table_and_rechecks_only_what_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = refined_work(
        tmp_path, {"good": GOOD_TEXT, "short": "A dog.", "echo": "Sure, here it is: " + GOOD_TEXT}
    )
    assert main(["filter", "--work", str(tmp_path)]) == 0
    assert table_rows(capsys.readouterr().out) == {
        "too_few_words": 1,
        "explanation": 1,
        "rejected": 2,
        "passed": 1,
        "total": 3,
    }
    verdicts = {r["image_id"]: r for r in read_records(work.filter)}
    assert verdicts["good"]["passed"] and verdicts["good"]["reasons"] == []
    assert verdicts["short"]["reasons"] == ["too_few_words: 2 < 20"]
    assert "refused" not in verdicts

    assert main(["filter", "--work", str(tmp_path)]) == 0
    assert len(read_records(work.filter)) == 3  # nothing changed: nothing re-judged
    capsys.readouterr()

    assert main(["filter", "--work", str(tmp_path), "--min-words", "1"]) == 0
    latest = {r["image_id"]: r for r in read_records(work.filter)}
    assert latest["short"]["passed"] and len(read_records(work.filter)) == 6
    assert table_rows(capsys.readouterr().out)["passed"] == 2


def test_rules_can_be_chosen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gibberish = "qz9 ing tion� blor ka mmm vex"
    assert reasons(gibberish, FilterSettings(rules=("length",), min_words=1)) == []
    assert reasons("", FilterSettings(rules=())) == ["empty"]
    work = refined_work(tmp_path, {"noise": gibberish})
    assert main(["filter", "--work", str(tmp_path), "--rules", "length", "--min-words", "1"]) == 0
    assert table_rows(capsys.readouterr().out) == {"rejected": 0, "passed": 1, "total": 1}
    assert read_records(work.filter)[0]["settings"]["rules"] == ["length"]
    assert main(["filter", "--work", str(tmp_path), "--rules", "length,spelling"]) == 2
    assert "unknown filter rule 'spelling'" in capsys.readouterr().err


SCENE = {
    "objects": ["circle", "square"],
    "colours": ["red", "blue", "gray"],
    "people": False,
    "animals": False,
}


def test_facts_rule_rejects_what_the_image_does_not_show() -> None:
    truth = Truth.from_words(SCENE)
    grounded = (
        "A red circle sits in the top left corner and a blue square in the middle, on a plain gray field."
    )
    assert judge(grounded, FilterSettings(min_words=1), truth) == []
    assert judge(grounded, FilterSettings(min_words=1)) == []  # no truth: the rule has nothing to check
    invented_person = grounded + " A woman in a green coat walks past them."
    wrong = judge(invented_person, FilterSettings(min_words=1), truth)
    assert len(wrong) == 1 and wrong[0].startswith("facts: names ")
    assert "woman" in wrong[0] and "green" in wrong[0]
    ungrounded = "A calm picture of a summer afternoon, with soft light and a quiet mood over everything."
    assert judge(ungrounded, FilterSettings(min_words=1), truth) == [
        "facts: names none of the image's objects (circle, square)"
    ]
    assert judge(invented_person, FilterSettings(min_words=1, rules=("length",)), truth) == []


def test_filter_step_checks_the_truth_each_record_keeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = WorkDir(tmp_path)
    scene_text = (
        "The picture shows a red circle near the top left corner and a blue square right in the middle of "
        "the frame, both on a plain gray background with nothing else in the scene."
    )
    made_up = scene_text + " A small dog sleeps beside the square."
    write_jsonl(work.refine, [
        {"image_id": "true", "raw": "x", "refined": scene_text, "truth": SCENE},
        {"image_id": "dog", "raw": "x", "refined": made_up, "truth": SCENE},
        {"image_id": "free", "raw": "x", "refined": made_up},
    ])  # fmt: skip
    assert main(["filter", "--work", str(tmp_path)]) == 0
    assert table_rows(capsys.readouterr().out) == {"facts": 1, "rejected": 1, "passed": 2, "total": 3}
    verdicts = {r["image_id"]: r for r in read_records(work.filter)}
    assert not verdicts["dog"]["passed"] and verdicts["dog"]["truth"] == SCENE
    assert verdicts["free"]["passed"] and "truth" not in verdicts["free"]

    # A record whose truth changes is judged again; the others are not.
    write_jsonl(
        work.refine,
        [{"image_id": "dog", "raw": "x", "refined": made_up, "truth": {**SCENE, "animals": True}}],
    )
    assert main(["filter", "--work", str(tmp_path)]) == 0
    assert table_rows(capsys.readouterr().out)["passed"] == 3
    assert len(read_records(work.filter)) == 4
