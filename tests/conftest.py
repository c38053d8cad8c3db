"""Shared fixtures: the tiny random preset (built in about a second, no downloads) and test images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TINY_PRESET = ROOT / "eval_configs" / "minigpt4_tiny_random.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_cfg_path() -> Path:
    return TINY_PRESET


@pytest.fixture(scope="session")
def tiny_chat():
    """A Chat on the tiny random preset, shared by the tests of a session (CPU)."""
    from minigpt4.chat import load_chat

    return load_chat(TINY_PRESET, device="cpu")


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A small RGB photo-like image on disk."""
    path = tmp_path / "photo.png"
    Image.radial_gradient("L").convert("RGB").resize((96, 64)).save(path)
    return path


@pytest.fixture
def red_square(tmp_path: Path) -> Path:
    path = tmp_path / "red.jpg"
    Image.new("RGB", (80, 80), (220, 20, 20)).save(path)
    return path
