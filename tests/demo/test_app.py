"""The app's named API, driven by gradio_client against a server on 127.0.0.1 (tiny random preset)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml
from app_helpers import converse, free_port, write_png_claiming
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app
from demo import build_demo, launch
from demo.examples import example_rows
from demo.handlers import THINKING, THINKING_MESSAGE, ChatHandlers
from minigpt4.config import load_preset

ROOT = Path(__file__).resolve().parents[2]
CAT = Path(example_rows()[0][0])  # scikit-image's chelsea.png
FIRST, SECOND = "Describe this image.", "What else do you see?"


@pytest.fixture(scope="module")
def app_url(tiny_chat) -> Iterator[str]:
    demo = launch(tiny_chat, host="127.0.0.1", port=free_port(), share=False, block=False)
    yield demo.local_url
    demo.close()


def client(url: str) -> Client:
    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def answers_one_by_one(app_url: str) -> tuple[list[str], list[str]]:
    """Two conversations about the same image, one after the other: [FIRST, SECOND] and [SECOND]."""
    return converse(client(app_url), CAT, [FIRST, SECOND]), converse(client(app_url), CAT, [SECOND])


def test_named_api_has_upload_ask_reset(app_url: str) -> None:
    endpoints = client(app_url).view_api(print_info=False, return_format="dict")["named_endpoints"]
    parameters = {name: [p["parameter_name"] for p in info["parameters"]] for name, info in endpoints.items()}
    assert parameters == {
        "/upload": ["image"],
        "/ask": ["message", "num_beams", "temperature", "top_p", "max_new_tokens", "do_sample"],
        "/reset": [],
    }


def test_answer_streams_piece_by_piece(app_url: str) -> None:
    chat = client(app_url)
    assert "1 image" in chat.predict(handle_file(str(CAT)), api_name="/upload")
    job = chat.submit(FIRST, api_name="/ask", do_sample=False, max_new_tokens=16)
    job.result()
    partial = job.outputs()
    assert len(partial) >= 2, partial
    assert all(later.startswith(earlier) for earlier, later in zip(partial, partial[1:], strict=False))
    assert partial[-1] == job.result() != ""


def test_second_turn_depends_on_the_first(answers_one_by_one) -> None:
    both, alone = answers_one_by_one
    assert all(both) and all(alone)
    assert both[1] != alone[0]


def test_two_clients_at_once_keep_separate_histories(app_url: str, answers_one_by_one) -> None:
    with ThreadPoolExecutor(2) as pool:
        both = pool.submit(converse, client(app_url), CAT, [FIRST, SECOND])
        alone = pool.submit(converse, client(app_url), CAT, [SECOND])
        assert (both.result(), alone.result()) == answers_one_by_one


def test_reset_clears_the_conversation(app_url: str, answers_one_by_one) -> None:
    chat = client(app_url)
    converse(chat, CAT, [FIRST])
    assert "restarted" in chat.predict(api_name="/reset")
    with pytest.raises(AppError, match="Upload an image first"):
        chat.predict(SECOND, api_name="/ask")
    assert converse(chat, CAT, [SECOND]) == answers_one_by_one[1]


def test_bad_input_is_refused_and_the_app_keeps_serving(app_url: str, tiny_chat, tmp_path: Path) -> None:
    chat = client(app_url)
    with pytest.raises(AppError, match="Upload an image first"):
        chat.predict(FIRST, api_name="/ask")
    with pytest.raises(AppError, match="No image was given"):
        chat.predict(None, api_name="/upload")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all")
    with pytest.raises(AppError, match="not an image"):
        chat.predict(handle_file(str(corrupt)), api_name="/upload")
    bomb = write_png_claiming(tmp_path / "bomb.png", 30_000, 30_000)
    with pytest.raises(AppError, match="too many pixels"):
        chat.predict(handle_file(str(bomb)), api_name="/upload")
    too_big = b"\0" * (tiny_chat.max_image_bytes + 1)  # the server refuses it before any handler runs
    response = httpx.post(f"{app_url}gradio_api/upload", files={"files": ("big.png", too_big)}, timeout=60)
    assert response.status_code == 413
    assert "1 image" in chat.predict(handle_file(str(CAT)), api_name="/upload")
    with pytest.raises(AppError, match="empty"):
        chat.predict("   ", api_name="/ask")
    assert chat.predict(FIRST, api_name="/ask", do_sample=False, max_new_tokens=4)


def test_stop_ends_the_answer_and_the_chat_goes_on(app_url: str) -> None:
    chat = client(app_url)
    chat.predict(handle_file(str(CAT)), api_name="/upload")
    job = chat.submit(FIRST, api_name="/ask", max_new_tokens=500)
    next(iter(job))  # the first piece has arrived: generation is under way
    job.cancel()
    assert len(job.outputs()) < 500
    assert chat.predict(SECOND, api_name="/ask", do_sample=False, max_new_tokens=4)


def test_app_arguments_default_to_localhost_and_the_default_preset(monkeypatch) -> None:
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv(app.PRESET_ENV, raising=False)
    args = app.build_parser().parse_args([])
    assert (args.cfg_path, args.host, args.port, args.share, args.device) == (
        None,
        "127.0.0.1",
        None,
        False,
        None,
    )


def test_app_arguments_follow_the_environment_unless_given(monkeypatch) -> None:
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv(app.PRESET_ENV, "minigpt4_space")
    args = app.build_parser().parse_args([])
    assert (args.cfg_path, args.host) == ("minigpt4_space", "0.0.0.0")
    args = app.build_parser().parse_args(["--cfg-path", "minigpt4_tiny_random", "--host", "127.0.0.1"])
    assert (args.cfg_path, args.host) == ("minigpt4_tiny_random", "127.0.0.1")


def test_app_names_an_unknown_preset(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        app.main(["--cfg-path", "no_such_preset"])
    assert exit_.value.code == 2
    assert "no_such_preset" in capsys.readouterr().err


@pytest.mark.slow
def test_a_normal_start_prints_only_where_the_app_runs() -> None:
    """No Gradio hint naming launch() arguments, no per-request httpx lines, no FutureWarning."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--cfg-path", "minigpt4_tiny_random", "--port", str(port), "--threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl+C" in line:
                break
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = "".join(lines)
    assert f"MiniGPT-4 (minigpt4_tiny_random) is running on http://127.0.0.1:{port}/" in out
    assert "--share also serves it" in out
    for noise in ("share=True", "launch()", "httpx", "Warning", "Traceback"):
        assert noise not in out, out


