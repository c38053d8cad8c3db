"""Batch jobs over several processes (`minigpt4.commands.ranks`): shares, parts, markers, merge;
and `caption`, `eval`, `curate generate` and `curate refine` under torchrun with two processes on
this CPU, against the same job in one process; one rank killed mid-run, then the job re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from curate_helpers import GOOD_TEXT, make_images, write_jsonl
from PIL import Image

from minigpt4.commands.ranks import Rank, RankedJsonl, job_digest, read_rows
from minigpt4.curate.records import WorkDir
from minigpt4.eval import evalset

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--cfg-path", "minigpt4_tiny_random", "--threads", "1"]
TIMEOUT_S = 240


# --- the machinery, in one process -------------------------------------------------------------


def _key(row: dict) -> int:
    return row["i"]


def test_shares_are_disjoint_deterministic_and_cover_the_inputs() -> None:
    items = list(range(23))
    shares = [Rank(r, 4).share(items) for r in range(4)]
    assert sorted(sum(shares, [])) == items
    assert [len(s) for s in shares] == [6, 6, 6, 5]
    assert shares == [Rank(r, 4).share(items) for r in range(4)]


def test_rank_comes_from_torchruns_environment(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Rank.from_env() == Rank(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="outside WORLD_SIZE=4"):
        Rank.from_env()


def _run_rank(out: Path, rank: Rank, items: list[int], job: str, stop_after: int | None = None) -> None:
    """A job writing {"i", "sq"} for its share; `stop_after` rows and it "crashes" (no marker)."""
    ranked = RankedJsonl(out, rank, _key, job)
    done = {_key(row) for row in read_rows(out)} | ranked.done_keys()
    todo = [i for i in rank.share(items) if i not in done]

    class Crash(Exception):
        pass

    try:
        with ranked.rows(len(items), "squaring", "row") as sink:
            for n, i in enumerate(todo):
                if stop_after is not None and n == stop_after:
                    raise Crash
                sink.write({"i": i, "sq": i * i})
                sink.advance()
    except Crash:
        return
    if rank.main:
        ranked.merge(items)


def test_two_ranks_merge_into_what_one_writes_and_a_crashed_rank_redoes_only_its_rest(tmp_path: Path) -> None:
    items = list(range(11))
    one = tmp_path / "one.jsonl"
    _run_rank(one, Rank(), items, "job")
    two = tmp_path / "two.jsonl"
    _run_rank(two, Rank(1, 2), items, "job", stop_after=2)  # rank 1 dies after 2 of its 5 rows
    assert len(list(read_rows(RankedJsonl(two, Rank(1, 2), _key, "job").part()))) == 2
    # The re-run: rank 1 first (it redoes 3 rows), then rank 0, which waits for it and merges.
    _run_rank(two, Rank(1, 2), items, "job")
    _run_rank(two, Rank(0, 2), items, "job")
    assert two.read_text() == one.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"], "parts are removed"


def test_rank_0_waits_for_the_markers_of_this_job_only(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    items = list(range(6))
    stale = RankedJsonl(out, Rank(1, 2), _key, "old-job")
    stale.part().write_text("")
    stale.part().with_name(stale.part().name + ".done").write_text("old-job")  # a marker of another job
    main = threading.Thread(target=_run_rank, args=(out, Rank(0, 2), items, "new-job"))
    main.start()
    time.sleep(1.5)
    assert main.is_alive() and not out.exists(), "rank 0 must not merge on an old job's marker"
    _run_rank(out, Rank(1, 2), items, "new-job")
    main.join(timeout=10)
    assert [row["i"] for row in read_rows(out)] == items


def test_parts_of_a_run_with_another_process_count_are_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    items = list(range(8))
    _run_rank(out, Rank(1, 4), items, "job-on-4")  # one of four ranks finished, then the job was stopped
    _run_rank(out, Rank(), items, "job-alone")  # resumed alone: rank 1's rows are kept, not redone
    assert [row["i"] for row in read_rows(out)] == items
    assert list(tmp_path.iterdir()) == [out]


def test_job_digest_depends_on_every_part() -> None:
    assert job_digest(["a"], 2) == job_digest(["a"], 2)
    assert len({job_digest(["a"], 2), job_digest(["b"], 2), job_digest(["a"], 3)}) == 3


# --- the commands under torchrun ---------------------------------------------------------------


def _env(mark: str = "") -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MINIGPT4_TEST_RUN": mark}


def _run(args: list[str], processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cmd = [*(launcher if processes > 1 else [sys.executable]), "-m", "minigpt4", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (25 * i % 256, 100, 200 - 10 * i)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.mark.slow
def test_caption_on_two_processes_writes_what_one_process_writes(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", 7)
    caption = ["caption", str(images), *TINY, "--greedy", "--max-new-tokens", "6"]
    _run([*caption, "--out", str(tmp_path / "one.jsonl")], 1)
    two = _run([*caption, "--out", str(tmp_path / "two.jsonl")], 2)
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 7
    assert "rank 0/2: 4 images of its share" in two.stderr and "rank 1/2: 3 images of its share" in two.stderr
    assert "images/s" in two.stderr and "captioning (all 2 ranks)" in two.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "one.jsonl", "two.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pope", "followup"])
def test_eval_on_two_processes_scores_the_merged_answers_once(tmp_path: Path, task: str) -> None:
    data = tmp_path / "evalset"
    evalset.write_eval_set(data, n_scenes=3, seed=2, photos=False)
    args = ["eval", *TINY, "--task", task, "--data", str(data), "--batch-size", "2", "--no-meteor"]
    _run([*args, "--out", str(tmp_path / "one.json")], 1)
    two = _run([*args, "--out", str(tmp_path / "two.json")], 2)
    one, both = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert both["predictions"] == one["predictions"] and both["metrics"] == one["metrics"]
    assert both["n"] == one["n"] > 2
    assert two.stdout.count(f"{task} on ") == 1, "only the first process reports"
    assert not list(tmp_path.glob("*.answers.jsonl*"))


@pytest.mark.slow
def test_curate_generate_and_refine_on_two_processes(tmp_path: Path) -> None:
    from curate_helpers import save_tiny_chat_model

    make_images(tmp_path / "images", 5)
    rows = {}
    for processes in (1, 2):
        work = tmp_path / f"work{processes}"
        generate = ["curate", "generate", str(tmp_path / "images"), "--work", str(work), *TINY[:2]]
        _run([*generate, "--batch-size", "2", "--max-new-tokens", "6", "--min-words", "0"], processes)
        rows[processes] = [
            {k: v for k, v in r.items() if k != "seconds"} for r in read_rows(WorkDir(work).generate)
        ]
    assert rows[2] == rows[1] and len(rows[1]) == 5

    model = save_tiny_chat_model(tmp_path / "chat-model")
    words = GOOD_TEXT.lower().split()
    refined = {}
    for processes in (1, 2):
        work = WorkDir(tmp_path / f"refine{processes}")
        write_jsonl(work.generate, [
            {"image_id": f"img{i}", "image": "unused.jpg", "raw": " ".join(words[i : i + 5])} for i in range(5)
        ])  # fmt: skip
        refine = ["curate", "refine", "--work", str(work.root), "--local-model", str(model)]
        _run([*refine, "--max-tokens", "5", "--device", "cpu", "--batch-size", "2"], processes)
        refined[processes] = list(read_rows(work.refine))
    assert refined[2] == refined[1] and [r["image_id"] for r in refined[1]] == [f"img{i}" for i in range(5)]


def _kill_rank(mark: str, rank: int) -> bool:
    """SIGKILL the worker of `rank` started with `mark` in its environment (Linux: /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MINIGPT4_TEST_RUN={mark}".encode() in env and f"RANK={rank}".encode() in env:
            os.kill(int(entry.name), signal.SIGKILL)
            return True
    return False


@pytest.mark.slow
def test_a_killed_rank_costs_only_its_unfinished_rows(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", 60)
    out = tmp_path / "captions.jsonl"
    caption = ["caption", str(images), *TINY, "--greedy", "--max-new-tokens", "24", "--out", str(out)]
    mark = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "minigpt4", *caption]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(mark), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    part = RankedJsonl(out, Rank(1, 2), _key, "").part()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(list(read_rows(part))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (
                "the job ended before rank 1 wrote 3 rows"
            )
            time.sleep(0.01)
        assert _kill_rank(mark, 1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and not out.exists(), "a job with a dead rank does not merge"
    kept = len(list(read_rows(part)))
    assert 3 <= kept < 30
    again = _run(caption, 2)
    assert f"rank 1/2: {30 - kept} images of its share" in again.stderr  # only what rank 1 had not done
    _run([*caption[:-1], str(tmp_path / "alone.jsonl")], 1)
    assert out.read_text() == (tmp_path / "alone.jsonl").read_text()  # complete, each image once
