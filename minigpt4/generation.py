"""Choosing each token of an answer, and stop-string handling for streamed text.

The decode loop itself is the batcher's (`minigpt4/decode/batcher.py`), written out rather than
`generate` so that a conversation keeps its key/values between turns, answers stream as they are
produced, and several answers share each step. Beam search goes through `generate` (see `Chat`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from minigpt4.config import GenerationConfig


@dataclass
class GenerationParams(GenerationConfig):
    """Decoding settings of one answer: a preset's `generation` section plus extra stop strings."""

    stop: tuple[str, ...] = ()


def logits_processors(params: GenerationParams) -> LogitsProcessorList:
    """The same processors `generate` would apply, so both paths choose tokens alike."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


def choose_token(
    params: GenerationParams,
    generated: list[int],
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
) -> int:
    """The next token: the processors over the answer's own tokens so far, then argmax or a draw."""
    past = torch.tensor([generated], dtype=torch.long, device=logits.device)
    scores = logits_processors(params)(past, logits.float().unsqueeze(0)).squeeze(0)
    if params.do_sample:
        return int(torch.multinomial(torch.softmax(scores, dim=-1).cpu(), 1, generator=generator))
    return int(torch.argmax(scores))


class StreamText:
    """Turns a growing token list into clean text pieces for streaming.

    It cuts at the first stop string, holds back text that may be the start of one (or an
    incomplete multi-byte character), drops leading whitespace and role prefixes such as
    `Assistant:`, and holds trailing whitespace until more text follows — so the pieces joined
    equal the final answer exactly.
    """

    def __init__(self, tokenizer, stop_strings: list[str], strip_prefixes: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.strip_prefixes = strip_prefixes
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _clean(self, text: str, final: bool) -> str:
        text = text.lstrip()
        for prefix in self.strip_prefixes:
            if text.startswith(prefix):
                text = text[len(prefix) :].lstrip()
            elif not final and prefix.startswith(text):
                return ""  # could still become the prefix: wait
        return text

    def add(self, token: int) -> str:
        """Add a token; return the text that is now safe to show (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self.finish(text[:cut])
        text = self._clean(text, final=False)
        hold = max((len(s) - 1 for s in self.stop_strings), default=0)
        safe_end = len(text)
        for n in range(min(hold, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop_strings):
                safe_end = len(text) - n
                break
        safe = text[:safe_end].rstrip("\ufffd")
        safe = safe.rstrip() if safe.rstrip() != safe else safe
        return self._emit(safe)

    def add_tokens(self, tokens: Iterable[int], stop_ids: set[int]) -> tuple[str, int, bool]:
        """Feed a finished output (beam search, batches): (new text, tokens used, ended by a stop).

        A stop id ends the text and is counted as used; without a stop the text is finished.
        """
        text, used = "", 0
        for token in tokens:
            used += 1
            if token in stop_ids:
                return text + self.finish(), used, True
            text += self.add(token)
            if self.stopped:
                return text, used, True
        return text + self.finish(), used, False

    def finish(self, text: str | None = None) -> str:
        """The rest of the answer once generation ends (all of it, cleaned)."""
        if text is None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(self._clean(text, final=True).rstrip())

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
