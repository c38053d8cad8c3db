"""`python -m minigpt4 eval`: caption, VQA, POPE, follow-up or open-instruction scores of a preset.

    python -m minigpt4 make-data eval --out data/eval          # the offline eval set
    python -m minigpt4 eval --cfg-path minigpt4_tiny_random --task pope --data data/eval

`--data` is an eval-set folder (standard file names, images in `images/`) or a file: a COCO caption
file, a VQAv2 questions file (with `--annotations`) or a POPE jsonl file; `--images` names the image
folder. The follow-up task asks a first question, keeps the model's answer in the conversation and
scores its answer to a second question by option accuracy. The instruct task asks open instructions
("Write a haiku about it.") and, in the same run, the upper bound: the preset's LLM without the image
and without LoRA, told the image's facts (minigpt4/eval/instruct.py, upper_bound.py). Answers are
greedy, in batches. The results JSON records the scores, every prediction, the config, the data files
with their digests and the git commit.

Under `torchrun --nproc_per_node N` (or `accelerate launch`) each process answers its share of the
samples into a part beside `<out>.answers.jsonl` (a re-run redoes only unanswered samples); the
first process merges the parts, scores all the answers once and writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minigpt4.commands.common import HelpFormatter, add_model_args, at_least, chat_from_args
from minigpt4.commands.ranks import Rank, RankedJsonl, job_digest, read_rows
from minigpt4.config import load_preset, resolve_preset
from minigpt4.errors import ConfigError, ImageError
from minigpt4.eval import evalset, instruct
from minigpt4.eval.answer import BatchAnswerer
from minigpt4.eval.data import (
    DataError,
    read_captions,
    read_followup,
    read_instruct,
    read_pope,
    read_vqa,
    write_json,
)
from minigpt4.eval.metrics import (
    answer_stats,
    caption_metrics,
    followup_metrics,
    names_object,
    option_answer,
    pope_answer,
    pope_metrics,
    repeats_itself,
    vqa_accuracy,
    vqa_metrics,
)
from minigpt4.eval.provenance import git_state, sha256_file
from minigpt4.eval.upper_bound import BareLLM, told_prompt

log = logging.getLogger(__name__)

VQA_PROMPT = "{question} Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Task:
    prompt: str  # "{question}" is replaced by the sample's question
    max_new_tokens: int
    data_file: str  # its name inside an eval-set folder


TASKS = {
    "caption": Task("Describe this image in one sentence.", 40, evalset.CAPTIONS_FILE),
    "vqa": Task(VQA_PROMPT, 10, evalset.VQA_QUESTIONS_FILE),
    "pope": Task(VQA_PROMPT, 10, evalset.POPE_FILE),
    # The follow-up is asked as a person would ask it; the same cap holds for the first answer.
    "followup": Task("{question}", 40, evalset.FOLLOWUP_FILE),
    # Open instructions want room: a story or a detailed description runs to 100–150 tokens.
    "instruct": Task("{question}", 160, evalset.INSTRUCT_FILE),
}


@dataclass(frozen=True)
class DataFiles:
    data: Path
    annotations: Path | None
    images: Path


def resolve_data(task: str, data: Path, annotations: Path | None, images: Path | None) -> DataFiles:
    """The files a task reads, from an eval-set folder or from explicit paths."""
    if data.is_dir():
        ann = data / evalset.VQA_ANNOTATIONS_FILE if task == "vqa" else None
        return DataFiles(
            data / TASKS[task].data_file, annotations or ann, images or data / evalset.IMAGES_DIR
        )
    if not data.is_file():
        raise DataError(f"--data {data}: no such file or folder")
    if task == "vqa" and annotations is None:
        raise DataError("--task vqa with a questions file needs --annotations (the VQAv2 annotations file)")
    return DataFiles(data, annotations, images or data.parent / evalset.IMAGES_DIR)


def load_samples(task: str, files: DataFiles) -> list:
    if task == "caption":
        return read_captions(files.data, files.images)
    if task == "vqa":
        return read_vqa(files.data, files.annotations, files.images)
    if task == "followup":
        return read_followup(files.data, files.images)
    if task == "instruct":
        return read_instruct(files.data, files.images)
    return read_pope(files.data, files.images)


def score(task: str, samples: Sequence, answers: Sequence, meteor: bool | None) -> tuple[dict, list[dict]]:
    """The task's metrics and one record per sample (its prediction beside the ground truth).

    An answer is a string, or for `followup` a pair (first answer, follow-up answer), for `instruct`
    a pair (the model's answer, the upper bound's).
    """
    pairs = list(zip(samples, answers, strict=True))
    if task == "caption":
        refs = {s.image_id: list(s.references) for s in samples}
        metrics = caption_metrics(refs, {s.image_id: a for s, a in pairs}, meteor=meteor)
        metrics.update(answer_stats(answers, [s.objects for s in samples]))
        records = [
            {
                "image_id": s.image_id,
                "image": s.image.name,
                "caption": a,
                "references": list(s.references),
                "repeats_itself": repeats_itself(a),
            }
            | ({"object_named": names_object(a, s.objects), "objects": list(s.objects)} if s.objects else {})
            for s, a in pairs
        ]
    elif task == "vqa":
        metrics = vqa_metrics(
            answers,
            [s.answers for s in samples],
            [s.answer_type for s in samples],
            [s.options for s in samples],
        )
        records = [
            _question_record(s, a, accuracy=vqa_accuracy(a, s.answers), answers=list(s.answers))
            | ({"options": list(s.options), "read_as": option_answer(a, s.options)} if s.options else {})
            for s, a in pairs
        ]
    elif task == "followup":
        firsts, followups = zip(*answers, strict=True)
        metrics = followup_metrics(
            followups,
            [s.answers for s in samples],
            [s.options for s in samples],
            [s.kind for s in samples],
            [s.category for s in samples],
        )
        records = [
            {
                "question_id": s.question_id,
                "image": s.image.name,
                "kind": s.kind,
                "category": s.category,
                "first_question": s.first_question,
                "first_answer": first,
                "question": s.question,
                "answer": followup,
                "read_as": option_answer(followup, s.options),
                "answers": list(s.answers),
                "options": list(s.options),
            }
            for s, first, followup in zip(samples, firsts, followups, strict=True)
        ]
    elif task == "instruct":
        metrics, records = _score_instruct(samples, answers)
    else:
        metrics = pope_metrics(answers, [s.label for s in samples], [s.category for s in samples])
        records = [
            _question_record(s, a, read_as=pope_answer(a), label=s.label, category=s.category)
            for s, a in pairs
        ]
    return metrics, records


def _score_instruct(samples: Sequence, answers: Sequence[tuple[str, str]]) -> tuple[dict, list[dict]]:
    model_answers, upper_answers = zip(*answers, strict=True)
    kinds = [s.kind for s in samples]
    truths = [s.truth for s in samples]
    images = [s.image for s in samples]
    model = instruct.check_answers(kinds, model_answers, truths, images)
    upper = instruct.check_answers(kinds, upper_answers, truths, images)
    metrics = instruct.instruct_metrics(kinds, [s.category for s in samples], model, upper)
    records = [
        {
            "question_id": s.question_id,
            "image": s.image.name,
            "category": s.category,
            "kind": s.kind,
            "held_out": s.kind in instruct.HELD_OUT,
            "instruction": s.instruction,
            "answer": answer,
            **instruct.checks_record(checks),
            "upper_bound": {
                "prompt": told_prompt(s.truth.facts, s.instruction),
                "answer": upper_answer,
                **instruct.checks_record(upper_checks),
            },
            "truth": dataclasses.asdict(s.truth),
        }
        for s, answer, upper_answer, checks, upper_checks in zip(
            samples, model_answers, upper_answers, model, upper, strict=True
        )
    ]
    return metrics, records


def _question_record(sample, answer: str, **truth: Any) -> dict[str, Any]:
    return {
        "question_id": sample.question_id,
        "image": sample.image.name,
        "question": sample.question,
        "answer": answer,
        **truth,
    }


def asker(
    task: str, answerer: BatchAnswerer, prompt: str, upper: BareLLM | None = None
) -> Callable[[Sequence], list]:
    """The function that answers a batch of the task's samples (`prompt` formats their question);
    for `instruct`, each answer comes with the upper bound's (`upper`) to the same instruction."""
    if task == "instruct":
        if upper is None:
            raise ValueError("the instruct task needs the upper bound's answerer")

        def both(batch: Sequence) -> list[tuple[str, str]]:
            asked = [prompt.format(question=s.instruction) for s in batch]
            answers = answerer.answer([s.image for s in batch], asked)
            told = upper.answer([s.truth.facts for s in batch], asked)
            return list(zip(answers, told, strict=True))

        return both
    if task == "followup":
        return lambda batch: answerer.answer_followups(
            [s.image for s in batch],
            [s.first_question for s in batch],
            [prompt.format(question=s.question) for s in batch],
        )
    return lambda batch: answerer.answer(
        [s.image for s in batch], [prompt.format(question=getattr(s, "question", "")) for s in batch]
    )


