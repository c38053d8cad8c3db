"""`python -m minigpt4 bench`: inference speed of a preset, measured side by side in one run.

    python -m minigpt4 bench --cfg-path minigpt4_tiny_random [--json]
    python -m minigpt4 bench train …        # training speed (minigpt4.train.bench)
    python -m minigpt4 bench replicas …     # N serve processes behind a round-robin (minigpt4.serve.replicas)
    python -m minigpt4 bench original …     # a CPU preset of the original at its real size (bench_original)

Each figure is the fastest of `--repeats` runs (default 1, on 1 torch thread, so the default run
finishes in a few minutes on a busy 2-core machine; other processes can only add time, so the minimum
is the steadiest estimate of what the code costs on a shared machine). Answers are greedy and
exactly `--answer-tokens` long: the stop tokens are switched off in the benchmark's own Chat.
- image encode ms: `Chat.upload_image` (preprocessing, vision, projection);
- time to first token at every turn of a `--turns`-turn conversation about one image, with the
  chat's KV reuse and without it (full prefill every turn, same prompts: the second conversation
  takes the first one's answers instead of decoding them again);
- decode tokens/s of the chat engine with the image in context, and of the same LLM's plain
  `generate` on a text prompt of the same length; both are (n-1) / (t(n tokens) - t(1 token)), so
  prefill cancels out. With `model.llm.decode_dtype`, the chat engine is also timed on its float32
  weights;
- the memory-bandwidth limit of decoding, interleaved with the decode runs: passes per second over
  exactly the weights one decode step reads (`decode_weight_tensors`, streamed by
  `minigpt4.eval.bandwidth.WeightStream`), and `bandwidth_fraction` = decode tok/s / that limit;
- peak RSS of the process (and peak GPU memory on CUDA);
- start to ready: a new Python process that imports the project and loads the preset (a *second*
  start: this process has already loaded it, so caches such as the converted lite LLM exist).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from minigpt4.chat import Chat, ChatSession
from minigpt4.commands.common import HelpFormatter, add_model_args, at_least, chat_from_args
from minigpt4.decode.engine import Engine
from minigpt4.decode.half_weights import decode_weight_tensors, float32_decode, has_half_decode_weights
from minigpt4.decode.stops import NO_STOPS
from minigpt4.errors import ConfigError, InputError
from minigpt4.eval.bandwidth import WeightStream
from minigpt4.eval.provenance import git_state
from minigpt4.images import load_image

log = logging.getLogger(__name__)

QUESTIONS = (
    "What is in this picture?",
    "What colours do you see?",
    "Where was this photo taken?",
    "What is in the background?",
    "Describe the lighting.",
    "Is there any text in the image?",
    "What might happen next?",
    "What is on the left side?",
    "What is on the right side?",
    "Summarise the picture in one sentence.",
)
GOALS = {
    "decode_ratio": 0.95,
    "ttft_turn10_over_turn1": 1.2,
    "reuse_speedup_turn10": 3.0,
    "bandwidth_fraction": 0.6,
}
# What the embedded default must reach on a 2-core laptop CPU: (figure, limit, "max" or "min").
LITE_TARGETS = (
    ("start_s", 10.0, "max"),
    ("encode_ms", 50.0, "max"),
    ("ttft_first_ms", 1000.0, "max"),
    ("decode_tok_s", 20.0, "min"),
)
_START = """
import json, sys
from minigpt4.chat import load_chat
preset, device, overrides = json.loads(sys.argv[1])
print(load_chat(preset, device=device, overrides=overrides).preset_name)
"""


def default_image() -> Image.Image:
    """A real photo that ships with scikit-image (512×512 astronaut portrait)."""
    from skimage import data_dir

    return Image.open(Path(data_dir) / "astronaut.png").convert("RGB")


def fastest(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time of `repeats` calls of `fn` (other processes can only add time)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class InferenceBench:
    """Runs the measurements on a Chat of its own: the given chat's model and runtime, with an engine
    without stops, so every answer has a fixed length. The given chat must be idle meanwhile."""

    def __init__(self, chat: Chat, image: Image.Image, answer_tokens: int) -> None:
        self.chat = chat.with_engine(Engine(chat.engine.runtime, NO_STOPS, chat.processor.pad_id))
        self.image = image
        self.answer_tokens = answer_tokens
        self.greedy = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}

    def session(self, question: str | None = None) -> ChatSession:
        """A new chat session with the image uploaded (and `question` asked)."""
        session = self.chat.new_session()
        self.chat.upload_image(session, self.image)
        if question is not None:
            self.chat.add_question(session, question)
        return session

    def _sync(self) -> None:
        if self.chat.model.device.type == "cuda":
            torch.cuda.synchronize()

    def context_tokens(self, session: ChatSession) -> int:
        """Positions of the prompt that the next answer continues (text tokens and image vectors)."""
        return len(self.chat.processor.conversation_ids(session.conversation))

    def encode_ms(self, repeats: int) -> float:
        session = self.chat.new_session()

        def upload() -> None:
            self.chat.upload_image(session, self.image)
            self._sync()

        return 1000 * fastest(upload, repeats)

    def turn(
        self, session: ChatSession, question: str, kv_reuse: bool, answer: str | None = None
    ) -> tuple[float, int]:
        """Ask and stream the answer: (seconds to its first piece, or to its end if it has none; prompt length).

        With `answer`, generation stops at the first piece and `answer` is recorded as the assistant's
        turn instead, so a second conversation can follow the first one's answers without decoding
        them again (greedy answers are the same with and without KV reuse).
        """
        self.chat.kv_reuse = kv_reuse
        self.chat.add_question(session, question)
        context = self.context_tokens(session)
        start = time.perf_counter()
        first = None
        with contextlib.closing(
            self.chat.stream_answer(session, max_new_tokens=self.answer_tokens, **self.greedy)
        ) as pieces:
            for _ in pieces:
                if first is None:
                    first = time.perf_counter() - start
                if answer is not None:
                    break
        seconds = first if first is not None else time.perf_counter() - start
        if answer is not None:
            session.conversation.messages[-1].text = answer
        return seconds, context

    def conversation(self, turns: int, repeats: int) -> dict[str, list]:
        """TTFT per turn with and without KV reuse (turns interleaved so both see the same load).

        The conversation without reuse takes the answers of the one with reuse: both arms prefill the
        same prompts, and only the first arm decodes whole answers.
        """
        with_reuse: list[list[float]] = [[] for _ in range(turns)]
        without: list[list[float]] = [[] for _ in range(turns)]
        context = [0] * turns
        with tqdm(total=repeats * turns, desc="conversation turns", unit="turn") as bar:
            for _ in range(repeats):
                reused, full = self.session(), self.session()
                for t in range(turns):
                    question = QUESTIONS[t % len(QUESTIONS)]
                    with_reuse[t].append(self.turn(reused, question, kv_reuse=True)[0])
                    answer = reused.conversation.messages[-1].text
                    seconds, context[t] = self.turn(full, question, kv_reuse=False, answer=answer)
                    without[t].append(seconds)
                    bar.update()
        self.chat.kv_reuse = True
        return {
            "ttft_ms": [1000 * min(x) for x in with_reuse],
            "ttft_ms_no_reuse": [1000 * min(x) for x in without],
            "context_tokens": context,
        }

    def _chat_seconds(self, question: str, n_tokens: int) -> float:
        session = self.session(question)  # set-up and image upload are not timed
        start = time.perf_counter()
        for _ in self.chat.stream_answer(session, max_new_tokens=n_tokens, **self.greedy):
            pass
        self._sync()
        return time.perf_counter() - start

    @torch.no_grad()
    def _generate_seconds(self, input_ids: torch.Tensor, n_tokens: int, pad_id: int) -> float:
        start = time.perf_counter()
        self.chat.model.llm.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            pad_token_id=pad_id,
            **self.greedy,
        )
        self._sync()
        return time.perf_counter() - start

    def decode(self, n_tokens: int, repeats: int) -> dict[str, float]:
        """Decode tokens/s: the chat engine with the image in context vs `generate` on same-length text."""
        question = QUESTIONS[0]
        prompt_len = self.context_tokens(self.session(question))
        tokenizer = self.chat.tokenizer
        filler = tokenizer(" image", add_special_tokens=False).input_ids[-1]
        text_ids = torch.full((1, prompt_len), filler, dtype=torch.long, device=self.chat.model.device)
        if tokenizer.bos_token_id is not None:
            text_ids[0, 0] = tokenizer.bos_token_id
        half = has_half_decode_weights(self.chat.model.llm)
        weights = WeightStream(decode_weight_tensors(self.chat.engine.runtime))
        with float32_decode():
            weights_fp32 = WeightStream(decode_weight_tensors(self.chat.engine.runtime)) if half else None
        times: dict[str, list[float]] = {
            k: []
            for k in ("chat_n", "chat_1", "plain_n", "plain_1", "fp32_n", "fp32_1", "limit", "fp32_limit")
        }
        for _ in tqdm(range(repeats), desc="decode runs", unit="run"):  # interleaved: same machine load
            times["chat_n"].append(self._chat_seconds(question, n_tokens))
            times["limit"].append(weights.seconds_per_pass(n_tokens - 1))
            times["chat_1"].append(self._chat_seconds(question, 1))
            times["plain_n"].append(self._generate_seconds(text_ids, n_tokens, filler))
            times["plain_1"].append(self._generate_seconds(text_ids, 1, filler))
            if weights_fp32 is not None:
                with float32_decode():
                    times["fp32_n"].append(self._chat_seconds(question, n_tokens))
                    times["fp32_limit"].append(weights_fp32.seconds_per_pass(n_tokens - 1))
                    times["fp32_1"].append(self._chat_seconds(question, 1))
        fastest = {k: min(v) for k, v in times.items() if v}

        def rate(kind: str) -> float:
            return (n_tokens - 1) / max(fastest[f"{kind}_n"] - fastest[f"{kind}_1"], 1e-9)

        limit_tok_s = 1 / fastest["limit"]
        result = {
            "decode_tok_s": rate("chat"),
            "plain_decode_tok_s": rate("plain"),
            "decode_ratio": rate("chat") / rate("plain"),
            "decode_prompt_tokens": prompt_len,
            "limit_tok_s": limit_tok_s,
            "bandwidth_fraction": rate("chat") / limit_tok_s,
            "decode_weights_mb": weights.bytes / 2**20,
            "limit_gb_s": weights.bytes * limit_tok_s / 1e9,
        }
        if weights_fp32 is not None:
            result["decode_tok_s_float32_weights"] = rate("fp32")
            result["limit_tok_s_float32_weights"] = 1 / fastest["fp32_limit"]
        return result


def concurrent_answers(
    chat: Chat, image: Image.Image, n_sessions: int, n_tokens: int, repeats: int
) -> dict[str, Any]:
    """Aggregate tokens/s of `n_sessions` answers decoded at once, against the same answers one by one.

    Every session has the image and its own question; answers are greedy with stops off, so each is
    `n_tokens` long. Each answer runs on its own thread, as the app and the API run them, and the
    engine's batcher decodes them together. Solo and together runs alternate (same machine load);
    the fastest of `repeats` counts. Each session's text together must equal its text alone.
    """
    bench = InferenceBench(chat, image, n_tokens)
    chat = bench.chat
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n_sessions)]
    bench.turn(bench.session(), QUESTIONS[0], kv_reuse=True)  # warm-up

    def answer(session: ChatSession, out: list[str], i: int) -> None:
        out[i] = "".join(chat.stream_answer(session, max_new_tokens=n_tokens, **bench.greedy))

    solo_s, together_s = [], []
    solo, together = [""] * n_sessions, [""] * n_sessions
    for _ in tqdm(range(repeats), desc=f"{n_sessions} sessions", unit="run"):
        sessions = [bench.session(q) for q in questions]  # image uploaded, question asked: not timed
        start = time.perf_counter()
        for i, session in enumerate(sessions):
            answer(session, solo, i)
        solo_s.append(time.perf_counter() - start)
        sessions = [bench.session(q) for q in questions]
        threads = [threading.Thread(target=answer, args=(s, together, i)) for i, s in enumerate(sessions)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together_s.append(time.perf_counter() - start)
    tokens = n_sessions * n_tokens
    one, many = tokens / min(solo_s), tokens / min(together_s)
    return {
        "sessions": n_sessions,
        "session_tokens": n_tokens,
        "single_tok_s": one,
        "aggregate_tok_s": many,
        "aggregate_speedup": many / one,
        "identical_outputs": solo == together,
        "runtime": chat.engine.runtime.name,
    }


def format_sessions_report(result: dict[str, Any]) -> str:
    """The table of a `concurrent_answers` result."""
    return "\n".join(
        [
            f"{result['sessions']} sessions answering at once, {result['session_tokens']} tokens each "
            f"(runtime {result['runtime']}, {result['threads']} threads, fastest of {result['repeats']} runs)",
            f"  one after another     {result['single_tok_s']:8.1f} tok/s",
            f"  together (batched)    {result['aggregate_tok_s']:8.1f} tok/s",
            f"  aggregate_speedup     {result['aggregate_speedup']:8.2f}x  (≥ 4 for 8 sessions: "
            f"{'met' if result['aggregate_speedup'] >= 4 else 'NOT met'})",
            f"  identical_outputs     {result['identical_outputs']}  (each session's greedy text, alone vs together)",
        ]
    )


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    out = {"peak_rss_mb": rss}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def start_seconds(preset: str | None, device: str | None, overrides: Sequence[str], repeats: int) -> float:
    """Wall time of a new `python` process that imports the project and loads the preset (fastest run)."""
    command = [sys.executable, "-c", _START, json.dumps([preset, device, list(overrides)])]
    times = []
    for _ in tqdm(range(repeats), desc="start to ready", unit="start"):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"loading the preset in a new process failed:\n{done.stderr[-2000:]}")
    return min(times)


def run_bench(
    chat: Chat,
    image: Image.Image,
    turns: int,
    answer_tokens: int,
    decode_tokens: int,
    repeats: int,
    start: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Every inference figure of the bench, as one dict (the `--json` output).

    `start`, when given, measures a second start in seconds (see `start_seconds`).
    """
    bench = InferenceBench(chat, image, answer_tokens)
    bench.turn(bench.session(), QUESTIONS[0], kv_reuse=True)  # warm-up: lazy initialisation, caches
    result: dict[str, Any] = {"encode_ms": bench.encode_ms(repeats)}
    result |= bench.conversation(turns, repeats)
    result |= bench.decode(decode_tokens, repeats)
    if start is not None:
        result["start_s"] = start()
    ttft, full = result["ttft_ms"], result["ttft_ms_no_reuse"]
    result["ttft_first_ms"] = ttft[0]
    result["ttft_turn10_over_turn1"] = ttft[-1] / ttft[0]
    result["reuse_speedup_turn10"] = full[-1] / ttft[-1]
    result |= peak_memory_mb(chat.model.device)
    return result | {
        "preset": chat.preset_name,
        "device": chat.device,
        "threads": torch.get_num_threads(),
        "turns": turns,
        "answer_tokens": answer_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "git": git_state(),
    }


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of a `run_bench` result."""
    lines = [
        f"MiniGPT-4 inference bench: preset {result['preset']} on {result['device']} "
        f"({result['threads']} torch threads), fastest of {result['repeats']} runs",
        f"image encode                 {result['encode_ms']:9.1f} ms",
        "",
        f"time to first token, {len(result['ttft_ms'])}-turn conversation, {result['answer_tokens']}-token answers",
        "  turn  context  with reuse  without reuse  speed-up",
    ]
    for t, (a, b, ctx) in enumerate(
        zip(result["ttft_ms"], result["ttft_ms_no_reuse"], result["context_tokens"], strict=True), 1
    ):
        lines.append(f"  {t:4d}  {ctx:7d}  {a:8.1f} ms  {b:10.1f} ms  {b / a:7.2f}x")
    lines += [
        "",
        f"decode, {result['decode_tokens']} new tokens after a {result['decode_prompt_tokens']}-position prompt",
        f"  chat engine, image in context  {result['decode_tok_s']:9.1f} tok/s",
        f"  plain generate, text prompt    {result['plain_decode_tok_s']:9.1f} tok/s",
        f"  bandwidth limit                {result['limit_tok_s']:9.1f} tok/s  (one pass over the "
        f"{result['decode_weights_mb']:.0f} MB of weights a step reads: {result['limit_gb_s']:.1f} GB/s)",
        f"  bandwidth_fraction             {result['bandwidth_fraction']:9.2f}  (chat engine / limit)",
    ]
    if "decode_tok_s_float32_weights" in result:
        lines.append(f"  chat engine, float32 weights   {result['decode_tok_s_float32_weights']:9.1f} tok/s")
        lines.append(f"  limit, float32 weights         {result['limit_tok_s_float32_weights']:9.1f} tok/s")
    lines += ["", f"peak RSS                     {result['peak_rss_mb']:9.0f} MB"]
    if "peak_gpu_mb" in result:
        lines.append(f"peak GPU memory              {result['peak_gpu_mb']:9.0f} MB")
    if "start_s" in result:
        lines.append(f"start to ready (2nd start)   {result['start_s']:9.2f} s")
    lines += ["", "ratios (goal)"]
    for key, goal in GOALS.items():
        better_high = key != "ttft_turn10_over_turn1"
        met = result[key] >= goal if better_high else result[key] <= goal
        sign = "≥" if better_high else "≤"
        lines.append(f"  {key:<24} {result[key]:6.2f}  ({sign} {goal}: {'met' if met else 'NOT met'})")
    if result["preset"] == "minigpt4_lite" and result["device"] == "cpu":
        lines += ["", "targets of the embedded default on a laptop CPU"]
        for key, limit, kind in LITE_TARGETS:
            if key in result:
                met = result[key] <= limit if kind == "max" else result[key] >= limit
                sign = "≤" if kind == "max" else "≥"
                verdict = "met" if met else "NOT met"
                lines.append(f"  {key:<24} {result[key]:8.1f}  ({sign} {limit:g}: {verdict})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m minigpt4 bench", description=__doc__.split("\n\n")[0]
    )
    add_model_args(p)
    p.add_argument("--image", type=Path, help="image to talk about (default: scikit-image's astronaut)")
    p.add_argument("--turns", type=at_least(1), default=10, help="turns of the measured conversation")
    p.add_argument(
        "--answer-tokens", type=at_least(1), default=32, help="length of every answer in the conversation"
    )
    p.add_argument(
        "--decode-tokens", type=at_least(2), default=64, help="new tokens in the decode measurement"
    )
    p.add_argument(
        "--repeats", type=at_least(1), default=1, help="runs of each measurement (the fastest counts)"
    )
    p.add_argument(
        "--threads",
        type=at_least(1),
        default=1,
        help="torch CPU threads (default 1: more threads spin-wait whenever another process holds a core)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--sessions",
        type=at_least(0),
        default=0,
        help="instead: aggregate tokens/s of N sessions answering at once, against one at a time",
    )
    p.add_argument(
        "--no-start",
        action="store_true",
        help="skip the start-to-ready measurement (a new process per repeat)",
    )
    return p


def settings_line(args: argparse.Namespace) -> str:
    """What this run measures with, printed first: the defaults are sized to finish in minutes."""
    start = "off" if args.no_start else "on"
    return (
        f"bench settings: --threads {args.threads} --repeats {args.repeats} --turns {args.turns} "
        f"--answer-tokens {args.answer_tokens} --decode-tokens {args.decode_tokens}, second start {start} "
        "(steadier figures: --repeats 3, and --threads N on an idle machine; see docs/performance.md)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the inference bench (or, with `train` first, the training bench)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        train_bench = importlib.import_module("minigpt4.train.bench")
        return int(train_bench.main(argv[1:]) or 0)
    if argv[:1] == ["original"]:
        original = importlib.import_module("minigpt4.eval.bench_original")
        return int(original.main(argv[1:]) or 0)
    if argv[:1] == ["replicas"]:
        replicas = importlib.import_module("minigpt4.serve.replicas")
        return int(replicas.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    print(settings_line(args), file=sys.stderr, flush=True)

    try:
        image = load_image(args.image) if args.image else default_image()
        chat = chat_from_args(args)
        if args.sessions:
            result = concurrent_answers(chat, image, args.sessions, args.decode_tokens, args.repeats)
            result |= {"threads": torch.get_num_threads(), "repeats": args.repeats, "git": git_state()}
            print(json.dumps(result, indent=1) if args.json else format_sessions_report(result))
            return 0
        start = (
            None
            if args.no_start
            else lambda: start_seconds(args.cfg_path, args.device, args.options, args.repeats)
        )
        result = run_bench(
            chat, image, args.turns, args.answer_tokens, args.decode_tokens, args.repeats, start=start
        )
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0