def test_space_front_matter_matches_the_project() -> None:
    front_matter = yaml.safe_load((ROOT / "README.md").read_text(encoding="utf-8").split("---")[1])
    pins = dict(
        line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    )
    assert front_matter["sdk"] == "gradio"
    assert front_matter["sdk_version"] == pins["gradio"]
    assert (ROOT / front_matter["app_file"]).is_file()


def test_space_preset_is_the_released_7b_model() -> None:
    no_download = ["model.projection.checkpoint=null"]
    space = load_preset("minigpt4_space", no_download)
    assert space.model == load_preset("minigpt4_vicuna0_7b", no_download).model
    assert space.model.llm.pretrained == "Vision-CAIR/vicuna-7b"


def test_demo_never_imports_torch() -> None:
    code = "import sys, demo; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _layout_paths(config: dict) -> dict[str, list[str]]:
    """elem_id → the types of the blocks around it, outermost first."""
    types = {comp["id"]: comp for comp in config["components"]}
    paths: dict[str, list[str]] = {}

    def walk(node: dict, around: list[str]) -> None:
        comp = types.get(node["id"], {})
        elem_id = comp.get("props", {}).get("elem_id")
        if elem_id:
            paths[elem_id] = around
        for child in node.get("children", []):
            walk(child, [*around, comp.get("type", "root")])

    walk(config["layout"], [])
    return paths


def test_sampling_sliders_are_enabled_only_by_the_sample_box_beside_them(tiny_chat) -> None:
    greedy_chat = copy.copy(tiny_chat)
    greedy_chat.defaults = replace(tiny_chat.defaults, do_sample=False)
    config = build_demo(greedy_chat).config
    by_elem = {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}
    sample, temperature, top_p = by_elem["sample"], by_elem["temperature"], by_elem["top-p"]
    assert sample["props"]["value"] is False
    assert temperature["props"]["interactive"] is False and top_p["props"]["interactive"] is False
    toggles = [d for d in config["dependencies"] if d["targets"] == [(sample["id"], "change")]]
    assert [sorted(d["outputs"]) for d in toggles] == [sorted([temperature["id"], top_p["id"]])]
    paths = _layout_paths(config)
    assert paths["sample"] == paths["temperature"] == paths["top-p"]  # side by side, in plain view
    assert "accordion" not in paths["sample"]
    on, off = (
        ChatHandlers(tiny_chat).sampling_controls(True),
        ChatHandlers(tiny_chat).sampling_controls(False),
    )
    assert [u["interactive"] for u in on] == [True, True] and [u["interactive"] for u in off] == [
        False,
        False,
    ]


