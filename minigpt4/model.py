"""MiniGPT-4: frozen vision features → one trained linear projection → a frozen causal LM.

Images enter the LLM as `n_image_tokens` embedding vectors each. In token sequences their
positions hold `IMAGE_TOKEN_ID`, so prompts, attention masks and training labels line up with
the final embedding sequence one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

IMAGE_PLACEHOLDER = "<ImageHere>"  # where a prompt's image embeddings are spliced in
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100


class MiniGPT4(nn.Module):
    """A frozen vision module, a trainable `llama_proj`, and a frozen causal LM (optionally with LoRA)."""

    def __init__(self, vision: nn.Module, llm: nn.Module, tokenizer) -> None:
        super().__init__()
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        self.n_image_tokens: int = vision.n_tokens
        self.feature_dim: int = vision.feature_dim
        self.llm_hidden: int = llm.get_input_embeddings().embedding_dim
        self.llama_proj = nn.Linear(self.feature_dim, self.llm_hidden)
        self.vision.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def train(self, mode: bool = True) -> MiniGPT4:
        """Only the projection (and LoRA) trains: the frozen parts stay in eval mode.

        LoRA's own dropout follows `mode`: it regularises the adapters, which do train.
        """
        super().train(mode)
        self.vision.eval()
        self.llm.eval()
        for name, module in self.llm.named_modules():
            if name.endswith("lora_dropout"):
                module.train(mode)
        return self

    # --- images -------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The vision module's own preprocessing, on the model's device."""
        return self.vision.preprocess(images).to(self.device)

    @torch.no_grad()
    def encode_frozen(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen features (batch, n_image_tokens, feature_dim): what a feature cache stores."""
        return self.vision(pixel_values.to(self.device)).float()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features → LLM-space vectors (batch, n_image_tokens, llm_hidden), in the LLM's dtype."""
        out = self.llama_proj(features.to(self.device, self.llama_proj.weight.dtype))
        return out.to(self.llm.get_input_embeddings().weight.dtype)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.encode_frozen(pixel_values))

    # --- prompts -------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str, n_images: int) -> list[int]:
        """Token ids of a prompt, with `n_image_tokens` × IMAGE_TOKEN_ID at each `<ImageHere>`.

        As in the original, text segments are tokenized separately and only the first gets the
        tokenizer's special tokens (BOS) — unless the prompt already starts with the BOS text.
        """
        segments = prompt.split(IMAGE_PLACEHOLDER)
        if len(segments) - 1 != n_images:
            raise ValueError(
                f"the prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} placeholders but {n_images} images were given"
            )
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        ids: list[int] = []
        for i, segment in enumerate(segments):
            if i > 0:
                ids.extend([IMAGE_TOKEN_ID] * self.n_image_tokens)
            if segment or i == 0:
                ids.extend(self.tokenizer(segment, add_special_tokens=add_special and i == 0).input_ids)
        return ids

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image embeddings spliced in at the IMAGE_TOKEN_ID positions, in order."""
        input_ids = input_ids.to(self.device)
        mask = input_ids == IMAGE_TOKEN_ID
        n_positions = int(mask.sum())
        n_given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_positions != n_given:
            n_images = 0 if image_embeds is None else image_embeds.shape[0]
            raise ValueError(
                f"the input has {n_positions} image positions ({n_positions / self.n_image_tokens:g} images) "
                f"but {n_images} image embeddings ({n_given} vectors) were given"
            )
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        if image_embeds is None:
            return embeds
        return embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def _image_embeds(
        self, pixel_values: torch.Tensor | None, features: torch.Tensor | None
    ) -> torch.Tensor | None:
        if features is not None:
            return self.project(features)
        if pixel_values is not None:
            return self.encode_images(pixel_values)
        return None

    # --- training -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ):
        """The LLM's output (with `.loss` when `labels` are given) for a batch with images.

        Images come as `pixel_values` (N, 3, H, W) or as pre-computed frozen `features`
        (N, n_image_tokens, feature_dim), in the order their positions appear in the batch.
        """
        image_embeds = self._image_embeds(pixel_values, features)
        if labels is not None and not bool((labels != IGNORE_INDEX).any()):
            raise ValueError("the batch has no supervised token (every label is -100): nothing to learn from")
        inputs_embeds = self.embed_inputs(input_ids, image_embeds)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            labels=None if labels is None else labels.to(self.device),
            use_cache=False,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Batched `generate` on prompts with images; returns only the new token ids.

        Pad batches on the left (with `attention_mask` zeros) so every prompt ends where its
        answer begins. Keyword arguments go to the LLM's `generate` (max_new_tokens, num_beams, …).
        """
        image_embeds = self._image_embeds(pixel_values, features)
        inputs_embeds = self.embed_inputs(input_ids, image_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.llm.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(self.device), **generate_kwargs
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: `llama_proj.*` (and the LoRA weights when enabled)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}
