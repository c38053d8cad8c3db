"""A budget for the key/values the transformers runtime keeps: positions cached, all sequences together.

Every conversation that keeps its cache holds its key/values between turns (about 0.5 MB a position
for a 7B LLaMA in fp16). Without a limit a few long chats fill a GPU, and the memory stays held by
sessions nobody uses. The budget caps the positions all sequences hold together:

* an answer starts only when its whole context (prompt + the tokens it may generate) fits beside
  what the others hold; until then it waits for a place, as it does for a free sequence;
* to make room, idle sequences (no answer decoding on them) lose their key/values, least recently
  used first; their next turn prefills its prompt again;
* beam search holds one cache per beam: `max_beams` is how many beams of a context fit.

Only the batcher's thread reserves and releases, so the budget needs no lock. Sequences are held
weakly: a session that is dropped frees its key/values with it.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# Left free on the GPU for a prefill's activations and logits when the budget is sized from its memory.
ACTIVATION_HEADROOM_BYTES = 1536 * 2**20


class KVBudgetError(ValueError):
    """One answer's context is larger than the whole budget: it could never start."""


class KVBudget:
    """At most `max_positions` key/value positions, over every sequence it tracks."""

    def __init__(self, max_positions: int) -> None:
        if max_positions < 1:
            raise ValueError(f"a KV budget needs at least one position, got {max_positions}")
        self.max_positions = max_positions
        self._sequences: weakref.WeakSet[Any] = weakref.WeakSet()
        self._clock = itertools.count(1)

    def track(self, seq: Any) -> None:
        """Count `seq` (it has `length` and `active`); the budget adds `reserved` and `last_used`."""
        seq.reserved, seq.last_used = 0, 0
        self._sequences.add(seq)

    def held(self, exclude: Any = None) -> int:
        """Positions held now: an active sequence counts its reservation, an idle one its length."""
        return sum(_cost(s) for s in list(self._sequences) if s is not exclude)

    def reserve(self, seq: Any, positions: int, release: Callable[[Any], None]) -> bool:
        """Make room for `seq` to hold `positions`; False if the active sequences leave too little.

        Idle sequences other than `seq` are released (`release(s)`), least recently used first, only
        as far as needed. On success `seq` is marked used now and counts `positions` while active.
        """
        if positions > self.max_positions:
            raise KVBudgetError(
                f"an answer needs {positions:,} key/value positions but the budget holds "
                f"{self.max_positions:,} (model.llm.kv_cache_positions)"
            )
        others = [s for s in list(self._sequences) if s is not seq]
        held = sum(_cost(s) for s in others)
        idle = sorted((s for s in others if not s.active and s.length), key=lambda s: s.last_used)
        for victim in idle:
            if held + positions <= self.max_positions:
                break
            held -= victim.length
            log.info("KV budget: released an idle conversation's %d cached positions", victim.length)
            release(victim)
        if held + positions > self.max_positions:
            return False
        seq.reserved, seq.last_used = positions, next(self._clock)
        return True

    def max_beams(self, context_positions: int, asked: int) -> int:
        """How many beams of `context_positions` each fit in the budget (at least 1, at most `asked`)."""
        beams = max(1, min(asked, self.max_positions // max(context_positions, 1)))
        if beams < asked:
            log.info("KV budget: %d beams of %d positions fit, not %d", beams, context_positions, asked)
        return beams


def _cost(seq: Any) -> int:
    return max(seq.reserved, seq.length) if seq.active else seq.length


def kv_bytes_per_position(llm_config: Any, dtype: torch.dtype) -> int:
    """Bytes one cached position takes: keys and values of every layer (grouped-query heads counted)."""
    text = getattr(llm_config, "text_config", None) or llm_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def default_kv_positions(
    max_context_tokens: int, max_sequences: int, bytes_per_position: int, free_bytes: int | None
) -> int:
    """The budget when the config sets none: room for `max_sequences` whole contexts, less where the
    free device memory (`free_bytes`, None on the CPU), after a headroom for activations, holds fewer;
    never less than one whole context."""
    positions = max_context_tokens * max_sequences
    if free_bytes is not None:
        fits = (free_bytes - ACTIVATION_HEADROOM_BYTES) // bytes_per_position
        if fits < max_context_tokens:
            log.warning(
                "KV budget: the free GPU memory holds %d positions, less than one context (%d)",
                max(fits, 0),
                max_context_tokens,
            )
        positions = min(positions, max(fits, max_context_tokens))
    return positions
