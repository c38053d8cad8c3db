"""`python -m minigpt4 serve`: the official openai client against a live server on 127.0.0.1,
serving the tiny preset's Chat. Greedy answers are compared with the engine's own answers to the
same conversation, so the tests hold for any weights."""

from __future__ import annotations

import base64
import functools
import http.server
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from serve_helpers import EndlessChat, GatedChat, RecordingChat, png_bytes, running, wait_until

from minigpt4.serve import create_app

API_KEY = "test-key"
MAX_IMAGE_BYTES = 100_000
MAX_REQUEST_BYTES = 1_000_000
RED, BLUE = png_bytes((200, 30, 30)), png_bytes((20, 40, 220))


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def engine_answer(chat: Any, calls: list[tuple[str, Any]], max_new_tokens: int = 8) -> str:
    """What the engine itself answers, greedily, to a session built by `calls`."""
    session = chat.new_session()
    build = {"image": chat.upload_image, "user": chat.add_question, "assistant": chat.add_past_answer}
    for kind, value in calls:
        build[kind](session, value)
    return chat.answer(session, max_new_tokens=max_new_tokens, do_sample=False)


@pytest.fixture(scope="module")
def recorder(tiny_chat: Any) -> RecordingChat:
    return RecordingChat(tiny_chat)


@pytest.fixture(scope="module")
def base_url(recorder: RecordingChat) -> Any:
    app = create_app(
        recorder, max_image_bytes=MAX_IMAGE_BYTES, api_key=API_KEY, max_request_bytes=MAX_REQUEST_BYTES
    )
    with running(app) as url:
        yield url


@pytest.fixture
def client(base_url: str, recorder: RecordingChat) -> OpenAI:
    recorder.calls.clear()
    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def model(tiny_chat: Any) -> str:
    return tiny_chat.preset_name


def ask(client: OpenAI, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, **kwargs
    )


def test_models_lists_the_preset(client: OpenAI, model: str) -> None:
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).id == model


def test_plain_answer_is_the_engines_answer(client: OpenAI, recorder: RecordingChat, model: str) -> None:
    reply = ask(client, model, [{"role": "user", "content": "Describe the scene."}])
    assert recorder.calls == [("user", "Describe the scene.")]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == engine_answer(recorder.chat, recorder.calls)
    assert reply.model == model and reply.id.startswith("chatcmpl-")
    assert 0 < reply.usage.completion_tokens <= 8
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 8 else "stop")
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_answer_is_the_plain_answer(client: OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "What do you see?"}]
    plain = ask(client, model, messages)
    chunks = list(ask(client, model, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[-1].usage == plain.usage and not chunks[-1].choices


def test_generation_settings_reach_the_engine(client: OpenAI, recorder: RecordingChat, model: str) -> None:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0.7,
        top_p=0.5,
        max_tokens=3,
        stop=["###", "\n\n"],
    )
    params = recorder.params
    assert (params.do_sample, params.temperature, params.top_p) == (True, 0.7, 0.5)
    assert (params.max_new_tokens, params.stop) == (3, ("###", "\n\n"))
    ask(client, model, [{"role": "user", "content": "Hi"}])
    assert recorder.params.do_sample is False


def test_image_as_data_url(client: OpenAI, recorder: RecordingChat, model: str) -> None:
    content = [image_part(data_url(RED)), text_part("What colour is this?")]
    reply = ask(client, model, [{"role": "user", "content": content}])
    assert recorder.calls == [("image", RED), ("user", "What colour is this?")]
    assert reply.choices[0].message.content == engine_answer(recorder.chat, recorder.calls)


def test_several_images_and_two_turns(client: OpenAI, recorder: RecordingChat, model: str) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [image_part(data_url(RED)), image_part(data_url(BLUE)), text_part("Compare.")],
        },
        {"role": "assistant", "content": "One is red, one is blue."},
        {"role": "user", "content": "Which is warmer?"},
    ]
    reply = ask(client, model, messages)
    assert recorder.calls == [
        ("image", RED),
        ("image", BLUE),
        ("user", "Answer briefly.\nCompare."),
        ("assistant", "One is red, one is blue."),
        ("user", "Which is warmer?"),
    ]
    assert reply.choices[0].message.content == engine_answer(recorder.chat, recorder.calls)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (data_url(b"these bytes are not an image"), "messages[0].content[0]"),
        ("data:image/png;base64,@@not-base64@@", "base64"),
        (data_url(b"\0" * (MAX_IMAGE_BYTES + 1)), f"limit of {MAX_IMAGE_BYTES} bytes"),
        ("/etc/hostname", "local image paths are disabled"),
        ("https://example.com/cat.png", "http(s) image URLs are disabled"),
    ],
)
def test_bad_image_is_400(client: OpenAI, model: str, url: str, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, model, [{"role": "user", "content": [image_part(url), text_part("What is this?")]}])
    assert caught.value.status_code == 400
    assert says in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"
    assert ask(client, model, [{"role": "user", "content": "Still there?"}]).choices[0].message.content


def test_too_long_message_is_400(client: OpenAI, model: str, tiny_chat: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, model, [{"role": "user", "content": "a" * (tiny_chat.max_message_chars + 1)}])
    assert "messages[0]" in caught.value.message


