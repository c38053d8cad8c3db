"""What a results file records about where its numbers came from: the code's commit, the data's digest."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from minigpt4.config import PROJECT_ROOT


def git_state(root: Path = PROJECT_ROOT) -> dict[str, str | bool | None]:
    """The checked-out commit and whether the tree has uncommitted changes (None outside a git tree)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
