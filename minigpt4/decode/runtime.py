"""The decoding interface, and the transformers runtime behind it.

A runtime holds the key/values of several *sequences* (one per conversation that keeps its cache)
and does two things with them: `prefill` (drop a sequence's cached positions past `keep`, then run
new input embeddings through the LLM) and `step` (one new token for each of several sequences, in
one batched call where the runtime can). Both return the next-token logits. Only the batcher's
thread calls a runtime, so runtimes need no locks.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import DynamicCache

from minigpt4.decode.kv_budget import KVBudget
from minigpt4.decode_weights import decode_weight_tensors


class Sequence(Protocol):
    """A runtime's handle of one sequence's cached positions."""

    length: int  # positions held
    active: bool  # set while an answer decodes on it (a runtime never evicts an active sequence)


class DecodeRuntime(Protocol):
    name: str
    max_sequences: int  # sequences decoded in one step at most
    batched: bool  # whether a step over several sequences costs about as much as over one

    def new_sequence(self) -> Sequence: ...

    def release(self, seq: Sequence) -> None: ...

    def reserve(self, seq: Sequence, positions: int) -> bool:
        """Room for `seq` to hold `positions` (prompt + answer) now? It may free idle sequences."""
        ...

    def max_beams(self, context_positions: int, asked: int) -> int:
        """How many beams of `context_positions` each the runtime's memory allows (≤ `asked`)."""
        ...

    def prefill(self, seq: Sequence, embeds: torch.Tensor, keep: int) -> torch.Tensor:
        """Keep the first `keep` positions of `seq`, append `embeds` (n, hidden); logits (vocab,)."""
        ...

    def step(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """Append `tokens[i]` to `seqs[i]` for every i, together; logits (len(seqs), vocab)."""
        ...


class TorchSequence:
    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.active = False

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class TorchRuntime:
    """A transformers causal LM; each sequence is a `DynamicCache`.

    With a `KVBudget` the positions all sequences cache together are capped (see kv_budget.py).
    A step runs the sequences one after another: their caches have different lengths, and padding
    them into one batch every step would copy every cache each token. On a GPU the per-sequence
    steps still overlap with the host's work; on a CPU the llama.cpp runtime batches for real.
    """

    name = "transformers"
    batched = False

    def __init__(
        self, llm: torch.nn.Module, max_sequences: int = 8, kv_budget: KVBudget | None = None
    ) -> None:
        self.llm = llm
        self.max_sequences = max_sequences
        self.kv_budget = kv_budget  # None: no cap on the positions cached (tests, one-off scripts)

    def new_sequence(self) -> TorchSequence:
        seq = TorchSequence()
        if self.kv_budget is not None:
            self.kv_budget.track(seq)
        return seq

    def release(self, seq: TorchSequence) -> None:
        seq.cache = DynamicCache()

    def reserve(self, seq: TorchSequence, positions: int) -> bool:
        return self.kv_budget is None or self.kv_budget.reserve(seq, positions, self.release)

    def max_beams(self, context_positions: int, asked: int) -> int:
        return asked if self.kv_budget is None else self.kv_budget.max_beams(context_positions, asked)

    @torch.no_grad()
    def prefill(self, seq: TorchSequence, embeds: torch.Tensor, keep: int) -> torch.Tensor:
        if keep == 0:
            seq.cache = DynamicCache()
        elif seq.length > keep:
            seq.cache.crop(keep - seq.length)  # a negative count: drop that many from the end
        out = self.llm(inputs_embeds=embeds.unsqueeze(0), cache=seq.cache, use_cache=True)
        return out.logits[0, -1]

    def decode_weight_tensors(self) -> list[torch.Tensor]:
        """The weights one decode step reads (for the bench's bandwidth limit)."""
        return decode_weight_tensors(self.llm)

    @torch.no_grad()
    def step(self, seqs: list[TorchSequence], tokens: list[int]) -> torch.Tensor:
        device = next(self.llm.parameters()).device
        rows = []
        for seq, token in zip(seqs, tokens, strict=True):
            out = self.llm(input_ids=torch.tensor([[token]], device=device), cache=seq.cache, use_cache=True)
            rows.append(out.logits[0, -1])
        return torch.stack(rows)
