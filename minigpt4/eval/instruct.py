"""Open instructions about an image ("Write a haiku about it.") and the rules that score the answers.

Each instruction is of one `KINDS` entry (describe in detail, poem, haiku, story, …), asked in one of
its phrasings, about an image whose facts are known (`Truth`: the words that name its main object or
its shapes, the colours it shows, whether it may show people or animals). An answer passes when:

- **form**: it has the form its kind asks for (`FORM_RULES`: a poem has at least three verse lines,
  a haiku two to five short lines, a story at least three sentences told in the past, a title at
  most twelve words, ideas two or more items, a colours answer names a colour, …);
- **grounding**: it names the main object (or one of the scene's shapes), a colours answer a colour
  the image has (words are matched whole, a plural counts: "coins" names "coin");
- **nothing invented**: no person word (`PERSON_WORDS`) where the image has no people, no animal
  word (`ANIMAL_WORDS`) where it has none, no colour word (`COLOUR_WORDS`) that it does not show;
- **diversity**: it is not (nearly) the answer given about the same image to an instruction of
  another kind (word 3-gram Jaccard similarity below `SAME_ANSWER`).

The upper bound is the same LLM without the image and without LoRA, told the image's facts in
words (`Truth.facts`) before the same instruction, scored by the same rules; `instruct_ratio` is
the image model's pass rate over the upper bound's. `HELD_OUT` kinds are the ones training data
must leave out, to see whether the skill transfers.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from minigpt4.data import scenes
from minigpt4.eval.photos import Photo


@dataclass(frozen=True)
class Kind:
    name: str
    phrasings: tuple[str, ...]


KINDS: tuple[Kind, ...] = (
    Kind("describe", (
        "Describe this image in detail.",
        "Give a detailed description of this picture.",
        "Tell me everything you see in this image.",
    )),
    Kind("poem", (
        "Write a short poem about this image.",
        "Compose a poem inspired by this picture.",
        "Can you write a few lines of poetry about what you see here?",
    )),
    Kind("haiku", (
        "Write a haiku about it.",
        "Write a haiku about this picture.",
        "Compose a haiku describing this image.",
    )),
    Kind("story", (
        "Tell me a short story about this picture.",
        "Write a short story inspired by this image.",
        "Make up a little story about what is in this image.",
    )),
    Kind("ideas", (
        "What could someone do with this?",
        "Give me a few ideas of what I could do with what is in this picture.",
        "How could what this image shows be used? Suggest some ideas.",
    )),
    Kind("child", (
        "Explain to a five-year-old what is in this picture.",
        "How would you explain this image to a small child?",
        "Describe this picture in simple words for a young kid.",
    )),
    Kind("colours", (
        "Which colours are in this image?",
        "What colours can you see in this picture?",
        "Name the colours in this image.",
    )),
    Kind("advert", (
        "Write a one-line advertisement for what is in this image.",
        "Write a catchy one-line slogan for this picture.",
        "Write a one-sentence ad featuring what this image shows.",
    )),
    Kind("happening", (
        "What is happening in this picture?",
        "What is going on in this image?",
        "What is going on here?",
    )),
    Kind("title", (
        "Give this image a title.",
        "Suggest a short title for this picture.",
        "What would be a good title for this image?",
    )),
    Kind("question", (
        "Ask a question about this image.",
        "What is one question someone might ask about this picture?",
        "Write a question about what is shown in this image.",
    )),
    Kind("tweet", (
        "Write a tweet about this picture.",
        "Write a short social media post about this image.",
        "Write a post for social media about this picture.",
    )),
)  # fmt: skip
KIND_NAMES: tuple[str, ...] = tuple(k.name for k in KINDS)
# Kinds that training data leaves out: their scores show whether following instructions transfers.
HELD_OUT: tuple[str, ...] = ("haiku", "advert", "question")


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Word lists (whole words; a plural in -s / -es counts). Generic words ("people", "someone", "you",
# "kid", "child") are left out: answers use them for whoever looks at or uses the picture.
PERSON_WORDS: frozenset[str] = _word_set("""
    man men woman women person persons human boy girl lady ladies gentleman gentlemen guy baby babies
    mother father mom mum dad grandmother grandfather grandma grandpa husband wife son daughter brother
    sister uncle aunt farmer chef soldier player driver doctor nurse king queen prince princess
    astronaut photographer cameraman pilot
""")
ANIMAL_WORDS: frozenset[str] = _word_set("""
    animal cat kitten kitty tabby dog puppy bird horse cow pig sheep goat chicken duck fish monkey
    baboon mandrill ape lion tiger bear elephant rabbit bunny mouse mice rat owl fox wolf wolves deer
    frog snake butterfly butterflies bee insect spider squirrel panda giraffe zebra turtle parrot pet
