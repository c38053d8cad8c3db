"""MiniGPT-4: frozen vision features → one trained linear projection → a frozen causal LM.

Images enter the LLM as `n_image_tokens` embedding vectors each. In token sequences their
positions hold `IMAGE_TOKEN_ID`, so prompts, attention masks and training labels line up with
the final embedding sequence one to one. The model only does the math; turning conversations into
token ids is the processor's (`minigpt4/processor.py`), decoding the engine's (`minigpt4/decode/`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from minigpt4.decode.inputs import IMAGE_TOKEN_ID, splice_images

IMAGE_PLACEHOLDER = "<ImageHere>"  # where a prompt's image embeddings are spliced in (minigpt4/processor.py)
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_ID", "MiniGPT4"]


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

    # --- inputs ---------------------------------------------------------------------------------

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
        return splice_images(self.llm.get_input_embeddings(), input_ids, image_embeds)

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

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: `llama_proj.*` (and the LoRA weights when enabled)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}
