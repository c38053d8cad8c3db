"""`curate review`: the store of decisions, and the page driven through gradio_client and a browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from curate_helpers import filtered_work, read_records

from minigpt4.curate.records import WorkDir
from minigpt4.curate.review import SHORTCUTS_JS, ReviewStore, build_review_app


def test_store_views_decisions_and_neighbours(tmp_path: Path) -> None:
    work = filtered_work(tmp_path, 5, rejected_by_filter=("scene_02",))
    store = ReviewStore(work)
    assert store.view("undecided") == ["scene_00", "scene_01", "scene_03", "scene_04"]
    store.save("scene_01", "approved", "Edited.")
    store.save("scene_03", "rejected", store.text("scene_03"))
    assert store.view("undecided") == ["scene_00", "scene_04"]
    assert store.view("approved") == ["scene_01"] and store.text("scene_01") == "Edited."
    assert store.neighbour("undecided", "scene_01", 1) == "scene_04"  # after a decided record
    assert store.neighbour("undecided", "scene_04", 1) == "scene_00"  # wraps round
    assert store.neighbour("undecided", "scene_00", -1) == "scene_04"
    assert store.neighbour("rejected", "scene_03", 1) == "scene_03"
    store.save_edit("scene_00", store.text("scene_00"))
    store.save_edit("scene_04", "Better words.")
    store.close()
    assert [r["image_id"] for r in read_records(work.review)] == ["scene_01", "scene_03", "scene_04"]

    reopened = ReviewStore(work)
    assert reopened.counts() == {"approved": 1, "rejected": 1, "undecided": 2, "total": 4}
    assert reopened.text("scene_04") == "Better words." and reopened.decision("scene_04") is None
    assert "scene_02" in ReviewStore(work, include_filtered_out=True).view("all")


@pytest.fixture
def review_page(tmp_path: Path) -> Iterator[tuple[WorkDir, str]]:
    work = filtered_work(tmp_path, 4)
    store = ReviewStore(work)
    app = build_review_app(store)
    app.launch(
        server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, head=SHORTCUTS_JS,
        allowed_paths=store.image_folders(),
    )  # fmt: skip
    try:
        yield work, app.local_url
    finally:
        app.close()
        store.close()


def test_review_page_through_gradio_client(review_page: tuple[WorkDir, str]) -> None:
    from gradio_client import Client

    work, url = review_page
    client = Client(url, verbose=False)
    image, text, raw, status, progress = client.predict("undecided", api_name="/show")
    assert Path(image).read_bytes() == (work.root.parent / "images" / "scene_00.jpg").read_bytes()
    assert text.startswith("Refined: ") and raw == text.removeprefix("Refined: ")
    assert "`scene_00`" in status and progress.startswith("**1 of 4** undecided")

    _, text, _, status, progress = client.predict("undecided", "A corrected text.", api_name="/approve")
    assert read_records(work.review)[-1] | {"time": 0} == {
        "image_id": "scene_00", "decision": "approved", "text": "A corrected text.", "time": 0
    }  # fmt: skip
    assert "`scene_01`" in status and progress.startswith("**1 of 3** undecided · approved 1")
    _, _, _, status, _ = client.predict("undecided", text, api_name="/reject")
    assert "`scene_02`" in status and read_records(work.review)[-1]["decision"] == "rejected"
    _, _, _, status, _ = client.predict("undecided", "Edited, then moved on.", api_name="/next")
    assert "`scene_03`" in status
    _, text, _, status, progress = client.predict("undecided", "", api_name="/prev")
    assert "`scene_02`" in status and text == "Edited, then moved on." and progress.startswith("**1 of 2**")

    reopened = Client(url, verbose=False)  # a new page: continues at the first undecided record
    _, _, _, status, _ = reopened.predict("undecided", api_name="/show")
    assert "`scene_02`" in status
    _, text, _, status, progress = reopened.predict("approved", api_name="/show")
    assert (
        "`scene_00`" in status and text == "A corrected text." and progress.startswith("**1 of 1** approved")
    )
    image, _, _, status, progress = reopened.predict("approved", "Rejected after all.", api_name="/reject")
    assert image is None and status == "Nothing approved here."  # its only record left the view
    assert progress.startswith("**0 of 0** approved · approved 0 · rejected 2 · undecided 2")
    image, text, _, status, progress = reopened.predict("rejected", api_name="/show")
    assert "`scene_00` — **rejected**" in status and text == "Rejected after all." and image is not None


@pytest.mark.slow
def test_keyboard_shortcuts_decide_in_a_browser(review_page: tuple[WorkDir, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    work, url = review_page
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless", "--disable-gpu"]
        )
        page = browser.new_page()
        page.goto(url, wait_until="domcontentloaded")
        progress = page.locator("#review-progress")
        expect(progress).to_contain_text("1 of 4", timeout=30_000)
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("a")
        expect(progress).to_contain_text("1 of 3", timeout=10_000)
        page.keyboard.press("ArrowRight")
        expect(page.locator("#review-status")).to_contain_text("scene_02", timeout=10_000)
        box = page.locator("#review-text textarea")
        box.fill("Typed in the box: a and r are text here.")
        expect(progress).to_contain_text("2 of 3")  # letters typed in the box are not shortcuts
        box.press("Control+Enter")
        expect(progress).to_contain_text("approved 2", timeout=10_000)
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("r")
        expect(progress).to_contain_text("rejected 1", timeout=10_000)
        browser.close()
    decisions = [(r["image_id"], r["decision"]) for r in read_records(work.review)]
    assert decisions == [("scene_00", "approved"), ("scene_02", "approved"), ("scene_03", "rejected")]
    assert read_records(work.review)[1]["text"] == "Typed in the box: a and r are text here."
