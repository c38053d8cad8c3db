"""Every case of the bad-input corpus through the chat engine on the tiny preset.

Each case gets its outcome (accepted, or an `ImageError` / `MessageError` whose message matches),
never a raw ValueError or TypeError, and the session that received it still answers the next good
question. Texts run through every template: a marker typed in a message never becomes structure.
"""

from __future__ import annotations

import re

import pytest
from cases import IMAGE_CASES, TEXT_CASES, ImageCase, TextCase
from PIL import Image

from minigpt4.chat import Chat
from minigpt4.conversation import TEMPLATES, get_template
from minigpt4.errors import ImageError, InputError, MessageError
from minigpt4.model import IMAGE_TOKEN_ID

QUICK = dict(do_sample=False, max_new_tokens=4)
# What the template itself writes: typed text must never change how often these occur.
STRUCTURE = ("###", "[INST]", "[/INST]", "<Img>", "</Img>", "<ImageHere>", "<|im_start|>", "<|im_end|>")


def test_the_corpus_is_large_and_names_are_unique():
    names = [c.name for c in IMAGE_CASES] + [c.name for c in TEXT_CASES]
    assert len(names) >= 45 and len(set(names)) == len(names)
    assert all(c.ok or c.error for c in [*IMAGE_CASES, *TEXT_CASES])


@pytest.fixture(scope="module")
def chats(tiny_chat) -> dict[str, Chat]:
    """A Chat per template over the one tiny model."""
    return {
        name: Chat(
            tiny_chat.model,
            get_template(name),
            max_context_tokens=tiny_chat.max_context_tokens,
            max_image_pixels=tiny_chat.max_image_pixels,
            max_image_bytes=tiny_chat.max_image_bytes,
            max_message_chars=tiny_chat.max_message_chars,
        )
        for name in TEMPLATES
    }


def _picture() -> Image.Image:
    return Image.radial_gradient("L").convert("RGB").resize((48, 32))


def _still_answers(chat: Chat, session) -> None:
    chat.add_question(session, "What colour is it?")
    chat.answer(session, **QUICK)
    assert session.history[-1][0] == "assistant"
    assert session.history[-2][1].endswith("What colour is it?")


def _structure(chat: Chat, session) -> tuple[list[int], list[int]]:
    """How often each structural marker is in the prompt, and its special/image token ids in order."""
    prompt = session.conversation.render(chat.tokenizer)
    ids = chat.processor.fit(session.conversation, 1).ids
    special = {i for i, t in chat.tokenizer.added_tokens_decoder.items() if t.special} | {IMAGE_TOKEN_ID}
    return [prompt.count(m) for m in STRUCTURE], [i for i in ids if i in special]


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: c.name)
def test_text_case(chats, template: str, case: TextCase):
    chat = chats[template]
    session = chat.new_session()
    chat.upload_image(session, _picture())
    if not case.ok:
        before = list(session.history)
        with pytest.raises(InputError) as err:
            chat.add_question(session, case.text)
        assert type(err.value) is MessageError
        assert re.search(case.error, str(err.value)), str(err.value)
        assert session.history == before
        _still_answers(chat, session)
        return
    plain = chat.new_session()
    chat.upload_image(plain, _picture())
    chat.add_question(plain, "plain words")
    chat.add_question(session, case.text)
    assert _structure(chat, session) == _structure(chat, plain)
    answer = chat.answer(session, **QUICK)
    assert session.history[-1] == ("assistant", answer)
    _still_answers(chat, session)
    assert _structure(chat, session)[1].count(IMAGE_TOKEN_ID) == chat.model.n_image_tokens


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_image_case(tiny_chat, case: ImageCase):
    chat = tiny_chat
    session = chat.new_session()
    data = case.make()
    if case.ok:
        chat.upload_image(session, data)
        assert session.n_images == 1
        chat.add_question(session, "What is in the image?")
        chat.answer(session, **QUICK)
    else:
        with pytest.raises(InputError) as err:
            chat.upload_image(session, data)
        assert type(err.value) is ImageError
        assert re.search(case.error, str(err.value)), str(err.value)
        assert session.n_images == 0 and session.history == []
        chat.upload_image(session, _picture())
    _still_answers(chat, session)
