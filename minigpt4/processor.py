"""The processor: a conversation and its images → the token ids an answer continues, and its stops.

As transformers' LLaVA processor does for its model, this is where text meets token ids: the
template renders the conversation, the text between images is tokenized the original's way, each
image takes `n_image_tokens` positions, and the prompt is fitted into the context. The model only
does the math (encode, project, splice by position, loss); the decode engine only sees ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minigpt4.conversation import Conversation, Message, Template, _exchange_starts
from minigpt4.decode.inputs import IMAGE_TOKEN_ID, PromptInput
from minigpt4.decode.stops import Stops
from minigpt4.errors import MessageError
from minigpt4.model import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)


def tokenize_prompt(tokenizer, prompt: str, n_images: int, n_image_tokens: int) -> list[int]:
    """Token ids of a prompt, with `n_image_tokens` × IMAGE_TOKEN_ID at each `<ImageHere>`.

    As in the original, text segments are tokenized separately and only the first gets the
    tokenizer's special tokens (BOS) — unless the prompt already starts with the BOS text.
    """
    segments = prompt.split(IMAGE_PLACEHOLDER)
    if len(segments) - 1 != n_images:
        raise ValueError(
            f"the prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} placeholders but {n_images} images were given"
        )
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    ids: list[int] = []
    for i, segment in enumerate(segments):
        if i > 0:
            ids.extend([IMAGE_TOKEN_ID] * n_image_tokens)
        if segment or i == 0:
            ids.extend(tokenizer(segment, add_special_tokens=add_special and i == 0).input_ids)
    return ids


@dataclass(frozen=True)
class FittedPrompt:
    """A conversation's prompt ids once fitted into the context, and the room left for the answer."""

    ids: list[int]
    max_new_tokens: int
    dropped: int  # oldest exchanges left out of the prompt


class Processor:
    """Conversations → prompt ids for one template, tokenizer and image size; the template's stops."""

    def __init__(
        self,
        tokenizer,
        template: Template,
        n_image_tokens: int,
        max_context_tokens: int = 2048,
        eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.n_image_tokens = n_image_tokens
        self.max_context_tokens = max_context_tokens
        ids = set(template.stop_token_ids(tokenizer)) | set(eos_ids)
        strings = tuple(template.stop_strings(tokenizer))
        self.stops = Stops(frozenset(ids), strings, self.detokenize)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else min(self.stops.ids, default=0)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokenize(self, prompt: str, n_images: int) -> list[int]:
        """Token ids of rendered prompt text (see `tokenize_prompt`)."""
        return tokenize_prompt(self.tokenizer, prompt, n_images, self.n_image_tokens)

    def conversation_ids(self, conversation: Conversation, drop_exchanges: int = 0) -> list[int]:
        """The ids of a conversation's prompt, ready for the assistant's next turn (nothing fitted)."""
        text = conversation.render(self.tokenizer, drop_exchanges)
        return self.tokenize(text, sum(m.images for m in conversation.messages))

    def inputs(self, ids: list[int], images: torch.Tensor | None, image_keys: tuple = ()) -> PromptInput:
        """What the engine decodes: `ids` with `images` (n, n_image_tokens, hidden) at their positions."""
        return PromptInput.of(ids, images, image_keys)

    def fit(
        self,
        conversation: Conversation,
        max_new_tokens: int,
        counts: dict[tuple[str, str], int] | None = None,
    ) -> FittedPrompt:
        """The prompt's ids, and how many new tokens the answer may have.

        When prompt + answer would pass `max_context_tokens`, the oldest question–answer text is
        left out of the prompt first. Always kept: the system text, every image (those of left-out
        exchanges move to the oldest kept turn) and the latest exchange. If even that leaves less
        room than `max_new_tokens`, the answer gets the room there is; with no room at all,
        `MessageError`. The conversation itself keeps everything.

        The cost does not grow with the square of the history: each message is tokenised once
        (its count is kept in `counts`, one dict per conversation) to estimate how many exchanges
        to leave out, then the prompt is tokenised for that estimate and its neighbours only, to
        find exactly the fewest exchanges to leave out.
        """
        counts = {} if counts is None else counts
        limit = self.max_context_tokens - max_new_tokens
        prompts: dict[int, list[int]] = {}

        def prompt(drop: int) -> list[int]:
            if drop not in prompts:
                prompts[drop] = self.conversation_ids(conversation, drop)
            return prompts[drop]

        most = conversation.n_droppable()
        ids = prompt(most)
        if len(ids) <= limit:
            drop = self._fewest_drops(conversation.messages, most, limit, prompt, counts) if most else 0
            if drop:
                log.info("context full: left out the %d oldest exchange(s)", drop)
            return FittedPrompt(prompt(drop), max_new_tokens, drop)
        room = self.max_context_tokens - len(ids)
        if room >= 1:
            log.info("context full: the answer may have %d tokens instead of %d", room, max_new_tokens)
            return FittedPrompt(ids, room, most)
        raise MessageError(
            f"the conversation needs {len(ids):,} tokens, but the context holds {self.max_context_tokens:,}: "
            "send a shorter message or restart"
        )

    def _fewest_drops(
        self,
        messages: list[Message],
        most: int,
        limit: int,
        prompt: Callable[[int], list[int]],
        counts: dict[tuple[str, str], int],
    ) -> int:
        """The fewest oldest exchanges to leave out for the prompt to hold at most `limit` tokens.

        Leaving out `most` is known to fit. The per-message counts give an estimate; the real
        prompt is then tokenised around it, galloping and bisecting, so the answer is exact
        (a prompt only shrinks as exchanges are left out) after a few tokenisations.
        """
        cuts = [
            0,
            *_exchange_starts(messages)[1:],
            len(messages),
        ]  # exchange k is messages[cuts[k]:cuts[k+1]]
        estimate = len(prompt(most))
        guess = most
        while guess > 0:  # only the exchanges that may fit are counted
            size = sum(self.message_tokens(m, counts) for m in messages[cuts[guess - 1] : cuts[guess]])
            if estimate + size > limit:
                break
            guess -= 1
            estimate += size

        def fits(drop: int) -> bool:
            return len(prompt(drop)) <= limit

        # Bracket the answer: `low` does not fit (-1: nothing below 0), `high` fits.
        step = 1
        if fits(guess):
            low, high = -1, guess
            while high > 0:
                probe = max(high - step, 0)
                if not fits(probe):
                    low = probe
                    break
                high, step = probe, step * 2
        else:
            low, high = guess, most
            while low + step < most:
                if fits(low + step):
                    high = low + step
                    break
                low, step = low + step, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle
        return high

    def message_tokens(self, message: Message, counts: dict[tuple[str, str], int]) -> int:
        """About how many prompt tokens a message takes, its images aside (kept in `counts` by text)."""
        key = (message.role, message.text)
        count = counts.get(key)
        if count is None:
            template = self.template
            prefix = template.user_prefix if message.role == "user" else template.assistant_prefix
            piece = prefix + message.text + template.sep
            count = len(self.tokenizer(piece, add_special_tokens=False).input_ids)
            counts[key] = count
        return count
