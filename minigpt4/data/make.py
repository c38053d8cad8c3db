"""The tiny training sets, in the layouts of the real data, from synthetic scenes.

  <out>/stage1/shapes/shard-0000N.tar      webdataset shards of jpg + json {"caption": …}
  <out>/stage1/shapes_txt/shard-0000N.tar  webdataset shards of jpg + txt (a second source to mix)
  <out>/cc_sbu_align/filter_cap.json       {"annotations": [{"image_id", "caption"}]} + image/<id>.jpg
Every file is written to a temporary name and renamed, so an interrupted run leaves no half file.
`python -m minigpt4 make-data train` (minigpt4/commands/make_data.py) writes them.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from minigpt4.data import scenes
from minigpt4.files import write_atomic, write_bytes_atomic, write_text_atomic
from minigpt4.images import jpeg_bytes

log = logging.getLogger(__name__)


def write_shards(
    out_dir: Path,
    rng: random.Random,
    n_shards: int,
    per_shard: int,
    size: int = 224,
    text_ext: str = "json",
    caption: Callable[[scenes.Scene], str] = scenes.caption,
) -> list[Path]:
    """Scenes as webdataset shards; `caption(scene)` goes in `json` ({"caption": …}) or plain `txt`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in tqdm(range(n_shards), desc=f"shards {out_dir.name}", unit="shard"):
        path = out_dir / f"shard-{shard:05d}.tar"

        def write(tmp: Path, shard: int = shard) -> None:
            with wds.TarWriter(str(tmp)) as sink:
                for i in range(per_shard):
                    scene = scenes.render_scene(rng, size=size)
                    text = caption(scene)
                    payload = json.dumps({"caption": text}) if text_ext == "json" else text
                    sink.write(
                        {"__key__": f"{shard:05d}{i:04d}", "jpg": jpeg_bytes(scene.image), text_ext: payload}
                    )

        write_atomic(path, write)
        paths.append(path)
    return paths


def write_cc_sbu_align(out_dir: Path, rng: random.Random, n: int, size: int) -> Path:
    """Scenes with detailed descriptions in the `cc_sbu_align` layout of stage 2."""
    image_dir = out_dir / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations = []
    for i in tqdm(range(n), desc="cc_sbu_align", unit="image"):
        scene = scenes.render_scene(rng, size=size)
        image_id = f"{i:05d}"
        write_bytes_atomic(image_dir / f"{image_id}.jpg", jpeg_bytes(scene.image))
        annotations.append({"image_id": image_id, "caption": scenes.describe(scene)})
    path = out_dir / "filter_cap.json"
    write_text_atomic(path, json.dumps({"annotations": annotations}, indent=1))
    return path
