"""Scores for the three evaluation tasks.

- Captions: BLEU-1..4, ROUGE-L and CIDEr from pycocoevalcap, and METEOR when Java is present (its
  scorer is a Java program). Text is tokenized with the Stanford PTB tokenizer that pycocoevalcap
  ships (also Java); without Java a plain lower-case word tokenizer stands in, and the result says so.
- VQA: the standard VQAv2 accuracy, min(#annotators who gave the answer / 3, 1) averaged over the
  leave-one-annotator-out subsets, after the official answer normalisation (punctuation, number
  words, articles, contractions). For questions with a closed answer set (`answer_options`), also
  the *option accuracy*: the answer is read as the one option it names ("The shape in the center is
  red." → "red"); naming none, or more than one, is wrong. A sentence can be right this way, and
  listing every option cannot.
- Follow-ups: the option accuracy of the second answer of a two-turn conversation (the answer read
  as the one option it names is one of the right ones), overall, per kind and per category.
- POPE: the answer is read as "no" when its first sentence contains the word no/No/not (POPE's own
  rule), else "yes"; accuracy, precision, recall, F1 and the share of "yes" answers.
- Answers (captions): words per answer, the share of answers that repeat themselves (a 3-word
  sequence said twice), and, for images that list words naming their main object, the share of
  answers that use one of them.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)


def java_available() -> bool:
    """Whether a `java` executable is on PATH (needed by the PTB tokenizer and by METEOR)."""
    return shutil.which("java") is not None


# ---------------------------------------------------------------------------------------- answers


def repeats_itself(answer: str, n: int = 3) -> bool:
    """Whether some sequence of `n` words occurs twice in `answer` (case and punctuation ignored)."""
    words = re.findall(r"[a-z0-9']+", answer.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def names_object(answer: str, words: Sequence[str]) -> bool:
    """Whether `answer` uses one of `words` (each matched at a word start: "coin" matches "coins")."""
    return any(re.search(rf"\b{re.escape(w.lower())}", answer.lower()) for w in words)


def answer_stats(answers: Sequence[str], objects: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Words per answer, repetition rate, and the share of answers naming their image's main object.

    `objects[i]` lists the words that name the main object of answer i's image (empty: not scored).
    """
    if not answers:
        return {}
    stats: dict[str, float | int] = {
        "words_per_answer": sum(len(a.split()) for a in answers) / len(answers),
        "repetition_rate": sum(map(repeats_itself, answers)) / len(answers),
    }
    scored = [names_object(a, words) for a, words in zip(answers, objects, strict=True) if words]
    if scored:
        stats["object_named"] = sum(scored) / len(scored)
        stats["object_named_n"] = len(scored)
    return stats


# ---------------------------------------------------------------------------------------- captions

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _simple_tokenize(captions: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    return {key: [" ".join(_WORD.findall(text.lower())) for text in texts] for key, texts in captions.items()}


def _ptb_tokenize(captions: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {key: [{"caption": text} for text in texts] for key, texts in captions.items()}
    return PTBTokenizer().tokenize(wrapped)


def caption_metrics(
    references: Mapping[object, Sequence[str]],
    predictions: Mapping[object, str],
    meteor: bool | None = None,
) -> dict[str, float | str]:
    """Corpus-level caption scores of `predictions` (one caption per image id) against `references`.

    `meteor=None` computes METEOR when Java is present; True requires it; False skips it. The
    returned dict also names the tokenizer used ("ptb" or "simple").
    """
    if set(references) != set(predictions):
        missing = sorted(map(str, set(references) ^ set(predictions)))[:5]
        raise ValueError(f"references and predictions cover different image ids (e.g. {missing})")
    if not references:
        raise ValueError("no captions to score")
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"image {key!r} has no reference caption")
    has_java = java_available()
    if meteor and not has_java:
        raise RuntimeError("METEOR needs Java (`java` on PATH); install a JDK or pass meteor=False")
    if not has_java:
        logger.warning("Java not found: simple tokenizer instead of PTB, no METEOR; scores differ slightly")
    tokenize = _ptb_tokenize if has_java else _simple_tokenize
    gts = tokenize(references)
    res = tokenize({key: [predictions[key]] for key in references})

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | str] = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor is not False and has_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["tokenizer"] = "ptb" if has_java else "simple"
    return scores


# --------------------------------------------------------------------------------------------- VQA

# Contractions written without their apostrophes, as the official VQA script restores them. Each
# canonical form below also matches every spelling that drops some of its apostrophes
# ("couldnt've", "couldn'tve", "couldntve" → "couldn't've").
# fmt: off
_CONTRACTED = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's",
    "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
    "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're",
    "they've", "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've",
    "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll",
    "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've",
    "you'd", "you'd've", "you'll", "you're", "you've",
]
# fmt: on


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        parts = word.split("'")
        for joins in itertools.product(("'", ""), repeat=len(parts) - 1):
            spelled = parts[0] + "".join(j + p for j, p in zip(joins, parts[1:], strict=True))
            if spelled != word:
                table[spelled] = word
    return table


