"""What one request may cost the server: long histories, request limits, slow or redirecting image
URLs, clients that leave in every phase, and errors that must leave as OpenAI-style bodies."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from serve_helpers import FailingChat, HeldReplayChat, ImageServer, RecordingChat, running, wait_until

from minigpt4.chat import Chat
from minigpt4.conversation import get_template
from minigpt4.serve import create_app
from minigpt4.serve.messages import RequestLimits, Turn, replay

CHAT = "/v1/chat/completions"


def body(model: str, content: Any = "Hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def image_body(model: str, url: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}]
    return body(model, content)


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health").json()


def idle(url: str) -> bool:
    state = health(url)
    return (state["running"], state["waiting"], state["fetching"]) == (0, 0, 0)


def assert_error(reply: httpx.Response, status: int, says: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert says in error["message"], error["message"]
    assert "Traceback" not in reply.text


def assert_answers(url: str, model: str) -> None:
    reply = httpx.post(f"{url}{CHAT}", json=body(model), timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.fixture
def model(tiny_chat: Any) -> str:
    return tiny_chat.preset_name


# ---- long histories ----


def test_replaying_a_long_history_tokenises_a_bounded_amount_per_turn(
    tiny_chat: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each replayed turn fits the context; the work per turn must not grow with the history."""
    chat = Chat(tiny_chat.model, get_template("vicuna0"), max_context_tokens=300)
    tokenised: list[int] = []
    real = chat.processor.tokenize

    def counting(prompt: str, n_images: int) -> list[int]:
        ids = real(prompt, n_images)
        tokenised.append(len(ids))
        return ids

    monkeypatch.setattr(chat.processor, "tokenize", counting)
    exchanges = 120
    turns = []
    for i in range(exchanges):
        turns.append(Turn("user", f"messages[{2 * i}]", [f"question {i} about the picture, in a few words"]))
        turns.append(Turn("assistant", f"messages[{2 * i + 1}]", [f"answer {i}, also in a few words"]))
    turns.append(Turn("user", "messages[-1]", ["the last question"]))
    session = chat.new_session()
    assert replay(chat, session, turns)
    fitted = chat.processor.fit(session.conversation, 8, session.token_counts)
    assert len(fitted.ids) + fitted.max_new_tokens <= 300 and fitted.max_new_tokens == 8
    # Only the last question is fitted, once: a few prompts, not one (or more) per replayed turn.
    assert len(tokenised) <= 2 * 8
    assert sum(tokenised) <= 2 * 8 * 300


def test_replay_stops_when_told_the_answer_is_not_wanted(tiny_chat: Any) -> None:
    recorder = RecordingChat(tiny_chat)
    turns = [Turn("user", "m0", ["one"]), Turn("assistant", "m1", ["two"]), Turn("user", "m2", ["three"])]
    assert not replay(recorder, recorder.new_session(), turns, cancelled=lambda: len(recorder.calls) >= 1)
    assert recorder.calls == [("user", "one")]


# ---- limits checked before the queue ----


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([{"role": "user", "content": "Hi"}] * 11, "at most 10 per request"),
        ([{"role": "user", "content": "a" * 301}], "at most 300 per request"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 3}],
            "at most 2 per request",
        ),
    ],
)
def test_requests_over_the_limits_are_refused_before_any_work(
    tiny_chat: Any, model: str, messages: list[Any], says: str
) -> None:
    recorder = RecordingChat(tiny_chat)
    app = create_app(recorder, limits=RequestLimits(max_messages=10, max_text_chars=300, max_images=2))
    with running(app) as url:
        reply = httpx.post(f"{url}{CHAT}", json={"model": model, "messages": messages}, timeout=60)
        assert_error(reply, 400, says)
        assert recorder.calls == []
        assert_answers(url, model)


# ---- image URLs ----


@pytest.mark.slow
def test_a_slow_image_url_has_one_deadline_for_the_whole_download(tiny_chat: Any, model: str) -> None:
    with ImageServer(drip_interval_s=0.05, drip_bytes=400) as images:  # 20 s of dripping in all
        app = create_app(
            tiny_chat, allow_http_images=True, allow_private_images=True, image_fetch_timeout_s=1.0
        )
        with running(app) as url:
            reply = httpx.post(f"{url}{CHAT}", json=image_body(model, f"{images.url}/drip"), timeout=30)
            assert_error(reply, 400, "the download took over 1 s")
            assert images.hung_up.wait(timeout=5), "the download went on after its deadline"
            assert idle(url)
            assert_answers(url, model)