""")
COLOUR_WORDS: frozenset[str] = _word_set("""
    red orange yellow green blue purple violet pink brown black white gray grey silver gold golden
    beige cyan turquoise magenta
""")
# Spellings of one colour: naming either is naming it.
_SAME_COLOUR = ({"gray", "grey"}, {"gold", "golden"}, {"purple", "violet"}, {"cyan", "turquoise"})
# Words that name each scene shape.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circular", "round", "disc", "disk", "ring", "oval", "sphere", "dot"),
    "square": ("square", "rectangle", "rectangular", "cube"),
    "triangle": ("triangle", "triangular", "pyramid"),
    "star": ("star",),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "cross": ("cross", "plus"),
}
# The colour words a scene background shows.
_BACKGROUND_COLOURS = {"gray": ("gray", "grey"), "beige": ("beige",), "light blue": ("blue",)}
SAME_ANSWER = 0.5  # word 3-gram Jaccard similarity from which two answers count as the same


@dataclass(frozen=True)
class Truth:
    """What an image is known to show, for scoring open answers about it."""

    facts: str  # one or two sentences: what the upper bound is told
    objects: tuple[str, ...]  # words that name its main object (or its shapes)
    colours: tuple[str, ...]  # every colour word it shows (others are invented)
    people: bool  # it may show people (False: a person word is invented)
    animals: bool  # it may show animals

    def words(self) -> dict:
        """Everything but the facts sentence, as JSON (what `curate filter`'s facts rule checks)."""
        return {
            "objects": list(self.objects),
            "colours": list(self.colours),
            "people": self.people,
            "animals": self.animals,
        }

    @classmethod
    def from_words(cls, words: dict, facts: str = "") -> Truth:
        return cls(facts, tuple(words["objects"]), tuple(words["colours"]), words["people"], words["animals"])


def scene_truth(scene: scenes.Scene) -> Truth:
    """A rendered scene's truth: its shapes, their colours and the background's; no people or animals."""
    colours = {o.colour for o in scene.objects} | set(_BACKGROUND_COLOURS[scene.background])
    shapes = dict.fromkeys(o.shape for o in scene.objects)
    return Truth(
        facts=f"The image shows {scenes.caption(scene)} on a plain {scene.background} background.",
        objects=tuple(word for shape in shapes for word in SHAPE_WORDS[shape]),
        colours=tuple(sorted(colours)),
        people=False,
        animals=False,
    )


def photo_truth(photo: Photo) -> Truth:
    """A photo's truth, as written by hand in minigpt4/eval/photos.py."""
    return Truth(photo.facts, photo.objects + photo.also_named, photo.colours, photo.people, photo.animals)


def instructions(image_index: int, n_phrasings: int = 1) -> list[tuple[str, str]]:
    """(kind, instruction) for one image: every kind, in `n_phrasings` of its phrasings, taken in
    turn from image to image so that every phrasing is asked."""
    return [
        (kind.name, kind.phrasings[(image_index + k + p) % len(kind.phrasings)])
        for k, kind in enumerate(KINDS)
        for p in range(n_phrasings)
    ]


# ------------------------------------------------------------------------------------- text pieces

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _clean(text: str) -> str:
    """Markdown emphasis and headings away, so "**Title:**" counts as the word "title"."""
    return re.sub(r"[*#_`]+", "", text).strip()


def lines(text: str) -> list[str]:
    """Non-empty lines; " / " also breaks a line (a poem written on one line)."""
    return [line.strip() for line in re.split(r"\n|\s/\s", _clean(text)) if words(line)]


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", _clean(text))
    return [p for p in parts if words(p)]


@functools.lru_cache(maxsize=256)
def _pattern(vocabulary: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w.lower()) for w in sorted(vocabulary, key=len, reverse=True))
    return re.compile(rf"\b({alternatives})(?:s|es)?\b")


def found(text: str, vocabulary: Sequence[str]) -> set[str]:
    """The words of `vocabulary` that `text` uses (whole words or phrases; a plural counts)."""
    if not vocabulary:
        return set()
    return set(_pattern(tuple(vocabulary)).findall(text.lower()))


# ------------------------------------------------------------------------------------------- form

# Past-tense words that tell a story (besides "once upon a time" and "one day").
_NARRATIVE = _word_set("""
    was were had did saw went came said found made took looked decided lived wanted felt began thought
    knew became stood sat ran flew grew told asked called turned smiled laughed walked jumped played
    noticed started stopped opened watched waited tried loved stayed returned named gave left met
""")
_IDEA_WORDS = ("could", "can", "use", "used", "make", "try", "might", "would", "idea", "ideas")


