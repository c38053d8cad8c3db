"""Training in real processes: two-process data parallelism on the CPU, and a run killed mid-way."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt4.train import checkpoints
from minigpt4.train.loop import FINAL_WEIGHTS, train

pytest_plugins = ["train_helpers"]  # fixtures: tiny_data, tiny_config, one_thread
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]
SHORT = ("run.max_epoch=1", "run.warmup_steps=2", "run.log_every=1")
TIMEOUT_S = 180  # a healthy 3-step run takes 25 s here
HUNG = f"[no exit within {TIMEOUT_S} s]"


def _sources(tiny_data: Path) -> str:
    return (
        f"data.sources=[{{name: shapes, path: '{tiny_data}/stage1/shapes', ratio: 115}}, "
        f"{{name: shapes_txt, path: '{tiny_data}/stage1/shapes_txt', ratio: 14}}]"
    )


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _kill_marked(mark: str) -> None:
    """SIGKILL every process whose environment holds `mark` (Linux: read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone already, or not ours to read
            continue


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "minigpt4",
        "train",
        *args,
    ]
    # Its own process group, and a mark in the environment of every process it starts: on a timeout
    # the workers go too, even one that runs in a session of its own and has outlived the launcher
    # (it would hold the output pipes open, and reading them to the end would wait forever).
    mark = f"MINIGPT4_TEST_RUN={uuid.uuid4().hex}"
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**_env(), "MINIGPT4_TEST_RUN": mark.split("=")[1]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_marked(mark)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -signal.SIGKILL, out, f"{err}\n{HUNG}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_processes_read_their_own_shards_and_train_like_one_process(tiny_data, tiny_config, tmp_path):
    steps = ("run.iters_per_epoch=3",)
    args = [
        "--cfg-path",
        "train_configs/tiny_stage1.yaml",
        "--options",
        _sources(tiny_data),
        *SHORT,
        *steps,
        "run.batch_size=4",
    ]
    proc = _torchrun([*args, f"run.output_dir={tmp_path / 'two'}"])
    if proc.returncode != 0 and ("SIGABRT" in proc.stderr or HUNG in proc.stderr):
        # gloo teardown aborts about one run in 20 on this machine, and once in a while a
        # rank never exits (seen once in ~40 runs); one retry absorbs either.
        proc = _torchrun([*args, f"run.output_dir={tmp_path / 'two-again'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    two = tmp_path / ("two" if (tmp_path / "two" / FINAL_WEIGHTS).exists() else "two-again")

    reads = dict(re.findall(r"process (\d) of 2 reads (.+)", out))
    assert reads == {"0": "shapes/shard-00000.tar, shapes/shard-00002.tar, shapes_txt/shard-00000.tar",
                     "1": "shapes/shard-00001.tar, shapes/shard-00003.tar, shapes_txt/shard-00001.tar"}  # fmt: skip
    assert "the trained weights are identical on all 2 processes" in out

    one = train(tiny_config(1, tmp_path / "one", *SHORT, *steps, "run.batch_size=8"))
    a, b = load_file(str(one.weights)), load_file(str(two / FINAL_WEIGHTS))
    assert a.keys() == b.keys()
    for key in a:  # same global batch, same samples; only the order of summation differs
        torch.testing.assert_close(b[key], a[key], atol=5e-6, rtol=1e-5)


def test_a_killed_run_resumes_at_its_last_checkpoint_and_ends_as_if_never_stopped(
    tiny_data, tiny_config, tmp_path
):
    steps = ("run.iters_per_epoch=16", "run.batch_size=4", "run.save_every=1", "run.keep_checkpoints=3")
    killed = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "minigpt4", "train", "--cfg-path", "train_configs/tiny_stage1.yaml", "--options",
        _sources(tiny_data), *SHORT, *steps, f"run.output_dir={killed}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not checkpoints.step_dir(killed, 2).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 2"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    stopped_at = checkpoints.list_checkpoints(killed)[-1][0]
    assert 2 <= stopped_at < 16, stopped_at

    resumed = train(tiny_config(1, killed, *SHORT, *steps), resume="auto")
    assert resumed.step == 16 and len(resumed.losses) == 16 - stopped_at
    whole = train(tiny_config(1, tmp_path / "whole", *SHORT, *steps))
    assert resumed.losses == whole.losses[stopped_at:]
    a, b = load_file(str(whole.weights)), load_file(str(resumed.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
