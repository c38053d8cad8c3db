"""The decode engine on the tiny random preset: ids in, ids out, one result per answer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from minigpt4.decode.engine import Engine
from minigpt4.decode.inputs import PromptInput
from minigpt4.decode.runtime import TorchRuntime
from minigpt4.decode.stops import NO_STOPS, Stops
from minigpt4.generation import GenerationParams

GREEDY = GenerationParams(max_new_tokens=8, do_sample=False, repetition_penalty=1.0)


def _prompts(chat, questions):
    model = chat.model
    pictures = [Image.radial_gradient("L").convert("RGB").rotate(30 * i) for i in range(len(questions))]
    vectors = model.encode_images(model.preprocess(pictures)).detach()
    prompts = []
    for i, question in enumerate(questions):
        ids = chat.processor.tokenize(f"<Img><ImageHere></Img> {question}", 1)
        prompts.append(PromptInput.of(ids, vectors[i : i + 1], (f"image{i}",)))
    return prompts


def test_a_batch_gives_what_each_prompt_gives_alone(tiny_chat):
    engine = Engine(TorchRuntime(tiny_chat.model.llm), NO_STOPS, tiny_chat.processor.pad_id)
    prompts = _prompts(tiny_chat, ["what is it?", "hi", "which colours are there in this picture?"])
    together = engine.generate_batch(prompts, GREEDY)  # left-padded `generate`
    alone = [engine.generate(p, GREEDY).run() for p in prompts]  # the batcher, one by one
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert all(r.answer_tokens == 8 and r.finish_reason == "length" for r in together + alone)
    assert [r.prompt_tokens for r in alone] == [len(p) for p in prompts]


def test_stop_ids_and_stop_strings_end_decoding_in_the_engine(tiny_chat):
    model = tiny_chat.model
    prompt = _prompts(tiny_chat, ["what is it?"])[0]
    free = Engine(TorchRuntime(model.llm), NO_STOPS).generate(prompt, GREEDY).run().tokens
    text = tiny_chat.processor.detokenize
    # A stop id: decoding ends with it; it is counted, and not handed to the reader.
    by_id = Engine(TorchRuntime(model.llm), Stops(frozenset({free[3]})))
    generation = by_id.generate(prompt, GREEDY)
    assert list(generation) == free[:3]
    assert generation.finished().tokens == free[:4] and generation.result.finish_reason == "stop"
    # A stop string that spans tokens: decoding ends at the token that completes it (no cancel needed).
    stop = text(free[:5])[-3:]
    by_string = Engine(TorchRuntime(model.llm), Stops(frozenset(), (stop,), text))
    result = by_string.generate(prompt, GREEDY).run()
    assert result.finish_reason == "stop" and stop in text(result.tokens) and len(result.tokens) <= 5
    batch = by_string.generate_batch([prompt, prompt], GREEDY)
    assert [r.tokens for r in batch] == [result.tokens] * 2


class _Conversation:
    """A caller's handle of one conversation (the chat's is its session)."""


def test_a_key_keeps_its_cache_and_the_next_prompt_prefills_only_what_is_new(tiny_chat):
    engine = Engine(TorchRuntime(tiny_chat.model.llm), NO_STOPS)
    first = _prompts(tiny_chat, ["what is it?"])[0]
    key = _Conversation()
    answer = engine.generate(first, GREEDY, key=key).run()
    assert answer.prefill_tokens == len(first)
    assert engine.cached_positions(key) == len(first) + len(answer.tokens) - 1  # the last token is not fed
    follow = PromptInput(first.ids + answer.tokens + [5, 6, 7], first.vectors, first.image_keys)
    again = engine.generate(follow, GREEDY, key=key).run()
    assert again.prefill_tokens == len(follow) - (len(first) + len(answer.tokens) - 1)
    fresh = Engine(TorchRuntime(tiny_chat.model.llm), NO_STOPS).generate(follow, GREEDY).run()
    assert again.tokens == fresh.tokens  # reuse changes the cost, not the answer
    other = PromptInput(first.ids, first.vectors + 1, ("another image",))
    assert (
        engine.generate(other, GREEDY, key=key).run().prefill_tokens > len(other) - 10
    )  # not the same image
    engine.forget(key)
    assert engine.cached_positions(key) == 0 and engine.sequence(key) is None


def test_cancel_ends_an_answer_and_says_so(tiny_chat):
    engine = Engine(TorchRuntime(tiny_chat.model.llm), NO_STOPS)
    generation = engine.generate(
        _prompts(tiny_chat, ["hi"])[0], GenerationParams(max_new_tokens=200, do_sample=False)
    )
    tokens = iter(generation)
    next(tokens)
    result = generation.cancel()
    assert result.finish_reason == "cancelled" and 1 <= result.answer_tokens < 200


def test_beam_search_runs_on_its_own_transformers_runtime(tiny_chat):
    built = []

    class StepOnly(TorchRuntime):
        """A runtime that cannot search beams itself (as llama.cpp cannot)."""

        def generate(self, *args, **kwargs):
            raise AssertionError("beams must go to the beam runtime")

    def beam_runtime():
        built.append(True)
        return TorchRuntime(tiny_chat.model.llm)

    engine = Engine(StepOnly(tiny_chat.model.llm), NO_STOPS, beam_runtime=beam_runtime)
    prompt = _prompts(tiny_chat, ["what is it?"])[0]
    beams = GenerationParams(max_new_tokens=6, do_sample=False, num_beams=2, repetition_penalty=1.0)
    first = engine.generate(prompt, beams).run()
    second = engine.generate(prompt, beams).run()
    assert first.tokens == second.tokens and 1 <= first.answer_tokens <= 6
    assert built == [True]  # built once, when first needed


def test_prompt_input_runs_tail_and_atoms():
    vectors = torch.arange(8.0).reshape(4, 2)
    prompt = PromptInput([1, -200, -200, 2, 3, -200, -200, 4], vectors, ("a", "b"))
    runs = list(prompt.runs())
    assert [r if isinstance(r, list) else r.tolist() for r in runs] == [
        [1], [[0.0, 1.0], [2.0, 3.0]], [2, 3], [[4.0, 5.0], [6.0, 7.0]], [4],
    ]  # fmt: skip
    assert prompt.atoms() == [1, ("a", 0), ("a", 1), 2, 3, ("b", 0), ("b", 1), 4]
    tail = prompt.tail(2)
    assert tail.ids == [-200, 2, 3, -200, -200, 4] and tail.vectors.tolist() == vectors[1:].tolist()
    with pytest.raises(ValueError, match="1 image positions but 0 image vectors"):
        PromptInput([1, -200], None)
