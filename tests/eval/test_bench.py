"""The inference bench on the tiny preset: what it measures and what it prints (never how fast)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from minigpt4.chat import load_chat
from minigpt4.decode.half_weights import add_half_decode_weights, decode_weight_tensors, float32_decode
from minigpt4.eval import bench
from minigpt4.eval.bandwidth import WeightStream

REQUIRED = (
    "encode_ms",
    "ttft_ms",
    "ttft_ms_no_reuse",
    "decode_tok_s",
    "plain_decode_tok_s",
    "decode_ratio",
    "ttft_turn10_over_turn1",
    "reuse_speedup_turn10",
    "peak_rss_mb",
    "limit_tok_s",
    "bandwidth_fraction",
)


@pytest.fixture(scope="module")
def own_chat(tiny_cfg_path: Path):
    """A Chat of its own: the bench switches its stop tokens off."""
    return load_chat(tiny_cfg_path, device="cpu")


@pytest.fixture(scope="module")
def result(own_chat) -> dict:
    return bench.run_bench(
        own_chat, bench.default_image(), turns=3, answer_tokens=4, decode_tokens=6, repeats=1
    )


def test_bench_reports_every_figure_per_turn(result: dict) -> None:
    for key in REQUIRED:
        assert key in result, key
    assert len(result["ttft_ms"]) == len(result["ttft_ms_no_reuse"]) == len(result["context_tokens"]) == 3
    assert all(t > 0 for t in result["ttft_ms"] + result["ttft_ms_no_reuse"])
    # The conversation grows every turn: each prompt holds all earlier questions and answers.
    assert result["context_tokens"][0] < result["context_tokens"][1] < result["context_tokens"][2]
    assert result["decode_ratio"] == pytest.approx(result["decode_tok_s"] / result["plain_decode_tok_s"])
    assert result["reuse_speedup_turn10"] == pytest.approx(
        result["ttft_ms_no_reuse"][-1] / result["ttft_ms"][-1]
    )
    assert result["ttft_turn10_over_turn1"] == pytest.approx(result["ttft_ms"][-1] / result["ttft_ms"][0])
    assert result["decode_prompt_tokens"] == result["context_tokens"][0]
    assert result["peak_rss_mb"] > 50
    assert result["limit_tok_s"] > 0
    assert result["bandwidth_fraction"] == pytest.approx(result["decode_tok_s"] / result["limit_tok_s"])
    assert result["limit_gb_s"] == pytest.approx(
        result["decode_weights_mb"] * 2**20 * result["limit_tok_s"] / 1e9
    )
    assert result["preset"] == "minigpt4_tiny_random" and result["device"] == "cpu"


def test_bench_turns_use_and_skip_the_kv_cache(own_chat) -> None:
    runner = bench.InferenceBench(own_chat, bench.default_image(), answer_tokens=5)
    reused, full = runner.session(), runner.session()
    _, context = runner.turn(reused, "What is it?", kv_reuse=True)
    runner.turn(full, "What is it?", kv_reuse=False)
    chat = runner.chat
    assert chat.cached_positions(reused) and not chat.cached_positions(full)
    # Stops are off, so the answer is exactly `answer_tokens` long, whatever the model says; the
    # last of its 5 tokens is never fed (no logits are needed after it).
    assert chat.cached_positions(reused) == chat.engine.sequence(reused).length == context + 4


def test_report_names_each_goal(result: dict) -> None:
    report = bench.format_report(result)
    assert "turn  context  with reuse  without reuse" in report
    for key in ("decode_ratio", "ttft_turn10_over_turn1", "reuse_speedup_turn10"):
        assert key in report
    verdict = "met" if result["decode_ratio"] >= 0.95 else "NOT met"
    assert re.search(rf"decode_ratio +{result['decode_ratio']:.2f} +\(≥ 0.95: {verdict}\)", report)


def test_bench_json_on_the_command_line(
    own_chat, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "chat_from_args", lambda args: own_chat)
    args = ["--cfg-path", "minigpt4_tiny_random", "--json", "--turns", "2", "--no-start"]
    assert bench.main([*args, "--answer-tokens", "2", "--decode-tokens", "3", "--repeats", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(REQUIRED) <= set(printed) and len(printed["ttft_ms"]) == 2


def test_bench_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    for args, said in ((["--turns", "0"], "argument --turns: must be ≥ 1, got 0"),
                       (["--decode-tokens", "1"], "argument --decode-tokens: must be ≥ 2, got 1")):  # fmt: skip
        with pytest.raises(SystemExit) as caught:
            bench.main(args)
        assert caught.value.code == 2 and said in capsys.readouterr().err


def test_bench_train_goes_to_the_training_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    fake = types.ModuleType("minigpt4.train.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "minigpt4.train.bench", fake)
    assert bench.main(["train", "--steps", "3"]) == 0
    assert seen == [["--steps", "3"]]


def test_second_start_is_a_new_process_loading_the_preset(tiny_cfg_path: Path) -> None:
    seconds = bench.start_seconds(str(tiny_cfg_path), "cpu", ["generation.max_new_tokens=7"], repeats=1)
    assert 0 < seconds < 600
    with pytest.raises(RuntimeError, match="no-such-key"):
        bench.start_seconds(str(tiny_cfg_path), "cpu", ["no-such-key=1"], repeats=1)


def test_half_decode_weights_are_timed_beside_float32(tiny_cfg_path: Path) -> None:
    chat = load_chat(tiny_cfg_path, device="cpu", overrides=["model.llm.decode_dtype=float16"])
    result = bench.run_bench(
        chat, bench.default_image(), turns=1, answer_tokens=2, decode_tokens=3, repeats=1, start=lambda: 4.5
    )
    assert result["decode_tok_s_float32_weights"] > 0 and result["start_s"] == 4.5
    report = bench.format_report(result)
    assert "chat engine, float32 weights" in report and "start to ready (2nd start)" in report
    assert "targets of the embedded default" not in report  # a tiny preset has none


def test_lite_targets_are_judged_in_the_report(result: dict) -> None:
    lite = result | {"preset": "minigpt4_lite", "start_s": 12.0, "encode_ms": 40.0, "decode_tok_s": 25.0}
    report = bench.format_report(lite)
    assert re.search(r"start_s +12\.0 +\(≤ 10: NOT met\)", report)
    assert re.search(r"encode_ms +40\.0 +\(≤ 50: met\)", report)
    assert re.search(r"decode_tok_s +25\.0 +\(≥ 20: met\)", report)
    assert "ttft_first_ms" in report


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _names(model: torch.nn.Module, tensors: list[torch.Tensor], attr: str) -> list[tuple[str, tuple]]:
    by_storage = {getattr(m, attr).data_ptr(): n for n, m in model.named_modules() if hasattr(m, attr)}
    return [(by_storage[t.data_ptr()], tuple(t.shape)) for t in tensors]


LLAMA_DECODE_WEIGHTS = [
    (f"model.layers.{i}.{name}", shape)
    for i in range(2)
    for name, shape in (
        ("self_attn.q_proj", (16, 16)),
        ("self_attn.k_proj", (8, 16)),
        ("self_attn.v_proj", (8, 16)),
        ("self_attn.o_proj", (16, 16)),
        ("mlp.gate_proj", (24, 16)),
        ("mlp.up_proj", (24, 16)),
        ("mlp.down_proj", (16, 24)),
    )
] + [("lm_head", (40, 16))]


def test_decode_weight_tensors_are_the_linear_weights_or_their_half_copies() -> None:
    llm = _tiny_llama()
    # lm_head is tied to the embedding table: it is read once per step, as a matrix, and listed once.
    tensors = decode_weight_tensors(llm)
    assert _names(llm, tensors, "weight") == LLAMA_DECODE_WEIGHTS
    assert all(t.dtype == torch.float32 for t in tensors)

    add_half_decode_weights(llm, "float16")
    half = decode_weight_tensors(llm)
    assert _names(llm, half, "weight_half") == LLAMA_DECODE_WEIGHTS
    assert all(t.dtype == torch.float16 for t in half)
    with float32_decode():  # the half copies switched off: a step reads the float32 weights again
        assert _names(llm, decode_weight_tensors(llm), "weight") == LLAMA_DECODE_WEIGHTS


def test_another_runtime_names_its_own_decode_weights() -> None:
    class QuantisedRuntime:
        def __init__(self) -> None:
            self.blocks = [torch.full((1000,), 7, dtype=torch.uint8), torch.zeros(24, dtype=torch.uint8)]

        def decode_weight_tensors(self) -> list[torch.Tensor]:
            return self.blocks

    runtime = QuantisedRuntime()
    tensors = decode_weight_tensors(runtime)
    assert len(tensors) == 2 and all(a is b for a, b in zip(tensors, runtime.blocks, strict=True))
    with pytest.raises(TypeError, match="cannot tell which weights"):
        decode_weight_tensors(object())


def test_weight_stream_reads_matrices_and_raw_byte_buffers() -> None:
    tensors = [
        torch.zeros(1000, dtype=torch.uint8),
        torch.ones(8, 16, dtype=torch.float16),
        torch.ones(4, 16, dtype=torch.float32),
        torch.zeros(0, dtype=torch.uint8),
    ]
    stream = WeightStream(tensors)
    assert stream.bytes == 1000 + 8 * 16 * 2 + 4 * 16 * 4
    assert len(stream.tensors) == 3  # the empty buffer is left out
    stream.one_pass()
    assert stream.seconds_per_pass(2) > 0
    with pytest.raises(ValueError, match="no weight tensors"):
        WeightStream([])


def test_limit_streams_the_chats_own_decode_weights(result: dict, own_chat) -> None:
    weights = decode_weight_tensors(own_chat.model.llm)
    assert result["decode_weights_mb"] == pytest.approx(
        sum(t.numel() * t.element_size() for t in weights) / 2**20
    )
    report = bench.format_report(result)
    assert re.search(rf"bandwidth limit +{result['limit_tok_s']:.1f} tok/s", report)
    assert re.search(rf"bandwidth_fraction +{result['bandwidth_fraction']:.2f} +\(≥ 0.6: ", report)


def test_turn_without_reuse_can_follow_another_conversations_answer(own_chat) -> None:
    runner = bench.InferenceBench(own_chat, bench.default_image(), answer_tokens=8)
    full = runner.session()
    runner.turn(full, "What is it?", kv_reuse=False, answer="A given answer.")
    assert full.conversation.messages[-1].text == "A given answer."
    # It stopped at its first piece instead of decoding all 8 tokens.
    assert 1 <= full.last_result.answer_tokens < 8


def test_defaults_are_one_thread_one_repeat_and_are_printed_first(
    own_chat, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    defaults = bench.build_parser().parse_args([])
    assert (defaults.threads, defaults.repeats, defaults.turns) == (1, 1, 10)
    monkeypatch.setattr(bench, "chat_from_args", lambda args: own_chat)
    threads = torch.get_num_threads()
    try:
        args = ["--json", "--turns", "1", "--no-start", "--answer-tokens", "2", "--decode-tokens", "2"]
        assert bench.main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert captured.err.index("bench settings: --threads 1 --repeats 1 --turns 1") < captured.err.index(
        "decode runs"
    )
    assert json.loads(captured.out)["threads"] == 1
