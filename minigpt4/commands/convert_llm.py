"""`python -m minigpt4 convert-llm HF_DIR`: a Hugging Face LLaMA checkpoint as a GGUF for llama.cpp.

By default the file goes into the user's cache, where a preset with `model.llm.runtime: llama_cpp`
and that checkpoint as `model.llm.pretrained` finds it (so it is converted once, before the app
starts); `--out` writes it anywhere. The path written is printed last.
"""

from __future__ import annotations

from pathlib import Path

from minigpt4.commands.common import CommandParser, fail
from minigpt4.errors import ConfigError

# As minigpt4.decode.convert_llm.OUTPUT_TYPES (not imported here: --help stays fast without torch).
OUTPUT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def build_parser() -> CommandParser:
    parser = CommandParser(prog="python -m minigpt4 convert-llm", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "hf_dir",
        type=Path,
        metavar="HF_DIR",
        help="the checkpoint's folder (config.json, tokenizer, weights)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE.gguf",
        help="the GGUF file to write (default: a file in the user's cache, "
        "$MINIGPT4_CACHE_DIR/gguf/ else ~/.cache/minigpt4/gguf/)",
    )
    parser.add_argument(
        "--weights",
        choices=OUTPUT_TYPES,
        default="f16",
        help="the weights' type: floats, or a llama.cpp quantisation made from the float16 file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minigpt4.decode.convert_llm import convert_llm, converted_llm  # noqa: PLC0415 (torch)

    try:
        if args.out is None:
            path = converted_llm(args.hf_dir, args.weights)
        else:
            path = convert_llm(args.hf_dir, args.out, args.weights)
    except ConfigError as e:
        fail(str(e))
    print(path)
    return 0