def _picked(tmp_path: Path, monkeypatch, source: Path, name: str | None = None) -> Path:
    """`source` copied where Gradio puts a file a user picked (its upload folder)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    picked = tmp_path / "0123abcd" / (name or source.name)
    picked.parent.mkdir(exist_ok=True)
    shutil.copy(source, picked)
    return picked


GENERATION = (1, 1.0, 0.9, 4, False)  # beams, temperature, top_p, max new tokens, sample


def test_sending_with_an_image_in_the_box_uploads_it_first(tiny_chat, tmp_path: Path, monkeypatch) -> None:
    picked = _picked(tmp_path, monkeypatch, CAT)
    handlers = ChatHandlers(tiny_chat)
    box, question, history = handlers.show_question("What is it?", [])
    assert (box, question) == ("", "What is it?")
    assert history == [{"role": "user", "content": "What is it?"}, THINKING_MESSAGE]  # shown at once
    box, status, session, uploaded, slip = handlers.upload_pending({"path": str(picked)}, None)
    assert box is None and "1 image" in status and session.n_images == 1 and uploaded == str(picked)
    assert slip is None
    history = handlers.show_image(uploaded, history)  # the image goes before the waiting question
    assert history[0] == {"role": "user", "content": {"path": str(picked)}} and history[1:] == [
        {"role": "user", "content": "What is it?"},
        THINKING_MESSAGE,
    ]
    *_, same, nothing, no_slip = handlers.upload_pending(None, session)  # nothing waiting: nothing to do
    assert same is session and session.n_images == 1 and nothing is None and no_slip is None
    steps = list(handlers.send(question, None, session, history, *GENERATION))
    box, status, _, first = steps[0]
    assert first[-1] == THINKING_MESSAGE  # until the first piece
    _, _, _, last = steps[-1]
    assert last[:2] == history[:2] and last[-1]["role"] == "assistant" and last[-1]["content"] != THINKING
    config = build_demo(tiny_chat).config
    by_elem = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    first_step = next(d for d in config["dependencies"] if d["targets"] == [(by_elem["message"], "submit")])
    assert first_step["queue"] is False and by_elem["chatbot"] in first_step["outputs"]


def test_a_users_slip_is_a_notice_and_the_chat_stays_clean(tiny_chat, tmp_path: Path, monkeypatch) -> None:
    handlers = ChatHandlers(tiny_chat)
    # Asking before any upload: a notice, the question back in the box, no bubble left behind.
    _, question, history = handlers.show_question("What is it?", [])
    with pytest.warns(UserWarning, match="Upload an image first"):
        steps = list(handlers.send(question, None, None, history, *GENERATION))
    assert len(steps) == 1
    box, status, session, chat_after = steps[0]
    assert box == "What is it?" and "Upload an image first" in status and chat_after == []

    # A file that is not an image, waiting in the box: the box empties, the question goes back.
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    picked = _picked(tmp_path, monkeypatch, text_file, "notes.png")
    _, question, history = handlers.show_question("And this?", [])
    with pytest.warns(UserWarning, match="not an image"):
        box, status, session, uploaded, slip = handlers.upload_pending({"path": str(picked)}, session)
    assert box is None and uploaded is None and "not an image" in slip and session.n_images == 0
    assert handlers.show_image(uploaded, history) == history
    (box, _, _, chat_after), *rest = handlers.send(question, slip, session, history, *GENERATION)
    assert not rest and box == "And this?" and chat_after == []

    # The Upload button with the same file: a notice and an empty box, nothing raised.
    with pytest.warns(UserWarning, match="not an image"):
        box, status, session, uploaded = handlers.upload_box({"path": str(picked)}, session)
    assert box is None and uploaded is None and "not an image" in status
    with pytest.warns(UserWarning, match="No image was given"):
        assert handlers.upload_box(None, session)[3] is None

    # An empty message after an upload: a notice; the image stays in the chat.
    good = _picked(tmp_path, monkeypatch, CAT)
    box, status, session, uploaded = handlers.upload_box({"path": str(good)}, session)
    history = handlers.show_image(uploaded, [])
    box, question, same = handlers.show_question("   ", history)
    assert box == "   " and same == history  # nothing shown for a blank message
    with pytest.warns(UserWarning, match="empty"):
        (box, _, _, chat_after), *_ = handlers.send(question, None, session, history, *GENERATION)
    assert chat_after == history


def test_the_status_line_says_which_models_run(tiny_chat) -> None:
    status = ChatHandlers(tiny_chat).model_status()
    assert "**minigpt4_tiny_random** (tiny random weights, for tests: answers are noise) on **cpu**" in status
    for name in ("minigpt4_lite", "minigpt4_vicuna0_7b", "minigpt4_space"):
        assert load_preset(name, ["model.projection.checkpoint=null"]).description, name
