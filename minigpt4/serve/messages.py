"""OpenAI messages → the turns of a Chat session, and the images they point to.

MiniGPT-4's templates carry their own system prompt, so system (and developer) messages are folded
into the next user message. Consecutive messages of one role are joined into one turn, since the
templates alternate user and assistant. Images are fetched before the request joins the queue, so
the model's worker never waits on a network or a disk.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

import httpx

from minigpt4.chat import Chat, ChatSession
from minigpt4.errors import ImageError, InputError, MessageError
from minigpt4.serve.protocol import ChatMessage, ImagePart

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from, and how big they may be (pixels are checked by the Chat)."""

    max_bytes: int
    local_dir: Path | None = None  # file:// URLs and paths are allowed only under this folder
    allow_http: bool = False
    http_timeout_s: float = 10.0


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


def fetch_images(turns: Sequence[Turn], policy: ImagePolicy) -> None:
    """Read the bytes of every image of the turns (blocking: run it off the event loop)."""
    for turn in turns:
        for image in turn.images:
            with _located(image.where):
                image.data = read_image_url(image.url, policy)


def replay(chat: Chat, session: ChatSession, turns: Sequence[Turn]) -> None:
    """Feed the turns into a fresh session: each user turn's images, then its text; earlier answers."""
    for turn in turns:
        if turn.role == "assistant":
            with _located(turn.where):
                chat.add_answer(session, turn.text)
            continue
        for image in turn.images:
            with _located(image.where):
                chat.upload_image(session, image.data)
        with _located(turn.where):
            chat.ask(session, turn.text)


def read_image_url(url: str, policy: ImagePolicy) -> bytes:
    """The bytes an image URL names: a data: URL always; a file or http(s) URL when the policy allows."""
    if url.startswith("data:"):
        return _read_data_url(url, policy.max_bytes)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        if not policy.allow_http:
            raise ImageError("http(s) image URLs are disabled on this server; send the image as a data: URL")
        return _read_http(url, policy)
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
    file = (root / path).resolve()
    if not file.is_relative_to(root):
        raise ImageError(f"{path} is outside the image folder this server may read")
    if not file.is_file():
        raise ImageError(f"no image file {path} in the server's image folder")
    size = file.stat().st_size
    if size > policy.max_bytes:
        raise _too_big(policy.max_bytes)
    return file.read_bytes()


def _read_http(url: str, policy: ImagePolicy) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        with httpx.stream("GET", url, timeout=policy.http_timeout_s, follow_redirects=True) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise _too_big(policy.max_bytes)
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise ImageError(f"could not fetch {url}: {e}") from e
    return b"".join(chunks)
