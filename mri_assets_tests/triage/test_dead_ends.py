"""No dead ends for clinicians (API level): the budget-spent state with its date, cases without
pixels flagged and skipped for everyone, lease renewal, undo, progress."""

from __future__ import annotations

from fastapi.testclient import TestClient

from mri_assets.triage.app import create_app
from mri_assets_tests.triage.conftest import CLASSES, PASSWORD, image_ids, log_in, make_store
from mri_assets_tests.triage.conftest import settings as app_settings


def logged_in(app, username: str) -> tuple[TestClient, str]:
    client = TestClient(app)
    return client, log_in(client, username)


def post_json(client, path: str, csrf: str, body: dict):
    return client.post(path, json=body, headers={"X-CSRF-Token": csrf})


def test_budget_spent_is_a_state_with_the_day_labelling_resumes(tmp_path, reader):
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    make_store(url, cases_per_period=100).enqueue(
        "pilot", [{"image_id": i, "priority": float(n)} for n, i in enumerate(image_ids(3))],
        CLASSES,
    )
    store = make_store(url, cases_per_period=1)
    store.add_annotator("alice", PASSWORD)
    app = create_app(store, reader, app_settings())
    alice, csrf = logged_in(app, "alice")
    first = alice.get("/api/next").json()["item"]
    second = alice.get(f"/api/next?held={first['id']}").json()["item"]
    answer = post_json(alice, "/api/label", csrf, {"item_id": first["id"], "label": "coronal",
                                                    "lease_next_held": [second["id"]]}).json()
    resumes_on = store.queue_status()["resumes_on"]
    assert answer["next"] is None
    assert answer["status"] == "budget_spent" and answer["resumes_on"] == resumes_on
    refused = post_json(alice, "/api/label", csrf, {"item_id": second["id"], "label": "coronal"})
    assert refused.status_code == 409
    assert refused.json()["error"] == "BudgetExhausted"
    assert refused.json()["resumes_on"] == resumes_on
    assert store.item(second["id"])["state"] == "queued", "given back for the next period"
    nothing = alice.get("/api/next").json()
    assert nothing == {"item": None, "status": "budget_spent", "budget_left_cases": 0,
                       "resumes_on": resumes_on}
    store.dispose()


def test_a_case_without_pixels_is_flagged_and_skipped_for_everyone(label_store, reader):
    missing = "0" * 24 + "-00001"
    label_store.enqueue("pilot", [{"image_id": missing, "priority": 1e9}], CLASSES)
    app = create_app(label_store, reader, app_settings())
    alice, _ = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    image = alice.get(item["image_url"])
    assert image.status_code == 404 and image.json()["error"] == "MissingPixels"
    assert "flagged for the admin" in image.json()["detail"]
    assert label_store.item(item["id"])["state"] == "skipped"
    bob, _ = logged_in(app, "bob")
    assert bob.get("/api/next").json()["item"]["id"] != item["id"]
    assert alice.get("/api/next").json()["item"]["id"] != item["id"]
    root, root_csrf = logged_in(app, "root")
    assert f'data-item-id="{item["id"]}"' in root.get("/admin").text
    root.post("/admin/flagged/requeue", data={"item_id": item["id"], "csrf_token": root_csrf})
    assert label_store.item(item["id"])["state"] == "queued"


def test_renewal_keeps_the_lease_and_reports_lost_ones(label_store, reader):
    app = create_app(label_store, reader, app_settings(lease_seconds=60))
    alice, csrf = logged_in(app, "alice")
    bob, _ = logged_in(app, "bob")
    item = alice.get("/api/next").json()["item"]
    theirs = bob.get("/api/next").json()["item"]
    answer = post_json(alice, "/api/renew", csrf, {"item_ids": [item["id"], theirs["id"]]}).json()
    assert list(answer["renewed"]) == [str(item["id"])]
    assert answer["lost"] == [theirs["id"]] and answer["lease_seconds"] == 60
    assert post_json(alice, "/api/renew", csrf, {"item_ids": list(range(1, 70))}).status_code == 422


def test_undo_through_the_api_and_progress(label_store, reader):
    app = create_app(label_store, reader, app_settings())
    alice, csrf = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    post_json(alice, "/api/label", csrf, {"item_id": item["id"], "label": "coronal"})
    assert alice.get("/api/progress").json()["labeled_this_session"] == 1
    back = post_json(alice, "/api/undo", csrf, {"item_id": item["id"]})
    assert back.status_code == 200 and back.json()["item"]["id"] == item["id"]
    progress = alice.get("/api/progress").json()
    assert progress["labeled_this_session"] == 0 and progress["queue_open"] == 12
    again = post_json(alice, "/api/undo", csrf, {"item_id": item["id"]})
    assert again.status_code == 409 and again.json()["error"] == "CannotUndo"
    post_json(alice, "/api/skip", csrf, {"item_id": item["id"]})
    assert post_json(alice, "/api/undo", csrf, {"item_id": item["id"]}).status_code == 200