def _verse_lines(text: str, max_words: int) -> list[str]:
    return [line for line in lines(text) if len(words(line)) <= max_words]


def _items(text: str) -> int:
    """How many items an answer gives: the most of its list lines, its sentences, its comma / "or" parts."""
    listed = [line for line in lines(text) if re.match(r"^(?:[-•]|\d+[.)])\s*", line)]
    parts = [p for p in re.split(r",|;|\bor\b", text) if words(p)]
    return max(len(listed), len(sentences(text)), len(parts))


def _mean_sentence_words(text: str) -> float:
    found_sentences = sentences(text)
    return sum(len(words(s)) for s in found_sentences) / max(len(found_sentences), 1)


def _title(text: str) -> bool:
    body = re.sub(r"^\s*title\s*:\s*", "", _clean(text), flags=re.IGNORECASE)
    return len(lines(body)) == 1 and 1 <= len(words(body)) <= 12


def _narrates(text: str) -> bool:
    said = words(text)
    told = " ".join(said)
    past = sum(w in _NARRATIVE for w in said)
    return "once upon a time" in told or "one day" in told or past >= 2


# Each kind's form rule (docs/evaluation.md states them): answer text → whether it has the form asked for.
FORM_RULES = {
    "describe": lambda a: len(words(a)) >= 40 and len(sentences(a)) >= 2,
    "poem": lambda a: len(_verse_lines(a, 15)) >= 3,
    "haiku": lambda a: 2 <= len(lines(a)) <= 5 and len(_verse_lines(a, 10)) == len(lines(a)),
    "story": lambda a: len(words(a)) >= 40 and len(sentences(a)) >= 3 and _narrates(a),
    "ideas": lambda a: _items(a) >= 2 and bool(found(a, _IDEA_WORDS)),
    "child": lambda a: len(sentences(a)) >= 2 and len(words(a)) >= 15 and _mean_sentence_words(a) <= 20,
    "colours": lambda a: bool(found(a, sorted(COLOUR_WORDS))),
    "advert": lambda a: len(lines(a)) == 1 and 3 <= len(words(a)) <= 30 and len(sentences(a)) <= 2,
    "happening": lambda a: any(len(words(s)) >= 5 for s in sentences(a)),
    "title": _title,
    "question": lambda a: "?" in a and len(words(a)) >= 3,
    "tweet": lambda a: 5 <= len(words(a)) <= 60 and len(a.strip()) <= 280,
}


# ------------------------------------------------------------------------------------------ rules


def _canonical_colours(named: set[str]) -> set[str]:
    out = set(named)
    for spellings in _SAME_COLOUR:
        if out & spellings:
            out |= spellings
    return out


def invented(answer: str, truth: Truth) -> list[str]:
    """The person, animal and colour words of `answer` that `truth` excludes, sorted."""
    wrong = set()
    if not truth.people:
        wrong |= found(answer, sorted(PERSON_WORDS))
    if not truth.animals:
        wrong |= found(answer, sorted(ANIMAL_WORDS))
    shown = _canonical_colours(set(truth.colours))
    wrong |= found(answer, sorted(COLOUR_WORDS)) - shown
    return sorted(wrong)


def grounded(kind: str, answer: str, truth: Truth) -> bool:
    """Whether the answer names the main object (a shape of a scene); for `colours`, a colour shown."""
    if kind == "colours":
        return bool(found(answer, sorted(COLOUR_WORDS)) & _canonical_colours(set(truth.colours)))
    return bool(found(answer, truth.objects))


def _grams(answer: str) -> set[tuple[str, ...]]:
    said = words(answer)
    if len(said) < 3:
        return {tuple(said)} if said else set()
    return {tuple(said[i : i + 3]) for i in range(len(said) - 2)}


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of two answers' word 3-grams (the whole answer for under three words)."""
    ga, gb = _grams(a), _grams(b)
    return len(ga & gb) / len(ga | gb) if ga and gb else 0.0


def diverse(answers: Sequence[str], kinds: Sequence[str]) -> list[bool]:
    """Per answer about one image: whether no answer to a different kind is (nearly) the same."""
    return [
        not any(
            kinds[j] != kinds[i] and similarity(answers[i], answers[j]) >= SAME_ANSWER
            for j in range(len(answers))
        )
        for i in range(len(answers))
    ]


