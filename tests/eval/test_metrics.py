"""Caption, VQA, follow-up and POPE metrics: known values of the standard formulas and their edge cases."""

from __future__ import annotations

import pytest

from minigpt4.eval import metrics
from minigpt4.eval.metrics import (
    caption_metrics,
    followup_metrics,
    normalize_vqa_answer,
    pope_answer,
    pope_metrics,
    vqa_accuracy,
    vqa_metrics,
)

REFS = {
    1: ["a red circle in the top left", "a red circle on a gray background"],
    2: ["a blue square and a green star", "two shapes, a blue square and a green star"],
    3: ["a cat sitting on a wooden table", "a tabby cat on a table"],
}


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("The Red one", "red 1"),
        ("black/white", "black white"),
        ("yes, it is", "yes it is"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("dont", "don't"),
        ("couldntve", "couldn't've"),
        ("  an apple\n", "apple"),
        ("none", "0"),
    ],
)
def test_vqa_normalisation_follows_the_official_rules(raw: str, normalized: str) -> None:
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(
    ("n_matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_counts_annotators_leave_one_out(n_matching: int, expected: float) -> None:
    answers = ["cat"] * n_matching + ["dog"] * (10 - n_matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_and_answers() -> None:
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("The cat", ["a cat"] * 10) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("cat", [])


def test_vqa_metrics_reports_percent_overall_and_per_answer_type() -> None:
    result = vqa_metrics(
        ["yes", "3", "red"], [["yes"] * 10, ["2"] * 10, ["red"] * 10], ["yes/no", "number", "other"]
    )
    assert result["accuracy"] == pytest.approx(200 / 3)
    assert result["per_answer_type"] == {"number": 0.0, "other": 100.0, "yes/no": 100.0}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_metrics(["a", "b"], [["a"] * 10])


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes, there is a cat in the image.", "yes"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not there", "no"),
        ("Yes. There is no dog next to it.", "yes"),  # only the first sentence counts
        ("I see a red circle", "yes"),
    ],
)
def test_pope_reads_answers_like_the_pope_script(text: str, answer: str) -> None:
    assert pope_answer(text) == answer


def test_pope_metrics_confusion_and_ratios() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    answers = ["Yes", "Yes", "No", "Yes", "No", "No"]
    result = pope_metrics(answers, labels, categories=["random"] * 3 + ["adversarial"] * 3)
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (2, 1, 1, 2)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["yes_ratio"] == pytest.approx(0.5)
    assert result["per_category"]["random"]["recall"] == pytest.approx(2 / 3)
    assert result["per_category"]["adversarial"]["accuracy"] == pytest.approx(2 / 3)


