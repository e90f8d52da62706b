"""The app in a real headless Chromium (Debian's ``chromium`` package) driven by Playwright."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_app import free_port, load_app_module

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 15_000


def chromium_path() -> str:
    """Debian's chromium; Playwright's own browser download cannot work offline."""
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not path:
        pytest.fail(
            "headless Chromium is missing: install Debian's chromium package "
            "(apt-get update && apt-get install -y chromium); .ci/run installs it"
        )
    return path


@pytest.fixture(scope="module")
def app_url(tiny_run):
    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(tiny_run)
    demo, url = load_app_module().serve(engine, port=free_port(), prevent_thread_lock=True)
    try:
        yield url, engine
    finally:
        demo.close()
        engine.close()


def screenshot(page, path: Path) -> Path:
    page.screenshot(path=str(path), full_page=True)
    assert path.exists() and path.stat().st_size > 10_000, f"screenshot {path} is empty or tiny"
    return path


@pytest.mark.slow
@pytest.mark.browser
def test_keywords_show_images_and_an_upload_shows_captions(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, engine = app_url
    image = next(h.image_path for h in engine.search_text("red", k=5).hits)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url, wait_until="domcontentloaded")

            page.locator("#text_to_images_query textarea").fill("a red square")
            page.locator("#text_to_images_button").click()
            expect(page.locator("#text_to_images_results img").first).to_be_visible()
            assert page.locator("#text_to_images_results img").count() >= 5
            expect(page.locator("#text_to_images_status")).to_contain_text("ms")
            screenshot(page, tmp_path / "text_to_images.png")

            page.get_by_role("tab", name="Image -> Captions").click()
            page.locator("#image_to_captions_query input[type=file]").set_input_files(image)
            table = page.locator("#image_to_captions_table")
            expect(table).to_contain_text("red")
            expect(page.locator("#image_to_captions_results img").first).to_be_visible()
            screenshot(page, tmp_path / "image_to_captions.png")
        finally:
            browser.close()
