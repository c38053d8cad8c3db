"""The processor: prompt text → ids with image positions, context fitting once per turn, stops."""

from __future__ import annotations

import pytest

from minigpt4.conversation import Conversation, get_template
from minigpt4.decode.inputs import IMAGE_TOKEN_ID
from minigpt4.errors import MessageError
from minigpt4.processor import Processor


@pytest.fixture
def processor(tiny_chat) -> Processor:
    return Processor(tiny_chat.tokenizer, get_template("vicuna0"), n_image_tokens=8, max_context_tokens=200)


def test_prompt_tokens_hold_image_positions(processor):
    ids = processor.tokenize("Look: <ImageHere> and <ImageHere> now", 2)
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids.count(IMAGE_TOKEN_ID) == 2 * 8
    with pytest.raises(ValueError, match="2 <ImageHere> placeholders but 1 images"):
        processor.tokenize("<ImageHere><ImageHere>", 1)


def _conversation(exchanges: int) -> Conversation:
    conversation = Conversation(get_template("vicuna0"))
    conversation.add_image()
    for i in range(exchanges):
        conversation.add_user(f"question {i} about the picture, in a few words")
        conversation.add_assistant(f"answer {i}, also in a few words")
    conversation.add_user("the last question")
    return conversation


def test_fitting_leaves_out_the_fewest_oldest_exchanges_and_keeps_the_image(processor):
    conversation = _conversation(30)
    fitted = processor.fit(conversation, 20)
    assert len(fitted.ids) <= 200 - 20 and fitted.max_new_tokens == 20
    assert fitted.ids.count(IMAGE_TOKEN_ID) == 8
    assert fitted.ids == processor.conversation_ids(conversation, fitted.dropped)
    assert len(processor.conversation_ids(conversation, fitted.dropped - 1)) > 200 - 20  # the fewest
    assert processor.fit(_conversation(1), 20).dropped == 0


def test_each_message_is_counted_once_per_conversation(processor, monkeypatch):
    conversation, counts = _conversation(30), {}
    processor.fit(conversation, 20, counts)
    calls = []
    real = processor.tokenizer.__class__.__call__

    def counting(self, text, *args, **kwargs):
        calls.append(text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(processor.tokenizer.__class__, "__call__", counting)
    conversation.add_assistant("one more answer")
    conversation.add_user("one more question")
    processor.fit(conversation, 20, counts)
    counted = [c for c in calls if c.startswith(("###Human:", "###Assistant:"))]
    assert all("question 0 " not in c for c in counted)  # earlier messages come from `counts`


def test_no_room_at_all_is_a_message_error(processor):
    conversation = Conversation(get_template("vicuna0"))
    conversation.add_user("word " * 400)
    with pytest.raises(MessageError, match="the context holds 200"):
        processor.fit(conversation, 1)


def test_the_template_gives_the_stops(processor):
    assert "###" in processor.stops.strings
    assert processor.stops.ends(processor.tokenizer("a cat###", add_special_tokens=False).input_ids)
    assert not processor.stops.ends(processor.tokenizer("a cat", add_special_tokens=False).input_ids)
