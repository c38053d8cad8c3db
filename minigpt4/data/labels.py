"""Token sequences and labels for the two training stages, in the original's formats (docs/method.md §4).

Stage 1: BOS, the image positions, then `caption + "\\n"` (at most 32 tokens); no prompt.
Stage 2: the template's prompt with the image (`###Human: <Img><ImageHere></Img> {instruction}
###Assistant: `), then `answer + "###"` (at most 160 tokens).
Labels are -100 on the prompt and the image positions, so the loss falls on the text that follows
and on its end symbol only. The text is tokenized apart from the prompt, as in the original.

A stage-2 example may go on with follow-up turns (question, answer) about the same image: each
question is rendered as the template renders a later turn (`Template.followup_prompt`, labels -100)
and each answer is learnt like the first. `max_text_tokens` bounds the first answer; a follow-up
that does not fit the same budget again is left out with the turns after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from minigpt4.conversation import Template
from minigpt4.model import IGNORE_INDEX, IMAGE_PLACEHOLDER

STAGE1_END = "\n"


@dataclass
class TextBuilder:
    """Builds (input_ids, labels) for images and their texts. `tokenize_prompt` is the processor's (minigpt4/processor.py)."""

    tokenize_prompt: Callable[[str, int], list[int]]
    tokenizer: object
    template: Template
    stage: int
    max_text_tokens: int
    _prompt_ids: dict[str | None, list[int]] = field(default_factory=dict, repr=False)
    _followup_ids: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def prompt(self, instruction: str | None) -> str:
        if self.stage == 1:
            return IMAGE_PLACEHOLDER
        if instruction is None:
            raise ValueError("a stage-2 example needs an instruction")
        return self.template.training_prompt(instruction, self.tokenizer)

    def end(self) -> str:
        return STAGE1_END if self.stage == 1 else self.template.answer_end(self.tokenizer)

    def build(
        self, text: str, instruction: str | None = None, turns: Sequence[tuple[str, str]] = ()
    ) -> tuple[list[int], list[int]]:
        return self.build_many([(text, instruction, turns)])[0]

    def build_many(
        self, items: Sequence[tuple[str, str | None, Sequence[tuple[str, str]]]]
    ) -> list[tuple[list[int], list[int]]]:
        """(text, instruction, follow-up turns) → (input_ids, labels); the answers are tokenized in one call."""
        end = self.end()
        if self.stage == 1 and any(turns for _, _, turns in items):
            raise ValueError("stage-1 examples have no follow-up turns")
        answers = [text for text, _, _ in items] + [a for _, _, turns in items for _, a in turns]
        encoded = iter(self.tokenizer([a + end for a in answers], add_special_tokens=False).input_ids)
        firsts = [next(encoded) for _ in items]
        out = []
        for (text, instruction, turns), ids in zip(items, firsts, strict=True):
            text_ids = ids[: self.max_text_tokens]
            if not text_ids:
                raise ValueError(f"the text {text!r} gives no token to learn from")
            if instruction not in self._prompt_ids:  # few distinct prompts: tokenize each once
                self._prompt_ids[instruction] = self.tokenize_prompt(self.prompt(instruction), 1)
            prompt_ids = self._prompt_ids[instruction]
            input_ids, labels = prompt_ids + text_ids, [IGNORE_INDEX] * len(prompt_ids) + text_ids
            fits = len(ids) <= self.max_text_tokens  # a cut answer ends the conversation
            for question, _ in turns:
                answer_ids = next(encoded)
                if not fits or len(answer_ids) > self.max_text_tokens:
                    fits = False
                    continue
                question_ids = self.followup_ids(question)
                input_ids += question_ids + answer_ids
                labels += [IGNORE_INDEX] * len(question_ids) + answer_ids
            out.append((input_ids, labels))
        return out

    def followup_ids(self, question: str) -> list[int]:
        """The tokens of a follow-up question's turn (each distinct question tokenized once)."""
        if question not in self._followup_ids:
            text = self.template.followup_prompt(question, self.tokenizer)
            self._followup_ids[question] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._followup_ids[question]


def pad_batch(
    sequences: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs: input_ids, attention_mask and labels (-100 on padding)."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def supervised_tokens(labels: torch.Tensor) -> int:
    """How many tokens the causal-LM loss counts: labels shift left by one, -100 is ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
