"""A hostile client against the app and the HTTP API, from outside (gradio_client, raw HTTP on
127.0.0.1): server files named as uploads, bodies that cost before the key is checked, image URLs
that lead into this machine, foreign Host headers (DNS rebinding), URLs that do not parse, loose
JSON types, docs without the key. Each is refused cleanly: a 4xx with one clear message, no
traceback, the same text whatever exists on the server, and the server answering the next request.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from app_helpers import free_port
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from serve_helpers import png_bytes, running

from demo import launch
from demo.examples import example_rows
from demo.handlers import NOT_UPLOADED
from minigpt4.hosts import AllowedHosts
from minigpt4.serve import create_app
from minigpt4.serve.messages import UNREACHABLE, RequestLimits, is_public_address

MODEL = "minigpt4_tiny_random"
KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = png_bytes((10, 200, 30))
CAT = Path(example_rows()[0][0])


def _body(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def _image_message(url: str) -> dict[str, Any]:
    return _body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}])


def _post(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    """POST `body` as JSON with non-ASCII escaped, so that lone surrogates (`\\ud800`) travel too."""
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body), headers=headers, **kwargs)


def _error(reply: httpx.Response, status: int, says: str = "") -> str:
    assert reply.status_code == status, (reply.status_code, reply.text[:500])
    message = reply.json()["error"]["message"]
    assert says in message, message
    assert "Traceback" not in message and 'File "' not in message
    return message


def _answers(url: str, headers: dict[str, str] | None = None) -> None:
    reply = httpx.post(f"{url}/v1/chat/completions", json=_body("Still there?"), headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] is not None


# --- 1. the app reads only files Gradio received -----------------------------------------------


@pytest.fixture(scope="module")
def app_url(tiny_chat) -> Iterator[str]:
    demo = launch(tiny_chat, host="127.0.0.1", port=free_port(), share=False, block=False)
    yield demo.local_url
    demo.close()


def _server_files(tmp_path: Path) -> dict[str, str]:
    """Paths on the server that no client uploaded: an image, files of every other kind, nothing."""
    outside = tmp_path / "server-photo.png"
    outside.write_bytes(PNG)
    library = Path(shutil.__file__)
    return {
        "an image outside the upload folder": str(outside),
        "the example cat in the repository": str(CAT),
        "a system file": "/etc/hostname",
        "a secret": "/etc/shadow",
        "a large library file": str(library),
        "nothing": str(tmp_path / "no-such-file.png"),
        "a folder": str(tmp_path),
        "a traversal out of the upload folder": "/tmp/gradio/../../etc/hostname",
        "a NUL byte": "/tmp/gradio/a\x00b.png",
    }


def test_the_app_never_reads_a_path_a_client_names(app_url: str, tmp_path: Path) -> None:
    client = Client(app_url, verbose=False)
    messages = {}
    for what, path in _server_files(tmp_path).items():
        with pytest.raises(AppError) as error:
            client.predict({"path": path}, api_name="/upload")
        messages[what] = str(error.value)
    # One text for all: no error tells whether the file exists, what it is, or its size.
    assert set(messages.values()) == {NOT_UPLOADED}, messages
    with pytest.raises(AppError, match="Upload an image first"):  # and no image joined the chat
        client.predict("What is this?", api_name="/ask")
    assert "Image received" in client.predict(handle_file(str(CAT)), api_name="/upload")
    assert client.predict("What is this?", api_name="/ask", do_sample=False, max_new_tokens=4)


def test_a_link_in_the_upload_folder_to_a_server_file_is_refused(app_url: str, tmp_path: Path) -> None:
    client = Client(app_url, verbose=False)
    uploaded = client.predict(handle_file(str(CAT)), api_name="/upload")
    assert "Image received" in uploaded
    from gradio.utils import get_upload_folder

    link = Path(get_upload_folder()) / "hostile-link" / "cat.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG)
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    try:
        with pytest.raises(AppError, match=NOT_UPLOADED):
            client.predict({"path": str(link)}, api_name="/upload")
    finally:
        shutil.rmtree(link.parent)


def test_the_chat_shows_only_the_image_the_upload_checked(tiny_chat) -> None:
    from demo import build_demo

    config = build_demo(tiny_chat).config
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    shows = [
        d for d in config["dependencies"] if ids["chatbot"] in d["outputs"] and ids["image"] in d["outputs"]
    ]
    assert shows and all(ids["image"] not in d["inputs"] for d in shows), "the box's value is the client's"


# --- 4. DNS rebinding: foreign Host headers ----------------------------------------------------


def test_the_app_refuses_a_foreign_host_name(app_url: str) -> None:
    port = httpx.URL(app_url).port
    foreign = httpx.get(app_url, headers={"Host": "rebind.attacker.example"})
    assert foreign.status_code == 400 and foreign.json()["error"]["code"] == "host_not_allowed"
    api = httpx.post(f"{app_url}/gradio_api/info", headers={"Host": f"rebind.attacker.example:{port}"})
    assert api.status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST."):
        assert httpx.get(app_url, headers={"Host": host}).status_code == 200, host


def test_allowed_hosts() -> None:
    hosts = AllowedHosts.for_server("myhost.lan", ["*.example.org", "space.hf.space"])
    allowed = ["localhost", "localhost:7860", "myhost.lan:80", "a.example.org", "SPACE.hf.space.",
               "127.0.0.1:8000", "[::1]:8000", "192.168.1.20", "::1"]  # fmt: skip
    refused = ["rebind.attacker.example", "example.org.attacker.example", "example.org", "", None,
               "myhost.lan.attacker.example", "2130706433", "localhost.attacker.example"]  # fmt: skip
    assert [h for h in allowed if not hosts.allows(h)] == []
    assert [h for h in refused if hosts.allows(h)] == []
    assert AllowedHosts.for_server("0.0.0.0").names == frozenset({"localhost"})
    assert AllowedHosts.for_server(None, ["*"]).allows("anything.example")


def test_the_environment_adds_a_spaces_name(monkeypatch) -> None:
    monkeypatch.setenv("SPACE_HOST", "owner-demo.hf.space")
    monkeypatch.setenv("MINIGPT4_ALLOWED_HOSTS", "a.example, b.example")
    hosts = AllowedHosts.for_server("0.0.0.0")
    assert all(hosts.allows(h) for h in ("owner-demo.hf.space", "a.example", "b.example:443"))
    assert not hosts.allows("c.example")


# --- the API: a keyed server --------------------------------------------------------------------

LIMITS = RequestLimits(max_messages=64, max_text_chars=2000, max_images=2)


@pytest.fixture(scope="module")
def api(tiny_chat, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("image_dir")
    (folder / "red.png").write_bytes(PNG)
    app = create_app(
        tiny_chat, api_key=KEY, limits=LIMITS, local_image_dir=folder, max_request_bytes=200 * 2**20
    )
    with running(app) as url:
        yield url


def test_the_key_is_checked_before_the_body_is_read_or_parsed(api: str) -> None:
    url = f"{api}/v1/chat/completions"
    _error(httpx.post(url, content=b"{not json"), 401, "no API key given")
    _error(httpx.post(url, content=b"{not json", headers={"Authorization": "Bearer wrong"}), 401, "not valid")
    # A 100 MB body that never ends: refused from the headers, before a byte of it is read.
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        chunk = b" " * 2**20
        for _ in range(100):
            sent += len(chunk)
            yield chunk

    try:
        reply = httpx.post(url, content=endless(), timeout=30)
        assert reply.status_code == 401
    except httpx.RemoteProtocolError:
        pass  # the server may close the connection while the client still sends: also a refusal
    _error(httpx.post(url, content=b"{not json", headers=AUTH), 400, "invalid JSON at byte 1")
    _answers(api, AUTH)


def test_millions_of_tiny_messages_are_refused_before_they_are_built(api: str) -> None:
    one = b'{"role":"user","content":"x"},'
    raw = b'{"model":"minigpt4_tiny_random","messages":[' + one * 330_000 + one[:-1] + b"]}"  # 10 MB
    message = _error(httpx.post(f"{api}/v1/chat/completions", content=raw, headers=AUTH, timeout=60), 400)
    assert "bytes of JSON structure" in message and "at most 64 messages" in message
    numbers = b'{"model":"m","messages":[],"tools":[' + b"1," * 2_000_000 + b"1]}"
    _error(
        httpx.post(f"{api}/v1/chat/completions", content=numbers, headers=AUTH, timeout=60), 400, "structure"
    )
    _answers(api, AUTH)


def test_a_big_image_body_still_passes_the_structure_check() -> None:
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(3 * 2**20)).decode()
    body = json.dumps(_image_message(image), indent=2).encode()
    LIMITS.check_body(body)  # 4 MB of base64 and a little structure: accepted


def test_health_answers_while_a_hostile_body_streams_in(api: str) -> None:
    """Reading a body is waiting on the network: it never holds the event loop."""
    done = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": ["'
        while not done.is_set():
            yield b"x" * 65536
            time.sleep(0.01)

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{api}/v1/chat/completions", content=slow_body(), headers=AUTH, timeout=30)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        time.sleep(0.3)
        for _ in range(5):
            health = httpx.get(f"{api}/health", timeout=5)
            assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        done.set()
        sender.join(timeout=30)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),
        ("n", "1"),
        ("temperature", "0.5"),
        ("top_p", False),
        ("stream", "yes"),
        ("max_completion_tokens", 2.0),
    ],  # fmt: skip
)
def test_fields_of_the_wrong_json_type_are_400(api: str, field: str, value: Any) -> None:
    body = {**_body("Hi"), field: value}
    _error(httpx.post(f"{api}/v1/chat/completions", json=body, headers=AUTH), 400, field)


def test_stop_strings_count_in_the_text_limit(api: str) -> None:
    body = _body("Hi", stop=["x" * 700, "y" * 700, "z" * 700])
    _error(httpx.post(f"{api}/v1/chat/completions", json=body, headers=AUTH), 400, "stop strings hold 2,102")


def test_the_docs_need_the_key_when_a_key_is_set(api: str, tiny_chat) -> None:
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{api}{path}").status_code in (401, 404), path
    schema = httpx.get(f"{api}/openapi.json", headers=AUTH)
    assert schema.status_code == 200
    request = schema.json()["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages", "max_tokens"} <= set(request["properties"])
    assert httpx.get(f"{api}/docs", headers=AUTH).status_code == 200
    with running(create_app(tiny_chat)) as open_url:  # no key: the docs are public, as is the API
        assert httpx.get(f"{open_url}/openapi.json").status_code == 200


def test_the_api_refuses_a_foreign_host_name(api: str) -> None:
    reply = httpx.get(f"{api}/health", headers={"Host": "rebind.attacker.example"})
    _error(reply, 400, "does not answer requests for that host name")
    assert httpx.get(f"{api}/health", headers={"Host": "localhost"}).status_code == 200


# --- 6 and 12. URLs that do not parse, and schemes in capitals ---------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://[::1", "the image URL is not a valid URL"),
        ("https://[fe80::1", "the image URL is not a valid URL"),
        ("red.png\x00.png", "no such image file"),
        ("red\ud800.png", "no such image file"),
        ("a" * 5000 + ".png", "no such image file"),
        ("/".join(["a" * 255] * 20), "no such image file"),
        ("../../etc/hostname", "outside the image folder"),
        ("ftp://example.org/x.png", "unsupported image URL scheme 'ftp'"),
    ],
)
def test_image_urls_that_do_not_parse_or_lead_nowhere_are_400(api: str, url: str, says: str) -> None:
    _error(_post(api, _image_message(url), headers=AUTH), 400, says)


def test_a_data_url_scheme_in_capitals_works(api: str) -> None:
    url = "DATA:image/png;base64," + base64.b64encode(PNG).decode()
    reply = httpx.post(f"{api}/v1/chat/completions", json=_image_message(url), headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text


# --- 3. SSRF: http(s) images only from public addresses ---------------------------------------


class _ImageServer:
    """An http server on 127.0.0.1 serving a PNG; it counts the requests it got."""

    def __init__(self) -> None:
        served = self.served = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                served.append((self.path, self.headers.get("Host")))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def image_server() -> Iterator[_ImageServer]:
    server = _ImageServer()
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_http_images_never_reach_this_machine_or_its_network(tiny_chat, image_server: _ImageServer) -> None:
    port = image_server.port
    inward = [
        f"http://127.0.0.1:{port}/x.png",
        f"http://localhost:{port}/x.png",
        f"http://2130706433:{port}/x.png",  # 127.0.0.1 as one number
        f"http://0x7f.1:{port}/x.png",
        f"http://127.1:{port}/x.png",
        f"http://[::1]:{port}/x.png",
        f"http://[::ffff:127.0.0.1]:{port}/x.png",
        f"http://[::ffff:7f00:1]:{port}/x.png",
        f"http://0.0.0.0:{port}/x.png",
        f"http://[::]:{port}/x.png",
        f"http://127.0.0.1:{_closed_port()}/x.png",  # a closed port reads the same as an open one
        "http://169.254.169.254/latest/meta-data/",  # refused before any packet is sent
        "http://10.1.2.3/x.png",
        "http://[fe80::1]/x.png",
        "http://224.0.0.1/x.png",
        "http://user:secret@127.0.0.1/x.png",
    ]
    with running(create_app(tiny_chat, allow_http_images=True)) as url:
        for source in inward:
            reply = _post(url, _image_message(source), timeout=30)
            assert _error(reply, 400) == f"messages[0].content[0]: {UNREACHABLE}", source
        for bad in ("http://127.0.0.1:99999/x.png", "http://a\x00b/x.png", "http://\ud800.example/x.png",
                    "http://[::1", "http:///x.png"):  # fmt: skip
            _error(_post(url, _image_message(bad)), 400)
        _answers(url)
    assert image_server.served == [], "nothing may reach this machine's own servers"


def test_allow_private_images_opens_them_and_credentials_stay_out_of_logs(
    tiny_chat, image_server: _ImageServer, caplog
) -> None:
    app = create_app(tiny_chat, allow_http_images=True, allow_private_images=True)
    with running(app) as url, caplog.at_level(logging.DEBUG):
        good = f"http://localhost:{image_server.port}/x.png"
        assert (
            httpx.post(f"{url}/v1/chat/completions", json=_image_message(good), timeout=60).status_code == 200
        )
        closed = f"http://user:s3cr3t@127.0.0.1:{_closed_port()}/x.png"
        message = _error(httpx.post(f"{url}/v1/chat/completions", json=_image_message(closed)), 400)
    assert image_server.served == [("/x.png", f"localhost:{image_server.port}")]  # the name, as asked
    assert "s3cr3t" not in message
    assert not [r for r in caplog.records if "s3cr3t" in r.getMessage()]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.1.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("2002:7f00:1::", False),
        ("2002:808:808::", True),
        ("64:ff9b::7f00:1", False),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),
    ],  # fmt: skip
)
def test_public_addresses(address: str, public: bool) -> None:
    import ipaddress

    assert is_public_address(ipaddress.ip_address(address)) is public
