"""`python -m minigpt4 serve` as a user runs it: a separate process, the tiny preset, an API key."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from minigpt4.serve import main

ROOT = Path(__file__).resolve().parents[2]


def test_an_unset_key_variable_is_refused_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.pop("MINIGPT4_UNSET_KEY", None)
    with pytest.raises(SystemExit) as caught:
        main(["--cfg-path", "minigpt4_tiny_random", "--api-key-env", "MINIGPT4_UNSET_KEY"])
    assert caught.value.code == 2
    assert "MINIGPT4_UNSET_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-messages", "--max-text-chars", "--max-images", "--image-timeout"])
def test_request_limits_must_be_positive(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--cfg-path", "minigpt4_tiny_random", flag, "0"])
    assert caught.value.code == 2
    assert f"argument {flag}: must be " in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_answers_with_the_key_and_refuses_without(tiny_cfg_path: Path) -> None:
    env = {**os.environ, "MINIGPT4_TEST_KEY": "s3cret"}
    command = [sys.executable, "-m", "minigpt4", "serve", "--cfg-path", str(tiny_cfg_path), "--port", "0"]
    command += ["--api-key-env", "MINIGPT4_TEST_KEY"]
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(server, lines), daemon=True).start()
    try:
        url = _started_url(lines, timeout_s=120)
        assert url.startswith("http://127.0.0.1:"), "the default bind address must be loopback"
        request = {
            "model": "minigpt4_tiny_random",
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 16,
        }
        reply = httpx.post(
            f"{url}/v1/chat/completions", json=request, headers={"Authorization": "Bearer s3cret"}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
        refused = httpx.post(f"{url}/v1/chat/completions", json=request)
        assert refused.status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=30)
    # uvicorn shuts down cleanly, then re-raises SIGTERM, so the exit status says nothing: read the log.
    assert "Application shutdown complete" in "".join(iter(lines.get, ""))


def _read_lines(process: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put("")  # the process closed its output


def _started_url(lines: queue.Queue[str], timeout_s: float) -> str:
    """The URL from uvicorn's 'running on' line (with --port 0 it names the port it picked)."""
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout_s)
        except queue.Empty:
            line = ""
        if not line:
            raise AssertionError("the server did not start:\n" + "".join(seen))
        seen.append(line)
        match = re.search(r"Uvicorn running on (http://\S+)", line)
        if match:
            return match.group(1)
