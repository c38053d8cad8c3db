"""Shared pieces of the curation tests: scene images, work folders, a real chat-completions server."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from minigpt4.curate.records import WorkDir
from minigpt4.data.scenes import describe, render_scene

GOOD_TEXT = (
    "The image shows a small brown dog sitting on a green lawn in front of a white wooden fence. "
    "The dog has floppy ears and a red collar, and it is looking up at the camera with its mouth open. "
    "Behind the fence there are tall trees with yellow leaves, and the sky is pale blue with a few clouds."
)


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` scene images, alternately JPEG and PNG, named scene_00, scene_01, …"""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = folder / f"scene_{i:02d}.{'jpg' if i % 2 == 0 else 'png'}"
        render_scene(rng, size=64).image.save(path)
        paths.append(path)
    return paths


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generated_work(root: Path, n: int, seed: int = 0) -> WorkDir:
    """A work folder as `curate generate` leaves it: n images with English scene descriptions."""
    work = WorkDir(root / "work")
    work.root.mkdir(parents=True)
    rng = random.Random(seed)
    records = []
    for path in make_images(root / "images", n, seed):
        raw = " ".join(describe(render_scene(rng, size=64)) for _ in range(3))
        records.append({"image_id": path.stem, "image": str(path), "raw": raw, "answers": [raw], "rounds": 1})
    write_jsonl(work.generate, records)
    return work


def paragraph_of(body: dict[str, Any]) -> str:
    """The paragraph a refine request carries (after the prompt's blank line)."""
    return body["messages"][-1]["content"].split("\n\n", 1)[1]


class ChatCompletionsServer:
    """An OpenAI chat-completions endpoint on 127.0.0.1 that answers `reply(paragraph)`.

    `faults` are served, in arrival order, before normal answers: "500", "429", "400", "401",
    "timeout" (holds the request for `hang_s` then answers late), or "ok" for one normal answer.
    Normal answers take `delay_s`.
    """

    def __init__(
        self,
        faults: list[str] | None = None,
        reply: Callable[[str], str] = str.upper,
        hang_s: float = 1.5,
        delay_s: float = 0.0,
    ):
        self.faults = list(faults or [])
        self.reply = reply
        self.hang_s = hang_s
        self.delay_s = delay_s  # before every normal answer
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _next_fault(self, body: dict[str, Any], headers: dict[str, str]) -> str:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            return self.faults.pop(0) if self.faults else "ok"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(
                self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (extra or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the "timeout" fault)

            def do_POST(self) -> None:
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fault = server._next_fault(body, dict(self.headers))
                if fault == "timeout":
                    time.sleep(server.hang_s)
                elif fault in ("500", "429", "400", "401"):
                    extra = {"Retry-After": "0"} if fault == "429" else None
                    self._send(int(fault), {"error": {"message": f"injected {fault}"}}, extra)
                    return
                time.sleep(server.delay_s)
                content = server.reply(paragraph_of(body))
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                })  # fmt: skip

        return Handler

    def __enter__(self) -> ChatCompletionsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def filtered_work(root: Path, n: int, rejected_by_filter: tuple[str, ...] = ()) -> WorkDir:
    """A work folder after generate, refine and filter; ids in `rejected_by_filter` failed a rule."""
    work = generated_work(root, n)
    generated = read_records(work.generate)
    write_jsonl(work.refine, [{"image_id": r["image_id"], "raw": r["raw"], "refined": f"Refined: {r['raw']}"}
                              for r in generated])  # fmt: skip
    write_jsonl(work.filter, [
        {"image_id": r["image_id"], "text": f"Refined: {r['raw']}", "passed": r["image_id"] not in rejected_by_filter,
         "reasons": ["too_few_words: 3 < 20"] if r["image_id"] in rejected_by_filter else [], "settings": {}}
        for r in generated
    ])  # fmt: skip
    return work


def save_tiny_chat_model(folder: Path) -> Path:
    """A random 2-layer LLaMA with a word-level tokenizer and a chat template, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from minigpt4.curate.refine import REFINE_PROMPT

    words = sorted(
        set((REFINE_PROMPT + " " + GOOD_TEXT).lower().replace(".", " . ").replace(",", " , ").split())
    )
    specials = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )  # fmt: skip
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1, eos_token_id=2, bos_token_id=2,
        initializer_range=0.5,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
