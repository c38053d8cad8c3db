"""Helpers shared by the decoding tests."""

from __future__ import annotations

from minigpt4.decode.inputs import PromptInput
from minigpt4.processor import tokenize_prompt


def greedy_tokens(runtime, prompt: PromptInput, n: int) -> list[int]:
    """The `n` greedy token ids a runtime decodes after prefilling `prompt` (its sequence released)."""
    seq = runtime.new_sequence()
    logits = runtime.prefill(seq, prompt, 0)
    tokens = []
    for _ in range(n):
        tokens.append(int(logits.argmax()))
        logits = runtime.step([seq], [tokens[-1]])[0]
    runtime.release(seq)
    return tokens


def prompt_ids(model, text: str, n_images: int) -> list[int]:
    """The processor's token ids of prompt text for `model` (its tokenizer and image size)."""
    return tokenize_prompt(model.tokenizer, text, n_images, model.n_image_tokens)
