"""What the lite vision readout can name: its colour words (with their RGB centres) and its places.

The readout (`minigpt4/lite/vision.py`) owns these: its colour bins start as the nearest colour
word and its 3×3 grid cells as the place words. The scene generator (`minigpt4/data/scenes.py`)
draws with the same colours in the same places, so its captions use words the readout knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# The colours scenes are drawn in (and answers name).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}

# Further words a colour bin may start as (its centre's nearest named colour).
COLOUR_WORDS: dict[str, tuple[int, int, int]] = COLOURS | {
    "gray": (128, 128, 128),
    "cyan": (40, 200, 220),
    "pink": (240, 130, 200),
}

# Reading order: row by row, left to right. Index i is at row i // 3, column i % 3.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)


def nearest_colour(rgb: Iterable[float], palette: Mapping[str, tuple[int, int, int]] = COLOUR_WORDS) -> str:
    """The name in `palette` whose RGB centre is nearest to `rgb` (the first such name on a tie)."""
    rgb = tuple(float(x) for x in rgb)
    return min(palette, key=lambda name: sum((x - y) ** 2 for x, y in zip(rgb, palette[name], strict=True)))
