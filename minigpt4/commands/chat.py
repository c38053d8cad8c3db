"""`python -m minigpt4 chat --image IMG`: talk about an image in the terminal, answers streamed.

Type a question and press Enter. Commands: `/image PATH` adds another image, `/reset` starts over
and forgets the images too (as the app's Restart does: questions are refused until `/image PATH`
adds one), `/help` lists the commands, `/quit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minigpt4.commands.common import (
    CommandParser,
    HelpFormatter,
    add_generation_args,
    add_model_args,
    add_threads_arg,
    chat_or_exit,
    check_generation_args,
    check_model_args,
    fail,
    params_from_args,
)
from minigpt4.errors import InputError

COMMANDS = {
    "/image PATH": "add an image to the conversation",
    "/reset": "start over: forget the conversation and its images",
    "/help": "list these commands",
    "/quit": "leave (also /exit or Ctrl-D)",
}
HELP = "commands: " + ", ".join(COMMANDS)
NO_IMAGE = "no image in this conversation: add one with /image PATH"


def _command_help() -> str:
    return "\n".join(f"  {name:<12} {what}" for name, what in COMMANDS.items())


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="python -m minigpt4 chat",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--image", action="append", default=[], help="an image to talk about (repeatable)")
    add_model_args(parser)
    add_threads_arg(parser)
    add_generation_args(parser)
    args = parser.parse_args(argv)
    for image in args.image:
        if not Path(image).is_file():
            parser.error(f"--image {image}: no such file")
    cfg = check_model_args(parser, args)
    check_generation_args(parser, args, cfg)

    chat = chat_or_exit(args)
    params = params_from_args(chat, args)
    session = chat.new_session()
    for image in args.image:
        try:
            chat.upload_image(session, image)
        except InputError as exc:
            fail(f"--image {image}: {exc}")
    print(f"{chat.preset_name} on {chat.device} · {session.n_images} image(s) · {HELP}")
    while True:
        try:
            line = input("You: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            print(_command_help())
            continue
        if command == "/reset":
            chat.reset(session)
            print("(conversation cleared, images too: add one with /image PATH)")
            continue
        try:
            if command == "/image":
                if not rest.strip():
                    raise InputError("/image needs a path: /image PATH")
                chat.upload_image(session, rest.strip())
                print(f"(image added: {session.n_images} in this conversation)")
                continue
            if command.startswith("/"):
                print(f"error: unknown command {command}; {HELP}", file=sys.stderr)
                continue
            if session.n_images == 0:
                raise InputError(NO_IMAGE)
            chat.add_question(session, line)
            print("Assistant: ", end="", flush=True)
            for piece in chat.stream_answer(session, params):
                print(piece, end="", flush=True)
            print()
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(stopped)")
