"""Bad inputs through the command line and the app: each is refused with one clear message, never a traceback.

CLI: flags, presets, `--options` keys, devices, `--out`, prompts, checkpoints and images, on the tiny
random preset. The checks that stop a command before its model loads run in-process (quick); a few
of every kind run as real subprocesses, to show that no traceback reaches a user's terminal. Each
asserts the exit status (2: nothing was done; 1: `caption` skipped some images and said which), one
error line naming the flag, key or file, and no "Traceback".

App: through gradio_client, each bad upload or message gets a message naming the problem, and the
same client session answers the next good question.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from app_helpers import GREEDY, free_port, write_png_claiming
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import save_file

from demo import launch
from demo.examples import example_rows
from minigpt4.__main__ import main
from minigpt4.config import PROJECT_ROOT

TINY = ["--cfg-path", "minigpt4_tiny_random"]
CAT = Path(example_rows()[0][0])

# --- bad files ------------------------------------------------------------------------------------


def _garbage_pth(path: Path) -> None:
    path.write_bytes(b"garbage, not a checkpoint at all")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage_safetensors(path: Path) -> None:
    path.write_bytes(b"\xff" * 64)


def _wrong_shapes(path: Path) -> None:
    save_file({"llama_proj.weight": torch.zeros(3, 3), "llama_proj.bias": torch.zeros(3)}, str(path))


def _nan(path: Path) -> None:
    weight = torch.zeros(64, 32)
    weight[0, 0] = float("nan")
    save_file({"llama_proj.weight": weight, "llama_proj.bias": torch.zeros(64)}, str(path))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def _pickle_with_code(path: Path) -> None:
    path.write_bytes(pickle.dumps({"llama_proj.weight": _RunsCode()}))


def _truncated(path: Path) -> None:
    good = path.with_suffix(".full")
    torch.save({"llama_proj.weight": torch.zeros(64, 32), "llama_proj.bias": torch.zeros(64)}, good)
    path.write_bytes(good.read_bytes()[:200])


CHECKPOINTS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # name: (file name, writer, what the message must say besides the file name)
    "garbage_pth": ("proj.pth", _garbage_pth, "cannot read"),
    "empty_pth": ("proj.pth", _empty, "cannot read"),
    "garbage_safetensors": ("proj.safetensors", _garbage_safetensors, "cannot read"),
    "wrong_shapes": ("proj.safetensors", _wrong_shapes, "in the checkpoint but"),
    "nan": ("proj.safetensors", _nan, "NaN"),
    "pickle_with_code": ("proj.pth", _pickle_with_code, "cannot read"),
    "truncated_pth": ("proj.pth", _truncated, "cannot read"),
}


def _bad_images(folder: Path) -> dict[str, Path]:
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 then nothing a decoder can use")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.jpg"
    text.write_text("a text file renamed .jpg\n", encoding="utf-8")
    truncated = folder / "truncated.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "whole.png")
    truncated.write_bytes((folder / "whole.png").read_bytes()[:60])
    (folder / "whole.png").unlink()
    return {"corrupt": corrupt, "empty": empty, "text": text, "truncated": truncated}


# --- running the CLI --------------------------------------------------------------------------------


def _in_process(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def _subprocess(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "minigpt4", *argv],
        cwd=PROJECT_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return result.returncode, result.stdout, result.stderr


def _assert_refused(code: int, err: str, *names: str, status: int = 2) -> None:
    """Exit `status`, no traceback, and exactly one error line, which names everything in `names`."""
    assert code == status, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], errors[0]


# Refused before the model loads: (argv after the image, what the error line must name).
REFUSED_UP_FRONT = {
    "unknown_preset": (["--cfg-path", "no_such_preset"], ["no_such_preset"]),
    "preset_file_missing": (["--cfg-path", "missing/preset.yaml"], ["missing/preset.yaml"]),
    "unknown_options_key": ([*TINY, "--options", "generation.top_pp=1"], ["--options", "generation.top_pp"]),
    "unknown_options_section": ([*TINY, "--options", "model.llm.dtypo=x"], ["--options", "model.llm.dtypo"]),
    "options_value_out_of_range": ([*TINY, "--options", "generation.top_p=2"], ["--options", "top_p"]),
    "options_wrong_type": ([*TINY, "--options", "generation.num_beams=many"], ["--options", "num_beams"]),
    "options_not_key_value": ([*TINY, "--options", "generation"], ["--options", "key.sub=value"]),
    "options_missing_checkpoint": (
        [*TINY, "--options", "model.projection.checkpoint=/no/such/proj.pth"],
        ["--options", "/no/such/proj.pth"],
    ),
    "device_unknown": ([*TINY, "--device", "tpu9"], ["--device tpu9"]),
    "num_beams_0": ([*TINY, "--num-beams", "0"], ["--num-beams"]),
    "num_beams_not_int": ([*TINY, "--num-beams", "two"], ["--num-beams"]),
    "temperature_negative": ([*TINY, "--temperature", "-1"], ["--temperature"]),
    "top_p_2": ([*TINY, "--top-p", "2"], ["--top-p"]),
    "max_new_tokens_0": ([*TINY, "--max-new-tokens", "0"], ["--max-new-tokens"]),
    "threads_0": ([*TINY, "--threads", "0"], ["--threads"]),
    "temperature_with_greedy": ([*TINY, "--greedy", "--temperature", "0.5"], ["--temperature", "--sample"]),
    "top_p_on_a_greedy_preset": (["--cfg-path", "minigpt4_lite", "--top-p", "0.5"], ["--top-p", "--sample"]),
    "greedy_and_sample": ([*TINY, "--greedy", "--sample"], ["--sample", "--greedy"]),
    "empty_prompt": ([*TINY, "--prompt", ""], ["--prompt"]),
    "blank_prompt": ([*TINY, "--prompt", " \n\t "], ["--prompt"]),
    "prompt_too_long": ([*TINY, "--prompt", "why? " * 5000], ["--prompt", "limit"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED_UP_FRONT))
def test_caption_refuses_before_loading(case: str, capsys, monkeypatch) -> None:
    argv, names = REFUSED_UP_FRONT[case]
    monkeypatch.setattr("minigpt4.chat.load_chat", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = _in_process(capsys, "caption", str(CAT), *argv)
    _assert_refused(code, err, *names)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_one(capsys) -> None:
    code, _, err = _in_process(capsys, "caption", str(CAT), *TINY, "--device", "cuda")
    _assert_refused(code, err, "--device cuda", "no CUDA GPU")


def test_out_in_a_missing_folder_or_a_folder(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "out.jsonl"
    code, _, err = _in_process(capsys, "caption", str(CAT), *TINY, "--out", str(missing))
    _assert_refused(code, err, "--out", str(missing.parent))
    code, _, err = _in_process(capsys, "caption", str(CAT), *TINY, "--out", str(tmp_path))
    _assert_refused(code, err, "--out", "folder")


def test_a_folder_without_images(capsys, tmp_path: Path) -> None:
    code, _, err = _in_process(capsys, "caption", str(tmp_path), *TINY)
    _assert_refused(code, err, "no image files", str(tmp_path))


def test_serve_refuses_before_loading(capsys) -> None:
    for argv, name in [
        (["--cfg-path", "no_such_preset"], "no_such_preset"),
        ([*TINY, "--options", "generation.top_pp=1"], "--options"),
        ([*TINY, "--device", "tpu9"], "--device tpu9"),
        ([*TINY, "--port", "70000"], "--port"),
    ]:
        code, _, err = _in_process(capsys, "serve", *argv)
        _assert_refused(code, err, name)


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_unusable_projection_checkpoint(case: str, capsys, tmp_path: Path) -> None:
    name, write, what = CHECKPOINTS[case]
    path = tmp_path / name
    write(path)
    option = f"model.projection.checkpoint={path}"
    code, out, err = _in_process(capsys, "caption", str(CAT), *TINY, "--options", option)
    _assert_refused(code, err, str(path), what)
    assert "this pickle runs code" not in out + err


def test_chat_with_an_image_that_is_not_one(capsys, tmp_path: Path) -> None:
    text = _bad_images(tmp_path)["text"]
    code, _, err = _in_process(capsys, "chat", *TINY, "--image", str(text))
    _assert_refused(code, err, "--image", str(text), "not an image")


# --- real subprocesses: what a terminal shows -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["caption", str(CAT), "--cfg-path", "no_such_preset"], ["no_such_preset"]),
        (["caption", str(CAT), *TINY, "--options", "generation.top_pp=1"], ["--options generation.top_pp=1"]),
        (["caption", str(CAT), *TINY, "--top-p", "2"], ["--top-p"]),
        (["chat", *TINY, "--image", "/no/such/image.png"], ["/no/such/image.png"]),
        (["serve", *TINY, "--device", "tpu9"], ["--device tpu9"]),
    ],
    ids=["unknown_preset", "options_key", "top_p", "chat_missing_image", "serve_device"],
)
def test_refused_in_a_subprocess(argv: list[str], names: list[str]) -> None:
    code, out, err = _subprocess(*argv)
    _assert_refused(code, err, *names)
    assert out == ""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["garbage_pth", "empty_pth", "garbage_safetensors", "wrong_shapes"])
def test_unusable_checkpoint_in_a_subprocess(case: str, tmp_path: Path) -> None:
    name, write, what = CHECKPOINTS[case]
    path = tmp_path / name
    write(path)
    code, out, err = _subprocess(
        "caption", str(CAT), *TINY, "--options", f"model.projection.checkpoint={path}"
    )
    _assert_refused(code, err, str(path), what)
    assert out == ""


@pytest.mark.slow
def test_caption_names_each_bad_image_and_goes_on(tmp_path: Path) -> None:
    bad = _bad_images(tmp_path)
    code, out, err = _subprocess("caption", *TINY, "--greedy", str(CAT), *map(str, bad.values()))
    assert code == 1 and "Traceback" not in err, err
    assert [line.count('"image"') for line in out.splitlines()] == [1]  # the one good image, as JSONL
    for path in bad.values():
        assert any(str(path) in line and "skipped" in line for line in err.splitlines()), (path, err)
    assert f"{len(bad)} of {len(bad) + 1} images could not be read" in err


@pytest.mark.slow
def test_chat_session_survives_bad_commands(tmp_path: Path) -> None:
    bad = _bad_images(tmp_path)
    lines = [
        "Before any image?",
        f"/image {bad['corrupt']}",
        f"/image {bad['empty']}",
        "/image",
        "/nonsense",
        f"/image {CAT}",
        "x" * 100_000,
        "What is this?",
        "/quit",
    ]
    code, out, err = _subprocess("chat", *TINY, "--greedy", stdin="\n".join(lines) + "\n")
    assert code == 0 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 6, err
    assert "no image" in errors[0] and str(bad["corrupt"]) not in errors[0]
    assert "unknown command /nonsense" in errors[4]
    assert "characters long" in errors[5]
    assert out.count("Assistant: ") == 1  # the good question, asked last


# --- the app ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_url(tiny_chat) -> Iterator[str]:
    demo = launch(tiny_chat, host="127.0.0.1", port=free_port(), share=False, block=False)
    yield demo.local_url
    demo.close()


def _upload(client: Client, path: Path) -> str:
    return client.predict(handle_file(str(path)), api_name="/upload")


def _ask(client: Client, message: str, **generation) -> str:
    return client.predict(message, api_name="/ask", **{**GREEDY, **generation})


# (needs an image uploaded first, the call, the message it must raise)
APP_CASES: dict[str, tuple[bool, Callable[[Client, dict[str, Path]], object], str]] = {
    "ask_before_upload": (False, lambda c, b: _ask(c, "What is this?"), "Upload an image first"),
    "upload_nothing": (False, lambda c, b: c.predict(None, api_name="/upload"), "No image was given"),
    "upload_corrupt": (False, lambda c, b: _upload(c, b["corrupt"]), "corrupt"),
    "upload_empty_file": (False, lambda c, b: _upload(c, b["empty"]), "empty"),
    "upload_text_renamed_jpg": (False, lambda c, b: _upload(c, b["text"]), "not an image"),
    "upload_truncated": (False, lambda c, b: _upload(c, b["truncated"]), "image"),
    "upload_bomb": (False, lambda c, b: _upload(c, b["bomb"]), "too many pixels"),
    "empty_message": (True, lambda c, b: _ask(c, ""), "empty"),
    "blank_message": (True, lambda c, b: _ask(c, " \n\t "), "empty"),
    "message_100k_chars": (True, lambda c, b: _ask(c, "x" * 100_000), "characters long"),
    # Gradio checks the sliders' ranges, which lie inside the engine's.
    "num_beams_0": (True, lambda c, b: _ask(c, "Why?", num_beams=0), "less than minimum value 1"),
    "max_new_tokens_0": (True, lambda c, b: _ask(c, "Why?", max_new_tokens=0), "less than minimum value 1"),
    "top_p_5": (True, lambda c, b: _ask(c, "Why?", do_sample=True, top_p=5), "greater than maximum value 1"),
    "temperature_0": (
        True,
        lambda c, b: _ask(c, "Why?", do_sample=True, temperature=0),
        "less than minimum value 0.1",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(APP_CASES))
def test_app_refuses_and_the_session_goes_on(case: str, app_url: str, tmp_path: Path) -> None:
    needs_image, call, message = APP_CASES[case]
    bad = {**_bad_images(tmp_path), "bomb": write_png_claiming(tmp_path / "bomb.png", 30_000, 30_000)}
    client = Client(app_url, verbose=False)
    if needs_image:
        assert "1 image" in _upload(client, CAT)
    with pytest.raises(AppError, match=message) as refused:
        call(client, bad)
    assert "Traceback" not in str(refused.value)
    if not needs_image:
        assert "1 image" in _upload(client, CAT)
    assert _ask(client, "What is in the picture?")  # the same session still answers


@pytest.mark.slow
def test_app_accepts_control_characters_and_emoji(app_url: str) -> None:
    client = Client(app_url, verbose=False)
    _upload(client, CAT)
    assert _ask(client, "What\x00 is\x07 this? 🐱 هذا")
    assert _ask(client, "And now?")
