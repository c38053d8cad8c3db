"""Start the MiniGPT-4 web app: `python app.py [--cfg-path PRESET] [--host H] [--port P] [--share] [--device D]`.

With no `--cfg-path` it serves the preset named by the MINIGPT4_PRESET environment variable, or else
the embedded offline default (`minigpt4_lite`). A Hugging Face Space sets MINIGPT4_PRESET=minigpt4_space.
"""

from __future__ import annotations

import argparse
import logging
import os

from demo import launch
from minigpt4.commands.common import (
    CommandParser,
    add_allowed_hosts_arg,
    add_model_args,
    add_threads_arg,
    chat_or_exit,
    check_model_args,
)

PRESET_ENV = "MINIGPT4_PRESET"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        description=f"MiniGPT-4 web app (Gradio). With no --cfg-path: the preset ${PRESET_ENV} names, if set."
    )
    add_model_args(parser)
    add_threads_arg(parser)
    parser.set_defaults(cfg_path=os.environ.get(PRESET_ENV) or None)
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: the first free one from $GRADIO_SERVER_PORT, else from 7860)",
    )
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    add_allowed_hosts_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Load the preset's model into a Chat engine and serve the app until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up checks, a line each
    chat = chat_or_exit(args)
    demo = launch(
        chat, host=args.host, port=args.port, share=args.share, allowed_hosts=args.allowed_hosts, block=False
    )
    print(f"MiniGPT-4 ({chat.preset_name}) is running on {demo.local_url}", flush=True)
    if demo.share_url:
        print(f"public link (for 1 week): {demo.share_url}", flush=True)
    print("Press Ctrl+C to stop." + ("" if args.share else " (--share also serves it through a public link)"))
    demo.block_thread()


if __name__ == "__main__":
    main()
