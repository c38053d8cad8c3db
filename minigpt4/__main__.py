"""`python -m minigpt4 <command> …`: one entry point for every tool of the project.

Each command lives in its own module with a `main(argv) -> int`; modules are imported only when
their command runs, so `python -m minigpt4 --help` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("minigpt4.commands.chat", "interactive chat about an image in the terminal"),
    "caption": ("minigpt4.commands.caption", "describe many images; one JSON line per image"),
    "train": ("minigpt4.train.loop", "stage-1 / stage-2 training of the projection"),
    "plot": ("minigpt4.train.plot", "draw a run's loss and learning-rate curves (metrics.svg)"),
    "cache-features": ("minigpt4.train.features", "pre-compute the frozen vision features of a data set"),
    "make-data": ("minigpt4.commands.make_data", "generate the offline training and evaluation sets"),
    "eval": ("minigpt4.eval.run", "caption / VQA / POPE metrics on a data set"),
    "bench": ("minigpt4.eval.bench", "speed benchmarks (inference; `bench train` for training)"),
    "curate": ("minigpt4.curate", "stage-2 data curation: generate, refine, filter, review, export"),
    "serve": ("minigpt4.serve", "OpenAI-compatible HTTP API"),
    "convert-llm": (
        "minigpt4.commands.convert_llm",
        "convert a Hugging Face LLaMA-family LLM to a (quantised) GGUF for llama.cpp",
    ),
}


def _usage() -> str:
    lines = ["usage: python -m minigpt4 <command> [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m minigpt4 <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
