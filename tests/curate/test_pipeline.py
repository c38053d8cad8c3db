"""The whole curation pipeline on 10 images: tiny model → chat-completions server → rules → review →
export → stage-2 training on the exported folder."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from curate_helpers import GOOD_TEXT, ChatCompletionsServer, make_images, read_records

from minigpt4.curate import main
from minigpt4.curate.records import WorkDir
from minigpt4.curate.review import ReviewStore
from minigpt4.data.loader import record_image, record_text
from minigpt4.data.stage2 import read_annotations
from minigpt4.train.loop import main as train_main


class StandInLLM:
    """A 'chat LLM' whose every third reply explains itself; the others are clean and name their input."""

    def __init__(self) -> None:
        self.replies = itertools.count()

    def __call__(self, paragraph: str) -> str:
        if next(self.replies) % 3 == 0:
            return "Here is the corrected paragraph: " + GOOD_TEXT
        return f"{GOOD_TEXT} The first description had {len(paragraph)} characters."


@pytest.mark.slow
def test_ten_images_from_folder_to_cc_sbu_align(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "images", 10)
    work = WorkDir(tmp_path / "work")
    args = ["--work", str(work.root)]
    model = ["--cfg-path", "minigpt4_tiny_random", "--device", "cpu", "--max-new-tokens", "12"]
    assert main(["generate", str(tmp_path / "images"), *args, *model, "--max-rounds", "2"]) == 0
    generated = read_records(work.generate)
    assert len(generated) == 10 and all(r["raw"] and 1 <= len(r["answers"]) <= 2 for r in generated)

    with ChatCompletionsServer(faults=["429", "500"], reply=StandInLLM()) as server:
        assert main(["refine", *args, "--base-url", server.url, "--backoff", "0.01"]) == 0
    refined = {r["image_id"]: r for r in read_records(work.refine)}
    chatty = {k for k, r in refined.items() if r["refined"].startswith("Here is")}
    assert len(refined) == 10 and len(chatty) == 4
    for image_id in refined.keys() - chatty:
        assert refined[image_id]["refined"].endswith(f"had {len(refined[image_id]['raw'])} characters.")

    assert main(["filter", *args]) == 0
    verdicts = {r["image_id"]: r for r in read_records(work.filter)}
    assert {k for k, v in verdicts.items() if not v["passed"]} == chatty
    assert all(verdicts[k]["reasons"] == ["explanation: 'Here is'"] for k in chatty)

    store = ReviewStore(work)
    to_review = store.view("undecided")
    assert len(to_review) == 10 - len(chatty)
    store.save(to_review[0], "rejected", store.text(to_review[0]))
    for image_id in to_review[1:]:
        store.save(image_id, "approved", store.text(image_id).replace("small brown dog", "small dog"))
    store.close()
    capsys.readouterr()

    out = tmp_path / "cc_sbu_align"
    assert main(["export", *args, "--out", str(out)]) == 0
    assert f"export: {len(to_review) - 1} image-text pairs" in capsys.readouterr().out
    records = read_annotations(out, "curated")  # as stage-2 training reads the folder
    assert [r["__key__"] for r in records] == to_review[1:]
    for record in records:
        assert "small dog" in record_text(record) and "brown" not in record_text(record)
        assert record_image(record, max_pixels=10**6).size == (64, 64)

    run = tmp_path / "run"
    assert train_main([
        "--cfg-path", "tiny_stage2", "--device", "cpu", "--options", f"data.sources=[{{name: curated, path: {out}}}]",
        f"run.output_dir={run}", "run.max_epoch=1", "run.iters_per_epoch=2", "run.batch_size=2",
    ]) == 0  # fmt: skip
    assert (run / "projection.safetensors").is_file()
