"""What a decode runtime is given: token ids, with image vectors at the positions that hold them.

A prompt is a list of token ids in which every image position holds `IMAGE_TOKEN_ID`; the image
vectors (already projected into the LLM's space) fill those positions in order. Each runtime turns
this into the LLM's input its own way: transformers splices the vectors into the token embeddings
(`splice_images`), llama.cpp feeds runs of tokens as token batches and runs of vectors as embedding
batches, as its own multimodal examples do, so neither needs a second copy of the LLM.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch

IMAGE_TOKEN_ID = -200  # the id of an image position in a prompt's token ids


@dataclass(frozen=True)
class PromptInput:
    """Token ids (`IMAGE_TOKEN_ID` at image positions) and the vectors of those positions, in order.

    `vectors` is (image positions, hidden) or None when there is no image position. `image_keys`
    names each image (its vectors are `vectors[k * n : (k + 1) * n]`): a conversation's cache is
    reused only where the same image sits at the same positions.
    """

    ids: list[int]
    vectors: torch.Tensor | None = None
    image_keys: tuple[Hashable, ...] = ()

    def __post_init__(self) -> None:
        n_positions = sum(1 for token in self.ids if token == IMAGE_TOKEN_ID)
        n_vectors = 0 if self.vectors is None else self.vectors.shape[0]
        if n_positions != n_vectors:
            raise ValueError(f"the prompt has {n_positions} image positions but {n_vectors} image vectors")
        if self.image_keys and n_vectors % len(self.image_keys):
            raise ValueError(f"{n_vectors} image vectors do not split into {len(self.image_keys)} images")

    @classmethod
    def of(
        cls, ids: list[int], images: torch.Tensor | None, image_keys: tuple[Hashable, ...] = ()
    ) -> PromptInput:
        """From per-image vectors (n_images, n_image_tokens, hidden)."""
        if images is None or images.shape[0] == 0:
            return cls(list(ids), None, image_keys)
        return cls(list(ids), images.reshape(-1, images.shape[-1]), image_keys)

    def __len__(self) -> int:
        return len(self.ids)

    def atoms(self) -> list[Hashable]:
        """What each position is, for KV reuse: a token id, or (image key, k) for an image's k-th vector.

        Without image keys, image positions are never the same as another prompt's.
        """
        atoms: list[Hashable] = []
        per_image = (len(self.vectors) // len(self.image_keys)) if self.image_keys else 0
        seen = 0
        for token in self.ids:
            if token != IMAGE_TOKEN_ID:
                atoms.append(token)
                continue
            atoms.append((self.image_keys[seen // per_image], seen % per_image) if per_image else object())
            seen += 1
        return atoms

    def tail(self, start: int) -> PromptInput:
        """The positions from `start` on (with their image vectors)."""
        if start == 0:
            return self
        skipped = sum(1 for token in self.ids[:start] if token == IMAGE_TOKEN_ID)
        vectors = None if self.vectors is None else self.vectors[skipped:]
        if vectors is not None and vectors.shape[0] == 0:
            vectors = None
        return PromptInput(self.ids[start:], vectors)

    def runs(self) -> Iterator[list[int] | torch.Tensor]:
        """The prompt as alternating runs: a list of token ids, or a (n, hidden) tensor of image vectors."""
        used = 0
        start = 0
        while start < len(self.ids):
            is_image = self.ids[start] == IMAGE_TOKEN_ID
            end = start
            while end < len(self.ids) and (self.ids[end] == IMAGE_TOKEN_ID) == is_image:
                end += 1
            if is_image:
                yield self.vectors[used : used + end - start]
                used += end - start
            else:
                yield self.ids[start:end]
            start = end


def splice_images(
    embed_tokens: torch.nn.Module, ids: torch.Tensor, vectors: torch.Tensor | None
) -> torch.Tensor:
    """Token embeddings of `ids` (batch, positions) with `vectors` at the IMAGE_TOKEN_ID positions, in order.

    As transformers' LLaVA does at its image token: a count mismatch is a `ValueError` naming both.
    """
    mask = ids == IMAGE_TOKEN_ID
    n_positions = int(mask.sum())
    n_given = 0 if vectors is None else vectors.reshape(-1, vectors.shape[-1]).shape[0]
    if n_positions != n_given:
        raise ValueError(
            f"the input has {n_positions} image positions but {n_given} image vectors were given"
        )
    embeds = embed_tokens(ids.masked_fill(mask, 0))
    if vectors is None or n_given == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1), vectors.to(embeds.device, embeds.dtype))
