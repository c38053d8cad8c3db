"""The frozen vision side: pixels in, a few feature vectors per image out.

Every kind is an `nn.Module` with `n_tokens`, `feature_dim`, `preprocess(images)` and
`forward(pixel_values) -> (batch, n_tokens, feature_dim)`. The trained projection of
`MiniGPT4` maps those features into the LLM's embedding space.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from minigpt4.config import VisionConfig
from minigpt4.errors import ConfigError
from minigpt4.weights import has_blip2_weights, load_blip2_weights, read_blip2_config

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# EVA ViT-g/14 as BLIP-2 uses it (docs/method.md §2): 39 blocks (the 40th is dropped: "penultimate" features).
EVA_VIT_G = dict(
    hidden_size=1408,
    intermediate_size=6144,
    num_hidden_layers=39,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    layer_norm_eps=1e-6,
    qkv_bias=True,
)
# BLIP-2's Q-Former: BERT-base with cross-attention every second layer.
QFORMER_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    cross_attention_frequency=2,
    layer_norm_eps=1e-12,
)
LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is a default nn.LayerNorm (HF's Blip2 default is 1e-6)
PATCHES_PER_TOKEN = 4  # the LLaMA-2 variant concatenates 4 neighbouring patch features


def clip_preprocess(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Resize to size×size (bicubic) and normalise with CLIP's statistics, as BLIP-2 does."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    arrays = [
        (
            np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
            / 255.0
            - mean
        )
        / std
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class Blip2Vision(nn.Module):
    """EVA ViT → ln_vision → (learned queries + Q-Former) or (4-patch grouping).

    With `use_qformer` (MiniGPT-4 on Vicuna) the output is the Q-Former's 32 query vectors
    (768-d). Without it (the LLaMA-2 variant) the 256 patch features, CLS dropped, are grouped
    four at a time into 64 vectors of 4×1408.
    """

    def __init__(
        self,
        vision_config: Blip2VisionConfig,
        qformer_config: Blip2QFormerConfig | None,
        num_query_tokens: int,
        image_size: int,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.vit_half_dtype: torch.dtype | None = None  # set by `halve_vit`
        self.vit_stored_dtype: torch.dtype | None = None  # set by `store_vit_half`
        self.visual_encoder = Blip2VisionModel(vision_config)
        # ln_vision lives outside the ViT so that it stays in fp32 when the ViT runs in fp16.
        self.visual_encoder.post_layernorm = nn.Identity()
        self.ln_vision = nn.LayerNorm(vision_config.hidden_size, eps=LN_VISION_EPS)
        self.use_qformer = qformer_config is not None
        if qformer_config is not None:
            self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_config.hidden_size))
            nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
            self.qformer = Blip2QFormerModel(qformer_config)
            self.n_tokens = num_query_tokens
            self.feature_dim = qformer_config.hidden_size
        else:
            n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
            if n_patches % PATCHES_PER_TOKEN:
                raise ConfigError(f"{n_patches} patches cannot be grouped {PATCHES_PER_TOKEN} at a time")
            self.n_tokens = n_patches // PATCHES_PER_TOKEN
            self.feature_dim = vision_config.hidden_size * PATCHES_PER_TOKEN

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_preprocess(images, self.image_size)

    def halve_vit(self, dtype: torch.dtype = torch.float16) -> None:
        """The original's ViT precision: only Conv and Linear weights (and biases) in `dtype`.

        As the original's `convert_weights_to_fp16`: LayerNorms and the class and position
        embeddings stay fp32, and `forward` runs under autocast, so the residual stream is fp32.
        """
        for module in self.visual_encoder.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                module.to(dtype)
        self.vit_half_dtype = dtype

    def store_vit_half(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """The ViT's Linear weights stored in `dtype`, computed in float32 (`HalfStoredLinear`): half
        the memory, float32's speed on a CPU, where half-precision products run several times slower
        without the instructions for them. Everything else stays float32."""
        for module in self.visual_encoder.modules():
            if type(module) is nn.Linear:
                module.__class__ = HalfStoredLinear
                module.to(dtype)
        self.vit_stored_dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.float()
        if self.vit_half_dtype is None:
            return self._features(pixel_values)
        # The original encodes images (ViT, ln_vision, Q-Former) in one autocast block.
        with torch.autocast(pixel_values.device.type, dtype=self.vit_half_dtype):
            return self._features(pixel_values).float()

    def _vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's last hidden states. The embeddings are EVA's: HF's Blip2 casts the class and
        position embeddings to the patch weights' dtype, which would make a halved ViT's residual
        stream fp16; here they stay fp32, as in the original."""
        embeddings = self.visual_encoder.embeddings
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = embeddings.class_embedding.expand(patches.shape[0], 1, -1)
        hidden = torch.cat([cls, patches.to(cls.dtype)], dim=1)
        hidden = hidden + embeddings.position_embedding[:, : hidden.shape[1]]
        return self.visual_encoder.encoder(inputs_embeds=hidden).last_hidden_state

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.ln_vision(self._vit(pixel_values))
        if not self.use_qformer:
            patches = patches[:, 1:, :]
            batch, n, dim = patches.shape
            return patches.reshape(batch, n // PATCHES_PER_TOKEN, dim * PATCHES_PER_TOKEN)
        queries = self.query_tokens.expand(patches.shape[0], -1, -1)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        return self.qformer(
            query_embeds=queries, encoder_hidden_states=patches, encoder_attention_mask=mask
        ).last_hidden_state


def blip2_configs(cfg: VisionConfig) -> tuple[Blip2VisionConfig, Blip2QFormerConfig | None]:
    """The ViT and Q-Former architectures a vision config asks for."""
    use_qformer = cfg.kind == "blip2"
    if cfg.random_init is not None:  # its keys are checked when the config is loaded
        vision_kwargs = dict(cfg.random_init.get("vision", {}))
        qformer_kwargs = dict(cfg.random_init.get("qformer", {}))
    elif cfg.pretrained is not None:
        vision_kwargs, qformer_kwargs = read_blip2_config(cfg.pretrained)
    else:
        vision_kwargs, qformer_kwargs = dict(EVA_VIT_G), dict(QFORMER_BASE)
    vision_config = Blip2VisionConfig(**vision_kwargs)
    qformer_config = None
    if use_qformer:
        qformer_kwargs["encoder_hidden_size"] = vision_config.hidden_size
        qformer_config = Blip2QFormerConfig(**qformer_kwargs)
    return vision_config, qformer_config


class HalfStoredLinear(nn.Linear):
    """A Linear whose weights are held in half precision and used in float32 (the same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x, self.weight.float(), bias)


VIT_DTYPES = {"auto": None, "float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def vit_half_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The ViT's half precision for `model.vision.dtype` (None: float32). "auto" is float16 on CUDA,
    float32 on the CPU; on a CPU bfloat16 halves the ViT's memory (its weights stored in bfloat16,
    computed in float32: `Blip2Vision.store_vit_half`); float16 is for GPUs."""
    if name not in VIT_DTYPES:
        raise ConfigError(f"model.vision.dtype: unknown dtype {name!r} (known: {', '.join(VIT_DTYPES)})")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else None
    if name == "float16" and device.type != "cuda":
        raise ConfigError("model.vision.dtype: float16 is for CUDA; on the CPU use bfloat16 or float32")
    return VIT_DTYPES[name]


def build_vision(cfg: VisionConfig, device: torch.device) -> nn.Module:
    """Build (and load, when weights are named) the frozen vision side of a config."""
    if cfg.kind in ("blip2", "blip2_patches"):
        vision_config, qformer_config = blip2_configs(cfg)
        # With weights to load, the module is made on the meta device and the checkpoint's tensors
        # become its weights: no random fp32 copy lives beside them (about half the peak memory).
        with torch.device("meta") if has_blip2_weights(cfg) else nullcontext():
            module = Blip2Vision(vision_config, qformer_config, cfg.num_query_tokens, cfg.image_size)
        # Halved before the weights load and before it moves: a 4.4 GB fp32 ViT never passes
        # through the GPU, nor through host memory when the CPU runs it in bfloat16.
        half = vit_half_dtype(cfg.dtype, device)
        if half is not None and device.type == "cpu":
            module.store_vit_half(half)
        elif half is not None:
            module.halve_vit(half)
        load_blip2_weights(module, cfg)
    elif cfg.kind == "efficientnet_lite":
        from minigpt4.lite.vision import EfficientNetLiteVision  # noqa: PLC0415

        module = EfficientNetLiteVision(object_colour=cfg.object_colour)
    else:
        raise ConfigError(
            f"model.vision.kind: unknown kind {cfg.kind!r} (known: blip2, blip2_patches, efficientnet_lite)"
        )
    module.to(device)
    module.requires_grad_(False)
    return module.eval()
