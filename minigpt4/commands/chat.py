"""`python -m minigpt4 chat --image IMG`: talk about an image in the terminal, answers streamed.

Type a question and press Enter. `/image PATH` adds another image, `/reset` starts over,
`/quit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import sys

from minigpt4.commands.common import add_generation_args, add_model_args, chat_from_args, params_from_args
from minigpt4.errors import InputError

HELP = "commands: /image PATH (add an image), /reset (start over), /quit"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minigpt4 chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", action="append", default=[], help="an image to talk about (repeatable)")
    add_model_args(parser)
    add_generation_args(parser)
    args = parser.parse_args(argv)

    chat = chat_from_args(args)
    params = params_from_args(chat, args)
    session = chat.new_session()
    for image in args.image:
        try:
            chat.upload_image(session, image)
        except InputError as exc:
            print(f"error: {image}: {exc}", file=sys.stderr)
            return 1
    print(f"{chat.preset_name} on {chat.device} · {session.n_images} image(s) · {HELP}")
    while True:
        try:
            line = input("You: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset(session)
            print("(conversation cleared)")
            continue
        try:
            if line.startswith("/image"):
                chat.upload_image(session, line.removeprefix("/image").strip())
                print(f"(image added: {session.n_images} in this conversation)")
                continue
            chat.ask(session, line)
            print("Assistant: ", end="", flush=True)
            for piece in chat.stream_answer(session, params):
                print(piece, end="", flush=True)
            print()
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(stopped)")
