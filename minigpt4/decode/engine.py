"""The decode engine: token ids and image vectors in, token ids out. It knows nothing of text.

Everything that decodes goes through an `Engine`: the chat's answers, evaluation, curation and the
bench. It owns the runtime (transformers or llama.cpp) and its batcher, the conversations' key/values
(a *sequence key*, an object the caller holds for a conversation, such as the chat's session, names the cache a prompt continues, so a conversation's next turn prefills only
what is new), the stops (ids and strings, checked as each token comes), cancellation, and beam
search, which goes through transformers' `generate` (on a runtime of its own where the main one
cannot search). Each answer ends in a `GenerationResult`: its tokens, its prompt and answer counts,
how much was prefilled, and why it ended.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from minigpt4.decode.batcher import Batcher, Request
from minigpt4.decode.inputs import PromptInput
from minigpt4.decode.runtime import DecodeRuntime, Sequence, TorchRuntime
from minigpt4.decode.stops import Stops
from minigpt4.generation import GenerationParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """One finished answer. `tokens` holds what was generated, a stop id last if one ended it."""

    tokens: list[int]
    prompt_tokens: int  # positions of the whole prompt, image vectors included
    prefill_tokens: int  # positions that had to be prefilled (KV reuse saved the rest)
    finish_reason: str  # "stop", "length" or "cancelled"

    @property
    def answer_tokens(self) -> int:
        return len(self.tokens)


class Generation:
    """An answer being decoded: iterate for its token ids as they come (stop ids left out); once it
    is done (or `cancel`ed), `result` says how it went."""

    def __init__(self, tokens: Iterator[int], stops: Stops, prompt_tokens: int) -> None:
        self._tokens = tokens
        self._stops = stops
        self._prompt_tokens = prompt_tokens
        self._finish: Callable[[], tuple[int, str]] | None = None
        self.generated: list[int] = []
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[int]:
        for token in self._tokens:
            self.generated.append(token)
            if token not in self._stops.ids:
                yield token

    def cancel(self) -> GenerationResult:
        """End decoding now (a reader that went away); the result of what was generated."""
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()
        return self.finished()

    def finished(self) -> GenerationResult:
        if self.result is None:
            prefilled, reason = self._finish() if self._finish else (self._prompt_tokens, "cancelled")
            self.result = GenerationResult(list(self.generated), self._prompt_tokens, prefilled, reason)
        return self.result

    def run(self) -> GenerationResult:
        """Decode to the end; the result."""
        for _ in self:
            pass
        return self.finished()


class _Cache:
    """The runtime sequence a key names, and what each of its positions holds (for reuse)."""

    def __init__(self, sequence: Sequence) -> None:
        self.sequence = sequence
        self.atoms: list[Any] = []


class Engine:
    """Decodes prompts on one runtime; `generate` for one answer, `generate_batch` for many.

    `beam_runtime` builds, when beam search is first asked for, the transformers runtime it runs on
    (None: the main runtime's own, which must then be a `TorchRuntime`).
    """

    def __init__(
        self,
        runtime: DecodeRuntime,
        stops: Stops,
        pad_id: int = 0,
        beam_runtime: Callable[[], TorchRuntime] | None = None,
    ) -> None:
        self.runtime = runtime
        self.stops = stops
        self.pad_id = pad_id
        self.batcher = Batcher(runtime)
        self._beam_factory = beam_runtime
        self._beam_runtime: TorchRuntime | None = None
        # Held weakly: a conversation that is dropped frees its cache with it.
        self._caches: weakref.WeakKeyDictionary[Any, _Cache] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @property
    def max_sequences(self) -> int:
        """Answers decoded together at most (more wait for a place)."""
        return self.runtime.max_sequences

    # --- conversations' caches ----------------------------------------------------------------------

    def cached_positions(self, key: object) -> int:
        """Positions whose key/values the engine keeps for `key`'s next prompt."""
        cache = self._caches.get(key)
        return len(cache.atoms) if cache is not None and cache.sequence.length else 0

    def sequence(self, key: object) -> Sequence | None:
        """The runtime sequence that holds `key`'s key/values (None: none yet)."""
        cache = self._caches.get(key)
        return None if cache is None else cache.sequence

    def forget(self, key: object) -> None:
        """Drop what is cached for `key` (a conversation restarted or gone)."""
        with self._lock:
            self._caches.pop(key, None)  # its key/values go with the sequence (only the batcher releases)

    # --- decoding -----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: PromptInput,
        params: GenerationParams,
        key: object | None = None,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Start decoding an answer to `prompt`; with `key`, continuing that key's cached positions.

        `params.max_new_tokens` must leave room in the context (the processor fits it). With
        `params.num_beams` > 1 the answer comes at once, from beam search.
        """
        stops = self.stops.with_strings(params.stop)
        beams = self.runtime.max_beams(len(prompt) + params.max_new_tokens, params.num_beams)
        if beams > 1:
            if key is not None:
                self.forget(key)
            return self._beam_search(prompt, replace(params, num_beams=beams), stops)
        cache = self._cache(key)
        atoms = prompt.atoms()
        request = Request(
            sequence=cache.sequence,
            cached=cache.atoms,
            prompt=prompt,
            atoms=atoms,
            params=replace(params, num_beams=1),
            stops=stops,
            generator=generator,
        )
        cache.atoms = []  # invalid until this answer is done
        self.batcher.submit(request)
        generation = Generation(request.results(), stops, len(prompt))

        def finish() -> tuple[int, str]:
            request.cancel()  # returns once the batcher has let go of the request
            if key is not None:
                cache.atoms = request.fed
            return request.prefilled, request.finish_reason

        generation._finish = finish
        return generation

    def generate_batch(
        self, prompts: list[PromptInput], params: GenerationParams, seed: int | None = None
    ) -> list[GenerationResult]:
        """One answer per prompt, nothing cached, the same token choice as `generate`.

        A batched runtime (llama.cpp) decodes them all together in the batcher; on transformers
        they go through one left-padded `generate` call, which is faster than stepping each cache.
        With `seed`, sampled answers are reproducible: prompt i draws from a generator seeded `seed + i`.
        """
        if not prompts:
            return []
        if self.runtime.batched or params.do_sample:
            generators = [
                None if seed is None else torch.Generator().manual_seed(seed + i) for i in range(len(prompts))
            ]
            generations = [
                self.generate(p, params, generator=g) for p, g in zip(prompts, generators, strict=True)
            ]
            return [g.run() for g in generations]
        stops = self.stops.with_strings(params.stop)
        outputs = self.runtime.generate(prompts, replace(params, num_beams=1), stops, self.pad_id)
        return [self._result(tokens, prompt, stops) for tokens, prompt in zip(outputs, prompts, strict=True)]

    def _beam_search(self, prompt: PromptInput, params: GenerationParams, stops: Stops) -> Generation:
        if self._beam_runtime is None:
            if self._beam_factory is not None:
                log.info("beam search: building the transformers runtime it runs on (once)")
                self._beam_runtime = self._beam_factory()
            elif isinstance(self.runtime, TorchRuntime):
                self._beam_runtime = self.runtime
            else:
                raise ValueError(
                    f"beam search needs the transformers runtime; this engine has {self.runtime.name}"
                )
        tokens = self._beam_runtime.generate([prompt], params, stops, self.pad_id)[0]
        result = self._result(tokens, prompt, stops)
        generation = Generation(iter(result.tokens), stops, len(prompt))
        generation._finish = lambda: (result.prefill_tokens, result.finish_reason)
        return generation

    @staticmethod
    def _result(tokens: list[int], prompt: PromptInput, stops: Stops) -> GenerationResult:
        tokens, stopped = stops.cut(tokens)
        return GenerationResult(tokens, len(prompt), len(prompt), "stop" if stopped else "length")

    def _cache(self, key: object | None) -> _Cache:
        if key is None:
            return _Cache(self.runtime.new_sequence())
        with self._lock:
            cache = self._caches.get(key)
            if cache is None:
                cache = self._caches[key] = _Cache(self.runtime.new_sequence())
            return cache

    def close(self) -> None:
        self.batcher.close()
