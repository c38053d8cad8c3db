"""`curate refine` against a real chat-completions server on 127.0.0.1, and with a local model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from curate_helpers import (
    GOOD_TEXT,
    ChatCompletionsServer,
    generated_work,
    paragraph_of,
    read_records,
    write_jsonl,
)

from minigpt4.curate import main
from minigpt4.curate.records import WorkDir, read_jsonl
from minigpt4.curate.refine import REFINE_PROMPT, RetryPolicy


def refine(work: WorkDir, server: ChatCompletionsServer, *extra: str) -> int:
    return main([
        "refine", "--work", str(work.root), "--base-url", server.url, "--model", "test-model",
        "--api-key-env", "CURATE_TEST_KEY", "--timeout", "0.5", "--backoff", "0.01", *extra,
    ])  # fmt: skip


def refined_by_id(work: WorkDir) -> dict[str, dict]:
    records = read_records(work.refine)
    ids = [r["image_id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicated records: {ids}"
    return {r["image_id"]: r for r in records}


def test_refine_retries_500_429_and_timeout_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CURATE_TEST_KEY", "sk-test-123")
    work = generated_work(tmp_path, 6)
    raw = {r["image_id"]: r["raw"] for r in read_records(work.generate)}
    with ChatCompletionsServer(faults=["500", "429", "timeout"]) as server:
        assert refine(work, server, "--concurrency", "2") == 0
    records = refined_by_id(work)
    assert set(records) == set(raw)
    for image_id, record in records.items():
        assert record["raw"] == raw[image_id]
        assert record["refined"] == raw[image_id].upper()
        assert record["model"] == "test-model"
    assert sum(r["attempts"] for r in records.values()) == 6 + 3
    assert len(server.requests) == 6 + 3
    for body in server.requests:
        assert body["model"] == "test-model"
        assert body["messages"] == [{"role": "user", "content": f"{REFINE_PROMPT}\n\n{paragraph_of(body)}"}]
        assert paragraph_of(body) in raw.values()
    assert all(h["Authorization"] == "Bearer sk-test-123" for h in server.headers)


def test_paper_refine_prompt_is_sent_verbatim(tmp_path: Path) -> None:
    work = generated_work(tmp_path, 1)
    with ChatCompletionsServer() as server:
        assert refine(work, server) == 0
    content = server.requests[0]["messages"][0]["content"]
    assert content == (
        "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not English "
        "sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. Return directly the "
        "results without explanation. Return directly the input paragraph if it is already correct without "
        "explanation.\n\n" + read_records(work.generate)[0]["raw"]
    )
    assert "Authorization" not in server.headers[0]  # no key in the environment: none sent


def test_bad_key_stops_the_run_and_a_rerun_repeats_nothing(tmp_path: Path) -> None:
    work = generated_work(tmp_path, 5)
    with ChatCompletionsServer(faults=["ok", "ok", "401"]) as server:
        assert refine(work, server, "--concurrency", "1") == 2
    first = refined_by_id(work)
    assert len(first) == 2
    with ChatCompletionsServer() as server:
        assert refine(work, server) == 0
    assert len(server.requests) == 3
    records = refined_by_id(work)
    assert len(records) == 5
    assert all(records[k] == v for k, v in first.items())


def test_refused_item_is_recorded_and_retried_on_request(tmp_path: Path) -> None:
    work = generated_work(tmp_path, 3)
    with ChatCompletionsServer(faults=["400"]) as server:
        assert refine(work, server, "--concurrency", "1") == 0
    records = refined_by_id(work)
    failed = [k for k, r in records.items() if "error" in r]
    assert len(failed) == 1 and "HTTP 400" in records[failed[0]]["error"]
    with ChatCompletionsServer() as server:
        assert refine(work, server) == 0
        assert server.requests == []
        assert refine(work, server, "--retry-failed") == 0
        assert len(server.requests) == 1
    latest = {r["image_id"]: r for r in read_records(work.refine)}
    assert all("refined" in r for r in latest.values())


def test_item_out_of_retries_is_left_for_the_next_run(tmp_path: Path) -> None:
    work = generated_work(tmp_path, 3)
    with ChatCompletionsServer(faults=["500", "500"]) as server:
        assert refine(work, server, "--concurrency", "1", "--max-attempts", "2") == 1
    assert len(refined_by_id(work)) == 2
    with ChatCompletionsServer() as server:
        assert refine(work, server) == 0
    assert len(server.requests) == 1
    assert len(refined_by_id(work)) == 3


def test_a_dead_server_stops_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = generated_work(tmp_path, 8)
    with ChatCompletionsServer(faults=["500"] * 100) as server:
        assert refine(work, server, "--concurrency", "1", "--max-attempts", "1") == 2
    assert len(server.requests) == 5
    assert not work.refine.read_text()
    assert "is the server up?" in capsys.readouterr().err


def test_a_regenerated_description_is_refined_again(tmp_path: Path) -> None:
    work = generated_work(tmp_path, 3)
    with ChatCompletionsServer() as server:
        assert refine(work, server) == 0
        write_jsonl(
            work.generate, [{"image_id": "scene_01", "image": "x.png", "raw": "A new text.", "answers": []}]
        )
        assert refine(work, server) == 0
    assert len(server.requests) == 4
    latest = {r["image_id"]: r for r in read_records(work.refine)}
    assert latest["scene_01"]["refined"] == "A NEW TEXT."


def test_retry_delay_doubles_is_capped_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=10, backoff_s=1.0, max_backoff_s=8.0)
    assert 0.5 <= policy.delay(1) <= 1.5
    assert 2.0 <= policy.delay(3) <= 6.0
    assert policy.delay(9) <= 12.0
    assert policy.delay(1, retry_after="3") == 3.0
    assert policy.delay(1, retry_after="999") == 8.0


def test_missing_inputs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ChatCompletionsServer() as server:
        assert refine(WorkDir(tmp_path), server) == 2
    assert "run `python -m minigpt4 curate generate` first" in capsys.readouterr().err
    work = generated_work(tmp_path, 1)
    assert main(["refine", "--work", str(work.root), "--local-model", str(tmp_path / "no_model")]) == 2
    assert "cannot load the chat model" in capsys.readouterr().err


def test_local_model_refines_in_batches_like_one_by_one(tmp_path: Path) -> None:
    from curate_helpers import save_tiny_chat_model

    from minigpt4.curate.refine import LocalChatModel, refine_messages

    folder = save_tiny_chat_model(tmp_path / "chat-model")
    work = WorkDir(tmp_path / "work")
    words = GOOD_TEXT.lower().split()
    write_jsonl(work.generate, [  # short texts in the model's vocabulary, so each reply depends on its text
        {"image_id": f"img{i}", "image": "unused.jpg", "raw": " ".join(words[i * 7 : i * 7 + 4 + i])} for i in range(3)
    ])  # fmt: skip
    assert main(["refine", "--work", str(work.root), "--local-model", str(folder), "--batch-size", "2",
                 "--max-tokens", "6", "--device", "cpu"]) == 0  # fmt: skip
    records = refined_by_id(work)
    assert set(records) == {"img0", "img1", "img2"}
    model = LocalChatModel(str(folder), device="cpu", max_new_tokens=6)
    for record in records.values():
        assert record["backend"] == "local" and record["model"] == str(folder)
        assert record["refined"] == model.complete_batch([refine_messages(record["raw"])])[0]
    assert len({r["refined"] for r in records.values()}) > 1  # each answer follows its own input


@pytest.mark.slow
def test_killed_refine_command_resumes_without_loss_or_repeats(tmp_path: Path) -> None:
    work = generated_work(tmp_path, 12)
    root = Path(__file__).resolve().parents[2]
    with ChatCompletionsServer(delay_s=0.3) as server:
        command = [
            sys.executable, "-m", "minigpt4", "curate", "refine", "--work", str(work.root),
            "--base-url", server.url, "--model", "m", "--concurrency", "3",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(root)}
        process = subprocess.Popen(
            command, cwd=root, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None and len(read_jsonl(work.refine)) < 3:
                time.sleep(0.02)
            assert process.poll() is None, "refine finished or failed before it could be killed"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        before = read_jsonl(work.refine)
        assert 3 <= len(before) < 12
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    records = read_records(work.refine)
    assert records[: len(before)] == before
    assert sorted(r["image_id"] for r in records) == [f"scene_{i:02d}" for i in range(12)]
    assert all(r["refined"] == r["raw"].upper() for r in records)
    assert f"{12 - len(before)} refined" in result.stdout


def test_facts_follow_the_paper_prompt_and_are_kept_with_the_record(tmp_path: Path) -> None:
    work = generated_work(tmp_path, 3)
    records = read_records(work.generate)
    known = {records[0]["image_id"]: "The image shows a red circle.", "elsewhere": "Not asked."}
    facts = tmp_path / "facts.jsonl"
    write_jsonl(facts, [{"image_id": k, "facts": v} for k, v in known.items()])
    with ChatCompletionsServer() as server:
        assert refine(work, server, "--facts", str(facts)) == 0
    contents = {paragraph_of(b): b["messages"][0]["content"] for b in server.requests}
    with_facts = contents[records[0]["raw"]]
    assert with_facts.startswith(REFINE_PROMPT + " ")  # the paper's prompt first, word for word
    assert "The image shows a red circle." in with_facts
    for record in records[1:]:  # images without facts get the paper's prompt alone
        assert contents[record["raw"]] == f"{REFINE_PROMPT}\n\n{record['raw']}"
    refined = refined_by_id(work)
    assert refined[records[0]["image_id"]]["facts"] == "The image shows a red circle."
    assert "facts" not in refined[records[1]["image_id"]]


def test_a_missing_or_malformed_facts_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = generated_work(tmp_path, 1)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"image_id": 3, "facts": "x"}])  # read_jsonl checks the id, read_facts the facts
    with ChatCompletionsServer() as server:
        assert refine(work, server, "--facts", str(tmp_path / "none.jsonl")) == 2
        assert refine(work, server, "--facts", str(bad)) == 2
        assert not server.requests
    err = capsys.readouterr().err
    assert "none.jsonl: no such file" in err and "bad.jsonl:1 is not a record with a string 'image_id'" in err


def test_a_facts_row_truth_is_kept_for_the_filter_and_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = generated_work(tmp_path, 2)
    records = read_records(work.generate)
    truth = {"objects": ["circle"], "colours": ["red", "gray"], "people": False, "animals": False}
    facts = tmp_path / "facts.jsonl"
    write_jsonl(
        facts,
        [{"image_id": records[0]["image_id"], "facts": "The image shows a red circle.", "truth": truth}],
    )
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"image_id": records[0]["image_id"], "facts": "x", "truth": {"objects": "circle"}}])
    with ChatCompletionsServer() as server:
        assert refine(work, server, "--facts", str(bad)) == 2
        assert not server.requests
        assert "bad.jsonl: row 1: truth needs objects and colours" in capsys.readouterr().err
        assert refine(work, server, "--facts", str(facts)) == 0
    refined = refined_by_id(work)
    assert refined[records[0]["image_id"]]["truth"] == truth
    assert "truth" not in refined[records[1]["image_id"]]
