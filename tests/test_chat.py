"""The chat engine on the tiny preset: streaming, KV reuse, several images, sessions, limits, errors."""

from __future__ import annotations

import threading

import pytest
from decode_helpers import prompt_ids
from PIL import Image

from minigpt4.chat import Chat
from minigpt4.conversation import get_template
from minigpt4.errors import MessageError
from minigpt4.generation import StreamText

GREEDY = dict(do_sample=False, max_new_tokens=12)


def _start(chat, image, question="What is in this image?"):
    session = chat.new_session()
    chat.upload_image(session, image)
    chat.add_question(session, question)
    return session


def test_streamed_pieces_join_to_the_blocking_answer(tiny_chat, photo):
    blocking = tiny_chat.answer(_start(tiny_chat, photo), **GREEDY)
    session = _start(tiny_chat, photo)
    pieces = list(tiny_chat.stream_answer(session, **GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == blocking
    assert session.history[-1] == ("assistant", blocking)


def test_kv_reuse_gives_the_full_prefill_answers_and_prefills_less(tiny_chat, photo):
    questions = ["What is in this image?", "What colour is it?", "Where is it?"]
    answers, prefill = {}, {}
    for reuse in (True, False):
        tiny_chat.kv_reuse = reuse
        session = tiny_chat.new_session()
        tiny_chat.upload_image(session, photo)
        answers[reuse], prefill[reuse] = [], []
        for q in questions:
            tiny_chat.add_question(session, q)
            answers[reuse].append(tiny_chat.answer(session, **GREEDY))
            prefill[reuse].append(session.last_result.prefill_tokens)
    tiny_chat.kv_reuse = True
    assert answers[True] == answers[False]
    assert prefill[True][0] == prefill[False][0]
    assert prefill[True][2] < prefill[False][2] / 3


def test_several_images_in_one_conversation(tiny_chat, photo, red_square):
    session = tiny_chat.new_session()
    tiny_chat.upload_image(session, photo)
    tiny_chat.upload_image(session, Image.open(red_square))
    tiny_chat.add_question(session, "Compare the two images.")
    assert session.n_images == 2
    prompt = session.conversation.render(tiny_chat.tokenizer)
    assert prompt.count("<ImageHere>") == 2
    assert tiny_chat.answer(session, **GREEDY)
    tiny_chat.upload_image(session, red_square.read_bytes())
    tiny_chat.add_question(session, "And this one?")
    assert tiny_chat.answer(session, **GREEDY)
    assert session.conversation.render(tiny_chat.tokenizer).count("<ImageHere>") == 3


def test_interleaved_sessions_keep_their_own_history(tiny_chat, photo, red_square):
    a, b = _start(tiny_chat, photo, "first question"), _start(tiny_chat, red_square, "other question")
    answer_a = tiny_chat.answer(a, **GREEDY)
    tiny_chat.answer(b, **GREEDY)
    tiny_chat.add_question(a, "second question")
    tiny_chat.answer(a, **GREEDY)
    assert [t for r, t in a.history if r == "user"] == [
        "<Img><ImageHere></Img> first question",
        "second question",
    ]
    assert [t for r, t in b.history if r == "user"] == ["<Img><ImageHere></Img> other question"]
    assert a.history[1] == ("assistant", answer_a)


def test_concurrent_sessions_match_sequential_answers(tiny_chat, photo, red_square):
    expected = [tiny_chat.answer(_start(tiny_chat, img), **GREEDY) for img in (photo, red_square)]
    sessions = [_start(tiny_chat, img) for img in (photo, red_square)]
    results = [None, None]

    def run(i):
        results[i] = tiny_chat.answer(sessions[i], **GREEDY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_closing_the_stream_keeps_what_was_said(tiny_chat, photo):
    session = _start(tiny_chat, photo)
    stream = tiny_chat.stream_answer(session, **GREEDY)
    first = next(stream)
    stream.close()
    assert session.history[-1] == ("assistant", first)
    tiny_chat.add_question(session, "go on")
    assert tiny_chat.answer(session, **GREEDY)


def test_beam_search_answers(tiny_chat, photo):
    session = _start(tiny_chat, photo)
    answer = tiny_chat.answer(session, num_beams=2, **GREEDY)
    assert answer and session.history[-1] == ("assistant", answer)
    assert tiny_chat.cached_positions(session) == 0  # beams keep no cache: the next turn prefills all


def test_message_errors_leave_the_conversation_as_it_was(tiny_chat, photo):
    session = _start(tiny_chat, photo)
    before = list(session.history)
    for bad, match in [("", "empty"), ("   \n", "empty"), ("x" * 100_000, "100,000 characters")]:
        with pytest.raises(MessageError, match=match):
            tiny_chat.add_question(session, bad)
    assert session.history == before
    with pytest.raises(MessageError, match="must be text"):
        tiny_chat.add_question(session, None)


def test_answer_before_a_question_is_an_error(tiny_chat, photo):
    session = tiny_chat.new_session()
    with pytest.raises(MessageError, match="ask a question first"):
        tiny_chat.answer(session)
    tiny_chat.upload_image(session, photo)
    tiny_chat.add_question(session, "hi")
    tiny_chat.answer(session, **GREEDY)
    with pytest.raises(MessageError, match="ask a question first"):
        tiny_chat.answer(session)


def test_reset_clears_everything(tiny_chat, photo):
    session = _start(tiny_chat, photo)
    tiny_chat.answer(session, **GREEDY)
    assert tiny_chat.cached_positions(session) > 0
    tiny_chat.reset(session)
    assert session.history == [] and session.n_images == 0 and tiny_chat.cached_positions(session) == 0


def test_long_history_drops_oldest_exchanges_but_keeps_the_image(tiny_chat, photo):
    chat = Chat(tiny_chat.model, get_template("vicuna0"), max_context_tokens=160)
    session = chat.new_session()
    chat.upload_image(session, photo)
    for i in range(8):
        chat.add_question(session, f"question number {i} about the picture")
        chat.answer(session, do_sample=False, max_new_tokens=8)
    assert len(session.history) == 16  # the history itself keeps everything
    fitted = chat.processor.fit(session.conversation, 8, session.token_counts)
    assert fitted.max_new_tokens == 8 and len(fitted.ids) <= 160 - 8 and fitted.dropped >= 1
    prompt = session.conversation.render(chat.tokenizer, drop_exchanges=1)
    assert "<ImageHere>" in prompt


def test_a_message_longer_than_the_context_is_refused(tiny_chat, photo):
    chat = Chat(tiny_chat.model, get_template("vicuna0"), max_context_tokens=120)
    session = _start(chat, photo, "short")
    before = list(session.history)
    with pytest.raises(MessageError, match="the context holds 120"):
        chat.add_question(session, "word " * 400)
    assert session.history == before


def test_stop_strings_cut_the_stream(tiny_chat):
    tok = tiny_chat.tokenizer
    stream = StreamText(tok, ["###"], ("Assistant:",))
    pieces = []
    for token in tok("Assistant: The cat sleeps.###Human: more", add_special_tokens=False).input_ids:
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(pieces) == stream.sent == "The cat sleeps."


def test_stream_without_stop_string_keeps_all_text(tiny_chat):
    tok = tiny_chat.tokenizer
    stream = StreamText(tok, ["###"])
    text = "".join(stream.add(t) for t in tok(" A dog ## runs ", add_special_tokens=False).input_ids)
    text += stream.finish()
    assert text == "A dog ## runs" and not stream.stopped


def test_sessions_record_token_counts_and_why_the_answer_ended(tiny_chat, photo):
    session = _start(tiny_chat, photo)
    prompt_len = len(prompt_ids(tiny_chat.model, session.conversation.render(tiny_chat.tokenizer), 1))
    full = tiny_chat.answer(session, do_sample=False, max_new_tokens=8)
    result = session.last_result
    assert (result.prompt_tokens, result.answer_tokens, result.finish_reason) == (prompt_len, 8, "length")
    again = _start(tiny_chat, photo)
    cut = tiny_chat.answer(again, do_sample=False, max_new_tokens=8, stop=(full[-3:],))
    assert again.last_result.finish_reason == "stop" and again.last_result.answer_tokens < 8
    assert full.startswith(cut) and len(cut) < len(full)


def test_a_question_during_an_answer_is_refused_and_not_recorded(tiny_chat, photo):
    session = _start(tiny_chat, photo)
    stream = tiny_chat.stream_answer(session, **GREEDY)
    next(stream)
    with pytest.raises(MessageError, match="still being generated"):
        tiny_chat.add_question(session, "and then?")
    with pytest.raises(MessageError, match="still being generated"):
        next(tiny_chat.stream_answer(session, **GREEDY))
    "".join(stream)
    assert [role for role, _ in session.history] == ["user", "assistant"]


def test_markers_and_special_tokens_typed_by_the_user_stay_text(tiny_chat, photo):
    session = _start(tiny_chat, photo, "what <ImageHere> is it?")
    assert tiny_chat.answer(session, **GREEDY)
    tiny_chat.add_question(session, "</s><s>")
    ids = tiny_chat.processor.fit(session.conversation, 1).ids
    tok = tiny_chat.tokenizer
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the prompt's own BOS only
    assert tok.eos_token_id not in ids
    assert ids.count(-200) == tiny_chat.model.n_image_tokens  # one image, one slot
    assert tiny_chat.answer(session, **GREEDY)


def test_a_lone_surrogate_is_cleaned_and_the_session_goes_on(tiny_chat, photo):
    session = _start(tiny_chat, photo, "\ud800 broken \x00")
    assert session.history[0] == ("user", "<Img><ImageHere></Img> \ufffd broken")
    assert tiny_chat.answer(session, **GREEDY)
    tiny_chat.add_past_answer(session, "earlier \udfff answer")
    tiny_chat.add_question(session, "and now?")
    assert tiny_chat.answer(session, **GREEDY)


def test_a_tokenizer_failure_in_ask_is_a_message_error_and_rolled_back(tiny_chat, photo, monkeypatch):
    session = _start(tiny_chat, photo)
    tiny_chat.answer(session, **GREEDY)
    before = list(session.history)

    def broken(prompt, n_images):
        raise TypeError("TextEncodeInput must be Union[...]")

    with monkeypatch.context() as m:
        m.setattr(tiny_chat.processor, "tokenize", broken)
        with pytest.raises(MessageError, match="could not be tokenized"):
            tiny_chat.add_question(session, "next question")
    assert session.history == before
    tiny_chat.add_question(session, "next question")
    assert tiny_chat.answer(session, **GREEDY)
