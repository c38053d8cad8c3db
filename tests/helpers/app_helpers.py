"""Helpers shared by the app's tests: free ports, bad images, gradio_client conversations."""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from gradio_client import Client, handle_file

# Greedy decoding: answers are reproducible, so two conversations can be compared.
GREEDY = {"do_sample": False, "max_new_tokens": 12}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny, valid-looking PNG whose header claims `width`×`height` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


def converse(client: Client, image: Path, questions: Sequence[str]) -> list[str]:
    """Upload `image`, ask each question in turn (near-greedy decoding); the answers."""
    client.predict(handle_file(str(image)), api_name="/upload")
    return [client.predict(question, api_name="/ask", **GREEDY) for question in questions]
