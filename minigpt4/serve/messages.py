"""OpenAI messages → the turns of a Chat session, and the images they point to.

MiniGPT-4's templates carry their own system prompt, so system (and developer) messages are folded
into the next user message. Consecutive messages of one role are joined into one turn, since the
templates alternate user and assistant. Images are fetched before the request starts on the
model's worker (it holds a place in the queue meanwhile), so the worker never waits on a network
or a disk. An http(s) image has one deadline for its whole download, and redirects are not
followed (a redirect could point into the server's own network). Its host name is resolved first,
and every address it resolves to must be public (not loopback, private, link-local, multicast,
reserved or unspecified, in any IPv6 wrapping of an IPv4 address); the download then connects to
the address that was checked, so a name that changes its answer in between (DNS rebinding) cannot
send it elsewhere. Every way of not reaching a host gets one text, so the API cannot be used to
map which hosts and ports answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

import httpx

from minigpt4.chat import Chat, ChatSession
from minigpt4.errors import ImageError, InputError, MessageError
from minigpt4.serve.protocol import ChatMessage, ImagePart

log = logging.getLogger(__name__)

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_SCAN_CHUNK = 2**20
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986
_DATA_URL = re.compile(
    r"(?i:data):(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S
)


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from, and how big they may be (pixels are checked by the Chat)."""

    max_bytes: int
    local_dir: Path | None = None  # file:// URLs and paths are allowed only under this folder
    allow_http: bool = False
    http_timeout_s: float = 10.0  # for the whole download of one image, not per read
    allow_private: bool = False  # http(s) hosts on loopback / private / link-local addresses too


@dataclass(frozen=True)
class RequestLimits:
    """How much one request may ask of the server, checked before it joins the queue."""

    max_messages: int = 256
    max_text_chars: int = 200_000  # all the text of all the messages (and the stop strings) together
    max_images: int = 8

    @property
    def max_structure_bytes(self) -> int:
        """The most bytes of JSON structure a request within these limits needs (see `check_body`):
        every text character escaped (`\\uXXXX`), and room for the keys, quotes and spaces of
        each message, pretty-printed."""
        return 6 * self.max_text_chars + 256 * self.max_messages + 2**16

    def check_body(self, raw: bytes) -> None:
        """Refuse, before parsing, a body with more JSON structure than any request within the limits.

        Images travel as base64, and everything else is text (capped) or structure; structure is
        made of the bytes outside base64's alphabet (quotes, commas, brackets, colons, spaces). A
        body of millions of tiny messages, or of a huge array, is nearly all such bytes: counting
        them (in C) keeps a hostile body from costing seconds and gigabytes to parse.
        """
        structure = sum(
            len(raw[i : i + _SCAN_CHUNK].translate(None, _BASE64_ALPHABET))
            for i in range(0, len(raw), _SCAN_CHUNK)  # chunks: other threads get the GIL between
        )
        if structure > self.max_structure_bytes:
            raise MessageError(
                f"the request holds {structure:,} bytes of JSON structure and text; this server takes "
                f"at most {self.max_structure_bytes:,} (at most {self.max_messages:,} messages and "
                f"{self.max_text_chars:,} characters of text): send fewer or shorter messages"
            )

    def check(self, messages: Sequence[ChatMessage], stop: Sequence[str] = ()) -> None:
        """Raise `MessageError` (a 400) when the messages ask for more than these limits allow."""
        if len(messages) > self.max_messages:
            raise MessageError(
                f"the request has {len(messages):,} messages; this server takes at most "
                f"{self.max_messages:,} per request: send fewer (older turns can be left out)"
            )
        chars, images = sum(map(len, stop)), 0
        for message in messages:
            parts = [message.content] if isinstance(message.content, str) else message.content
            for part in parts:
                if isinstance(part, str):
                    chars += len(part)
                elif isinstance(part, ImagePart):
                    images += 1
                else:
                    chars += len(part.text)
        if chars > self.max_text_chars:
            raise MessageError(
                f"the messages and stop strings hold {chars:,} characters of text; this server takes "
                f"at most {self.max_text_chars:,} per request"
            )
        if images > self.max_images:
            raise MessageError(
                f"the messages hold {images} images; this server takes at most {self.max_images} per request"
            )


@dataclass
class ImageRef:
    """One image of a turn: where it was named (for error messages), its URL, then its bytes."""

    where: str
    url: str
    data: bytes = b""


