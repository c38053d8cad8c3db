"""Serving beyond one process: the round-robin proxy of `bench replicas` spreads connections over
its backends in turn, and `serve` takes `--threads` like the other commands."""

from __future__ import annotations

import http.server
import threading

import httpx

from minigpt4.serve.cli import _parser
from minigpt4.serve.replicas import round_robin


def _backend(name: str) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real server

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_proxy_hands_each_connection_to_the_next_backend() -> None:
    backends = [_backend("a"), _backend("b")]
    try:
        with round_robin([b.server_port for b in backends]) as port:
            answers = [httpx.get(f"http://127.0.0.1:{port}/").text for _ in range(6)]  # a connection each
            with httpx.Client() as kept:  # one connection: one backend for all its requests
                same = {kept.get(f"http://127.0.0.1:{port}/").text for _ in range(3)}
    finally:
        for backend in backends:
            backend.shutdown()
    assert answers == ["a", "b", "a", "b", "a", "b"]
    assert len(same) == 1


def test_serve_takes_threads() -> None:
    args = _parser().parse_args(["--threads", "2"])
    assert args.threads == 2
