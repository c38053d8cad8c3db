"""Step 3: rule checks on the refined descriptions; every rejection names its rules and why.

Most rules read the text alone. The `facts` rule reads the image's known truth as well, where `curate
refine --facts` stored one with the record (rendered scenes, class examples): a description that names
none of the image's objects, or names a person, an animal or a colour the truth excludes, is rejected
(the instruct eval's word lists, `minigpt4/eval/instruct.py`). Records without a truth pass it.

A record is re-checked only when its text or the settings changed since it was last checked, so
running the step again with other thresholds re-judges everything, and running it again with the
same ones does nothing.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from minigpt4.commands.common import at_least
from minigpt4.curate.records import CurateError, JsonlWriter, WorkDir, count_words, latest_by_id, read_jsonl
from minigpt4.eval.instruct import Truth, found, invented

# The most frequent English words: prose has 35–55% of them, captions-style descriptions about 40%.
_COMMON_WORDS = """a about above across after against along among an and any are around as at away back be
    been before behind being below beneath beside between both but by can could down during each
    either for from front has have he her here his holding how i in inside into is it its like
    looks may might more most near next of off on one onto or other out outside over she side
    some such than that the their them there these they this those through to top toward towards
    two under up upon very was wearing were what when where which while who with within without
    would you"""
COMMON_ENGLISH = frozenset(_COMMON_WORDS.split())
TEMPLATE_TOKENS = re.compile(
    r"###|\b(?:Assistant|Human|USER|ASSISTANT)\s*:|</?Img>|<ImageHere>|<ImageFeature>|</?s>|"
    r"\[/?INST\]|<<\/?SYS>>|<\|[^|<>]{1,40}\|>|<unk>|<pad>"
)
EXPLANATION = re.compile(
    r"^\W*(?:here\s+is|here's|sure\b|certainly|of\s+course|corrected|revised|rewritten|"
    r"the\s+(?:corrected|revised|rewritten|fixed|given|input|original)\s+(?:paragraph|text|version)|"
    r"i\s+(?:have|'ve|fixed|corrected|removed|rewrote|cannot|can't)\b)"
    r"|without\s+explanation|(?:given|input|original)\s+paragraph|as\s+an\s+ai\b|i\s+apologi[sz]e|i'm\s+sorry",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z']+")


TEXT_RULES = ("length", "english", "repeated_sentence", "repeated_ngram", "template_tokens", "explanation")
RULE_NAMES = (*TEXT_RULES, "facts")


@dataclass(frozen=True)
class FilterSettings:
    rules: tuple[str, ...] = RULE_NAMES  # the rules applied; an empty text is always rejected
    min_words: int = 20
    max_words: int = 200
    min_common_ratio: float = 0.2  # share of words that are frequent English words
    max_foreign_letters: float = 0.05  # share of letters outside a–z
    ngram: int = 5
    max_ngram_repeats: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rules) - set(RULE_NAMES))
        if unknown:
            raise CurateError(f"unknown filter rule {unknown[0]!r}; the rules are {', '.join(RULE_NAMES)}")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def check_length(text: str, s: FilterSettings) -> str | None:
    n = count_words(text)
    if n < s.min_words:
        return f"too_few_words: {n} < {s.min_words}"
    if n > s.max_words:
        return f"too_many_words: {n} > {s.max_words}"
    return None


def check_english(text: str, s: FilterSettings) -> str | None:
    letters = [c for c in text if c.isalpha()]
    foreign = sum(not ("a" <= c.lower() <= "z") for c in letters) / max(len(letters), 1)
    if foreign > s.max_foreign_letters:
        return f"non_english: {foreign:.0%} of letters are not a–z"
    words = _words(text)
    common = sum(w in COMMON_ENGLISH for w in words) / max(len(words), 1)
    if common < s.min_common_ratio:
        return f"non_english: only {common:.0%} of words are common English words"
    return None


def check_repeated_sentence(text: str, s: FilterSettings) -> str | None:
    sentences = [" ".join(_words(sentence)) for sentence in _SENTENCE_END.split(text)]
    repeated = Counter(sentence for sentence in sentences if sentence.count(" ") >= 2).most_common(1)
    if repeated and repeated[0][1] > 1:
        sentence, times = repeated[0]
        return f"repeated_sentence: {times}× {sentence!r:.80}"
    return None


def check_repeated_ngram(text: str, s: FilterSettings) -> str | None:
    words = _words(text)
    grams = Counter(tuple(words[i : i + s.ngram]) for i in range(len(words) - s.ngram + 1)).most_common(1)
    if grams and grams[0][1] > s.max_ngram_repeats:
        gram, times = grams[0]
        return f"repeated_ngram: {times}× {' '.join(gram)!r}"
    return None


def check_template_tokens(text: str, s: FilterSettings) -> str | None:
    found = sorted(set(TEMPLATE_TOKENS.findall(text)))
    return f"template_tokens: {', '.join(found)}" if found else None


def check_explanation(text: str, s: FilterSettings) -> str | None:
    match = EXPLANATION.search(text)
    return f"explanation: {match.group(0).strip()!r}" if match else None


def check_facts(text: str, truth: Truth) -> str | None:
    """Whether a description contradicts what its image is known to show."""
    wrong = invented(text, truth)
    if wrong:
        return f"facts: names {', '.join(wrong)}, which the image does not show"
    if truth.objects and not found(text, truth.objects):
        return f"facts: names none of the image's objects ({', '.join(truth.objects[:4])})"
    return None


RULES: dict[str, Callable[[str, FilterSettings], str | None]] = dict(
    zip(
        TEXT_RULES,
        (
            check_length,
            check_english,
            check_repeated_sentence,
            check_repeated_ngram,
            check_template_tokens,
            check_explanation,
        ),
        strict=True,
    )
)


def judge(text: str, settings: FilterSettings, truth: Truth | None = None) -> list[str]:
    """Why `text` is rejected: one `reason: detail` line per failed rule ([] when it passes).

    `truth`: what the image is known to show, for the `facts` rule (None: that rule passes).
    """
    if not text.strip():
        return ["empty: no text"]
    reasons = [reason for name in settings.rules if name in RULES and (reason := RULES[name](text, settings))]
    if truth is not None and "facts" in settings.rules and (reason := check_facts(text, truth)):
        reasons.append(reason)
    return reasons


def reason_name(reason: str) -> str:
    return reason.split(":", 1)[0]


def filter_records(work: WorkDir, settings: FilterSettings) -> dict[str, Any]:
    """Judge every refined record whose text or settings changed; returns the summary of all records."""
    refined = [
        r for r in latest_by_id(read_jsonl(work.require(work.refine, "refine"))).values() if "refined" in r
    ]
    judged = latest_by_id(read_jsonl(work.filter))
    wanted = json.loads(json.dumps(asdict(settings)))  # as it reads back from the file
    with JsonlWriter(work.filter) as out:
        for record in refined:
            previous = judged.get(record["image_id"])
            truth = record.get("truth")
            if (
                previous
                and previous["text"] == record["refined"]
                and previous["settings"] == wanted
                and previous.get("truth") == truth
            ):
                continue
            reasons = judge(record["refined"], settings, Truth.from_words(truth) if truth else None)
            result = {
                "image_id": record["image_id"],
                "text": record["refined"],
                "passed": not reasons,
                "reasons": reasons,
                "settings": wanted,
                **({"truth": truth} if truth else {}),
            }
            out.write(result)
            judged[record["image_id"]] = result
    current = [judged[r["image_id"]] for r in refined]
    per_reason = Counter(reason_name(reason) for r in current for reason in r["reasons"])
    return {
        "total": len(current),
        "passed": sum(r["passed"] for r in current),
        "per_reason": dict(per_reason),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: records rejected per reason, then the totals."""
    rows = sorted(summary["per_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
    rows += [
        ("rejected", summary["total"] - summary["passed"]),
        ("passed", summary["passed"]),
        ("total", summary["total"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'reason':<{width}}  count", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {count:>5}" for name, count in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FilterSettings()
    parser.add_argument(
        "--rules",
        default=",".join(RULE_NAMES),
        help="comma-separated rules to apply (default: all); an empty text is always rejected",
    )
    parser.add_argument(
        "--min-words", type=at_least(0), default=d.min_words, help="shortest description kept"
    )
    parser.add_argument("--max-words", type=at_least(1), default=d.max_words, help="longest description kept")
    parser.add_argument(
        "--min-common-ratio",
        type=float,
        default=d.min_common_ratio,
        help="reject as non-English below this share of frequent English words",
    )
    parser.add_argument(
        "--max-foreign-letters",
        type=float,
        default=d.max_foreign_letters,
        help="reject as non-English above this share of letters outside a–z",
    )
    parser.add_argument("--ngram", type=int, default=d.ngram, help="n of the repeated n-gram check")
    parser.add_argument(
        "--max-ngram-repeats",
        type=int,
        default=d.max_ngram_repeats,
        help="reject when one n-gram appears more often than this",
    )


def run(args: argparse.Namespace, work: WorkDir) -> int:
    """`curate filter`: rule checks with reasons, and a table of counts per reason."""
    settings = FilterSettings(
        tuple(name.strip() for name in args.rules.split(",") if name.strip()),
        args.min_words,
        args.max_words,
        args.min_common_ratio,
        args.max_foreign_letters,
        args.ngram,
        args.max_ngram_repeats,
    )
    print(format_summary(filter_records(work, settings)))
    return 0
