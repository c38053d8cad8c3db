"""The work folder's JSONL files and the image sources of `curate generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
from curate_helpers import make_images

from minigpt4.curate.records import CurateError, JsonlWriter, latest_by_id, read_jsonl
from minigpt4.curate.sources import iter_source, safe_image_id


def test_a_write_cut_by_a_kill_is_dropped_and_the_next_record_starts_clean(tmp_path: Path) -> None:
    path = tmp_path / "step.jsonl"
    with JsonlWriter(path) as out:
        out.write({"image_id": "a", "text": "ok"})
    with path.open("ab") as f:
        f.write(b'{"image_id": "b", "te')  # the process died here
    assert [r["image_id"] for r in read_jsonl(path)] == ["a"]
    with JsonlWriter(path) as out:
        out.write({"image_id": "b", "text": "redone"})
    assert read_jsonl(path) == [{"image_id": "a", "text": "ok"}, {"image_id": "b", "text": "redone"}]


def test_damage_inside_the_file_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "step.jsonl"
    path.write_text('{"image_id": "a"}\nnot json\n{"image_id": "c"}\n')
    with pytest.raises(CurateError, match=r"step.jsonl:2 is not valid JSON"):
        read_jsonl(path)
    path.write_text('{"image_id": 3}\n')
    with pytest.raises(CurateError, match="string 'image_id'"):
        read_jsonl(path)


def test_records_are_on_disk_as_soon_as_written(tmp_path: Path) -> None:
    path = tmp_path / "step.jsonl"
    out = JsonlWriter(path)
    out.write({"image_id": "a"})
    assert json.loads(path.read_text()) == {"image_id": "a"}  # before close
    out.close()


def test_latest_record_of_an_id_wins_and_first_order_is_kept() -> None:
    latest = latest_by_id([{"image_id": "x", "v": 1}, {"image_id": "y", "v": 1}, {"image_id": "x", "v": 2}])
    assert list(latest) == ["x", "y"] and latest["x"]["v"] == 2


def test_folder_source_lists_images_recursively_with_file_safe_ids(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 3)
    make_images(tmp_path / "imgs" / "sub dir", 1)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    images, total = iter_source(str(tmp_path / "imgs"), tmp_path / "unpack")
    ids = [i.image_id for i in images]
    assert total == 4 and ids == ["scene_00", "scene_01", "scene_02", "sub_dir_scene_00"]


def test_folder_source_errors(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 1)
    (tmp_path / "a" / "scene_00.png").write_bytes((tmp_path / "a" / "scene_00.jpg").read_bytes())
    with pytest.raises(CurateError, match="both map to image id 'scene_00'"):
        iter_source(str(tmp_path / "a"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="no images"):
        iter_source(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(CurateError, match="neither a folder"):
        iter_source(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(CurateError):
        safe_image_id("///")


def test_webdataset_shards_yield_each_image_once_with_its_bytes(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 4)
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"{shard:03d}.tar")) as sink:
            for path in paths[shard * 2 : shard * 2 + 2]:
                sink.write(
                    {
                        "__key__": f"s{shard}/{path.stem}",
                        path.suffix[1:]: path.read_bytes(),
                        "json": {"caption": "x"},
                    }
                )
            sink.write({"__key__": "no_image", "json": {"caption": "x"}})
    for source in (str(tmp_path / "shards"), str(tmp_path / "shards" / "{000..001}.tar")):
        images, total = iter_source(source, tmp_path / "unpack")
        items = list(images)
        assert total is None
        assert [i.image_id for i in items] == ["s0_scene_00", "s0_scene_01", "s1_scene_02", "s1_scene_03"]
        assert [i.data for i in items] == [p.read_bytes() for p in paths]
        assert items[1].path == (tmp_path / "unpack" / "s0_scene_01.png").resolve()
    with pytest.raises(CurateError, match="shard not found"):
        list(iter_source(str(tmp_path / "shards" / "{000..002}.tar"), tmp_path)[0])
