"""Triage routes: authentication, roles, CSRF, refusals, escaping, path traversal, restarts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from PIL import Image

from mri_assets.resources.label_store import InvalidUsername
from mri_assets.triage.app import create_app
from mri_assets.triage.slice_reader import SliceNotFound
from mri_assets_tests.triage.conftest import (
    CLASSES,
    METRICS_TOKEN,
    PASSWORD,
    add_users,
    image_ids,
    log_in,
    make_store,
    mni_axial_slices,
    settings,
)


@pytest.fixture
def app(label_store, reader):
    return create_app(label_store, reader, settings())


@pytest.fixture
def client(app):
    with TestClient(app, follow_redirects=False) as test_client:
        yield test_client


def logged_in(app, username: str) -> tuple[TestClient, str]:
    client = TestClient(app)
    return client, log_in(client, username)


def post_json(client: TestClient, path: str, csrf: str, body: dict):
    return client.post(path, json=body, headers={"X-CSRF-Token": csrf})


def test_every_route_refuses_anonymous_requests(app, client):
    checked = set()
    # The routers' routes as served (include_router keeps them behind one entry per router).
    for route in iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute) or route.path == "/login":
            continue
        path = route.path.replace("{item_id}", "1")
        for method in route.methods:
            response = client.request(method, path, json={"item_id": 1, "label": "coronal"})
            redirected_to_login = (
                response.status_code == 303 and response.headers["location"] == "/login"
            )
            assert redirected_to_login or response.status_code == 401, (method, path)
            checked.add((method, route.path))
    # Every route the app serves, and no other: a route left out of a router, or one added
    # without being listed here, fails.
    assert checked == {
        ("GET", "/"),
        ("GET", "/logout"),
        ("POST", "/logout"),
        ("GET", "/api/next"),
        ("POST", "/api/label"),
        ("POST", "/api/skip"),
        ("POST", "/api/unsure"),
        ("POST", "/api/undo"),
        ("POST", "/api/renew"),
        ("GET", "/api/progress"),
        ("GET", "/api/example.png"),
        ("GET", "/image/{item_id}.png"),
        ("GET", "/image/{item_id}.raw"),
        ("GET", "/metrics"),
        ("GET", "/admin"),
        ("POST", "/admin/flagged/requeue"),
        ("GET", "/admin/users"),
        ("POST", "/admin/users/add"),
        ("POST", "/admin/users/role"),
        ("POST", "/admin/users/password"),
        ("POST", "/admin/users/{action}"),
        ("GET", "/admin/sessions"),
        ("POST", "/admin/sessions/end"),
        ("GET", "/admin/audit"),
    }


def test_metrics_need_the_configured_bearer_token(client, label_store):
    assert client.get("/metrics").status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert client.get("/metrics", headers=wrong).status_code == 401
    response = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    assert "mri_triage_queue_size 12.0" in response.text
    assert "mri_triage_labels_last_hour 0.0" in response.text
    assert "mri_triage_budget_left_eur" in response.text


def test_metrics_refuse_everyone_when_no_token_is_configured(label_store, reader):
    app = create_app(label_store, reader, settings(metrics_token=None))
    with TestClient(app) as client:
        assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 401


def test_admin_page_is_refused_to_clinicians(app):
    clinician, _ = logged_in(app, "alice")
    assert clinician.get("/admin").status_code == 403
    admin, _ = logged_in(app, "root")
    assert admin.get("/admin").status_code == 200


def test_wrong_password_does_not_log_in(client):
    token = client.get("/login").text.split('name="csrf-token" content="')[1].split('"')[0]
    response = client.post(
        "/login", data={"username": "alice", "password": "wrong", "csrf_token": token}
    )
    assert response.status_code == 401
    assert "wrong password" in response.text
    assert client.get("/").status_code == 303


def test_posts_without_the_csrf_token_are_refused(app, client):
    response = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 403
    user, csrf = logged_in(app, "alice")
    item = user.get("/api/next").json()["item"]
    body = {"item_id": item["id"], "label": "coronal"}
    assert user.post("/api/label", json=body).status_code == 403
    assert post_json(user, "/api/label", "forged", body).status_code == 403
    assert post_json(user, "/api/label", csrf, body).status_code == 200


def test_session_cookie_is_httponly_and_samesite_strict(client):
    response = client.get("/login")
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_pages_send_a_script_restricting_content_security_policy(client):
    policy = client.get("/login").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy


def test_clinician_labels_the_leased_item_and_admin_totals_change(app, label_store):
    user, csrf = logged_in(app, "alice")
    item = user.get("/api/next").json()["item"]
    assert item["class_set"] == CLASSES and "prediction" not in item
    image = user.get(item["image_url"])
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (256, 256)
    answer = post_json(user, "/api/label", csrf, {"item_id": item["id"], "label": "coronal"})
    assert answer.status_code == 200
    admin, _ = logged_in(app, "root")
    page = admin.get("/admin").text
    assert '<td id="labels-total">1</td>' in page
    assert '<td id="queue-size">11</td>' in page
    assert label_store.labels_snapshot()["annotator"].to_list() == ["alice"]


def test_refusals_carry_a_clear_message(app):
    alice, alice_csrf = logged_in(app, "alice")
    bob, bob_csrf = logged_in(app, "bob")
    item = alice.get("/api/next").json()["item"]
    wrong_class = post_json(alice, "/api/label", alice_csrf, {"item_id": item["id"], "label": "x"})
    assert wrong_class.status_code == 422
    assert wrong_class.json()["error"] == "LabelNotInClassSet"
    assert "class set" in wrong_class.json()["detail"]
    unknown = post_json(alice, "/api/label", alice_csrf, {"item_id": 9999, "label": "coronal"})
    assert unknown.status_code == 404 and unknown.json()["error"] == "UnknownItem"
    stolen = post_json(bob, "/api/label", bob_csrf, {"item_id": item["id"], "label": "coronal"})
    assert stolen.status_code == 409 and stolen.json()["error"] == "ItemLeasedToOther"
    assert post_json(bob, "/api/skip", bob_csrf, {"item_id": item["id"]}).status_code == 409


def test_skip_and_unsure_move_on_to_other_items(app):
    alice, csrf = logged_in(app, "alice")
    first = alice.get("/api/next").json()["item"]
    assert post_json(alice, "/api/skip", csrf, {"item_id": first["id"]}).status_code == 200
    second = alice.get("/api/next").json()["item"]
    assert second["id"] != first["id"]
    assert post_json(alice, "/api/unsure", csrf, {"item_id": second["id"]}).status_code == 200
    assert alice.get("/api/next").json()["item"]["id"] not in (first["id"], second["id"])


def test_planted_script_is_refused_as_a_name_and_escaped_as_a_class(app, label_store):
    planted = "<script>alert('x')</script>"
    with pytest.raises(InvalidUsername):
        label_store.add_annotator(planted, PASSWORD, "clinician")
    label_store.enqueue("evil", [{"image_id": "x-planted", "priority": 1e9}], [planted, "ok"])
    alice, csrf = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    assert item["class_set"] == [planted, "ok"]
    assert post_json(alice, "/api/label", csrf, {"item_id": item["id"], "label": planted}).status_code == 200
    admin, _ = logged_in(app, "root")
    for path in ("/admin", "/admin/audit", "/admin/users"):
        page = admin.get(path).text
        assert "<script>alert" not in page, path
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in admin.get("/admin").text


def test_image_route_cannot_read_outside_the_store(app, label_store):
    label_store.enqueue("..", [{"image_id": "../../../../etc/passwd", "priority": 1e9}], CLASSES)
    alice, _ = logged_in(app, "alice")
    planted = alice.get("/api/next").json()["item"]
    assert planted["wave"] == ".."
    response = alice.get(planted["image_url"])
    assert response.status_code == 404 and b"root:" not in response.content
    for path in (
        "/image/../../etc/passwd.png",
        "/image/..%2F..%2Fetc%2Fpasswd.png",
        "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd.png",
        "/image/1%2F..%2F..%2Fetc%2Fpasswd.png",
    ):
        response = alice.get(path)
        assert response.status_code in (404, 422), path
        assert b"root:" not in response.content


def test_image_of_an_item_leased_to_someone_else_is_refused(app):
    alice, _ = logged_in(app, "alice")
    bob, _ = logged_in(app, "bob")
    item = alice.get("/api/next").json()["item"]
    assert bob.get(item["image_url"]).status_code == 404
    assert alice.get(item["image_url"]).status_code == 200


def test_prediction_is_hidden_by_default_and_shown_by_config(label_store, reader):
    app = create_app(label_store, reader, settings(show_prediction=True))
    user, _ = logged_in(app, "alice")
    assert user.get("/api/next").json()["item"]["prediction"] == "coronal"


def test_restarted_server_keeps_labels_and_resumes_the_open_lease(db_url, label_store, reader):
    first_app = create_app(label_store, reader, settings())
    user, csrf = logged_in(first_app, "alice")
    labeled = user.get("/api/next").json()["item"]
    post_json(user, "/api/label", csrf, {"item_id": labeled["id"], "label": "sagittal"})
    open_item = user.get("/api/next").json()["item"]
    label_store.dispose()

    restarted_store = make_store(db_url)
    restarted = create_app(restarted_store, reader, settings())
    again, csrf = logged_in(restarted, "alice")
    assert again.get("/api/next").json()["item"]["id"] == open_item["id"]
    assert restarted_store.labels_snapshot()["label"].to_list() == ["sagittal"]
    restarted_store.dispose()


def test_logout_ends_the_session(app):
    user, csrf = logged_in(app, "alice")
    user.post("/logout", data={"csrf_token": csrf})
    assert user.get("/api/next").status_code == 401


def test_add_users_refuses_duplicates(label_store):
    with pytest.raises(RuntimeError, match="already exists"):
        add_users(label_store, ["alice"])


def test_label_answer_carries_the_next_item_when_asked(app, label_store):
    user, csrf = logged_in(app, "alice")
    first = user.get("/api/next").json()["item"]
    preloaded = user.get(f"/api/next?held={first['id']}").json()["item"]
    body = {"item_id": first["id"], "label": "coronal", "lease_next_held": [preloaded["id"]]}
    answer = post_json(user, "/api/label", csrf, body).json()
    assert answer["next"]["id"] not in (first["id"], preloaded["id"])
    assert label_store.item(answer["next"]["id"])["lease_owner"] == "alice"


def test_reader_serves_each_slice_from_its_shard_and_row(reader):
    ids = image_ids(12)
    template = mni_axial_slices()
    for position, image_id in enumerate(ids):
        shown = np.asarray(Image.open(io.BytesIO(reader("pilot", image_id))))
        assert np.array_equal(shown, template[position % len(template)]), image_id
    with pytest.raises(SliceNotFound):
        reader("pilot", ids[0].replace("-", "_"))