_CONTRACTIONS = _contraction_table()
# fmt: off
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# fmt: on
_ARTICLES = {"a", "an", "the"}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)", whose first group is a no-op look-ahead: in effect it
# removes every period that is not followed by a digit. Written here as it behaves.
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: "Two dogs." → "2 dogs", "The Red one" → "red 1"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCTUATION:
        # Next to a space (or in a text with a digit-grouping comma) the mark is dropped; inside a
        # word it becomes a space ("black/white" → "black white").
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Standard VQA accuracy of one predicted answer against the annotators' `answers` (10 in VQAv2).

    For each annotator, the prediction scores min(1, matches among the other annotators / 3); the
    accuracy is the mean over annotators.
    """
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    n_match = sum(g == pred for g in gts)
    return sum(min(1.0, (n_match - (g == pred)) / 3) for g in gts) / len(gts)


def option_answer(prediction: str, options: Sequence[str]) -> str | None:
    """The one option of a closed answer set that `prediction` names, else None (none, or several).

    Both sides are normalised as VQA answers ("Two." names "2"); an option matches as whole words,
    also with a plural "s"/"es", and an option inside a longer named one ("center" in "top center")
    does not count separately.
    """
    text = f" {normalize_vqa_answer(prediction)} "
    normalised = {normalize_vqa_answer(o): o for o in options}
    named = [n for n in normalised if re.search(rf" {re.escape(n)}(?:s|es)? ", text)]
    named = [n for n in named if not any(n != m and f" {n} " in f" {m} " for m in named)]
    return normalised[named[0]] if len(named) == 1 else None


def vqa_metrics(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
    options: Sequence[Sequence[str]] | None = None,
) -> dict[str, float | int | dict[str, float]]:
    """Mean VQA accuracy (in %, as the VQA challenge reports it), overall and per answer type.

    With `options` (a closed answer set per question; empty: open), also `option_accuracy` (in %)
    over the questions that have one, and their number `option_n`.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no VQA answers to score")
    accs = [vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)]
    result: dict[str, float | int | dict[str, float]] = {"accuracy": 100 * sum(accs) / len(accs)}
    if answer_types is not None:
        by_type: dict[str, list[float]] = defaultdict(list)
        for acc, kind in zip(accs, answer_types, strict=True):
            by_type[kind].append(acc)
        result["per_answer_type"] = {k: 100 * sum(v) / len(v) for k, v in sorted(by_type.items())}
    if options is not None:
        closed = [
            vqa_accuracy(option_answer(p, o) or "", a)
            for p, a, o in zip(predictions, answers, options, strict=True)
            if o
        ]
        if closed:
            result["option_accuracy"] = 100 * sum(closed) / len(closed)
            result["option_n"] = len(closed)
    return result


def followup_metrics(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    options: Sequence[Sequence[str]],
    kinds: Sequence[str],
    categories: Sequence[str] | None = None,
) -> dict[str, float | int | dict[str, dict[str, float | int]]]:
    """Option accuracy (in %) of follow-up answers, overall and per kind (and per category, if given).

    A prediction is right when the one option it names (`option_answer`) is among its `answers`.
    Each group reports `option_accuracy`, `right` and `n`.
    """
    if not len(predictions) == len(answers) == len(options) == len(kinds):
        raise ValueError(
            f"{len(predictions)} predictions for {len(answers)} answer sets, "
            f"{len(options)} option sets and {len(kinds)} kinds"
        )
    if not predictions:
        raise ValueError("no follow-up answers to score")
    right = [option_answer(p, o) in a for p, a, o in zip(predictions, answers, options, strict=True)]

    def scores(flags: Sequence[bool]) -> dict[str, float | int]:
        return {"option_accuracy": 100 * sum(flags) / len(flags), "right": sum(flags), "n": len(flags)}

    def per(groups: Sequence[str]) -> dict[str, dict[str, float | int]]:
        by_group: dict[str, list[bool]] = defaultdict(list)
        for flag, group in zip(right, groups, strict=True):
            by_group[group].append(flag)
        return {g: scores(flags) for g, flags in sorted(by_group.items())}

    result: dict[str, float | int | dict[str, dict[str, float | int]]] = dict(scores(right))
    result["per_kind"] = per(kinds)
    if categories is not None:
        result["per_category"] = per(categories)
    return result


# -------------------------------------------------------------------------------------------- POPE


def pope_answer(text: str) -> str:
    """Read a free-form answer as "yes" or "no" the way POPE's evaluation script does.

    Only the first sentence counts, commas are dropped, and the words "no", "No" and "not" make it a
    "no"; anything else is a "yes".
    """
    first = text.split(".", 1)[0].replace(",", "")
    words = first.split()
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def _binary_scores(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels, strict=True))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels, strict=True))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(preds),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(preds),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def pope_metrics(
    answers: Sequence[str], labels: Sequence[str], categories: Sequence[str] | None = None
) -> dict[str, float | dict[str, dict[str, float]]]:
    """POPE scores of free-form `answers` against "yes"/"no" `labels` ("yes" is the positive class).

    With `categories` (POPE's random / popular / adversarial sampling), also the scores per category.
    """
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} POPE labels")
    if not answers:
        raise ValueError("no POPE answers to score")
    bad = sorted({y for y in labels if y not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad[:5]}")
    preds = [pope_answer(a) for a in answers]
    result: dict[str, float | dict[str, dict[str, float]]] = dict(_binary_scores(preds, labels))
    if categories is not None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(categories):
            groups[c].append(i)
        result["per_category"] = {
            c: _binary_scores([preds[i] for i in idx], [labels[i] for i in idx])
            for c, idx in sorted(groups.items())
        }
    return result
