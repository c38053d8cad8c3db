"""Batched greedy answers about one image each, rendered and cleaned exactly as the chat does.

Each question is put in the chat's template as a fresh conversation (image turn + question) by the
chat's processor, and the prompts are decoded together by its engine (`Engine.generate_batch`).
Answers stop and are cut at the template's stop strings like the chat's, so a batch gives what
`Chat.answer` would give one at a time with greedy decoding. `answer_texts` asks without an image
(the text-only upper bound of the open instructions), greedily or sampled with a seed (the teacher's
second tries).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minigpt4.chat import Chat
from minigpt4.conversation import Conversation
from minigpt4.decode.engine import Engine
from minigpt4.generation import GenerationParams, StreamText
from minigpt4.images import load_image


@dataclass(frozen=True)
class Sampling:
    """Sampled instead of greedy answers: prompt i of a batch draws from a generator seeded `seed + i`."""

    seed: int
    temperature: float = 0.7
    top_p: float = 0.9


class BatchAnswerer:
    """Greedy answers of `chat`'s model to (image, question) pairs, a batch at a time.

    `engine` decodes instead of the chat's own (the upper bound's, on the LLM without LoRA).
    """

    def __init__(self, chat: Chat, max_new_tokens: int, engine: Engine | None = None) -> None:
        self.chat = chat
        self.processor = chat.processor
        self.engine = engine or chat.engine
        self.params = GenerationParams(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=chat.defaults.repetition_penalty,
        )

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the chat's prompt for one image and `question` (image positions included)."""
        return self.processor.conversation_ids(self._opening(question))

    def _opening(self, question: str) -> Conversation:
        """A fresh conversation: the image turn and `question`."""
        conversation = Conversation(self.processor.template)
        conversation.add_image()
        conversation.add_user(question)
        return conversation

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        """One answer per (image, question) pair; raises `ImageError` for an unreadable image."""
        return self._generate(images, [self.prompt_ids(q) for q in questions])

    def answer_texts(self, questions: Sequence[str], sample: Sampling | None = None) -> list[str]:
        """One answer per question asked in a fresh conversation with no image (greedy, or `sample`)."""
        prompts = []
        for question in questions:
            conversation = Conversation(self.processor.template)
            conversation.add_user(question)
            prompts.append(self.processor.conversation_ids(conversation))
        return self._generate(None, prompts, sample)

    def answer_conversations(
        self, images: Sequence[Path], conversations: Sequence[Conversation]
    ) -> list[str]:
        """The next assistant turn of each conversation (one image each, its image turn first)."""
        return self._generate(images, [self.processor.conversation_ids(c) for c in conversations])

    def answer_followups(
        self, images: Sequence[Path], first_questions: Sequence[str], followups: Sequence[str]
    ) -> list[tuple[str, str]]:
        """(first answer, follow-up answer) per image: the model's own first answer stays in the
        conversation when the follow-up is asked, as in a chat session."""
        if not len(images) == len(first_questions) == len(followups):
            raise ValueError(
                f"{len(images)} images for {len(first_questions)} and {len(followups)} questions"
            )
        conversations = [self._opening(question) for question in first_questions]
        firsts = self.answer_conversations(images, conversations)
        for conversation, first, followup in zip(conversations, firsts, followups, strict=True):
            conversation.add_assistant(first)
            conversation.add_user(followup)
        return list(zip(firsts, self.answer_conversations(images, conversations), strict=True))

    @torch.no_grad()
    def _generate(
        self, images: Sequence[Path] | None, prompts: Sequence[list[int]], sample: Sampling | None = None
    ) -> list[str]:
        """Answers to `prompts`, one image each (`images` None: text only, no image)."""
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        model = self.chat.model
        vectors = None
        if images is not None:
            pictures = [load_image(path, self.chat.max_image_pixels) for path in images]
            vectors = model.encode_images(model.preprocess(pictures))
        inputs = [
            self.processor.inputs(ids, None if vectors is None else vectors[i : i + 1])
            for i, ids in enumerate(prompts)
        ]
        params, seed = self.params, None
        if sample is not None:
            params = replace(params, do_sample=True, temperature=sample.temperature, top_p=sample.top_p)
            seed = sample.seed
        return [self._clean(result.tokens) for result in self.engine.generate_batch(inputs, params, seed)]

    def _clean(self, tokens: list[int]) -> str:
        stream = StreamText(
            self.processor.tokenizer,
            list(self.processor.stops.strings),
            self.processor.template.strip_prefixes,
        )
        stream.add_tokens(tokens, set(self.processor.stops.ids))
        return stream.sent