def answer_all(
    answer_batch: Callable[[Sequence], list], samples: Sequence, batch_size: int, progress: bool = True
) -> tuple[list, list, list[dict]]:
    """Greedy answers from `answer_batch`, `batch_size` samples at a time, with a progress bar.

    Returns the samples answered, their answers, and the samples skipped because their image could
    not be read (each with the reason), as `caption` does: one bad file does not cost the run.
    """
    answered: list = []
    answers: list = []
    skipped: list[dict] = []
    started = time.perf_counter()
    with tqdm(total=len(samples), desc="answering", unit="q", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            try:
                answers += answer_batch(batch)
                answered += batch
            except ImageError:
                for sample in batch:
                    try:
                        answers += answer_batch([sample])
                        answered.append(sample)
                    except ImageError as e:
                        log.error("%s: skipped: %s", sample.image, e)
                        skipped.append({"image": str(sample.image), "error": str(e)})
            bar.update(len(batch))
    if progress and samples:
        seconds = time.perf_counter() - started
        log.info("%d answers in %.1f s (%.2f answers/s)", len(samples), seconds, len(samples) / seconds)
    return answered, answers, skipped


def answer_ranked(
    answer_batch: Callable[[Sequence], list], samples: Sequence, batch_size: int, ranked: RankedJsonl
) -> tuple[list, list, list[dict]] | None:
    """`answer_all` over processes: this rank answers its share into its part; the first rank
    merges every part and returns all the answers (in sample order); the others return None."""
    rank = ranked.rank
    in_out = {row.get("index") for row in read_rows(ranked.out)}
    done = in_out | ranked.done_keys()
    mine = [i for i in rank.share(range(len(samples))) if i not in done]
    log.info("%s: %d of %d samples to answer", rank.name, len(mine), len(samples))
    started = time.perf_counter()
    with ranked.rows(len(samples) - len(in_out), "answering", "q") as sink:
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            batch = [samples[i] for i in indices]
            answered, answers, skipped = answer_all(answer_batch, batch, batch_size, progress=False)
            by_sample = {id(sample): answer for sample, answer in zip(answered, answers, strict=True)}
            errors = {s["image"]: s for s in skipped}
            for i, sample in zip(indices, batch, strict=True):
                if id(sample) in by_sample:
                    sink.write({"index": i, "answer": by_sample[id(sample)]})
                else:
                    sink.write(
                        {"index": i, "skipped": errors.get(str(sample.image), {"image": str(sample.image)})}
                    )
            sink.advance(len(batch))
    if mine:
        seconds = time.perf_counter() - started
        log.info(
            "%s: %d answers in %.1f s (%.2f answers/s)", rank.name, len(mine), seconds, len(mine) / seconds
        )
    if not rank.main:
        return None
    ranked.merge(range(len(samples)))
    rows = {row["index"]: row for row in read_rows(ranked.out)}
    answered, answers, skipped = [], [], []
    for i, sample in enumerate(samples):
        row = rows.get(i)
        if row is None or "skipped" in row:
            skipped.append((row or {}).get("skipped", {"image": str(sample.image), "error": "not answered"}))
            continue
        answered.append(sample)
        answer = row["answer"]
        answers.append(tuple(answer) if isinstance(answer, list) else answer)  # follow-ups: pairs
    return answered, answers, skipped


def metric_rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Flatten (possibly nested) metrics into printable (name, value) rows."""
    rows = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            rows += metric_rows(value, f"{prefix}{name} / ")
        elif isinstance(value, float):
            rows.append((prefix + name, f"{value:.4f}"))
        else:
            rows.append((prefix + name, str(value)))
    return rows


def describe_data(files: DataFiles) -> dict[str, Any]:
    """The data files' paths and SHA-256 digests, for the results file."""
    paths = {k: v for k, v in dataclasses.asdict(files).items() if v is not None}
    return {k: str(v) for k, v in paths.items()} | {
        "sha256": {k: sha256_file(v) for k, v in paths.items() if v.is_file()}
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m minigpt4 eval", description=__doc__.split("\n\n")[0]
    )
    add_model_args(p)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, type=Path, help="eval-set folder, or the task's data file")
    p.add_argument(
        "--annotations", type=Path, help="VQAv2 annotations file (when --data is a questions file)"
    )
    p.add_argument("--images", type=Path, help="image folder (default: images/ beside the data)")
    p.add_argument("--out", type=Path, help="results JSON (default: outputs/eval/<preset>_<task>.json)")
    p.add_argument("--limit", type=at_least(1), help="score only the first N samples")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="answers decoded together")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="answer length cap (default: 40 caption/followup, 10 vqa/pope, 160 instruct)",
    )
    p.add_argument(
        "--prompt", help="instruction; {question} is replaced by the question (followup: the second one)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process, ~20 s)")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Score a preset on a task's data and write the results JSON; 2 on bad input."""
    args = build_parser().parse_args(argv)
    task = TASKS[args.task]
    try:
        files = resolve_data(args.task, args.data, args.annotations, args.images)
        samples = load_samples(args.task, files)[: args.limit]
        cfg_file = resolve_preset(args.cfg_path)
    except (DataError, ConfigError) as e:
        return _fail(str(e))
    prompt = args.prompt or task.prompt
    try:
        prompt.format(question="")
    except (KeyError, IndexError, ValueError):
        return _fail(f"--prompt may hold {{question}} and no other {{…}} field, got {prompt!r}")
    max_new_tokens = args.max_new_tokens or task.max_new_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    rank = Rank.from_env()
    started = time.time()
    try:
        args.device = rank.device(args.device)
        chat = chat_from_args(args)  # loaded only once the inputs are known good
        answerer = BatchAnswerer(chat, max_new_tokens)
        upper = None
        if args.task == "instruct":
            upper = BareLLM(chat, load_preset(cfg_file, args.options).model, max_new_tokens)
    except ConfigError as e:
        return _fail(str(e))
    out = args.out or Path("outputs") / "eval" / f"{chat.preset_name}_{args.task}.json"
    ask = asker(args.task, answerer, prompt, upper)
    if rank.world == 1:
        samples, answers, skipped = answer_all(ask, samples, args.batch_size)
    else:
        job = job_digest(args.task, describe_data(files), args.limit, args.cfg_path, args.options, prompt,
                         max_new_tokens, rank.world)  # fmt: skip
        answers_file = out.with_name(out.stem + ".answers.jsonl")
        answers_file.parent.mkdir(parents=True, exist_ok=True)
        ranked = RankedJsonl(answers_file, rank, lambda row: row.get("index"), job)
        merged = answer_ranked(ask, samples, args.batch_size, ranked)
        if merged is None:
            return 0  # the first process scores and writes the results
        samples, answers, skipped = merged
        answers_file.unlink()
    if not samples:
        return _fail(f"none of the {len(skipped)} images could be read")
    metrics, records = score(args.task, samples, answers, meteor=False if args.no_meteor else None)
    results = {
        "task": args.task,
        "metrics": metrics,
        "n": len(samples),
        "config": {
            "preset": chat.preset_name,
            "file": str(cfg_file),
            "options": args.options,
            "device": chat.device,
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "batch_size": args.batch_size,
            "decoding": {"do_sample": False, "repetition_penalty": chat.defaults.repetition_penalty},
        }
        | (
            {
                "upper_bound": {
                    "image": False,
                    "lora": False,
                    "prompt": told_prompt("{facts}", "{instruction}"),
                }
            }
            if upper
            else {}
        ),
        "data": describe_data(files) | {"limit": args.limit},
        "git": git_state(),
        "seconds": round(time.time() - started, 1),
        "predictions": records,
        "skipped": skipped,
    }
    write_json(out, results)
    print(f"{args.task} on {files.data} ({len(samples)} samples), preset {chat.preset_name}")
    if args.task == "instruct":
        print(instruct.table(metrics))
    else:
        width = max(len(name) for name, _ in metric_rows(metrics))
        for name, value in metric_rows(metrics):
            print(f"  {name:<{width}}  {value}")
    print(f"results: {out}")
    if skipped:
        print(f"{len(skipped)} samples skipped: their image could not be read (listed in the results)")
    return 1 if skipped else 0
