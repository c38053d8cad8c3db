"""The eval command on the tiny preset: batched answers equal the chat's, results record their origin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minigpt4.conversation import Conversation
from minigpt4.eval import evalset, run
from minigpt4.eval.answer import BatchAnswerer
from minigpt4.eval.metrics import followup_metrics, pope_metrics, vqa_metrics


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evalset")
    evalset.write_eval_set(out, n_scenes=3, seed=1, photos=False)
    return out


@pytest.fixture
def use_tiny_chat(tiny_chat, monkeypatch: pytest.MonkeyPatch):
    """`eval` on the session's tiny Chat instead of loading the preset again."""
    monkeypatch.setattr(run, "chat_from_args", lambda args: tiny_chat)
    return tiny_chat


def _eval(*args: str | Path) -> int:
    return run.main(["--cfg-path", "minigpt4_tiny_random", *map(str, args)])


def test_batched_greedy_answers_equal_the_chat_one_at_a_time(tiny_chat, small_set: Path) -> None:
    images = sorted((small_set / evalset.IMAGES_DIR).glob("*.png"))
    # Prompts of different lengths, so the batch is left-padded.
    questions = ["What is it?", "How many shapes are in the image, and what colours do they have?", "Colour?"]
    batched = BatchAnswerer(tiny_chat, max_new_tokens=12).answer(images, questions)
    one_by_one = []
    for image, question in zip(images, questions, strict=True):
        session = tiny_chat.new_session()
        tiny_chat.upload_image(session, image)
        tiny_chat.add_question(session, question)
        one_by_one.append(tiny_chat.answer(session, do_sample=False, max_new_tokens=12))
    assert batched == one_by_one


def test_batched_answers_continue_whole_conversations(tiny_chat, small_set: Path) -> None:
    images = sorted((small_set / evalset.IMAGES_DIR).glob("*.png"))[:2]
    conversations, expected = [], []
    for image in images:
        session = tiny_chat.new_session()
        tiny_chat.upload_image(session, image)
        tiny_chat.add_question(session, "What is it?")
        first = tiny_chat.answer(session, do_sample=False, max_new_tokens=6)
        tiny_chat.add_question(session, "Tell me more.")
        expected.append(tiny_chat.answer(session, do_sample=False, max_new_tokens=6))
        conversation = Conversation(tiny_chat.template)
        conversation.add_image()
        conversation.add_user("What is it?")
        conversation.add_assistant(first)
        conversation.add_user("Tell me more.")
        conversations.append(conversation)
    assert BatchAnswerer(tiny_chat, max_new_tokens=6).answer_conversations(images, conversations) == expected


