"""The model: shapes, frozen parts, placeholder splicing, the training loss, the LLaMA-2 variant."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import prompt_ids

from minigpt4.build import build_model
from minigpt4.config import load_preset
from minigpt4.errors import ConfigError
from minigpt4.model import IGNORE_INDEX, IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def model():
    return build_model(load_preset("minigpt4_tiny_random").model, "cpu")


def test_only_the_projection_trains(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llama_proj.weight", "llama_proj.bias"}
    assert set(model.trainable_state_dict()) == trainable
    model.train()
    assert not model.vision.training and not model.llm.training
    model.eval()


def test_encode_images_shape(model):
    pixels = torch.randn(3, 3, 224, 224)
    assert model.encode_frozen(pixels).shape == (3, 8, 32)
    assert model.encode_images(pixels).shape == (3, 8, model.llm_hidden)


def test_image_count_mismatch_names_both_counts(model):
    ids = torch.tensor([prompt_ids(model, "<ImageHere> hi", 1)])
    with pytest.raises(ValueError, match="8 image positions .* but 2 image embeddings"):
        model.embed_inputs(ids, torch.zeros(2, 8, model.llm_hidden))


def test_image_embeddings_land_at_their_positions(model):
    ids = torch.tensor([prompt_ids(model, "a <ImageHere> b <ImageHere>", 2)])
    images = torch.randn(2, 8, model.llm_hidden)
    embeds = model.embed_inputs(ids, images)
    positions = (ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
    torch.testing.assert_close(embeds[0, positions], images.reshape(16, -1))
    text = (ids[0] != IMAGE_TOKEN_ID).nonzero().flatten()
    torch.testing.assert_close(embeds[0, text], model.llm.get_input_embeddings()(ids[0, text]))


def test_forward_loss_trains_the_projection(model):
    ids = torch.tensor([prompt_ids(model, "<ImageHere> a red square", 1)])
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN_ID] = IGNORE_INDEX
    labels[0, 0] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels, pixel_values=torch.randn(1, 3, 224, 224))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.llama_proj.weight.grad is not None and model.llama_proj.weight.grad.abs().sum() > 0
    model.llama_proj.weight.grad = None
    model.llama_proj.bias.grad = None


def test_cached_features_give_the_same_loss(model):
    ids = torch.tensor([prompt_ids(model, "<ImageHere> a cat", 1)])
    labels = torch.where(ids == IMAGE_TOKEN_ID, IGNORE_INDEX, ids)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        direct = model(input_ids=ids, labels=labels, pixel_values=pixels).loss
        cached = model(input_ids=ids, labels=labels, features=model.encode_frozen(pixels)).loss
    torch.testing.assert_close(direct, cached)


def test_a_batch_with_nothing_to_learn_is_an_error(model):
    ids = torch.tensor([prompt_ids(model, "<ImageHere> hi", 1)])
    with pytest.raises(ValueError, match="no supervised token"):
        model(
            input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), pixel_values=torch.randn(1, 3, 224, 224)
        )


def test_llama2_variant_groups_four_patches():
    cfg = load_preset("minigpt4_tiny_random", ["model.vision.kind=blip2_patches", "model.template=llama2"])
    model = build_model(cfg.model, "cpu")
    assert (model.n_image_tokens, model.feature_dim) == (64, 4 * 32)
    assert model.llama_proj.in_features == 128
    assert model.encode_images(torch.randn(1, 3, 224, 224)).shape == (1, 64, model.llm_hidden)


def test_low_resource_on_cpu_is_a_clear_error():
    cfg = load_preset(
        "minigpt4_tiny_random",
        ["model.llm.low_resource=true", "model.llm.pretrained=org/model", "model.llm.random_init=null"],
    )
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_model(cfg.model, "cpu")
