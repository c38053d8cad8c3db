"""Command line of `python -m minigpt4 serve`: load a preset, then run the app under uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

import uvicorn

from minigpt4.commands.common import (
    CommandParser,
    add_allowed_hosts_arg,
    add_model_args,
    add_threads_arg,
    at_least,
    chat_or_exit,
    check_model_args,
    positive,
)
from minigpt4.hosts import AllowedHosts
from minigpt4.serve.app import create_app
from minigpt4.serve.messages import RequestLimits

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m minigpt4 serve",
        description="Serve a MiniGPT-4 preset over OpenAI's chat-completions API (POST /v1/chat/completions).",
    )
    add_model_args(parser)
    add_threads_arg(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)"
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer <key>' where <key> is the value of this environment variable",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=4,
        help="requests that may wait behind the running ones (as many as the preset decodes together); more get 429",
    )
    parser.add_argument(
        "--image-dir",
        type=Path,
        help="allow image_url to name files (paths or file:// URLs) under this folder",
    )
    parser.add_argument(
        "--allow-http-images",
        action="store_true",
        help="allow image_url to be an http(s) URL the server fetches (public addresses only)",
    )
    parser.add_argument(
        "--allow-private-images",
        action="store_true",
        help="with --allow-http-images, also fetch from loopback, private and link-local addresses "
        "(this machine and its network: only where every client may reach them)",
    )
    add_allowed_hosts_arg(parser)
    parser.add_argument(
        "--max-request-mb", type=float, help="largest request body (default: 4 images at the limit)"
    )
    limits = RequestLimits()
    parser.add_argument(
        "--max-messages",
        type=at_least(1),
        default=limits.max_messages,
        help="most messages per request (%(default)s)",
    )
    parser.add_argument(
        "--max-text-chars",
        type=at_least(1),
        default=limits.max_text_chars,
        help="most characters of text in all the messages of a request (%(default)s)",
    )
    parser.add_argument(
        "--max-images",
        type=at_least(1),
        default=limits.max_images,
        help="most images per request (%(default)s)",
    )
    parser.add_argument(
        "--image-timeout",
        type=positive(float),
        default=10.0,
        metavar="S",
        help="seconds an http(s) image may take to download, in all (%(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted."""
    parser = _parser()
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    if args.image_dir is not None and not args.image_dir.is_dir():
        parser.error(f"--image-dir {args.image_dir}: not a folder")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be in 0..65535")
    if args.max_queue < 0:
        parser.error(f"--max-queue {args.max_queue}: must be ≥ 0")
    if args.allow_private_images and not args.allow_http_images:
        parser.error("--allow-private-images needs --allow-http-images")
    if args.max_request_mb is not None and args.max_request_mb <= 0:
        parser.error(f"--max-request-mb {args.max_request_mb}: must be > 0")
    check_model_args(parser, args)
    if api_key is None and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)

    chat = chat_or_exit(args)
    app = create_app(
        chat,
        api_key=api_key,
        max_queue=args.max_queue,
        local_image_dir=args.image_dir,
        allow_http_images=args.allow_http_images,
        max_request_bytes=int(args.max_request_mb * 2**20) if args.max_request_mb else None,
        limits=RequestLimits(args.max_messages, args.max_text_chars, args.max_images),
        image_fetch_timeout_s=args.image_timeout,
        allow_private_images=args.allow_private_images,
        allowed_hosts=AllowedHosts.for_server(args.host, args.allowed_hosts),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
