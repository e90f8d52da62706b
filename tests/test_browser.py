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


# -- what a user meets: stale results, the cards, narrow screens, odd queries, a changing run ------------
@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, url: str, width: int = 1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="domcontentloaded")
    return page


def search_text(page, tab: str, query: str, k: int | None = None) -> None:
    box = page.locator(f"#{tab}_query textarea")
    box.fill(query)
    if k is not None:
        page.locator(f"#{tab}_query").locator("xpath=../..").locator("input[type=number]").fill(str(k))
    page.locator(f"#{tab}_button").click()


@pytest.mark.slow
@pytest.mark.browser
def test_an_error_clears_the_results_and_status_of_its_tab(app_url, browser, tmp_path):
    from playwright.sync_api import expect

    url, engine = app_url
    image = next(h.image_path for h in engine.search_text("red", k=1).hits)
    empty, big = tmp_path / "empty.png", tmp_path / "big.png"
    empty.write_bytes(b"")
    big.write_bytes(b"\x89PNG" + b"\0" * 11_000_000)
    page = open_page(browser, url)
    search_text(page, "text_to_images", "a red square")
    expect(page.locator("#text_to_images_results img").first).to_be_visible()
    search_text(page, "text_to_images", "猫")
    expect(page.locator("#text_to_images_status")).to_contain_text("vocabulary: 猫")
    expect(page.locator("#text_to_images_results .cm-card")).to_have_count(0)

    page.get_by_role("tab", name="Image -> Captions").click()
    upload = page.locator("#image_to_captions_query input[type=file]")
    status = page.locator("#image_to_captions_status")
    upload.set_input_files(str(empty))
    expect(status).to_contain_text("image is empty (0 bytes): empty.png")
    upload.set_input_files(image)
    expect(page.locator("#image_to_captions_table")).to_contain_text("red")
    expect(status).to_contain_text("captions in")
    upload.set_input_files(str(big))  # refused by the server before any search
    expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible()
    expect(page.locator("#image_to_captions_results .cm-card")).to_have_count(0)
    expect(status).not_to_contain_text("captions in")
    expect(status).not_to_contain_text("empty.png")
    expect(page.locator("#image_to_captions_table")).not_to_contain_text("red")
    screenshot(page, tmp_path / "after_oversized_upload.png")


@pytest.mark.slow
@pytest.mark.browser
def test_results_show_id_whole_caption_and_a_link_to_the_image(app_url, browser):
    from playwright.sync_api import expect

    url, engine = app_url
    page = open_page(browser, url)
    search_text(page, "text_to_images", "a red square")
    cards = page.locator("#text_to_images_results .cm-card")
    expect(cards.first).to_be_visible()
    first = engine.search_text("a red square", k=12).hits[0]
    card = cards.first
    expect(card).to_contain_text(f"id {first.item_id}")
    expect(card).to_contain_text(first.key)
    caption = card.locator(".cm-caption")
    expect(caption).to_have_text(first.captions[0])
    assert caption.get_attribute("title") == " | ".join(first.captions)
    picture, text = card.locator("img").bounding_box(), caption.bounding_box()
    assert text["y"] >= picture["y"] + picture["height"], "the caption sits under the picture"
    link = card.locator("a").get_attribute("href")
    assert link == f"api/items/{first.item_id}/image"
    assert card.locator("a").get_attribute("target") == "_blank"
    response = page.request.get(url + link)
    assert response.ok and response.headers["content-type"] == "image/png"
    assert response.body() == Path(first.image_path).read_bytes(), "the link serves the file itself"


@pytest.mark.slow
@pytest.mark.browser
def test_a_narrow_screen_keeps_every_result_and_tab_in_sight(app_url, browser, tmp_path):
    from playwright.sync_api import expect

    url, _ = app_url
    page = open_page(browser, url, width=390)
    search_text(page, "text_to_images", "a red square")
    images = page.locator("#text_to_images_results img")
    expect(images).to_have_count(12)
    expect(images.last).to_be_visible()
    rights = [images.nth(i).bounding_box() for i in range(12)]
    assert all(box["x"] >= 0 and box["x"] + box["width"] <= 390 for box in rights), rights
    assert len({round(box["x"]) for box in rights}) in (2, 3), "columns follow the width"
    tabs = page.locator(".tab-wrapper [role=tablist] button, .tab-wrapper .overflow-dropdown button")
    for title in ("Text -> Images", "Image -> Captions", "Image -> Images", "Text -> Texts"):
        tab = tabs.filter(has_text=title)
        expect(tab).to_be_visible()
        box = tab.bounding_box()
        assert box["x"] >= 0 and box["x"] < 390 and box["height"] > 10, (title, box)
    tabs.filter(has_text="Image -> Images").click()
    expect(page.locator("#image_to_images_query")).to_be_visible()
    screenshot(page, tmp_path / "narrow.png")


@pytest.mark.slow
@pytest.mark.browser
def test_odd_queries_are_refused_or_answered_with_a_notice(app_url, browser):
    from playwright.sync_api import expect

    url, _ = app_url
    page = open_page(browser, url)
    status = page.locator("#text_to_images_status")
    search_text(page, "text_to_images", "red zzzqx")
    expect(status).to_contain_text("Ignored, not in the model's vocabulary: zzzqx")
    expect(page.locator("#text_to_images_results .cm-card").first).to_be_visible()
    search_text(page, "text_to_images", "red " * 1250)  # 5,000 characters
    expect(status).to_contain_text("images in")
    box = page.locator("#text_to_images_query textarea").bounding_box()
    assert box["height"] < 120, f"the keyword box stays a few lines high: {box}"


