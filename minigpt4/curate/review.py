"""Step 4: the paper's manual check (docs/method.md §5), a Gradio page.

The image beside its refined description, editable in place; approve or reject with a button or a
key; "n of N" progress; a view of undecided, approved, rejected or all records. Every decision or
edit is appended to `review.jsonl` (flushed and synced) the moment it is made, and the page opens
on the first undecided record, so closing it and coming back continues where it stopped.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt4.curate.records import CurateError, JsonlWriter, WorkDir, latest_by_id, read_jsonl

VIEWS = ("undecided", "approved", "rejected", "all")
APPROVED, REJECTED = "approved", "rejected"

# Plain keys act when no text field has the focus; Ctrl/⌘+Enter approves from inside the text box.
SHORTCUTS_JS = """
<script>
document.addEventListener("keydown", (event) => {
  const typing = ["TEXTAREA", "INPUT"].includes(document.activeElement?.tagName);
  const plain = !event.ctrlKey && !event.metaKey && !event.altKey;
  let target = null;
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") target = "approve";
  else if (plain && !typing)
    target = {a: "approve", r: "reject", ArrowRight: "next", j: "next", ArrowLeft: "prev", k: "prev"}[event.key];
  if (!target) return;
  const button = document.getElementById("review-" + target);
  if (button) { event.preventDefault(); button.click(); }
});
</script>
"""


@dataclass(frozen=True)
class Item:
    image_id: str
    image: str
    raw: str
    refined: str
    reasons: tuple[str, ...]


class ReviewStore:
    """The records under review and the decisions taken so far (shared by every browser tab)."""

    def __init__(self, work: WorkDir, include_filtered_out: bool = False):
        generated = latest_by_id(read_jsonl(work.require(work.generate, "generate")))
        judged = latest_by_id(read_jsonl(work.require(work.filter, "filter")))
        self.items: dict[str, Item] = {}
        for image_id, gen in generated.items():
            verdict = judged.get(image_id)
            if verdict is None or not (verdict["passed"] or include_filtered_out):
                continue
            self.items[image_id] = Item(
                image_id, gen["image"], gen["raw"], verdict["text"], tuple(verdict["reasons"])
            )
        self.order = {image_id: i for i, image_id in enumerate(self.items)}
        self.decisions = {k: v for k, v in latest_by_id(read_jsonl(work.review)).items() if k in self.items}
        self._writer = JsonlWriter(work.review)
        self._lock = threading.Lock()

    def decision(self, image_id: str) -> str | None:
        record = self.decisions.get(image_id)
        return record["decision"] if record else None

    def text(self, image_id: str) -> str:
        record = self.decisions.get(image_id)
        return record["text"] if record else self.items[image_id].refined

    def view(self, name: str) -> list[str]:
        if name not in VIEWS:
            raise CurateError(f"unknown view {name!r}; one of {', '.join(VIEWS)}")
        if name == "all":
            return list(self.items)
        wanted = None if name == "undecided" else name
        return [image_id for image_id in self.items if self.decision(image_id) == wanted]

    def save(self, image_id: str, decision: str | None, text: str) -> None:
        """Record a decision (None: still undecided) with the text as it stands; written at once."""
        if image_id not in self.items:
            raise CurateError(f"unknown image id {image_id!r}")
        record = {"image_id": image_id, "decision": decision, "text": text, "time": time.time()}
        with self._lock:
            self._writer.write(record)
            self.decisions[image_id] = record

    def save_edit(self, image_id: str, text: str) -> None:
        """Keep an edited text without changing the decision; nothing is written when it did not change."""
        if text != self.text(image_id):
            self.save(image_id, self.decision(image_id), text)

    def neighbour(self, view: str, current: str | None, step: int) -> str | None:
        """The record of `view` after (step 1) or before (step -1) `current` in file order, wrapping round.

        `current` itself need not be in the view (it may just have left it by being decided).
        """
        ids = self.view(view)
        if not ids:
            return None
        if current not in self.order:
            return ids[0]
        here = self.order[current]
        if step > 0:
            return next((i for i in ids if self.order[i] > here), ids[0])
        return next((i for i in reversed(ids) if self.order[i] < here), ids[-1])

    def counts(self) -> dict[str, int]:
        decided = [self.decision(i) for i in self.items]
        return {
            "approved": decided.count(APPROVED),
            "rejected": decided.count(REJECTED),
            "undecided": decided.count(None),
            "total": len(decided),
        }

    def image_folders(self) -> list[str]:
        return sorted({str(Path(item.image).parent) for item in self.items.values()})

    def close(self) -> None:
        self._writer.close()


def _progress(store: ReviewStore, view: str, current: str | None) -> str:
    ids = store.view(view)
    c = store.counts()
    where = f"**{ids.index(current) + 1} of {len(ids)}**" if current in ids else f"**0 of {len(ids)}**"
    return (
        f"{where} {view} · approved {c['approved']} · rejected {c['rejected']} · "
        f"undecided {c['undecided']} · total {c['total']}"
    )


def _status(store: ReviewStore, image_id: str) -> str:
    item = store.items[image_id]
    decision = store.decision(image_id) or "undecided"
    lines = [f"`{image_id}` — **{decision}**"]
    lines += [f"- filter: {reason}" for reason in item.reasons]
    return "\n".join(lines)


def build_review_app(store: ReviewStore) -> Any:
    """The review page for `store`; launch it with `head=SHORTCUTS_JS` for the keyboard shortcuts."""
    import gradio as gr

    def display(view: str, image_id: str | None) -> tuple:
        if image_id is None:
            empty = f"Nothing {view} here." if view != "all" else "No records."
            return None, "", "", empty, _progress(store, view, None), None
        item = store.items[image_id]
        return (
            item.image,
            store.text(image_id),
            item.raw,
            _status(store, image_id),
            _progress(store, view, image_id),
            image_id,
        )

    def show(view: str, current: str | None) -> tuple:
        ids = store.view(view)
        return display(view, current if current in ids else (ids[0] if ids else None))

    def move(step: int):
        def handler(view: str, text: str, current: str | None) -> tuple:
            if current is not None:
                store.save_edit(current, text)
            return display(view, store.neighbour(view, current, step))

        return handler

    def decide(decision: str):
        def handler(view: str, text: str, current: str | None) -> tuple:
            if current is None:
                return show(view, None)
            store.save(current, decision, text)
            return display(view, store.neighbour(view, current, 1))

        return handler

    with gr.Blocks(title="MiniGPT-4 · stage-2 review") as app:
        gr.Markdown(
            "### Stage-2 review\nIs the text true to the image and a clean paragraph? Edit it in place, then "
            "approve (**A**, or Ctrl+Enter in the text) or reject (**R**); **←/→** move. Every decision is saved at once."
        )
        current = gr.State(None)
        with gr.Row():
            view = gr.Radio(list(VIEWS), value="undecided", label="Show", scale=1)
            progress = gr.Markdown(elem_id="review-progress")
        with gr.Row():
            image = gr.Image(type="filepath", interactive=False, label="Image", height=480, scale=1)
            with gr.Column(scale=1):
                text = gr.Textbox(label="Description (edit in place)", lines=12, elem_id="review-text")
                status = gr.Markdown(elem_id="review-status")
                with gr.Row():
                    approve = gr.Button("✓ Approve (A)", variant="primary", elem_id="review-approve")
                    reject = gr.Button("✗ Reject (R)", variant="stop", elem_id="review-reject")
                with gr.Row():
                    prev = gr.Button("← Previous", elem_id="review-prev")
                    nxt = gr.Button("Next →", elem_id="review-next")
                with gr.Accordion("Before refinement", open=False):
                    raw = gr.Textbox(show_label=False, interactive=False, lines=6)
        outputs = [image, text, raw, status, progress, current]
        app.load(show, [view, current], outputs, api_name="show")
        view.change(show, [view, current], outputs, api_name=False)
        for button, handler, name in (
            (approve, decide(APPROVED), "approve"),
            (reject, decide(REJECTED), "reject"),
            (nxt, move(1), "next"),
            (prev, move(-1), "prev"),
        ):
            button.click(handler, [view, text, current], outputs, api_name=name)
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for a remote reviewer)"
    )
    parser.add_argument("--port", type=int, default=7861, help="port of the review page")
    parser.add_argument(
        "--include-filtered-out",
        action="store_true",
        help="also show the records the filter rejected, with its reasons",
    )


def run(args: argparse.Namespace, work: WorkDir) -> int:
    """`curate review`: serve the review page until interrupted."""
    store = ReviewStore(work, args.include_filtered_out)
    counts = store.counts()
    print(
        f"review: {counts['undecided']} undecided of {counts['total']} → open http://{args.host}:{args.port}"
    )
    try:
        build_review_app(store).launch(
            server_name=args.host,
            server_port=args.port,
            head=SHORTCUTS_JS,
            allowed_paths=store.image_folders(),
        )
    finally:
        store.close()
    return 0
