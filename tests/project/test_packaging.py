"""The package installs as a command: its dependencies are the pinned ones, `minigpt4` runs anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _pins(name: str) -> list[str]:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_package_declares_the_pinned_requirements_and_a_console_script() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["dependencies"] == _pins("requirements.txt")
    assert project["optional-dependencies"]["test"] == _pins("requirements-test.txt")
    assert project["scripts"] == {"minigpt4": "minigpt4.__main__:main"}


def test_the_minigpt4_command_works_from_another_directory(tmp_path: Path) -> None:
    command = shutil.which("minigpt4")
    assert command, "no `minigpt4` command: setup.sh installs the package (pip install -e .)"
    shown = subprocess.run([command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "caption" in shown.stdout and "train" in shown.stdout
    # A command that reads the project's files (a preset by name, the eval set's photos) from elsewhere.
    made = subprocess.run(
        [command, "make-data", "eval", "--out", "ev", "--scenes", "2", "--no-photos"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "ev" / "instruct.jsonl").is_file()
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from minigpt4.config import resolve_preset; print(resolve_preset('minigpt4_lite'))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        found.returncode == 0 and Path(found.stdout.strip()) == ROOT / "eval_configs" / "minigpt4_lite.yaml"
    )
