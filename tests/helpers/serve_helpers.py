"""Helpers for the server tests: a live uvicorn server in a thread, and Chat wrappers that record
or hold back what the server asks of the engine."""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from PIL import Image


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve `app` on a free port of 127.0.0.1 for the duration; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until(condition: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class ChatProxy:
    """Passes everything to a real Chat; subclasses override what they watch."""

    def __init__(self, chat: Any) -> None:
        self.chat = chat

    def __getattr__(self, name: str) -> Any:
        return getattr(self.chat, name)


class RecordingChat(ChatProxy):
    """Records how each session is built (images, user and assistant turns) and the generation params."""

    def __init__(self, chat: Any) -> None:
        super().__init__(chat)
        self.calls: list[tuple[str, Any]] = []
        self.params: Any = None

    def upload_image(self, session: Any, image: bytes) -> None:
        self.calls.append(("image", image))
        self.chat.upload_image(session, image)

    def add_question(self, session: Any, text: str) -> None:
        self.calls.append(("user", text))
        self.chat.add_question(session, text)

    def add_past_question(self, session: Any, text: str) -> None:
        self.calls.append(("user", text))
        self.chat.add_past_question(session, text)

    def add_past_answer(self, session: Any, text: str) -> None:
        self.calls.append(("assistant", text))
        self.chat.add_past_answer(session, text)

    def stream_answer(self, session: Any, params: Any = None, **overrides: Any) -> Iterator[str]:
        self.params = params
        return self.chat.stream_answer(session, params, **overrides)


class GatedChat(ChatProxy):
    """Holds every answer back until `gate` is set, so a test can fill the queue at its own pace."""

    def __init__(self, chat: Any) -> None:
        super().__init__(chat)
        self.gate = threading.Event()

    def stream_answer(self, session: Any, params: Any = None, **overrides: Any) -> Iterator[str]:
        self.gate.wait(timeout=30)
        yield from self.chat.stream_answer(session, params, **overrides)


class EndlessChat(ChatProxy):
    """Answers with a piece every 10 ms until the server closes the generator (or 30 s pass)."""

    def __init__(self, chat: Any) -> None:
        super().__init__(chat)
        self.pieces = 0
        self.closed = threading.Event()

    def stream_answer(self, session: Any, params: Any = None, **overrides: Any) -> Iterator[str]:
        try:
            for _ in range(3000):
                self.pieces += 1
                yield "tick "
                time.sleep(0.01)
        finally:
            self.closed.set()


class FailingChat(ChatProxy):
    """Raises an unexpected error (not an InputError) whenever a user message holds `trigger`."""

    def __init__(self, chat: Any, trigger: str = "boom") -> None:
        super().__init__(chat)
        self.trigger = trigger

    def add_question(self, session: Any, text: str) -> None:
        if self.trigger in text:
            raise RuntimeError("an engine bug: internal detail that must not reach the client")
        self.chat.add_question(session, text)


class HeldReplayChat(ChatProxy):
    """Holds the first replayed user message until `gate` is set, and counts the messages asked."""

    def __init__(self, chat: Any) -> None:
        super().__init__(chat)
        self.gate = threading.Event()
        self.asked = 0

    def add_question(self, session: Any, text: str) -> None:
        self.asked += 1
        if self.asked == 1:
            self.gate.wait(timeout=30)
        self.chat.add_question(session, text)


class ImageServer:
    """A small HTTP server on 127.0.0.1 for image URLs, in a thread:

    - `/drip`: a PNG-typed body sent one byte every `drip_interval_s`, `drip_bytes` bytes at most
      (so it stops by itself); `dripping` is set while a client is being dripped to, and
      `hung_up` once a client closed the connection in the middle;
    - `/redirect`: a 302 to `/red.png`;
    - `/red.png`: a small PNG.
    """

    def __init__(self, drip_interval_s: float = 0.1, drip_bytes: int = 300) -> None:
        self.drip_interval_s = drip_interval_s
        self.drip_bytes = drip_bytes
        self.dripping = threading.Event()
        self.hung_up = threading.Event()
        self.image = png_bytes((200, 30, 30))
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/red.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/red.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(owner.image)))
                    self.end_headers()
                    self.wfile.write(owner.image)
                elif self.path == "/drip":
                    owner._drip(self)
                else:
                    self.send_error(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _drip(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()
        self.dripping.set()
        try:
            for _ in range(self.drip_bytes):
                handler.wfile.write(b"\x89")
                handler.wfile.flush()
                time.sleep(self.drip_interval_s)
        except OSError:  # the client hung up
            self.hung_up.set()
        finally:
            self.dripping.clear()

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
