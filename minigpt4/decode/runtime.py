"""The decoding interface, and the transformers runtime behind it.

A runtime holds the key/values of several *sequences* (one per conversation that keeps its cache)
and does two things with them: `prefill` (drop a sequence's cached positions past `keep`, then run
new input embeddings through the LLM) and `step` (one new token for each of several sequences, in
one batched call where the runtime can). Both return the next-token logits. Only the batcher's
thread calls a runtime, so runtimes need no locks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from minigpt4.decode.half_weights import decode_weight_tensors
from minigpt4.decode.inputs import PromptInput, splice_images
from minigpt4.decode.kv_budget import KVBudget
from minigpt4.decode.stops import Stops
from minigpt4.generation import GenerationParams, logits_processors


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

    def prefill(self, seq: Sequence, prompt: PromptInput, keep: int) -> torch.Tensor:
        """Keep the first `keep` positions of `seq`, append `prompt`'s positions; logits (vocab,)."""
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

    def embed(self, prompt: PromptInput) -> torch.Tensor:
        """The LLM's input embeddings of `prompt` (1, positions, hidden): tokens' with the image vectors spliced in."""
        device = self.llm.get_input_embeddings().weight.device
        return splice_images(
            self.llm.get_input_embeddings(), torch.tensor([prompt.ids], device=device), prompt.vectors
        )

    @torch.no_grad()
    def prefill(self, seq: TorchSequence, prompt: PromptInput, keep: int) -> torch.Tensor:
        if keep == 0:
            seq.cache = DynamicCache()
        elif seq.length > keep:
            seq.cache.crop(keep - seq.length)  # a negative count: drop that many from the end
        out = self.llm(inputs_embeds=self.embed(prompt), cache=seq.cache, use_cache=True)
        return out.logits[0, -1]

    @torch.no_grad()
    def generate(
        self, prompts: list[PromptInput], params: GenerationParams, stops: Stops, pad_id: int
    ) -> list[list[int]]:
        """Whole answers through transformers' `generate`, prompts left-padded into one batch: the
        path of beam search, and of a batch on a runtime that steps each cache on its own."""
        embed = self.llm.get_input_embeddings()
        device = embed.weight.device
        width = max(map(len, prompts))
        # Left padding keeps every prompt's last token in the last column, where generation continues.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p.ids for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        vectors = [p.vectors for p in prompts if p.vectors is not None]
        embeds = splice_images(embed, ids, torch.cat(vectors) if vectors else None)
        sampling = {"temperature": params.temperature, "top_p": params.top_p} if params.do_sample else {}
        output = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=params.max_new_tokens,
            num_beams=params.num_beams,
            do_sample=params.do_sample,
            # The engine's own processors for one beam: `generate`'s repetition_penalty skips as many
            # generated tokens as a row has left padding when the prompt comes as inputs_embeds.
            logits_processor=logits_processors(replace(params, do_sample=False))
            if params.num_beams == 1
            else None,
            repetition_penalty=params.repetition_penalty if params.num_beams > 1 else None,
            eos_token_id=sorted(stops.ids) or None,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([_StopsCriteria(stops)]) if stops.strings else None,
            **sampling,
        )
        return [row.tolist() for row in output]

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


class _StopsCriteria(StoppingCriteria):
    """Ends each row of `generate` at a stop string (`generate` checks stop ids itself)."""

    def __init__(self, stops: Stops) -> None:
        self.stops = stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([self.stops.ends(row.tolist()) for row in input_ids], device=input_ids.device)
