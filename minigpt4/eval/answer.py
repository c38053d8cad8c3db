"""Batched greedy answers about one image each, rendered and cleaned exactly as the Chat engine does.

Each question is put in the chat's template as a fresh conversation (image turn + question), and
the prompts are decoded together: by the chat's own batched runtime (llama.cpp) where it has one,
else left-padded into one batch for `generate`. Answers stop and are
cut at the template's stop strings like the chat's, so a batch gives what `Chat.answer` would give
one at a time with greedy decoding. `answer_texts` asks without an image (the text-only upper bound
of the open instructions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from minigpt4.chat import Chat
from minigpt4.conversation import Conversation
from minigpt4.generation import GenerationParams, StreamText, logits_processors
from minigpt4.images import load_image


class BatchAnswerer:
    """Greedy answers of `chat`'s model to (image, question) pairs, a batch at a time."""

    def __init__(self, chat: Chat, max_new_tokens: int) -> None:
        self.chat = chat
        self.params = GenerationParams(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=chat.defaults.repetition_penalty,
        )
        tokenizer = chat.tokenizer
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(chat.stop_ids, default=0)
        )

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the chat's prompt for one image and `question` (image positions included)."""
        return self.conversation_ids(self._opening(question))

    def _opening(self, question: str) -> Conversation:
        """A fresh conversation: the image turn and `question`."""
        conversation = Conversation(self.chat.template)
        conversation.add_image()
        conversation.add_user(question)
        return conversation

    def conversation_ids(self, conversation: Conversation) -> list[int]:
        """Token ids of a whole conversation about one image, ready for the assistant's next turn."""
        return self.chat.model.tokenize_prompt(conversation.render(self.chat.tokenizer), 1)

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        """One answer per (image, question) pair; raises `ImageError` for an unreadable image."""
        return self._generate(images, [self.prompt_ids(q) for q in questions])

    def answer_texts(self, questions: Sequence[str]) -> list[str]:
        """One answer per question asked in a fresh conversation with no image."""
        prompts = []
        for question in questions:
            conversation = Conversation(self.chat.template)
            conversation.add_user(question)
            prompts.append(self.chat.model.tokenize_prompt(conversation.render(self.chat.tokenizer), 0))
        return self._generate(None, prompts)

    def answer_conversations(
        self, images: Sequence[Path], conversations: Sequence[Conversation]
    ) -> list[str]:
        """The next assistant turn of each conversation (one image each, its image turn first)."""
        return self._generate(images, [self.conversation_ids(c) for c in conversations])

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
    def _generate(self, images: Sequence[Path] | None, prompts: Sequence[list[int]]) -> list[str]:
        """Answers to `prompts`, one image each (`images` None: text only, no image)."""
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        model, chat = self.chat.model, self.chat
        pixel_values = None
        if images is not None:
            pixel_values = model.preprocess([load_image(path, chat.max_image_pixels) for path in images])
        if chat.runtime.batched:  # the chat's own decoder (llama.cpp) decodes the whole batch together
            if pixel_values is None:  # no image: zero image vectors per prompt
                hidden = model.llm.get_input_embeddings().embedding_dim
                embeds = torch.zeros(len(prompts), 0, hidden)
            else:
                embeds = model.encode_images(pixel_values)
            answers = chat.decode_prompts(list(prompts), embeds, self.params)
            return [self._clean(tokens) for tokens in answers]
        width = max(map(len, prompts))
        # Left padding keeps every prompt's last token in the last column, where generation continues.
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        output = model.generate(
            ids,
            mask,
            pixel_values=pixel_values,
            max_new_tokens=self.params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            # The chat's own processors, passed in: `generate`'s repetition_penalty skips as many
            # generated tokens as a row has left padding when the prompt comes as inputs_embeds.
            logits_processor=logits_processors(self.params),
            eos_token_id=sorted(chat.stop_ids),
            pad_token_id=self.pad_id,
            stop_strings=chat.stop_strings or None,
            tokenizer=chat.tokenizer,
        )
        return [self._clean(row.tolist()) for row in output]

    def _clean(self, tokens: list[int]) -> str:
        stream = StreamText(self.chat.tokenizer, self.chat.stop_strings, self.chat.template.strip_prefixes)
        stream.add_tokens(tokens, self.chat.stop_ids)
        return stream.sent
