"""The labeling and admin pages in Debian's chromium (headless, driven by Playwright).

Each test drives a real uvicorn server on loopback: keyboard labeling and admin totals, revoked
sessions, lockout after failed logins, the budget-spent and missing-pixels states, lease
renewal, undo, the next case shown while the label is still being sent (and a network error
retried), and the admin's user management.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from playwright.sync_api import expect

from mri_assets.resources.label_store import LoginPolicy
from mri_assets.triage.app import create_app
from mri_assets_tests.services import free_port
from mri_assets_tests.triage.conftest import (
    CLASSES,
    PASSWORD,
    LiveServer,
    image_ids,
    make_store,
    settings,
)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
pytestmark = pytest.mark.integration


@contextmanager
def serving(app):
    with LiveServer(app, free_port()) as server:
        yield server


def log_in(page, url: str, username: str, password: str = PASSWORD) -> None:
    page.goto(f"{url}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/")


def wait_until_idle(page) -> None:
    expect(page.locator("#labeling")).to_have_attribute("data-busy", "0")


def shown_item(page) -> str:
    return page.locator("#slice").get_attribute("data-item-id")


def test_clinician_labels_with_the_keyboard_and_admin_sees_totals(page, live_server, label_store):
    url = live_server.url
    page.goto(f"{url}/admin")
    assert page.url.endswith("/login")
    log_in(page, url, "root")
    wait_until_idle(page)
    page.goto(f"{url}/admin")
    assert page.inner_text("#labels-total") == "0"
    page.goto(f"{url}/")
    wait_until_idle(page)

    canvas = page.locator("#slice")
    seen = []
    for key in ["1", "2", "3", "4", "3"]:
        seen.append(shown_item(page))
        page.keyboard.press(key)
        expect(canvas).not_to_have_attribute("data-item-id", seen[-1])
        wait_until_idle(page)
        expect(page.locator("#status")).to_contain_text("Saved")
    assert len(set(seen)) == 5
    assert page.inner_text("#done-count") == "5"
    expect(page.locator("#lease-left")).not_to_have_text("–")

    window, level = int(canvas.get_attribute("data-window")), int(canvas.get_attribute("data-level"))
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowUp")
    assert int(canvas.get_attribute("data-window")) > window
    assert int(canvas.get_attribute("data-level")) > level
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 150, box["y"] + 260, steps=5)
    page.mouse.up()
    assert int(canvas.get_attribute("data-window")) < window + 8
    page.keyboard.press("+")
    assert float(canvas.get_attribute("data-zoom")) > 1.0
    page.keyboard.down("Shift")
    page.mouse.move(box["x"] + 300, box["y"] + 300)
    page.mouse.down()
    page.mouse.move(box["x"] + 340, box["y"] + 320, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert canvas.get_attribute("data-pan") != "0,0"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "triage-labeling.png"))

    page.goto(f"{url}/admin")
    assert page.inner_text("#labels-total") == "5"
    assert "root" in page.inner_text("#per-annotator")
    assert page.locator("#burn-actual").count() == 1
    page.screenshot(path=str(ARTIFACTS / "triage-admin.png"))
    page.click("#logout")
    page.wait_for_url(f"{url}/login?notice=logged_out")
    page.goto(f"{url}/")
    assert "/login" in page.url


def test_revoked_sessions_are_refused_and_a_copied_cookie_dies_with_logout(
    browser, page, live_server, label_store
):
    url = live_server.url
    log_in(page, url, "alice")
    wait_until_idle(page)
    label_store.disable_annotator("alice", by="root")
    page.keyboard.press("1")
    page.wait_for_url(f"{url}/login?notice=revoked")
    expect(page.locator("#login-notice")).to_contain_text("Your session was ended")
    assert label_store.label_count() == 0
    label_store.enable_annotator("alice", by="root")

    log_in(page, url, "alice")
    wait_until_idle(page)
    copied = browser.new_context()
    copied.add_cookies(page.context.cookies())
    thief = copied.new_page()
    thief.goto(f"{url}/")
    assert thief.url == f"{url}/"
    # Closed before the logout: its own session check would race the next navigation.
    thief.close()
    page.click("#logout")
    page.wait_for_url(f"{url}/login?notice=logged_out")
    thief = copied.new_page()
    thief.goto(f"{url}/")
    assert thief.url == f"{url}/login?notice=logged_out"
    copied.close()


def test_repeated_failed_logins_lock_the_account(page, label_store, reader):
    policy = LoginPolicy(account_free_failures=2, account_lockout_failures=3)
    with serving(create_app(label_store, reader, settings(login_policy=policy))) as server:
        page.goto(f"{server.url}/login")
        for _ in range(3):
            page.fill("#username", "alice")
            page.fill("#password", "Not-Her-Password-77")
            page.keyboard.press("Enter")
            page.wait_for_load_state()
        expect(page.locator("#login-error")).to_contain_text("try again after")
        page.fill("#username", "alice")
        page.fill("#password", PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_load_state()
        expect(page.locator("#login-error")).to_contain_text("Too many failed logins")
        assert page.url.endswith("/login")
    assert any(e["what"] == "login_locked" for e in label_store.audit_entries(who="alice"))


def test_budget_spent_shows_when_labelling_resumes(page, tmp_path, reader):
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    make_store(url, cases_per_period=100).enqueue(
        "pilot", [{"image_id": i, "priority": float(n)} for n, i in enumerate(image_ids(4))],
        CLASSES,
    )
    store = make_store(url, cases_per_period=1)
    store.add_annotator("alice", PASSWORD)
    with serving(create_app(store, reader, settings())) as server:
        log_in(page, server.url, "alice")
        wait_until_idle(page)
        page.keyboard.press("1")
        wait_until_idle(page)
        page.keyboard.press("2")
        box = page.locator("#state-box")
        expect(box).to_be_visible()
        expect(box).to_have_attribute("data-state", "budget")
        expect(page.locator("#state-title")).to_have_text("Budget spent for this quarter")
        resumes = store.queue_status()["resumes_on"]
        assert box.get_attribute("data-resumes-on") == resumes
        expect(page.locator("#state-text")).to_contain_text("Labelling resumes on")
        page.screenshot(path=str(ARTIFACTS / "triage-budget-spent.png"))
        page.reload()
        expect(page.locator("#state-box")).to_have_attribute("data-state", "budget")
    assert store.label_count() == 1
    store.dispose()


def test_a_case_without_pixels_is_skipped_and_flagged_for_the_admin(page, live_server,
                                                                     label_store):
    missing = "0" * 24 + "-00001"  # a valid id that no slices shard holds
    label_store.enqueue("pilot", [{"image_id": missing, "priority": 1e9}], CLASSES)
    broken = next(i for i in range(1, 100) if (label_store.item(i) or {}).get("image_id") == missing)
    url = live_server.url
    log_in(page, url, "root")
    wait_until_idle(page)
    expect(page.locator("#notice")).to_contain_text(f"Case {broken} skipped")
    assert shown_item(page) not in ("", str(broken))
    page.keyboard.press("1")
    wait_until_idle(page)
    expect(page.locator("#status")).to_contain_text("Saved")
    page.goto(f"{url}/admin")
    expect(page.locator(f'#flagged tr[data-item-id="{broken}"]')).to_be_visible()
    assert label_store.item(broken)["state"] == "skipped"
    assert label_store.lease_next("bob")["id"] != broken


def test_leases_are_renewed_while_the_page_is_visible(page, label_store, reader):
    with serving(create_app(label_store, reader, settings(lease_seconds=15))) as server:
        log_in(page, server.url, "alice")
        wait_until_idle(page)
        item = int(shown_item(page))
        first_end = label_store.item(item)["lease_expires_at"]
        expect(page.locator("#labeling")).to_have_attribute("data-renewals", "2", timeout=30_000)
        assert label_store.item(item)["lease_expires_at"] > first_end
        assert label_store.item(item)["lease_owner"] == "alice"


def test_undo_brings_the_last_case_back_to_label_again(page, live_server, label_store):
    log_in(page, live_server.url, "alice")
    wait_until_idle(page)
    first = shown_item(page)
    page.keyboard.press("1")
    wait_until_idle(page)
    assert shown_item(page) != first
    page.keyboard.press("z")
    expect(page.locator("#slice")).to_have_attribute("data-item-id", first)
    wait_until_idle(page)
    page.keyboard.press("2")
    wait_until_idle(page)
    labels = label_store.labels_snapshot()
    assert labels["item_id"].to_list() == [int(first)]
    assert labels["label"].to_list() == [CLASSES[1]]
    assert [e["what"] for e in label_store.audit_entries(what="undo")] == ["undo"]


class HoldLabels:
    """Holds every POST /api/label until `release` is set (a slow network or server)."""

    def __init__(self, app):
        self.app = app
        self.release = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/api/label":
            await anyio.to_thread.run_sync(self.release.wait)
        await self.app(scope, receive, send)


def test_the_next_case_shows_while_the_label_is_sent_and_a_lost_request_is_retried(
    page, label_store, reader
):
    held = HoldLabels(create_app(label_store, reader, settings()))
    with serving(held) as server:
        log_in(page, server.url, "alice")
        expect(page.locator("#labeling")).to_have_attribute("data-busy", "0")
        first = shown_item(page)
        page.keyboard.press("1")
        expect(page.locator("#slice")).not_to_have_attribute("data-item-id", first)
        expect(page.locator("#slice")).not_to_have_attribute("data-item-id", "")
        assert page.locator("#labeling").get_attribute("data-busy") == "1"
        assert label_store.label_count() == 0, "shown before the label was stored"
        held.release.set()
        wait_until_idle(page)
        assert label_store.label_count() == 1

        dropped = []

        def drop_once(route):
            if not dropped:
                dropped.append(route.request.url)
                route.abort("connectionreset")
            else:
                route.continue_()

        page.route("**/api/label", drop_once)
        second = shown_item(page)
        page.keyboard.press("2")
        wait_until_idle(page)
        assert dropped, "the first try was cut off"
        expect(page.locator("#status")).to_contain_text("Saved")
        assert label_store.labels_snapshot()["item_id"].to_list()[-1] == int(second)


def test_admin_manages_users_and_ends_sessions_from_the_pages(page, live_server, label_store):
    url = live_server.url
    log_in(page, url, "root")
    page.goto(f"{url}/admin/users")
    page.fill("#new-username", "dave")
    page.fill("#new-password", "password")
    page.click("#add-user-submit")
    expect(page.locator("#admin-error")).to_contain_text("password")
    page.fill("#new-username", "Dave")
    page.fill("#new-password", "Quiet-Meadow-19-Fern")
    page.click("#add-user-submit")
    expect(page.locator("#admin-done")).to_have_text("Account added.")
    page.click('tr[data-username="dave"] button[data-action="disable"]')
    expect(page.locator('tr[data-username="dave"]')).to_have_attribute("data-state", "disabled")
    page.goto(f"{url}/admin/audit?what=disable_annotator")
    expect(page.locator("#audit tr[data-what='disable_annotator']")).to_have_count(1)
    page.goto(f"{url}/admin/sessions")
    expect(page.locator('#sessions tr[data-username="root"]')).to_have_count(1)
