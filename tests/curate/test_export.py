"""`curate export`: approved records → cc_sbu_align (filter_cap.json + image/{image_id}.jpg)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from curate_helpers import filtered_work, write_jsonl
from PIL import Image

from minigpt4.curate import main
from minigpt4.curate.records import WorkDir
from minigpt4.data.loader import record_image, record_text
from minigpt4.data.stage2 import read_annotations


def decide(work: WorkDir, image_id: str, decision: str | None, text: str) -> None:
    write_jsonl(work.review, [{"image_id": image_id, "decision": decision, "text": text, "time": 0}])


def export(work: WorkDir, out: Path, *extra: str) -> int:
    return main(["export", "--work", str(work.root), "--out", str(out), *extra])


def annotations(out: Path) -> dict[str, str]:
    data = json.loads((out / "filter_cap.json").read_text())
    return {a["image_id"]: a["caption"] for a in data["annotations"]}


def test_export_writes_the_approved_records_in_cc_sbu_align_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = filtered_work(tmp_path, 5, rejected_by_filter=("scene_04",))
    decide(work, "scene_00", "approved", "A red circle, edited by hand. ")
    decide(work, "scene_01", "approved", "A png image.")
    decide(work, "scene_02", "rejected", "Wrong.")
    decide(work, "scene_03", "approved", "First thought.")
    decide(work, "scene_03", "rejected", "Second thought.")
    decide(work, "scene_04", "approved", "  ")  # an emptied text is never exported
    out = tmp_path / "cc_sbu_align"
    assert export(work, out) == 0
    assert annotations(out) == {"scene_00": "A red circle, edited by hand.", "scene_01": "A png image."}
    records = read_annotations(out, "curated")  # what stage-2 training reads
    assert [(record_text(r), record_image(r, 10**6).size) for r in records] == [
        ("A red circle, edited by hand.", (64, 64)),
        ("A png image.", (64, 64)),
    ]
    assert sorted(p.name for p in (out / "image").iterdir()) == ["scene_00.jpg", "scene_01.jpg"]
    assert (out / "image" / "scene_00.jpg").read_bytes() == (
        tmp_path / "images" / "scene_00.jpg"
    ).read_bytes()
    with Image.open(out / "image" / "scene_01.jpg") as converted:
        assert converted.format == "JPEG" and converted.size == (64, 64)
    summary = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:6]}
    assert summary == {
        "generate": ["5", "5"], "refine": ["5", "5"], "filter": ["5", "4"], "review": ["4", "2"], "export": ["2", "2"]
    }  # fmt: skip


def test_include_undecided_skips_the_manual_check_but_not_the_filter(tmp_path: Path) -> None:
    work = filtered_work(tmp_path, 4, rejected_by_filter=("scene_03",))
    decide(work, "scene_00", "rejected", "No.")
    decide(work, "scene_01", None, "Edited, not yet decided.")
    out = tmp_path / "out"
    assert export(work, out, "--include-undecided") == 0
    captions = annotations(out)
    assert list(captions) == ["scene_01", "scene_02"]
    assert captions["scene_01"] == "Edited, not yet decided."
    assert captions["scene_02"].startswith("Refined: The image shows")


def test_nothing_approved_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = filtered_work(tmp_path, 2)
    assert export(work, tmp_path / "out") == 2
    assert "no records to export" in capsys.readouterr().err
    assert not (tmp_path / "out" / "filter_cap.json").exists()


def test_a_rerun_keeps_the_images_already_written_and_updates_the_captions(tmp_path: Path) -> None:
    work = filtered_work(tmp_path, 3)
    decide(work, "scene_00", "approved", "One.")
    out = tmp_path / "out"
    assert export(work, out) == 0
    first = out / "image" / "scene_00.jpg"
    first.write_bytes(b"kept as it is")  # marks the file: a rerun must not rewrite it
    (out / "image" / "scene_01.jpg.tmp").write_bytes(b"half a file from a killed run")
    decide(work, "scene_01", "approved", "Two.")
    assert export(work, out) == 0
    assert first.read_bytes() == b"kept as it is"
    assert annotations(out) == {"scene_00": "One.", "scene_01": "Two."}
    assert Image.open(out / "image" / "scene_01.jpg").format == "JPEG"


def test_unreadable_source_image_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = filtered_work(tmp_path, 1)
    decide(work, "scene_00", "approved", "One.")
    (tmp_path / "images" / "scene_00.jpg").write_bytes(b"not an image")
    assert export(work, tmp_path / "out") == 2
    assert "cannot export" in capsys.readouterr().err
    assert list((tmp_path / "out" / "image").iterdir()) == []