@dataclass
class Turn:
    role: Literal["user", "assistant"]
    where: str
    texts: list[str] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.texts)


def to_turns(messages: Sequence[ChatMessage]) -> list[Turn]:
    """Group the messages into alternating turns; the last must be the user's."""
    turns: list[Turn] = []
    system: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        parts = [message.content] if isinstance(message.content, str) else message.content
        if message.role in ("system", "developer"):
            if any(isinstance(part, ImagePart) for part in parts):
                raise MessageError(f"{where}: a {message.role} message cannot hold images")
            system += [part if isinstance(part, str) else part.text for part in parts]
            continue
        if not turns or turns[-1].role != message.role:
            if message.role == "assistant" and not turns:
                raise MessageError(f"{where}: the conversation must start with a user message")
            turns.append(Turn(message.role, where))
        turn = turns[-1]
        if message.role == "user":
            turn.texts += system
            system = []
        for j, part in enumerate(parts):
            if isinstance(part, str):
                turn.texts.append(part)
            elif isinstance(part, ImagePart):
                if message.role == "assistant":
                    raise MessageError(f"{where}: an assistant message cannot hold images")
                turn.images.append(ImageRef(f"{where}.content[{j}]", part.image_url.url))
            else:
                turn.texts.append(part.text)
    if not turns or turns[-1].role != "user" or system:
        raise MessageError("the last message must come from the user")
    return turns


@contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefix a user error with the place in the request it comes from."""
    try:
        yield
    except InputError as e:
        raise type(e)(f"{where}: {e}") from e


async def fetch_images(turns: Sequence[Turn], policy: ImagePolicy) -> None:
    """Read the bytes of every image of the turns; cancelling the task stops the download."""
    for turn in turns:
        for image in turn.images:
            with _located(image.where):
                image.data = await fetch_image(image.url, policy)


async def fetch_image(url: str, policy: ImagePolicy) -> bytes:
    """The bytes an image URL names: http(s) downloads on the event loop, the rest on a thread."""
    if _scheme(url) in ("http", "https") and policy.allow_http:
        return await _read_http(url, policy)
    return await asyncio.to_thread(read_image_url, url, policy)


def _scheme(url: str) -> str:
    """The URL's scheme, lower case (schemes are case-insensitive). Read from its first characters,
    so a data: URL of many megabytes is not copied to find it; an http(s) or file URL that does not
    parse is the client's error (`http://[::1` makes urlparse raise)."""
    match = _SCHEME.match(url)
    scheme = match[1].lower() if match else ""
    if scheme in ("http", "https", "file"):
        try:
            urlparse(url)
        except ValueError as e:
            raise ImageError("the image URL is not a valid URL") from e
    return scheme


def replay(
    chat: Chat, session: ChatSession, turns: Sequence[Turn], cancelled: Callable[[], bool] = lambda: False
) -> bool:
    """Feed the turns into a fresh session: each user turn's images, then its text; earlier answers.

    Only the last user turn is asked (fitted into the context, once); the earlier ones are recorded.
    Stops early, returning False, once `cancelled()` says the answer is no longer wanted.
    """
    last_user = max((i for i, t in enumerate(turns) if t.role != "assistant"), default=-1)
    for i, turn in enumerate(turns):
        if cancelled():
            return False
        if turn.role == "assistant":
            with _located(turn.where):
                chat.add_past_answer(session, turn.text)
            continue
        for image in turn.images:
            with _located(image.where):
                chat.upload_image(session, image.data)
        with _located(turn.where):
            (chat.add_question if i == last_user else chat.add_past_question)(session, turn.text)
    return not cancelled()


def read_image_url(url: str, policy: ImagePolicy) -> bytes:
    """The bytes an image URL names: a data: URL always; a file or http(s) URL when the policy allows."""
    scheme = _scheme(url)
    if scheme == "data":
        return _read_data_url(url, policy.max_bytes)
    if scheme in ("http", "https"):
        if not policy.allow_http:
            raise ImageError("http(s) image URLs are disabled on this server; send the image as a data: URL")
        raise ImageError("http(s) image URLs are fetched by fetch_image, not read here")
    if scheme in ("", "file"):
        if policy.local_dir is None:
            raise ImageError("local image paths are disabled on this server; send the image as a data: URL")
        return _read_local(unquote(urlparse(url).path) if scheme else url, policy)
    raise ImageError(f"unsupported image URL scheme {scheme!r}; use a data: URL")


