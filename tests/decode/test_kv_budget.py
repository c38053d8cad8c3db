"""The KV budget: the positions the transformers runtime caches, all conversations together, are capped."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from minigpt4.chat import load_chat
from minigpt4.decode.kv_budget import KVBudget, KVBudgetError, default_kv_positions, kv_bytes_per_position
from minigpt4.decode.runtime import TorchRuntime
from minigpt4.errors import ConfigError

GREEDY = {"do_sample": False, "num_beams": 1}


class FakeSequence:
    def __init__(self, length: int = 0, active: bool = False) -> None:
        self.length, self.active = length, active


def _budget(max_positions: int, *lengths: int) -> tuple[KVBudget, list[FakeSequence]]:
    budget = KVBudget(max_positions)
    seqs = [FakeSequence(n) for n in lengths]
    for seq in seqs:
        budget.track(seq)
        assert budget.reserve(seq, n := seq.length, lambda s: None) and n == seq.reserved
    return budget, seqs


def _release(seq: FakeSequence) -> None:
    seq.length = 0


def test_idle_caches_are_released_least_recently_used_first_and_only_as_far_as_needed():
    budget, (old, middle, recent) = _budget(100, 30, 30, 30)
    new = FakeSequence()
    budget.track(new)
    assert budget.reserve(new, 40, _release)  # 90 held + 40 > 100: the oldest idle one goes
    assert (old.length, middle.length, recent.length) == (0, 30, 30)
    new.active = True
    assert budget.held() == 100


def test_an_answer_waits_while_active_ones_hold_the_room_and_active_caches_are_never_released():
    budget, (busy, idle) = _budget(100, 60, 20)
    busy.active = True
    new = FakeSequence()
    budget.track(new)
    assert not budget.reserve(new, 50, _release)  # 60 active + 50 > 100 even with the idle one gone
    assert busy.length == 60
    busy.active = False  # its answer ended: now it is idle and may go
    assert budget.reserve(new, 50, _release)
    with pytest.raises(KVBudgetError, match="needs 101 key/value positions but the budget holds 100"):
        budget.reserve(new, 101, _release)


def test_beams_are_limited_by_context():
    budget = KVBudget(4000)
    assert budget.max_beams(300, 10) == 10
    assert budget.max_beams(1000, 10) == 4
    assert budget.max_beams(2000, 10) == 2
    assert budget.max_beams(3000, 5) == 1


def test_the_default_budget_holds_whole_contexts_that_fit_the_free_gpu_memory():
    llama_7b = LlamaConfig()  # its defaults are LLaMA-7B's: 32 layers, 32 heads of 128
    per_position = kv_bytes_per_position(llama_7b, torch.float16)
    assert per_position == 524_288  # 0.5 MB a position: 1 GB at 2,000 tokens
    assert default_kv_positions(2000, 8, per_position, None) == 16_000  # the CPU: max_sequences contexts
    free_24gb_card = int(7.6e9)  # a 24 GB card after the 7B preset (≈16.4 GB)
    assert default_kv_positions(2000, 8, per_position, free_24gb_card) == 11_423
    assert default_kv_positions(2000, 8, per_position, int(1e9)) == 2000  # never less than one context


@pytest.fixture(scope="module")
def small_budget_chat():
    """The tiny preset with room for one context of 200 positions, all conversations together."""
    return load_chat(
        "minigpt4_tiny_random",
        device="cpu",
        overrides=["model.max_context_tokens=200", "model.llm.kv_cache_positions=200"],
    )


def _asked(chat, image, question: str):
    session = chat.new_session()
    chat.upload_image(session, image)
    chat.add_question(session, question)
    return session


def test_app_and_api_chats_share_one_budgeted_runtime(tiny_chat):
    assert isinstance(tiny_chat.engine.runtime, TorchRuntime)
    assert tiny_chat.engine.runtime.kv_budget.max_positions == 8 * 1024  # max_sequences × max_context_tokens
    with pytest.raises(ConfigError, match=r"kv_cache_positions \(100\) must hold at least one whole context"):
        load_chat("minigpt4_tiny_random", device="cpu", overrides=["model.llm.kv_cache_positions=100"])


def test_a_new_conversation_takes_the_room_of_the_least_recently_used_idle_one(small_budget_chat, photo):
    chat = small_budget_chat
    first = _asked(chat, photo, "What is in the image?")
    chat.answer(first, max_new_tokens=20, **GREEDY)
    held_by_first = chat.engine.sequence(first).length
    assert held_by_first > 60
    second = _asked(chat, photo, "Which colours do you see?")
    chat.answer(second, max_new_tokens=200 - held_by_first, **GREEDY)  # needs more than is left
    assert chat.engine.sequence(first).length == 0, "the idle conversation's cache was released"
    assert chat.engine.sequence(second).length > 0
    assert chat.engine.runtime.kv_budget.held() <= 200
    chat.add_question(first, "And now?")  # the released conversation still answers, prefilling everything
    assert chat.answer(first, max_new_tokens=8, **GREEDY)
    assert first.last_result.prefill_tokens == first.last_result.prompt_tokens
    assert chat.engine.runtime.kv_budget.held() <= 200


def test_beam_search_gets_the_beams_its_context_leaves_room_for(photo, monkeypatch):
    overrides = ["model.max_context_tokens=200", "model.llm.kv_cache_positions=500"]
    chat = load_chat("minigpt4_tiny_random", device="cpu", overrides=overrides)
    seen = []
    generate = chat.model.llm.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["num_beams"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(chat.model.llm, "generate", recording_generate)
    session = _asked(chat, photo, "Describe it.")
    chat.answer(session, max_new_tokens=20, do_sample=False, num_beams=10)
    prompt = session.last_result.prompt_tokens
    assert seen == [500 // (prompt + 20)] and 1 < seen[0] < 10


class _FailingPrefill(TorchRuntime):
    def prefill(self, seq, embeds, keep):
        super().prefill(seq, embeds, keep)  # the cache is filled, then the request fails (an OOM)
        raise RuntimeError("out of memory")


def test_a_failed_prefill_leaves_no_cache_held(tiny_chat, photo):
    from minigpt4.chat import Chat

    chat = Chat(
        tiny_chat.model, tiny_chat.template, runtime=_FailingPrefill(tiny_chat.model.llm, 2, KVBudget(4096))
    )
    session = _asked(chat, photo, "hi")
    with pytest.raises(RuntimeError, match="out of memory"):
        chat.answer(session, max_new_tokens=5, **GREEDY)
    assert chat.engine.sequence(session).length == 0
    assert chat.engine.runtime.kv_budget.held() == 0
