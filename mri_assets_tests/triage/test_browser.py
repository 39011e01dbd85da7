"""The labeling page in Debian's chromium (headless, driven by Playwright): keyboard only."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from mri_assets_tests.services import require_binary
from mri_assets_tests.triage.conftest import PASSWORD

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture
def page():
    chromium = require_binary("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        yield context.new_page()
        context.close()
        browser.close()


def wait_until_idle(page) -> None:
    expect(page.locator("#labeling")).to_have_attribute("data-busy", "0")


@pytest.mark.integration
def test_admin_labels_five_items_with_the_keyboard_and_sees_totals_change(page, live_server):
    page.set_default_timeout(20_000)
    page.goto(f"{live_server.url}/admin")
    assert page.url.endswith("/login")
    page.fill("#username", "root")
    page.fill("#password", PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server.url}/")
    wait_until_idle(page)

    page.goto(f"{live_server.url}/admin")
    assert page.inner_text("#labels-total") == "0"
    page.goto(f"{live_server.url}/")
    wait_until_idle(page)

    canvas = page.locator("#slice")
    seen = []
    for key in ["1", "2", "3", "4", "3"]:
        seen.append(canvas.get_attribute("data-item-id"))
        page.keyboard.press(key)
        expect(canvas).not_to_have_attribute("data-item-id", seen[-1])
        wait_until_idle(page)
        assert page.inner_text("#status").startswith("Saved")
    assert len(set(seen)) == 5
    assert page.inner_text("#done-count") == "5"

    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowUp")
    assert canvas.get_attribute("data-window") == "264"
    assert canvas.get_attribute("data-level") == "132"
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 150, box["y"] + 260, steps=5)
    page.mouse.up()
    assert int(canvas.get_attribute("data-window")) < 264
    assert int(canvas.get_attribute("data-level")) < 132
    page.keyboard.press("+")
    assert float(canvas.get_attribute("data-zoom")) > 1.0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "triage-labeling.png"))

    page.goto(f"{live_server.url}/admin")
    assert page.inner_text("#labels-total") == "5"
    assert page.inner_text("#queue-size") == "7"
    assert "root" in page.inner_text("#per-annotator")

    page.click("#logout")
    page.wait_for_url(f"{live_server.url}/login")
    page.goto(f"{live_server.url}/")
    assert page.url.endswith("/login")
