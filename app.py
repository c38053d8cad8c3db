"""Start the MiniGPT-4 web app: `python app.py [--cfg-path PRESET] [--host H] [--port P] [--share] [--device D]`.

With no `--cfg-path` it serves the preset named by the MINIGPT4_PRESET environment variable, or else
the embedded offline default (`minigpt4_lite`). A Hugging Face Space sets MINIGPT4_PRESET=minigpt4_space.
"""

from __future__ import annotations

import argparse
import logging
import os

PRESET_ENV = "MINIGPT4_PRESET"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MiniGPT-4 web app (Gradio)")
    parser.add_argument(
        "--cfg-path",
        default=os.environ.get(PRESET_ENV) or None,
        help=f"preset name in eval_configs/ or a YAML path (default: ${PRESET_ENV}, else the embedded default)",
    )
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
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Load the preset's model into a Chat engine and serve the app until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported after parsing so that `--help` and argument errors answer at once.
    from demo import launch
    from minigpt4.chat import load_chat
    from minigpt4.errors import ConfigError

    try:
        chat = load_chat(args.cfg_path, device=args.device)
    except ConfigError as error:
        parser.error(str(error))
    launch(chat, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    main()
