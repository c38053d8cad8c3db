"""Example images for the app: scikit-image's sample photos, installed with the package (no downloads)."""

from __future__ import annotations

from pathlib import Path

import skimage.data

# (file in skimage.data, a question to ask about it)
EXAMPLES = (
    ("chelsea.png", "Describe this image in detail."),
    ("coffee.png", "What is in the cup, and how is it served?"),
    ("astronaut.png", "Who might this person be, and what are they wearing?"),
    ("rocket.jpg", "What is happening in this picture?"),
)


def example_rows() -> list[list[str]]:
    """`[image path, question]` rows for `gr.Examples`, for the sample photos that are installed."""
    folder = Path(skimage.data.data_dir)
    return [[str(folder / name), question] for name, question in EXAMPLES if (folder / name).is_file()]
