"""`curate generate`: the paper's prompt, "Continue" under 80 words, and resuming without loss or repeats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from curate_helpers import make_images, read_records

from minigpt4.curate import main
from minigpt4.curate.generate import (
    CONTINUE_PROMPT,
    GENERATE_PROMPT,
    GenerateSettings,
    describe,
    describe_batch,
    generate,
)
from minigpt4.curate.records import CurateError, WorkDir, read_jsonl
from minigpt4.curate.sources import iter_source

ROOT = Path(__file__).resolve().parents[2]


class RecordingChat:
    """The tiny Chat, with every question it is asked recorded and an optional crash after n images."""

    def __init__(self, chat: Any, crash_after: int | None = None):
        self.chat = chat
        self.preset_name = chat.preset_name
        self.asked: list[str] = []
        self.uploads = 0
        self.crash_after = crash_after

    def new_session(self) -> Any:
        return self.chat.new_session()

    def upload_image(self, session: Any, image: Path) -> None:
        if self.uploads == self.crash_after:
            raise RuntimeError("simulated crash")
        self.uploads += 1
        self.chat.upload_image(session, image)

    def add_question(self, session: Any, text: str) -> None:
        self.asked.append(text)
        self.chat.add_question(session, text)

    def answer(self, session: Any, **overrides: Any) -> str:
        return self.chat.answer(session, **overrides)


def test_paper_prompt_then_continue_until_enough_words(tiny_chat: Any, red_square: Path) -> None:
    assert GENERATE_PROMPT == (
        "Describe this image in detail. Give as many details as possible. Say everything you see."
    )
    chat = RecordingChat(tiny_chat)
    for min_words, max_rounds in ((10_000, 3), (1, 3), (10_000, 1)):
        chat.asked.clear()
        answers = describe(
            chat, red_square, GenerateSettings(min_words, max_rounds, (("max_new_tokens", 12),))
        )
        words = [len(" ".join(answers[: i + 1]).split()) for i in range(len(answers))]
        assert all(w < min_words for w in words[:-1])  # "Continue" only while under the minimum
        assert len(answers) == max_rounds or words[-1] >= min_words
        assert chat.asked == [GENERATE_PROMPT] + [CONTINUE_PROMPT] * (len(answers) - 1)
    assert len(describe(chat, red_square, GenerateSettings(10_000, 3, (("max_new_tokens", 4),)))) == 3


def test_continue_is_asked_in_the_same_conversation(tiny_chat: Any, red_square: Path) -> None:
    sessions = []

    class KeepSession(RecordingChat):
        def new_session(self) -> Any:
            sessions.append(self.chat.new_session())
            return sessions[-1]

    answers = describe(
        KeepSession(tiny_chat), red_square, GenerateSettings(10_000, 2, (("max_new_tokens", 8),))
    )
    assert len(sessions) == 1 and sessions[0].n_images == 1
    assert [role for role, _ in sessions[0].history] == ["user", "assistant", "user", "assistant"]
    assert sessions[0].history[2][1] == CONTINUE_PROMPT
    assert [text.strip() for role, text in sessions[0].history if role == "assistant"] == answers


def test_batched_rounds_match_the_chat_greedily(tiny_chat: Any, tmp_path: Path) -> None:
    paths = make_images(tmp_path, 3)
    greedy = (("max_new_tokens", 8), ("do_sample", False))
    one_round = GenerateSettings(10_000, 1, greedy, batch_size=3)
    batched = describe_batch(tiny_chat, paths, one_round)
    assert batched == [describe(tiny_chat, path, GenerateSettings(10_000, 1, greedy)) for path in paths]
    assert [len(a) for a in describe_batch(tiny_chat, paths, GenerateSettings(10_000, 3, greedy, 3))] == [
        3,
        3,
        3,
    ]
    assert [len(a) for a in describe_batch(tiny_chat, paths, GenerateSettings(0, 3, greedy, 3))] == [1, 1, 1]
    with pytest.raises(CurateError, match="temperature needs batch size 1"):
        GenerateSettings(80, 3, (("temperature", 0.7),), batch_size=4)


def test_batched_generate_records_each_image_and_skips_the_unreadable(tiny_chat: Any, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    work = WorkDir(tmp_path / "work")
    images, total = iter_source(str(tmp_path / "imgs"), work.images)
    settings = GenerateSettings(10_000, 2, (("max_new_tokens", 6),), batch_size=3)
    assert generate(lambda: tiny_chat, images, work, settings, total) == {
        "already_done": 0, "described": 4, "errors": 1
    }  # fmt: skip
    records = {r["image_id"]: r for r in read_records(work.generate)}
    assert set(records) == {"broken", "scene_00", "scene_01", "scene_02", "scene_03"}
    assert "error" in records["broken"] and all(len(records[f"scene_0{i}"]["answers"]) == 2 for i in range(4))


def run_generate(chat: Any, source: Path, work: WorkDir, **kwargs: Any) -> dict[str, int]:
    images, total = iter_source(str(source), work.images)
    settings = GenerateSettings(1_000, 2, (("max_new_tokens", 6),))
    return generate(lambda: chat, images, work, settings, total=total, **kwargs)


def test_a_crashed_run_restarted_loses_and_repeats_nothing(tiny_chat: Any, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    work = WorkDir(tmp_path / "work")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_generate(RecordingChat(tiny_chat, crash_after=4), tmp_path / "imgs", work)
    first = read_records(work.generate)
    assert [r["image_id"] for r in first] == ["broken", "scene_00", "scene_01", "scene_02"]
    assert "error" in first[0] and "raw" not in first[0]

    chat = RecordingChat(tiny_chat)
    counts = run_generate(chat, tmp_path / "imgs", work)
    assert counts == {"already_done": 4, "described": 3, "errors": 0}
    assert chat.uploads == 3  # only the images not yet described
    records = read_records(work.generate)
    assert records[:4] == first
    assert [r["image_id"] for r in records] == ["broken", *(f"scene_{i:02d}" for i in range(6))]
    for record in records[1:]:
        assert record["raw"] == " ".join(a for a in record["answers"] if a)
        assert record["preset"] == "minigpt4_tiny_random" and record["words"] == len(record["raw"].split())
    assert run_generate(RecordingChat(tiny_chat), tmp_path / "imgs", work)["described"] == 0


def test_limit_and_shards_source(tiny_chat: Any, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 3)
    with wds.TarWriter(str(tmp_path / "000.tar")) as sink:
        for path in paths:
            sink.write({"__key__": path.stem, path.suffix[1:]: path.read_bytes()})
    work = WorkDir(tmp_path / "work")
    assert run_generate(tiny_chat, tmp_path / "000.tar", work, limit=2)["described"] == 2
    assert run_generate(tiny_chat, tmp_path / "000.tar", work)["described"] == 1
    records = read_records(work.generate)
    assert [Path(r["image"]).read_bytes() for r in records] == [p.read_bytes() for p in paths]
    assert all(Path(r["image"]).parent == work.images.resolve() for r in records)


def test_bad_arguments_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w")]) == 2
    assert "neither a folder of images nor webdataset shards" in capsys.readouterr().err
    make_images(tmp_path / "imgs", 1)
    assert (
        main(["generate", str(tmp_path / "imgs"), "--work", str(tmp_path / "w"), "--cfg-path", "no_such"])
        == 2
    )
    assert "no_such" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_rounds"):
        GenerateSettings(80, 0)


@pytest.mark.slow
def test_killed_generate_command_resumes_without_loss_or_repeats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "imgs", 8)
    work = tmp_path / "work"
    arguments = [
        "generate", str(tmp_path / "imgs"), "--work", str(work), "--cfg-path", "minigpt4_tiny_random",
        "--device", "cpu", "--min-words", "10000", "--max-rounds", "2", "--max-new-tokens", "12",
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "minigpt4", "curate", *arguments],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if len(read_jsonl(work / "generate.jsonl")) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "generate finished or failed before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    before = read_jsonl(work / "generate.jsonl")  # complete records; the kill may have cut the next one
    assert 2 <= len(before) < 8
    assert main(arguments) == 0  # the restart, in this process
    records = read_records(work / "generate.jsonl")
    assert sorted(r["image_id"] for r in records) == [f"scene_{i:02d}" for i in range(8)]
    assert records[: len(before)] == before
    assert f"{len(before)} already done" in capsys.readouterr().out
