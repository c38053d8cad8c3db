"""Where an answer ends: its stop token ids and stop strings, checked in one place as tokens come.

The ids come from the template and the LLM's own end-of-sequence ids, the strings from the template
and the request (`GenerationParams.stop`). A stop string may span several tokens, so the text of the
answer's last tokens is decoded after each one: only a window long enough to hold the longest stop
string, so the check costs the same at the hundredth token as at the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stops:
    """Stop token ids, stop strings, and the detokenizer the strings are matched with (None: no strings)."""

    ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()
    detokenize: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        if self.strings and self.detokenize is None:
            raise ValueError("stop strings need a detokenize function to match them with")

    def with_strings(self, extra: Iterable[str]) -> Stops:
        """These stops and the request's own stop strings."""
        extra = tuple(s for s in extra if s and s not in self.strings)
        return Stops(self.ids, self.strings + extra, self.detokenize) if extra else self

    @property
    def window(self) -> int:
        """Tokens to decode to see any stop string whole (a token is at least one character, or part of one)."""
        return 2 * max(map(len, self.strings), default=0) + 4

    def ends(self, tokens: Sequence[int]) -> bool:
        """Whether the answer so far ends at its last token: a stop id, or a stop string now in its text."""
        if not tokens:
            return False
        if tokens[-1] in self.ids:
            return True
        if not self.strings:
            return False
        text = self.detokenize(list(tokens[-self.window :]))
        return any(s in text for s in self.strings)

    def cut(self, tokens: Sequence[int]) -> tuple[list[int], bool]:
        """A finished output up to its first stop (a stop id included, since it was generated), and
        whether a stop ended it."""
        for i in range(len(tokens)):
            if self.ends(tokens[: i + 1]):
                return list(tokens[: i + 1]), True
        return list(tokens), False


NO_STOPS = Stops()