@pytest.mark.parametrize(
    ("messages", "extra", "says"),
    [
        ([], {}, "messages"),
        ([{"role": "user", "content": "Hi"}], {"n": 2}, "only n=1"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], {}, "last message"),
        ([{"role": "tool", "content": "42", "tool_call_id": "x"}], {}, "messages[0].role"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            {},
            "part 0 has type 'input_audio'",
        ),
    ],
)
def test_requests_the_model_cannot_honour_are_400(
    client: OpenAI, model: str, messages: list[Any], extra: dict[str, Any], says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, model, messages, **extra)
    assert says in caught.value.message


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "gpt-4o", [{"role": "user", "content": "Hi"}])
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_missing_or_wrong_key_is_401(base_url: str, model: str) -> None:
    stranger = OpenAI(base_url=f"{base_url}/v1", api_key="wrong-key", max_retries=0)
    for headers, says in (({}, "not valid"), ({"Authorization": openai.Omit()}, "no API key given")):
        with pytest.raises(openai.AuthenticationError, match=says) as caught:
            ask(stranger, model, [{"role": "user", "content": "Hi"}], extra_headers=headers)
        assert caught.value.body["code"] == "invalid_api_key"
    bare = httpx.post(f"{base_url}/v1/chat/completions", json={"model": model, "messages": []})
    assert bare.status_code == 401 and "Authorization: Bearer" in bare.json()["error"]["message"]
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_oversized_request_is_413(base_url: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "a" * MAX_REQUEST_BYTES}]}
    reply = httpx.post(
        f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

    def chunked() -> Any:  # no Content-Length: the limit must hold while the body streams in
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_REQUEST_BYTES // 10_000 + 1):
            yield b"a" * 10_000
        yield b'"}]}'

    reply = httpx.post(
        f"{base_url}/v1/chat/completions", content=chunked(), headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert reply.status_code == 413


def test_local_and_http_images_when_enabled(tiny_chat: Any, model: str, tmp_path: Any) -> None:
    (tmp_path / "red.png").write_bytes(RED)
    (tmp_path.parent / "outside.png").write_bytes(BLUE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    recorder = RecordingChat(tiny_chat)
    app = create_app(
        recorder,
        max_image_bytes=MAX_IMAGE_BYTES,
        local_image_dir=tmp_path,
        allow_http_images=True,
        allow_private_images=True,  # the image server is on this machine
    )
    try:
        with running(app) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            sources = [
                "red.png",
                f"file://{tmp_path}/red.png",
                f"http://127.0.0.1:{images.server_port}/red.png",
            ]
            for source in sources:
                ask(client, model, [{"role": "user", "content": [image_part(source), text_part("Colour?")]}])
            assert recorder.calls == [("image", RED), ("user", "Colour?")] * 3
            for source in ("../outside.png", str(tmp_path.parent / "outside.png")):
                with pytest.raises(openai.BadRequestError, match="outside the image folder"):
                    ask(
                        client,
                        model,
                        [{"role": "user", "content": [image_part(source), text_part("Colour?")]}],
                    )
            with pytest.raises(openai.BadRequestError, match="could not fetch"):
                missing = f"http://127.0.0.1:{images.server_port}/missing.png"
                ask(client, model, [{"role": "user", "content": [image_part(missing), text_part("Colour?")]}])
    finally:
        images.shutdown()


def test_more_requests_than_the_queue_holds_get_429(tiny_chat: Any, model: str) -> None:
    gated = GatedChat(tiny_chat)
    with running(create_app(gated, max_image_bytes=MAX_IMAGE_BYTES, max_queue=1, max_running=2)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def request(_: int) -> int:
            try:
                ask(client, model, [{"role": "user", "content": "Hi"}])
                return 200
            except openai.RateLimitError as e:
                assert int(e.response.headers["Retry-After"]) >= 1
                assert e.body["code"] == "rate_limit_exceeded"
                return 429

        with ThreadPoolExecutor(max_workers=6) as pool:
            replies = [pool.submit(request, i) for i in range(6)]
            # Two requests run together (held at the gate), one waits; the other three are refused at once.
            assert wait_until(lambda: sum(r.done() for r in replies) == 3, timeout_s=20)
            assert queue_state(url) == (2, 1)
            gated.gate.set()
            assert sorted(r.result() for r in replies) == [200, 200, 200, 429, 429, 429]
        assert queue_state(url) == (0, 0)
        assert ask(client, model, [{"role": "user", "content": "Hi"}]).choices[0].message.content


def queue_state(url: str) -> tuple[int, int]:
    health = httpx.get(f"{url}/health").json()
    return health["running"], health["waiting"]


def test_client_disconnect_stops_generation(tiny_chat: Any, model: str) -> None:
    endless = EndlessChat(tiny_chat)
    with running(create_app(endless, max_image_bytes=MAX_IMAGE_BYTES)) as url:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
        assert endless.closed.wait(timeout=5), "the stream was not closed after the client left"
        assert endless.pieces < 500
        assert wait_until(lambda: queue_state(url) == (0, 0))

        endless.closed.clear()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        assert endless.closed.wait(timeout=5), "the answer was not stopped after the client left"