@pytest.mark.slow
@pytest.mark.browser
def test_a_cut_query_says_how_much_was_read(workdir, browser):
    from playwright.sync_api import expect
    from test_app import train_short_text_run

    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(train_short_text_run(workdir, "tiny_browser_textcnn"))
    demo, url = load_app_module().serve(engine, port=free_port(), prevent_thread_lock=True)
    try:
        page = open_page(browser, url)
        search_text(page, "text_to_images", "red square " * 10)
        expect(page.locator("#text_to_images_status")).to_contain_text(
            "only its first 8 of 20 words were used"
        )
    finally:
        demo.close()
        engine.close()


@pytest.mark.slow
@pytest.mark.browser
def test_items_added_to_the_run_show_up_without_a_restart(tiny_run_copy, browser, tmp_path):
    from playwright.sync_api import expect
    from tinyrun import image_folder

    from crossmodal.jobs.index import add_to_run
    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(tiny_run_copy)
    demo, url = load_app_module().serve(engine, port=free_port(), prevent_thread_lock=True)
    try:
        page = open_page(browser, url)
        page.get_by_text("About this run").click()
        expect(page.locator("#about")).to_contain_text("96 images")
        add_to_run(tiny_run_copy, str(image_folder(tmp_path / "more", 4, prefix="added")), progress=False)
        search_text(page, "text_to_images", "red", k=100)
        expect(page.locator("#text_to_images_results")).to_contain_text("added0000.png")
        added = page.locator("#text_to_images_results .cm-card", has_text="added0000.png").locator("img")
        added.scroll_into_view_if_needed()  # the cards' images load lazily
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=added.element_handle())
        assert added.evaluate("img => img.naturalWidth") == 32, "the added item's image is served"
        page.reload()
        page.get_by_text("About this run").click()
        expect(page.locator("#about")).to_contain_text("100 images")
    finally:
        demo.close()
        engine.close()


HEADER_LINES = """th => {
  const span = th.querySelector('.header'), range = document.createRange();
  range.selectNodeContents(span);
  return new Set(Array.from(range.getClientRects(), r => Math.round(r.top))).size;
}"""


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("tab", ["image_to_captions", "text_to_texts"])
def test_a_narrow_screen_keeps_table_headers_whole(app_url, browser, tab, tmp_path):
    """Reported by a new user: at 390 px the captions table broke its headers mid-word ("ran / k",
    "di / st / an / ce") and cut off the "item id" column. Each header is one line; the table
    scrolls sideways as a whole, so that every column can be reached."""
    from playwright.sync_api import expect

    url, engine = app_url
    page = open_page(browser, url, width=390)
    title = {"image_to_captions": "Image -> Captions", "text_to_texts": "Text -> Texts"}[tab]
    page.locator(".tab-wrapper [role=tablist] button, .tab-wrapper .overflow-dropdown button").filter(
        has_text=title
    ).click()
    if tab == "text_to_texts":
        search_text(page, tab, "a red square")
    else:
        image = next(h.image_path for h in engine.search_text("red", k=1).hits)
        page.locator(f"#{tab}_query input[type=file]").set_input_files(image)
    table = page.locator(f"#{tab}_table")
    expect(table).to_contain_text("red")
    headers = table.locator("th.header-cell")
    expect(headers).to_have_count(5)
    for i in range(5):
        th = headers.nth(i)
        assert th.evaluate(HEADER_LINES) == 1, f"header {th.inner_text()!r} breaks over lines"
        assert th.evaluate("th => th.querySelector('.header').scrollWidth <= th.clientWidth"), th.inner_text()
    last = headers.nth(4)
    last.scroll_into_view_if_needed()
    box = last.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390, f"the 'item id' column is cut off: {box}"
    screenshot(page, tmp_path / f"narrow_{tab}.png")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("tab", ["text_to_images", "text_to_texts"])
def test_clearing_the_keyword_box_clears_the_results_as_removing_the_image_does(app_url, browser, tab):
    """Reported by a new user: the image tabs emptied their results with the image, the text tabs
    kept theirs when the keywords were deleted."""
    from playwright.sync_api import expect

    url, _ = app_url
    page = open_page(browser, url)
    if tab == "text_to_texts":
        page.get_by_role("tab", name="Text -> Texts").click()
    search_text(page, tab, "a red square")
    status, cards = page.locator(f"#{tab}_status"), page.locator(f"#{tab}_results .cm-card")
    expect(status).to_contain_text(" in ")
    expect(cards.first).to_be_visible()
    box = page.locator(f"#{tab}_query textarea")
    box.fill("a red")  # editing keeps the results until the next search
    expect(status).to_contain_text(" in ")
    box.fill("")
    expect(cards).to_have_count(0)
    expect(status).to_have_text("")
    if tab == "text_to_texts":  # the other tab's table sits in a closed accordion
        expect(page.locator(f"#{tab}_table")).not_to_contain_text("red")
