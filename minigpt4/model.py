"""MiniGPT-4: frozen vision features → one trained linear projection → a frozen causal LM.

Images enter the LLM as `n_image_tokens` embedding vectors each. In token sequences their
positions hold `IMAGE_TOKEN_ID`, so prompts, attention masks and training labels line up with
the final embedding sequence one to one. The model only does the math; turning conversations into
token ids is the processor's (`minigpt4/processor.py`), decoding the engine's (`minigpt4/decode/`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from minigpt4.decode.inputs import IMAGE_TOKEN_ID, splice_images

IMAGE_PLACEHOLDER = "<ImageHere>"  # where a prompt's image embeddings are spliced in (minigpt4/processor.py)
IGNORE_INDEX = -100

log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_ID", "MiniGPT4"]


@dataclass(frozen=True)
class DeferredLLM:
    """An LLM not loaded until something needs it: what the model must know of it meanwhile, and
    how to load it (with its LoRA and trained weights)."""

    hidden: int
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    load: Callable[[], nn.Module]  # the LLM (with LoRA adapters when the config has them)
    checkpoint: str | None = None  # trained weights loaded once it is (its LoRA weights)


class MiniGPT4(nn.Module):
    """A frozen vision module, a trainable `llama_proj`, and a frozen causal LM (optionally with LoRA).

    The LLM may be a `DeferredLLM`: when another runtime decodes from its own weights (llama.cpp),
    the transformers copy is loaded only when something asks for `model.llm` (beam search, the bench).
    """

    def __init__(self, vision: nn.Module, llm: nn.Module | DeferredLLM, tokenizer) -> None:
        super().__init__()
        self.vision = vision
        self.tokenizer = tokenizer
        self.n_image_tokens: int = vision.n_tokens
        self.feature_dim: int = vision.feature_dim
        if isinstance(llm, DeferredLLM):
            self._deferred: DeferredLLM | None = llm
            self._modules["llm"] = None
            self.llm_hidden, self.llm_dtype, self.eos_token_ids = llm.hidden, llm.dtype, llm.eos_token_ids
        else:
            self._deferred = None
            self._modules["llm"] = llm
            embeddings = llm.get_input_embeddings()
            self.llm_hidden: int = embeddings.embedding_dim
            self.llm_dtype: torch.dtype = embeddings.weight.dtype
            eos = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
            self.eos_token_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self.llama_proj = nn.Linear(self.feature_dim, self.llm_hidden)
        self.vision.requires_grad_(False)

    @property
    def llm(self) -> nn.Module:
        """The transformers LLM, loaded now if it was deferred."""
        if self._modules["llm"] is None and self._deferred is not None:
            from minigpt4.weights import load_trainable  # noqa: PLC0415 (weights imports this module)

            deferred, self._deferred = self._deferred, None
            log.info("loading the transformers copy of the LLM (until now only the decode runtime held it)")
            self._modules["llm"] = deferred.load().to(self.device)
            if deferred.checkpoint is not None:
                load_trainable(self, deferred.checkpoint)
        return self._modules["llm"]

    @property
    def llm_loaded(self) -> bool:
        return self._modules["llm"] is not None

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def train(self, mode: bool = True) -> MiniGPT4:
        """Only the projection (and LoRA) trains: the frozen parts stay in eval mode.

        LoRA's own dropout follows `mode`: it regularises the adapters, which do train.
        """
        super().train(mode)
        self.vision.eval()
        if not self.llm_loaded:
            return self
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
        return out.to(self.llm_dtype)

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
