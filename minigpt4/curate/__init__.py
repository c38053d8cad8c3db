"""Stage-2 data curation (DESIGN §5): `python -m minigpt4 curate generate|refine|filter|review|export`.

All steps share one work folder (`--work`) holding one JSONL file per step; each step reads the
previous step's file, skips what it already did, and appends as it goes, so any step can be
stopped and started again.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from minigpt4.curate.records import WorkDir
from minigpt4.errors import ConfigError, InputError

STEPS = {
    "generate": "describe each image with the stage-1 model (the paper's prompt, 'Continue' under 80 words)",
    "refine": "rewrite each description with a chat LLM (OpenAI-compatible API or a local model)",
    "filter": "rule checks with reasons; prints counts per reason",
    "review": "a web page to check, edit, approve or reject each record by hand",
    "export": "approved records → cc_sbu_align (filter_cap.json + image/{image_id}.jpg)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minigpt4 curate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, help_ in STEPS.items():
        sub = steps.add_parser(name, help=help_, description=help_)
        sub.add_argument("--work", required=True, type=Path, help="the work folder shared by all steps")
        importlib.import_module(f"minigpt4.curate.{name}").add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one curation step; a problem with the input is reported in one line with exit code 2."""
    args = build_parser().parse_args(argv)
    step = importlib.import_module(f"minigpt4.curate.{args.step}")
    try:
        return step.run(args, WorkDir(args.work))
    except (InputError, ConfigError) as e:
        print(f"curate {args.step}: error: {e}", file=sys.stderr)
        return 2
