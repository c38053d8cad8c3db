"""Arguments shared by the commands that load a preset and generate text."""

from __future__ import annotations

import argparse
from dataclasses import replace

from minigpt4.chat import Chat, load_chat
from minigpt4.config import DEFAULT_PRESET
from minigpt4.generation import GenerationParams


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg-path",
        default=None,
        help=f"preset name in eval_configs/ or a YAML path (default: {DEFAULT_PRESET})",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when present)")
    parser.add_argument(
        "--options",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override preset keys, e.g. generation.top_p=0.5",
    )


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (defaults: the preset's)")
    group.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-p", type=float)
    group.add_argument("--num-beams", type=int)
    group.add_argument("--max-new-tokens", type=int)


def chat_from_args(args: argparse.Namespace) -> Chat:
    return load_chat(args.cfg_path, device=args.device, overrides=args.options)


def params_from_args(chat: Chat, args: argparse.Namespace) -> GenerationParams:
    changes = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
    }
    params = replace(chat.defaults, **{k: v for k, v in changes.items() if v is not None})
    return replace(params, do_sample=False) if args.greedy else params