@pytest.mark.slow
def test_a_request_fetching_images_holds_a_place_in_the_queue(tiny_chat: Any, model: str) -> None:
    with ImageServer(drip_interval_s=0.05, drip_bytes=200) as images:  # 10 s of dripping in all
        app = create_app(
            tiny_chat,
            allow_http_images=True,
            allow_private_images=True,
            image_fetch_timeout_s=3.0,
            max_queue=0,
            max_running=1,
        )
        with running(app) as url, ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                httpx.post, f"{url}{CHAT}", json=image_body(model, f"{images.url}/drip"), timeout=30
            )
            assert wait_until(lambda: health(url)["fetching"] == 1, timeout_s=10)
            assert health(url)["running"] == 0
            busy = httpx.post(f"{url}{CHAT}", json=body(model), timeout=30)
            assert_error(busy, 429, "busy")
            assert_error(slow.result(), 400, "took over 3 s")
            assert idle(url)
            assert_answers(url, model)


@pytest.mark.slow
def test_redirects_are_not_followed(tiny_chat: Any, model: str) -> None:
    with (
        ImageServer() as images,
        running(create_app(tiny_chat, allow_http_images=True, allow_private_images=True)) as url,
    ):
        reply = httpx.post(f"{url}{CHAT}", json=image_body(model, f"{images.url}/redirect"), timeout=30)
        assert_error(reply, 400, "does not follow redirects")
        assert "/red.png" in reply.json()["error"]["message"]
        ok = httpx.post(f"{url}{CHAT}", json=image_body(model, f"{images.url}/red.png"), timeout=60)
        assert ok.status_code == 200, ok.text


# ---- clients that leave ----


@pytest.mark.slow
def test_a_client_that_leaves_during_a_fetch_stops_it(tiny_chat: Any, model: str) -> None:
    with ImageServer(drip_interval_s=0.05, drip_bytes=400) as images:  # 20 s of dripping in all
        app = create_app(
            tiny_chat, allow_http_images=True, allow_private_images=True, image_fetch_timeout_s=30.0
        )
        with running(app) as url:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}{CHAT}", json=image_body(model, f"{images.url}/drip"), timeout=1.0)
            assert images.hung_up.wait(timeout=5), "the download went on after the client left"
            assert wait_until(lambda: idle(url), timeout_s=5)
            assert_answers(url, model)


@pytest.mark.slow
def test_a_client_that_leaves_during_replay_stops_it(tiny_chat: Any, model: str) -> None:
    held = HeldReplayChat(tiny_chat)
    messages: list[dict[str, str]] = []
    for i in range(20):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "last"})
    with running(create_app(held)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{CHAT}", json={"model": model, "messages": messages}, timeout=0.5)
        time.sleep(1.0)  # the server polls its client every 0.25 s
        held.gate.set()
        assert wait_until(lambda: idle(url), timeout_s=10)
        assert held.asked == 1, "the history was replayed for a client that had left"
        assert_answers(url, model)


# ---- errors that must read well ----


def test_unexpected_engine_errors_are_json_and_the_server_goes_on(tiny_chat: Any, model: str) -> None:
    with running(create_app(FailingChat(tiny_chat))) as url:
        for stream in (False, True):
            reply = httpx.post(f"{url}{CHAT}", json=body(model, "boom", stream=stream), timeout=60)
            assert reply.status_code == 500
            error = reply.json()["error"]
            assert error["type"] == "server_error" and "failed to answer" in error["message"]
            assert "internal detail" not in reply.text and "Traceback" not in reply.text
            assert_answers(url, model)


def test_malformed_json_names_the_byte(tiny_chat: Any, model: str) -> None:
    with running(create_app(tiny_chat)) as url:
        reply = httpx.post(
            f"{url}{CHAT}",
            content=b'{"model": "x", "messages": [',
            headers={"Content-Type": "application/json"},
        )
        assert_error(reply, 400, "invalid JSON at byte 28")


def test_an_unknown_content_part_names_its_type_and_the_accepted_ones(tiny_chat: Any, model: str) -> None:
    with running(create_app(tiny_chat)) as url:
        reply = httpx.post(f"{url}{CHAT}", json=body(model, [{"type": "input_audio", "input_audio": {}}]))
        assert_error(reply, 400, "messages[0].content: part 0 has type 'input_audio'")
        assert "'text' or 'image_url'" in reply.json()["error"]["message"]


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_auth_scheme_is_case_insensitive(tiny_chat: Any, model: str, scheme: str) -> None:
    with running(create_app(tiny_chat, api_key="k3y")) as url:
        reply = httpx.post(f"{url}{CHAT}", json=body(model), headers={"Authorization": f"{scheme} k3y"})
        assert reply.status_code == 200, reply.text
        wrong = httpx.post(f"{url}{CHAT}", json=body(model), headers={"Authorization": "Basic k3y"})
        assert_error(wrong, 401, "Bearer <key>")