def diverse_by_image(answers: Sequence[str], kinds: Sequence[str], images: Sequence[object]) -> list[bool]:
    """`diverse` within each image's answers; `images[i]` names the image answer `i` is about."""
    by_image: dict[object, list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_image[image].append(i)
    is_diverse = [True] * len(answers)
    for indices in by_image.values():
        flags = diverse([answers[i] for i in indices], [kinds[i] for i in indices])
        for i, flag in zip(indices, flags, strict=True):
            is_diverse[i] = flag
    return is_diverse


@dataclass(frozen=True)
class Checks:
    form: bool
    grounded: bool
    invented: tuple[str, ...]
    diverse: bool

    @property
    def passed(self) -> bool:
        return self.form and self.grounded and not self.invented and self.diverse


def check_answers(
    kinds: Sequence[str], answers: Sequence[str], truths: Sequence[Truth], images: Sequence[object]
) -> list[Checks]:
    """Every rule on every answer; `images[i]` groups the answers about one image (for diversity)."""
    is_diverse = diverse_by_image(answers, kinds, images)
    checks = []
    for kind, answer, truth, flag in zip(kinds, answers, truths, is_diverse, strict=True):
        if not words(answer):
            checks.append(Checks(False, False, (), False))
            continue
        checks.append(
            Checks(
                form=FORM_RULES[kind](answer),
                grounded=grounded(kind, answer, truth),
                invented=tuple(invented(answer, truth)),
                diverse=flag,
            )
        )
    return checks


# ---------------------------------------------------------------------------------------- metrics


def _ratio(score: float, upper: float) -> float | None:
    return score / upper if upper else None


def _summary(model: Sequence[Checks], upper: Sequence[Checks]) -> dict[str, float | int | None]:
    n = len(model)
    score = sum(c.passed for c in model) / n
    upper_score = sum(c.passed for c in upper) / n
    return {
        "instruct_score": score,
        "upper_bound_score": upper_score,
        "instruct_ratio": _ratio(score, upper_score),
        "invented_rate": sum(bool(c.invented) for c in model) / n,
        "upper_bound_invented_rate": sum(bool(c.invented) for c in upper) / n,
        "n": n,
    }


def _rule_rates(checks: Sequence[Checks]) -> dict[str, float]:
    n = len(checks)
    return {
        "form": sum(c.form for c in checks) / n,
        "grounded": sum(c.grounded for c in checks) / n,
        "not_invented": sum(not c.invented for c in checks) / n,
        "diverse": sum(c.diverse for c in checks) / n,
    }


def instruct_metrics(
    kinds: Sequence[str],
    categories: Sequence[str],
    model: Sequence[Checks],
    upper: Sequence[Checks],
) -> dict:
    """Pass rates of the image model and of the upper bound, their ratio and the invented-content
    rates: overall, per kind and per category (photo / scene), with each rule's own pass rate."""
    if not model or len(model) != len(upper):
        raise ValueError(f"{len(model)} model answers for {len(upper)} upper-bound answers")

    def per(groups: Sequence[str], order: Sequence[str]) -> dict[str, dict]:
        out = {}
        for name in order:
            idx = [i for i, g in enumerate(groups) if g == name]
            if idx:
                out[name] = _summary([model[i] for i in idx], [upper[i] for i in idx])
        return out

    return {
        **_summary(model, upper),
        "rules": _rule_rates(model),
        "upper_bound_rules": _rule_rates(upper),
        "per_kind": per(kinds, KIND_NAMES),
        "per_category": per(categories, sorted(set(categories))),
        "held_out_kinds": list(HELD_OUT),
    }


def checks_record(checks: Checks) -> dict:
    return asdict(checks) | {"invented": list(checks.invented), "passed": checks.passed}


def table(metrics: dict) -> str:
    """A short table: per kind, per category and overall — answers, score, upper bound, ratio, invented."""

    def fmt(value: float | None) -> str:
        return "  -  " if value is None else f"{value:5.2f}"

    rows = [f"{'':<14}{'n':>5}  {'score':>5}  {'upper':>5}  {'ratio':>5}  {'invented':>8}"]
    named = [(f"{k}{'*' if k in HELD_OUT else ''}", v) for k, v in metrics["per_kind"].items()]
    named += [(f"[{c}]", v) for c, v in metrics["per_category"].items()]
    named.append(("overall", metrics))
    for name, m in named:
        rows.append(
            f"{name:<14}{m['n']:>5}  {fmt(m['instruct_score'])}  {fmt(m['upper_bound_score'])}  "
            f"{fmt(m['instruct_ratio'])}  {fmt(m['invented_rate']):>8}"
        )
    rules = metrics["rules"]
    rows.append("rules passed: " + ", ".join(f"{k} {v:.2f}" for k, v in rules.items()) + "  (* held out)")
    return "\n".join(rows)
