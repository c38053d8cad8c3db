"""Stage-2 data curation, the paper's five steps (docs/method.md §5): `python -m minigpt4 curate …`.

The steps: `generate`, `refine`, `filter`, `review`, `export`.

All steps share one work folder (`--work`) holding one JSONL file per step; each step reads the
previous step's file, skips what it already did, and appends as it goes, so any step can be
stopped and started again.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from minigpt4.commands.common import HelpFormatter
from minigpt4.curate.records import WorkDir
from minigpt4.errors import ConfigError, InputError

STEPS = {
    "generate": "describe each image with the stage-1 model (the paper's prompt, 'Continue' under 80 words)",
    "refine": "rewrite each description with a chat LLM (OpenAI-compatible API or a local model)",
    "filter": "rule checks with reasons; prints counts per reason",
    "review": "a web page to check, edit, approve or reject each record by hand",
    "export": "approved records → cc_sbu_align (filter_cap.json + image/{image_id}.jpg)",
}


def usage() -> str:
    lines = [
        "usage: python -m minigpt4 curate STEP --work DIR [options]",
        "",
        __doc__.strip(),
        "",
        "steps, in order:",
    ]
    lines += [f"  {name:<9} {help_}" for name, help_ in STEPS.items()]
    lines += ["", "`python -m minigpt4 curate STEP --help` describes each step."]
    return "\n".join(lines)


def step_parser(step: str) -> argparse.ArgumentParser:
    """The arguments of one step (only that step's module is imported: `generate` brings in torch)."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog=f"python -m minigpt4 curate {step}", description=STEPS[step]
    )
    parser.add_argument("--work", required=True, type=Path, help="the work folder shared by all steps")
    importlib.import_module(f"minigpt4.curate.{step}").add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one curation step; a problem with the input is reported in one line with exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    step = argv[0]
    if step not in STEPS:
        print(f"unknown step {step!r}\n\n{usage()}", file=sys.stderr)
        return 2
    args = step_parser(step).parse_args(argv[1:])
    try:
        return importlib.import_module(f"minigpt4.curate.{step}").run(args, WorkDir(args.work))
    except (InputError, ConfigError) as e:
        print(f"curate {step}: error: {e}", file=sys.stderr)
        return 2
