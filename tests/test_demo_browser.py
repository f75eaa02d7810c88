"""The demo in a real browser: Debian's chromium driven by Playwright opens the page, uploads an image, clicks
Search and sees k result images with their captions; clicking a result searches with it; a bad upload shows a
message and the next search still works. Screenshots are saved in the test's temporary folder.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.test_demo import launch, make_assets


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
K = 8
ALL_RESULTS_LOADED = (
    "k => { const imgs = Array.from(document.querySelectorAll('#results img'));"
    " return imgs.length === k && imgs.every(i => i.complete && i.naturalWidth > 0); }"
)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is missing: apt-get install chromium (make test does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_browser__upload_search_select_and_a_bad_upload(browser, tmp_path):
    from sce_hf.demo import build_demo

    assets = make_assets(tmp_path / "assets")
    demo = build_demo(assets.model, assets.gallery, index=str(tmp_path / "index"), progress=False, default_k=K)
    url = launch(demo)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(assets.queries[7]))
        page.locator("#query img").first.wait_for()
        page.locator("#search").click()
        page.wait_for_function(ALL_RESULTS_LOADED, arg=K, timeout=30_000)
        captions = page.locator("#results .caption-label").all_inner_texts()
        assert len(captions) == K
        scores = [float(c.split(" · ")[0]) for c in captions]
        assert scores == sorted(scores, reverse=True) and scores[0] >= 0.999
        label = assets.dataset.features["label"].int2str(assets.dataset[7]["label"])
        assert captions[0] == f"1.000 · {label}"
        page.screenshot(path=str(tmp_path / "demo-results.png"), full_page=True)

        # "use a gallery image as the query": clicking the second result searches with it
        second_label = captions[1].split(" · ")[1]
        page.locator("#results button.thumbnail-item").nth(1).click()
        page.wait_for_function(
            "label => { const c = document.querySelector('#results .caption-label');"
            " return c !== null && c.textContent.trim() === '1.000 · ' + label; }",
            arg=second_label, timeout=30_000,
        )
        page.wait_for_function(ALL_RESULTS_LOADED, arg=K, timeout=30_000)
        page.screenshot(path=str(tmp_path / "demo-selected-as-query.png"), full_page=True)

        # a text file named .png: a visible message, then a good upload searches again
        bad = tmp_path / "notes.png"
        bad.write_text("not an image\n")
        page.locator("input[type=file]").first.set_input_files(str(bad))
        page.locator("#search").click()
        message = page.get_by_text(re.compile("the file is not an image")).first
        message.wait_for(timeout=30_000)
        assert message.is_visible()
        page.wait_for_timeout(800)  # the toast slides in
        page.screenshot(path=str(tmp_path / "demo-bad-upload.png"))
        page.locator("input[type=file]").first.set_input_files(str(assets.queries[42]))
        page.locator("#search").click()
        label = assets.dataset.features["label"].int2str(assets.dataset[42]["label"])
        page.wait_for_function(
            "label => { const c = document.querySelector('#results .caption-label');"
            " return c !== null && c.textContent.trim() === '1.000 · ' + label; }",
            arg=label, timeout=30_000,
        )
    finally:
        page.close()
        demo.close()
    for name in ("demo-results.png", "demo-selected-as-query.png", "demo-bad-upload.png"):
        assert (tmp_path / name).stat().st_size > 10_000
