"""The command line: `caption` (resumable batch) and `chat` (terminal), run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

from minigpt4.config import PROJECT_ROOT


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minigpt4", *args],
        cwd=PROJECT_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_caption_writes_one_line_per_image_and_resumes(tmp_path, photo, red_square):
    out = tmp_path / "o.jsonl"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["caption", "--cfg-path", "eval_configs/minigpt4_tiny_random.yaml", "--greedy", "--out", str(out)]
    first = _run(*args, str(photo), str(red_square), str(broken))
    assert first.returncode == 1, first.stderr  # the broken one is reported …
    assert "broken.jpg: skipped" in first.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [rec["image"] for rec in lines] == [str(photo), str(red_square)]  # … and the batch went on
    assert all(rec["caption"] and rec["preset"] == "minigpt4_tiny_random" for rec in lines)
    again = _run(*args, str(photo), str(red_square))
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().splitlines()) == 2


def test_chat_streams_answers_and_takes_commands(photo, red_square):
    result = _run(
        "chat",
        "--cfg-path",
        "minigpt4_tiny_random",
        "--image",
        str(photo),
        "--greedy",
        stdin=f"What is this?\n/image {red_square}\n\n/image /no/such.png\nAnd now?\n/reset\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 2
    assert "image added: 2 in this conversation" in result.stdout
    assert "conversation cleared" in result.stdout
    assert "image file not found" in result.stderr


def test_unknown_command_and_help():
    assert _run("nope").returncode == 2
    help_ = _run("--help")
    assert help_.returncode == 0 and "caption" in help_.stdout and "train" in help_.stdout