def test_pope_metrics_all_no_has_zero_precision_not_an_error() -> None:
    result = pope_metrics(["no", "no"], ["yes", "no"])
    assert result["precision"] == 0.0 and result["f1"] == 0.0 and result["yes_ratio"] == 0.0
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_caption_metrics_rank_a_right_caption_above_a_wrong_one() -> None:
    right = caption_metrics(REFS, {k: v[0] for k, v in REFS.items()}, meteor=False)
    wrong = caption_metrics(
        REFS, {1: "a dog running", 2: "a plate of food", 3: "a bus on a street"}, meteor=False
    )
    assert right["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert right["ROUGE-L"] == pytest.approx(1.0)
    assert right["CIDEr"] > 1.0
    assert wrong["BLEU-4"] < 0.01 and wrong["CIDEr"] < right["CIDEr"] / 5
    assert "METEOR" not in right


def test_caption_metrics_without_java_use_the_simple_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    preds = {1: "A red circle, top left.", 2: "A blue square.", 3: "A cat on a table!"}
    with_java = caption_metrics(REFS, preds, meteor=False)
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    without = caption_metrics(REFS, preds)
    assert with_java["tokenizer"] == "ptb" and without["tokenizer"] == "simple"
    assert "METEOR" not in without
    for key in ("BLEU-4", "ROUGE-L", "CIDEr"):
        assert without[key] == pytest.approx(with_java[key], rel=1e-6)
    with pytest.raises(RuntimeError, match="Java"):
        caption_metrics(REFS, preds, meteor=True)


def test_caption_metrics_reject_mismatched_ids() -> None:
    with pytest.raises(ValueError, match="different image ids"):
        caption_metrics(REFS, {1: "a red circle"}, meteor=False)
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({1: []}, {1: "a"}, meteor=False)


@pytest.mark.slow
def test_meteor_scores_with_java() -> None:
    preds = {1: REFS[1][0], 2: REFS[2][0], 3: "a bus on a street"}
    result = caption_metrics(REFS, preds, meteor=True)
    assert 0.3 < result["METEOR"] < 1.0


def test_repetition_is_a_three_word_sequence_said_twice() -> None:
    assert metrics.repeats_itself("The cat is on the mat. The cat is asleep.")
    assert metrics.repeats_itself("a red, red, red, red ball")  # "red red red" twice
    assert not metrics.repeats_itself("The cat is on the mat and a dog sleeps on the sofa.")
    assert not metrics.repeats_itself("")


def test_object_words_match_at_word_starts() -> None:
    assert metrics.names_object("Two old Coins on a table.", ["coin"])
    assert metrics.names_object("It is a camera tripod.", ["camera", "tripod"])
    assert not metrics.names_object("A bitcoin wallet.", ["coin"])
    assert not metrics.names_object("A cup of tea.", ["cat"])


def test_answer_stats_score_only_images_with_object_words() -> None:
    answers = ["A tabby cat. A tabby cat.", "A red shape in the top left", "A dog on the grass"]
    stats = metrics.answer_stats(answers, [("cat",), (), ("horse",)])
    assert stats["words_per_answer"] == pytest.approx((6 + 7 + 5) / 3)
    assert stats["repetition_rate"] == pytest.approx(1 / 3)
    assert stats["object_named"] == pytest.approx(1 / 2) and stats["object_named_n"] == 2
    assert "object_named" not in metrics.answer_stats(answers, [(), (), ()])


POSITIONS = ("top left", "top center", "center", "bottom right")


@pytest.mark.parametrize(
    ("answer", "options", "read_as"),
    [
        ("The shape in the center is red.", ("red", "blue", "green"), "red"),
        ("Top center.", POSITIONS, "top center"),  # "center" inside "top center" is not a second option
        ("It is in the center of the picture.", POSITIONS, "center"),
        ('The answer is "two".', tuple("0123456789"), "2"),
        ("There are two triangles.", ("triangle", "square"), "triangle"),
        ("Red or blue.", ("red", "blue"), None),  # two options named
        ("A shape.", ("red", "blue"), None),  # none named
        ("Reddish.", ("red",), None),  # whole words only
    ],
)
def test_option_answer_reads_the_one_option_named(answer: str, options: tuple, read_as: str | None) -> None:
    assert metrics.option_answer(answer, options) == read_as


def test_option_accuracy_counts_only_closed_questions() -> None:
    predictions = ["The circle is red.", "Blue and red.", "2", "A cat"]
    answers = [["red"] * 10, ["red"] * 10, ["2"] * 10, ["cat"] * 10]
    options = [("red", "blue"), ("red", "blue"), tuple("0123456789"), ()]
    result = vqa_metrics(predictions, answers, options=options)
    assert result["option_n"] == 3
    assert result["option_accuracy"] == pytest.approx(200 / 3)  # right, both named (wrong), right
    assert result["accuracy"] == pytest.approx(50.0)  # exact match: "2" and "A cat"
    assert "option_accuracy" not in vqa_metrics(predictions, answers)


def test_followup_metrics_score_the_one_option_named_overall_and_per_kind() -> None:
    colours = ("red", "brown", "gray", "grey", "black", "white", "black and white")
    positions = ("top left", "center", "bottom left")
    counts = ("0", "1", "2", "3")
    predictions = [
        "The cup is red.",  # right: one of two right options
        "It is brown and red.",  # two options named: wrong
        "It's grey.",  # right: the other spelling is an option of its own
        "The photo is black and white.",  # right: "black" and "white" inside it do not count
        "It is black.",  # wrong
        "The circle is in the top left corner.",  # right
        "It is in the center, at the bottom left.",  # two options: wrong
        "There are two circles.",  # right: "two" reads as "2"
        "None.",  # wrong: reads as "0", the answer is 1
        "I cannot tell.",  # no option named: wrong
    ]
    answers = [
        ("red", "brown"),
        ("red", "brown"),
        ("gray", "grey"),
        ("gray", "black and white"),
        ("white",),
        ("top left",),
        ("center",),
        ("2",),
        ("1",),
        ("3",),
    ]
    options = [colours] * 5 + [positions] * 2 + [counts] * 3
    kinds = ["colour"] * 5 + ["position"] * 2 + ["count"] * 3
    categories = ["photo"] * 4 + ["scene"] * 6
    result = followup_metrics(predictions, answers, options, kinds, categories)
    assert result["option_accuracy"] == pytest.approx(50.0)
    assert (result["right"], result["n"]) == (5, 10)
    assert result["per_kind"] == {
        "colour": {"option_accuracy": pytest.approx(60.0), "right": 3, "n": 5},
        "count": {"option_accuracy": pytest.approx(100 / 3), "right": 1, "n": 3},
        "position": {"option_accuracy": pytest.approx(50.0), "right": 1, "n": 2},
    }
    assert result["per_category"]["photo"] == {"option_accuracy": pytest.approx(75.0), "right": 3, "n": 4}
    assert "per_category" not in followup_metrics(predictions, answers, options, kinds)
    with pytest.raises(ValueError, match="9 predictions for 10 answer sets"):
        followup_metrics(predictions[:9], answers, options, kinds)
    with pytest.raises(ValueError, match="no follow-up answers"):
        followup_metrics([], [], [], [])
