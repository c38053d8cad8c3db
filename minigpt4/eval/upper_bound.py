"""The upper bound of open-instruction answers: the preset's own LLM, without the image and without
LoRA, told the image's facts in words before the same instruction, with the same decoding.

An image model that reads its picture perfectly could at best give what its LLM gives when told
what the picture shows; `instruct_ratio` (minigpt4/eval/instruct.py) compares the two. LoRA is left
out because it is part of what stage 2 trained: the bare LLM is what the model started from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

from minigpt4.build import build_runtime
from minigpt4.chat import Chat
from minigpt4.config import ModelConfig
from minigpt4.decode.engine import Engine
from minigpt4.eval.answer import BatchAnswerer, Sampling


def told_prompt(facts: str, instruction: str) -> str:
    """What the bare LLM is asked: the image's facts, then the instruction."""
    return f"{facts} {instruction}"


class BareLLM:
    """Text-only answers of `chat`'s LLM with its LoRA adapters off (greedy unless sampled)."""

    def __init__(self, chat: Chat, model_cfg: ModelConfig, max_new_tokens: int) -> None:
        self._adapters_off = None
        engine = None
        if chat.engine.runtime.batched and model_cfg.lora is not None:
            # llama.cpp decodes a GGUF with the adapters merged in: decode the unmerged one instead.
            runtime = build_runtime(replace(model_cfg, lora=None), chat.model)
            engine = Engine(runtime, chat.processor.stops, chat.processor.pad_id)
        elif not chat.engine.runtime.batched:
            # peft's context that runs the base weights; None when the LLM has no adapters.
            self._adapters_off = getattr(chat.model.llm, "disable_adapter", None)
        self.answerer = BatchAnswerer(chat, max_new_tokens, engine)

    def answer(self, facts: Sequence[str], instructions: Sequence[str]) -> list[str]:
        """One answer per (facts, instruction) pair, asked with no image."""
        return self.answer_prompts([told_prompt(f, i) for f, i in zip(facts, instructions, strict=True)])

    def answer_prompts(self, prompts: Sequence[str], sample: Sampling | None = None) -> list[str]:
        """One answer per text prompt, asked with no image (greedy, or `sample`)."""
        with self._adapters_off() if self._adapters_off else contextlib.nullcontext():
            return self.answerer.answer_texts(prompts, sample)
