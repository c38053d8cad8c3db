"""Where `curate generate` finds its images: a folder (searched recursively) or webdataset shards."""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minigpt4.curate.records import CurateError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SourceImage:
    """One image to describe. Shard samples carry their bytes, written to `path` when processed."""

    image_id: str
    path: Path
    data: bytes | None = None


def safe_image_id(name: str) -> str:
    """`name` made usable as a file name (`image/{image_id}.jpg`): path separators and odd characters → `_`."""
    image_id = _UNSAFE.sub("_", name).strip("._")
    if not image_id:
        raise CurateError(f"cannot make an image id from {name!r}")
    return image_id


def is_shard_source(source: str) -> bool:
    path = Path(source)
    if "{" in source or source.endswith(".tar"):
        return True
    return path.is_dir() and any(path.glob("*.tar")) and not list_folder(path, check=False)


def list_folder(folder: Path, check: bool = True) -> list[SourceImage]:
    """The images under `folder`, sorted; the id is the relative path without suffix, made file-safe."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    images: dict[str, SourceImage] = {}
    for path in paths:
        image_id = safe_image_id(str(path.relative_to(folder).with_suffix("")))
        if check and image_id in images:
            raise CurateError(
                f"{images[image_id].path} and {path} both map to image id {image_id!r}: rename one"
            )
        images[image_id] = SourceImage(image_id, path.resolve())
    return list(images.values())


def shard_urls(source: str) -> list[str]:
    """The shard files a source names: a folder of `.tar`, one `.tar`, or a brace/glob pattern."""
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    if "{" in source:
        from webdataset.shardlists import expand_urls

        return list(expand_urls(source))
    return sorted(glob.glob(source)) or [source]


def iter_shards(urls: list[str], unpack_dir: Path) -> Iterator[SourceImage]:
    """The image of each webdataset sample (`jpg`, `jpeg`, `png` or `webp`); the id is the sample key.

    Unreadable samples are skipped with a warning by webdataset; a repeated key is skipped with one here.
    """
    import webdataset as wds

    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise CurateError(f"shard not found: {missing[0]}")
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, handler=wds.warn_and_continue)
    seen: set[str] = set()
    for sample in dataset:
        suffix = next((s for s in ("jpg", "jpeg", "png", "webp") if s in sample), None)
        if suffix is None:
            log.warning("sample %s in %s has no image; skipped", sample["__key__"], sample.get("__url__"))
            continue
        image_id = safe_image_id(sample["__key__"])
        if image_id in seen:
            log.warning("sample key %s appears twice; the second one is skipped", image_id)
            continue
        seen.add(image_id)
        yield SourceImage(image_id, (unpack_dir / f"{image_id}.{suffix}").resolve(), sample[suffix])


def iter_source(source: str, unpack_dir: Path) -> tuple[Iterator[SourceImage], int | None]:
    """The images of `source` and their count when known without reading everything."""
    if is_shard_source(source):
        return iter_shards(shard_urls(source), unpack_dir), None
    folder = Path(source)
    if not folder.is_dir():
        raise CurateError(f"{source} is neither a folder of images nor webdataset shards")
    images = list_folder(folder)
    if not images:
        raise CurateError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return iter(images), len(images)