def _too_big(limit: int) -> ImageError:
    return ImageError(f"the image is larger than this server's limit of {limit} bytes")


def _read_data_url(url: str, max_bytes: int) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ImageError("a data: URL must look like data:image/png;base64,<data>")
    data = match["data"]
    # 4 base64 characters hold 3 bytes: refuse before decoding anything too big.
    if len(data) // 4 * 3 > max_bytes + 2:
        raise _too_big(max_bytes)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data: URL is not valid base64 ({e})") from e
    if len(raw) > max_bytes:
        raise _too_big(max_bytes)
    return raw


def _read_local(path: str, policy: ImagePolicy) -> bytes:
    assert policy.local_dir is not None
    root = policy.local_dir.resolve()
    try:
        file = (root / path).resolve()
        inside = file.is_relative_to(root)
        size = file.stat().st_size if inside and file.is_file() else None
    except (OSError, ValueError):  # NUL bytes, lone surrogates, names too long, link loops
        inside, size = True, None
    if not inside:
        raise ImageError("that path is outside the image folder this server may read")
    if size is None:
        raise ImageError("no such image file in the server's image folder")
    if size > policy.max_bytes:
        raise _too_big(policy.max_bytes)
    try:
        return file.read_bytes()
    except OSError as e:
        raise ImageError("the image file in the server's image folder cannot be read") from e


UNREACHABLE = (
    "could not fetch the image: its host cannot be reached, refused the connection, or is not one "
    "this server may fetch from (only public addresses)"
)


@dataclass(frozen=True)
class _Target:
    """Where an http(s) image URL leads: the URL to connect to (host replaced by a checked
    address), the Host header and TLS name of the original, and the URL as it may be shown."""

    url: httpx.URL
    host_header: str
    tls_name: str
    shown: str


async def _resolve(url: str, policy: ImagePolicy) -> _Target:
    try:
        parsed = httpx.URL(url)
        host, port = parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise ImageError("the image URL is not a valid URL") from e
    shown = str(parsed.copy_with(username=None, password=None))
    if not host:
        raise ImageError("the image URL has no host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(info[4][0].partition("%")[0]) for info in infos]
    except (OSError, UnicodeError, ValueError) as e:
        log.info("image host %s did not resolve: %s", host, e)
        raise ImageError(UNREACHABLE) from e
    if not addresses or not (policy.allow_private or all(map(is_public_address, addresses))):
        log.info("refused an image URL whose host %s resolves to %s", host, [str(a) for a in addresses])
        raise ImageError(UNREACHABLE)
    default_port = parsed.port is None
    host_header = host if default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if default_port else f"[{host}]:{port}"
    return _Target(parsed.copy_with(host=str(addresses[0])), host_header, host, shown)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is on the public internet, unwrapping IPv4 carried in IPv6 (mapped,
    6to4, Teredo, NAT64), so that `::ffff:127.0.0.1` counts as the loopback it is."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return is_public_address(inner)
    return address.is_global and not address.is_multicast


async def _read_http(url: str, policy: ImagePolicy) -> bytes:
    """Download an image with one deadline for the whole download; redirects are refused."""
    target = await _resolve(url, policy)
    chunks: list[bytes] = []
    size = 0
    deadline_s = policy.http_timeout_s
    try:
        async with (
            asyncio.timeout(deadline_s),
            httpx.AsyncClient(timeout=deadline_s, trust_env=False) as client,
            client.stream(
                "GET",
                target.url,
                headers={"Host": target.host_header},
                extensions={"sni_hostname": target.tls_name},
                follow_redirects=False,
            ) as response,
        ):
            if response.is_redirect:
                where = response.headers.get("location", "elsewhere")
                raise ImageError(
                    f"could not fetch {target.shown}: it redirects (HTTP {response.status_code}) to "
                    f"{where}, and this server does not follow redirects; give the image's final URL"
                )
            if response.status_code >= 400:
                raise ImageError(f"could not fetch {target.shown}: HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > policy.max_bytes:
                raise _too_big(policy.max_bytes)
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise _too_big(policy.max_bytes)
                chunks.append(chunk)
    except (TimeoutError, httpx.TimeoutException) as e:
        raise ImageError(f"could not fetch {target.shown}: the download took over {deadline_s:g} s") from e
    except (httpx.HTTPError, OSError) as e:
        log.info("image download from %s failed: %s", target.shown, e)
        raise ImageError(UNREACHABLE) from e
    return b"".join(chunks)
