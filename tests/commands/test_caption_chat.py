"""The command line: `caption` (resumable batch) and `chat` (terminal), run as real subprocesses."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from minigpt4.commands.caption import main as caption_main
from minigpt4.commands.common import (
    add_generation_args,
    chat_from_args,
    check_generation_args,
    params_from_args,
)
from minigpt4.config import PROJECT_ROOT, load_preset
from minigpt4.generation import GenerationParams


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


def test_caption_stdout_carries_only_json_lines_and_progress_goes_to_stderr(photo, red_square):
    result = _run(
        "caption", "--cfg-path", "minigpt4_tiny_random", "--greedy", "--threads", "1", str(photo), str(red_square)
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(photo), str(red_square)]
    assert "2/2" in result.stderr  # tqdm, one step per image, even when stderr is not a terminal


def test_text_printed_while_the_model_loads_goes_to_stderr(monkeypatch, capsys):
    """The efficientnet package prints "Loaded pretrained weights …" on stdout while the lite preset loads."""

    def noisy_load_chat(*args, **kwargs):
        print("Loaded pretrained weights for efficientnet-lite0")
        return "chat"

    monkeypatch.setattr("minigpt4.chat.load_chat", noisy_load_chat)
    args = argparse.Namespace(cfg_path=None, device=None, options=[], threads=None)
    assert chat_from_args(args) == "chat"
    out, err = capsys.readouterr()
    assert out == "" and "Loaded pretrained weights" in err


def test_chat_refuses_unknown_commands_and_questions_after_reset(photo, red_square):
    result = _run(
        "chat", "--cfg-path", "minigpt4_tiny_random", "--image", str(photo), "--greedy", "--threads", "1",
        stdin=f"/imagine a cat\n/reset\nWhat is this?\n/image {red_square}\nAnd now?\n/help\n/quit\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "unknown command /imagine" in result.stderr and "/image PATH" in result.stderr
    assert "no image in this conversation: add one with /image PATH" in result.stderr
    assert result.stdout.count("Assistant: ") == 1  # only the question asked about the new image
    assert "/reset" in result.stdout  # /help lists the commands


@pytest.mark.parametrize("preset_samples", [False, True])
def test_sampling_flags_need_sampling(preset_samples: bool, capsys):
    """--temperature/--top-p are refused where decoding is greedy (the preset's or --greedy); --sample enables them."""
    preset = "minigpt4_tiny_random" if preset_samples else "minigpt4_lite"
    greedy = ["--greedy"] if preset_samples else []
    with pytest.raises(SystemExit) as exit_:
        caption_main(["x.jpg", "--cfg-path", preset, *greedy, "--temperature", "0.7"])
    assert exit_.value.code == 2
    assert "--temperature has no effect without sampling" in capsys.readouterr().err

    parser = argparse.ArgumentParser()
    add_generation_args(parser)
    args = parser.parse_args(["--sample", "--temperature", "0.7"])
    cfg = load_preset(preset)
    check_generation_args(parser, args, cfg)  # accepted
    chat = SimpleNamespace(defaults=GenerationParams(do_sample=preset_samples))
    params = params_from_args(chat, args)
    assert params.do_sample and params.temperature == 0.7
    assert not params_from_args(chat, parser.parse_args(["--greedy"])).do_sample


def test_command_line_modules_import_neither_gradio_nor_torch():
    """`--help` of caption/chat/serve stays quick, and `import app` leaves torch to the model load."""
    code = (
        "import sys, minigpt4.__main__, minigpt4.commands.caption, minigpt4.commands.chat, app\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "import minigpt4.serve.cli\n"
        "sys.exit(f'{heavy} gradio={\"gradio\" in sys.modules}')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.stderr.strip() == "[] gradio=True", result.stderr  # gradio: only through `app`
    code = "import sys, minigpt4.commands.caption, minigpt4.commands.chat, minigpt4.serve.cli; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT).returncode == 0