def test_eval_pope_writes_scores_predictions_and_provenance(
    use_tiny_chat, small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pope.json"
    code = _eval("--task", "pope", "--data", small_set, "--out", out, "--batch-size", 4)
    assert code == 0
    results = json.loads(out.read_text())
    probes = (small_set / evalset.POPE_FILE).read_text().splitlines()
    assert results["n"] == len(probes) == len(results["predictions"])
    preds = results["predictions"]
    expected = pope_metrics(
        [p["answer"] for p in preds], [p["label"] for p in preds], [p["category"] for p in preds]
    )
    assert results["metrics"] == expected
    assert {p["read_as"] for p in preds} <= {"yes", "no"}
    assert results["config"]["preset"] == use_tiny_chat.preset_name
    assert results["data"]["sha256"]["data"] == run.sha256_file(small_set / evalset.POPE_FILE)
    assert len(results["git"]["commit"]) == 40
    printed = capsys.readouterr().out
    assert "yes_ratio" in printed and "per_category / adversarial / f1" in printed
    assert not list(tmp_path.glob("*.tmp"))


def test_eval_vqa_and_caption_on_the_eval_set(use_tiny_chat, small_set: Path, tmp_path: Path) -> None:
    assert _eval("--task", "vqa", "--data", small_set, "--out", tmp_path / "v.json", "--limit", 4) == 0
    vqa = json.loads((tmp_path / "v.json").read_text())
    assert vqa["n"] == 4 and vqa["data"]["limit"] == 4
    answers = [p["answers"] for p in vqa["predictions"]]
    assert vqa["metrics"]["accuracy"] == pytest.approx(
        vqa_metrics([p["answer"] for p in vqa["predictions"]], answers)["accuracy"]
    )
    assert vqa["metrics"]["option_n"] == 4  # scene questions: each has its closed answer set
    read = [p["read_as"] == p["answers"][0] for p in vqa["predictions"]]
    assert vqa["metrics"]["option_accuracy"] == pytest.approx(100 * sum(read) / 4)
    out = tmp_path / "c.json"
    assert (
        _eval("--task", "caption", "--data", small_set, "--out", out, "--no-meteor", "--max-new-tokens", 8)
        == 0
    )
    caption = json.loads(out.read_text())
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(caption["metrics"]) and "METEOR" not in caption["metrics"]
    assert caption["n"] == 3 and all(len(p["references"]) == 3 for p in caption["predictions"])
    answers = [p["caption"] for p in caption["predictions"]]
    assert caption["metrics"]["words_per_answer"] == pytest.approx(sum(len(a.split()) for a in answers) / 3)
    assert caption["metrics"]["repetition_rate"] == pytest.approx(
        sum(p["repeats_itself"] for p in caption["predictions"]) / 3
    )
    assert "object_named" not in caption["metrics"]  # scenes list no main object


def test_eval_followup_keeps_the_first_answer_in_the_conversation(
    use_tiny_chat, small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[list[tuple[str, str, int]]]] = []  # per call: per conversation, its messages
    answer_conversations = BatchAnswerer.answer_conversations

    def spy(self, images, conversations):
        seen.append([[(m.role, m.text, m.images) for m in c.messages] for c in conversations])
        return answer_conversations(self, images, conversations)

    monkeypatch.setattr(BatchAnswerer, "answer_conversations", spy)
    out = tmp_path / "f.json"
    assert _eval("--task", "followup", "--data", small_set, "--out", out, "--max-new-tokens", 6) == 0
    results = json.loads(out.read_text())
    preds = results["predictions"]
    assert results["n"] == len(preds) == 3
    assert [p["kind"] for p in preds] == ["colour", "position", "count"]
    assert all(p["first_answer"] for p in preds)  # something to carry into the follow-up
    # One batch: the first questions, then the same conversations carrying the model's first answers.
    first_round, second_round = seen
    for opening, conversation, p in zip(first_round, second_round, preds, strict=True):
        assert opening == [("user", "What is in this image?", 1)]
        assert conversation == [*opening, ("assistant", p["first_answer"], 0), ("user", p["question"], 0)]
    # The follow-up answer is what a chat session gives after the same two questions.
    session = use_tiny_chat.new_session()
    use_tiny_chat.upload_image(session, small_set / evalset.IMAGES_DIR / preds[0]["image"])
    use_tiny_chat.add_question(session, "What is in this image?")
    assert use_tiny_chat.answer(session, do_sample=False, max_new_tokens=6) == preds[0]["first_answer"]
    use_tiny_chat.add_question(session, preds[0]["question"])
    assert use_tiny_chat.answer(session, do_sample=False, max_new_tokens=6) == preds[0]["answer"]
    expected = followup_metrics(
        [p["answer"] for p in preds],
        [p["answers"] for p in preds],
        [p["options"] for p in preds],
        [p["kind"] for p in preds],
        [p["category"] for p in preds],
    )
    assert results["metrics"] == expected and set(expected["per_kind"]) == {"colour", "position", "count"}
    assert all(p["answers"][0] in p["options"] for p in preds)


def test_eval_rejects_bad_data_before_loading_a_model(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_model(args):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(run, "chat_from_args", no_model)
    assert _eval("--task", "pope", "--data", tmp_path / "missing") == 2
    assert "no such file or folder" in capsys.readouterr().err
    questions = small_set / evalset.VQA_QUESTIONS_FILE
    assert _eval("--task", "vqa", "--data", questions) == 2
    assert "needs --annotations" in capsys.readouterr().err
    assert run.main(["--task", "pope", "--data", str(small_set), "--cfg-path", "no_such_preset"]) == 2
    assert "no_such_preset" in capsys.readouterr().err
    for flag in ("--batch-size", "--limit"):
        with pytest.raises(SystemExit) as caught:
            _eval("--task", "pope", "--data", small_set, flag, 0)
        assert caught.value.code == 2 and f"argument {flag}: must be ≥ 1, got 0" in capsys.readouterr().err
    assert _eval("--task", "pope", "--data", small_set, "--prompt", "{question} {lang}") == 2
    assert "--prompt may hold {question}" in capsys.readouterr().err


def test_eval_skips_an_unreadable_image_and_keeps_the_rest(
    use_tiny_chat, small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "set"
    shutil.copytree(small_set, data)
    broken = sorted((data / evalset.IMAGES_DIR).glob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated file
    out = tmp_path / "r.json"
    assert _eval("--task", "caption", "--data", data, "--out", out, "--no-meteor", "--max-new-tokens", 4) == 1
    results = json.loads(out.read_text())
    assert results["n"] == 2 and [s["image"] for s in results["skipped"]] == [str(broken)]
    assert broken.name not in {p["image"] for p in results["predictions"]}
    assert "1 samples skipped" in capsys.readouterr().out


def test_eval_command_loads_the_preset_itself(small_set: Path, tiny_cfg_path: Path, tmp_path: Path) -> None:
    from minigpt4.__main__ import main

    out = tmp_path / "r.json"
    args = ["eval", "--cfg-path", str(tiny_cfg_path), "--device", "cpu", "--task", "pope"]
    assert main([*args, "--data", str(small_set), "--limit", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["file"] == str(tiny_cfg_path)
