"""The browser page of eve-serve, in a real headless Chromium against the demo's final model:
the page loads, an uploaded image shows as the model sees it with its visual token count, a
question gets a streamed answer, and a screenshot is written.

Chromium is Debian's package, installed by scripts/install_chromium.sh on first use; where it
cannot be installed (no root, no registry) the test is skipped and the rest of the suite runs.
EVE_PAGE_SCREENSHOT=path also writes the screenshot there (the README's was made so)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serving import Server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # the machine has no network


@pytest.fixture(scope="module")
def chromium() -> str:
    if shutil.which("chromium") is None:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0 or shutil.which("chromium") is None:
            pytest.skip(f"Chromium could not be installed: {(proc.stderr or proc.stdout)[-500:]}")
    return shutil.which("chromium")


@pytest.mark.browser
def test_page_answers_a_question_about_an_uploaded_image(chromium, quick_run, tmp_path):
    from playwright.sync_api import sync_playwright

    out, _ = quick_run
    image = sorted((out / "world" / "eval" / "unseen" / "images").glob("*.jpg"))[0]  # 1:4 or 4:1, never trained on
    server = Server(out / "final", tmp_path / "server.log", "--served-model-name", "eve-demo")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1100, "height": 620})
            page.goto(server.url + "/")
            assert "eve-demo" in page.title()
            page.set_input_files("#image", str(image))
            page.wait_for_selector("#info[data-tokens]", timeout=30_000)
            info = page.inner_text("#info")
            preview = server.post_raw("/v1/eve/preview", b'{"image": "%s"}' % page.eval_on_selector(
                "#seen", "e => e.src").encode())[1]  # what the page shows is what the server reports
            assert f"= {preview['visual_tokens']} visual tokens" in info
            assert f"{preview['processed_size'][0]}×{preview['processed_size'][1]}" in info
            page.fill("#question", "What color are the shapes? Answer the question using a single word or phrase.")
            page.click("#ask")
            page.wait_for_selector(".assistant[data-done]", timeout=120_000)
            answer = page.inner_text(".turn.assistant").strip()
            assert answer in ("red", "green", "blue", "yellow"), answer
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
            browser.close()
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("EVE_PAGE_SCREENSHOT"):
            shutil.copy(shot, os.environ["EVE_PAGE_SCREENSHOT"])
    finally:
        server.stop()
