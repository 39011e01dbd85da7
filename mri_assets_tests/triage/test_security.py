"""Issue 16's attacks on the triage app, each with the answer it gets now (API level).

Sessions: copied cookie after logout, deleted/disabled user, demoted admin, forged cookie, idle
and absolute ends, weak secret. Login: wrong passwords throttled then locked, weak passwords,
look-alike names, the login page's message. Inputs: bodies over the limit, long usernames,
non-ASCII tokens, ids of 2**63 and more, cross-site Origin, security headers.
"""

from __future__ import annotations

import secrets
import socket
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from mri_assets.deployment import Deployment
from mri_assets.resources.label_store import LoginPolicy, token_hash, utc_now
from mri_assets.triage.app import TriageSettings, WeakSecret, create_app
from mri_assets_tests.triage.conftest import (
    CLASSES,
    PASSWORD,
    SECRET,
    csrf_from,
    log_in,
    settings,
)


class Clock:
    def __init__(self):
        self.now = utc_now()

    def __call__(self):
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(label_store, reader, clock):
    return create_app(label_store, reader, settings(), clock=clock)


def logged_in(app, username: str, password: str = PASSWORD) -> tuple[TestClient, str]:
    client = TestClient(app, follow_redirects=False)
    client.follow_redirects = True
    csrf = log_in(client, username, password)
    client.follow_redirects = False
    return client, csrf


def post_json(client, path: str, csrf: str, body: dict, **headers):
    return client.post(path, json=body, headers={"X-CSRF-Token": csrf, **headers})


def login_attempt(app_or_client, username: str, password: str):
    client = (
        app_or_client
        if isinstance(app_or_client, TestClient)
        else TestClient(app_or_client, follow_redirects=False)
    )
    token = csrf_from(client.get("/login").text)
    return client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )


# -- sessions ---------------------------------------------------------------------------------


def test_a_copied_cookie_is_refused_after_logout(app):
    alice, csrf = logged_in(app, "alice")
    thief = TestClient(app, follow_redirects=False, cookies=dict(alice.cookies))
    assert thief.get("/api/next").status_code == 200
    alice.post("/logout", data={"csrf_token": csrf})
    refused = thief.get("/api/next")
    assert refused.status_code == 401
    assert refused.json()["login_url"] == "/login?notice=logged_out"
    page = thief.get("/")
    assert page.status_code == 303 and page.headers["location"] == "/login?notice=logged_out"
    assert "You are logged out." in thief.get(page.headers["location"]).text


@pytest.mark.parametrize("change", ["delete", "disable", "password"])
def test_account_changes_end_its_sessions_at_once(app, label_store, change):
    alice, csrf = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    {
        "delete": lambda: label_store.delete_annotator("alice", by="root"),
        "disable": lambda: label_store.disable_annotator("alice", by="root"),
        "password": lambda: label_store.reset_password("alice", "Other-Lantern-42-Moss", by="root"),
    }[change]()
    answer = post_json(alice, "/api/label", csrf, {"item_id": item["id"], "label": "coronal"})
    assert answer.status_code == 401 and answer.json()["login_url"] == "/login?notice=revoked"
    assert label_store.label_count() == 0
    if change != "password":
        assert login_attempt(app, "alice", PASSWORD).status_code == 401


def test_a_demoted_admin_loses_the_admin_pages_at_once(app, label_store):
    label_store.add_annotator("carol", PASSWORD, "admin")
    carol, _ = logged_in(app, "carol")
    assert carol.get("/admin").status_code == 200
    root, root_csrf = logged_in(app, "root")
    demoted = root.post(
        "/admin/users/role", data={"username": "carol", "role": "clinician", "csrf_token": root_csrf}
    )
    assert demoted.status_code == 303
    after = carol.get("/admin")
    assert after.status_code == 303 and after.headers["location"] == "/login?notice=revoked"
    carol_again, _ = logged_in(app, "carol")
    assert carol_again.get("/admin").status_code == 403


def test_a_forged_cookie_is_refused_even_with_the_secret_known(app, label_store):
    forged = secrets.token_urlsafe(32)
    assert label_store.session_for(token_hash(SECRET, forged), idle_s=1800)[0] is None
    for cookie in (forged, "alice", "x" * 5000, "é" * 43):
        client = TestClient(app, follow_redirects=False)
        raw = {"cookie": b"triage_session=" + cookie.encode("utf-8")}
        assert client.get("/api/next", headers=raw).status_code == 401, cookie[:10]
        assert client.get("/admin", headers=raw).status_code == 303


def test_sessions_end_after_idle_time_and_at_their_absolute_end(label_store, reader, clock):
    app = create_app(label_store, reader, settings(session_idle_s=1800, session_max_age_s=7200),
                     clock=clock)
    alice, _ = logged_in(app, "alice")
    clock.advance(minutes=29)
    assert alice.get("/api/next").status_code == 200
    clock.advance(minutes=29)  # 29 min after the last request: still alive
    assert alice.get("/api/next").status_code == 200
    clock.advance(minutes=31)
    idle = alice.get("/api/next")
    assert idle.status_code == 401 and idle.json()["login_url"] == "/login?notice=idle"

    bob, _ = logged_in(app, "bob")
    for _ in range(4):
        clock.advance(minutes=25)
        assert bob.get("/api/next").status_code == 200
    clock.advance(minutes=25)
    expired = bob.get("/api/next")
    assert expired.status_code == 401 and expired.json()["login_url"] == "/login?notice=expired"


def test_background_calls_do_not_keep_a_session_from_idling(label_store, reader, clock):
    app = create_app(label_store, reader, settings(session_idle_s=600), clock=clock)
    alice, csrf = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    for _ in range(3):
        clock.advance(minutes=4)
        assert post_json(alice, "/api/renew", csrf, {"item_ids": [item["id"]]}).status_code in (
            200, 401)
        alice.get("/api/progress")
    assert alice.get("/api/next").status_code == 401


def test_admins_list_and_end_sessions(app):
    alice, _ = logged_in(app, "alice")
    root, csrf = logged_in(app, "root")
    listing = root.get("/admin/sessions").text
    assert 'data-username="alice"' in listing and 'data-username="root"' in listing
    session_id = listing.split('data-username="alice"')[0].rsplit('data-session-id="', 1)[1]
    session_id = session_id.split('"')[0]
    ended = root.post("/admin/sessions/end", data={"session_id": session_id, "csrf_token": csrf})
    assert ended.status_code == 303
    assert alice.get("/api/next").status_code == 401
    assert 'data-username="alice"' not in root.get("/admin/sessions").text


@pytest.mark.parametrize("secret", ["", "secret", "changeme", "short-but-random-7Gq", "a" * 64])
def test_the_app_refuses_to_start_with_a_weak_or_default_secret(label_store, reader, secret):
    with pytest.raises(WeakSecret, match="MRI_ASSETS_TRIAGE_SECRET"):
        create_app(label_store, reader, TriageSettings(secret_key=secret))
    create_app(label_store, reader, TriageSettings(secret_key=secret, demo=True))


def test_the_deployment_settings_need_a_secret_unless_in_demo(monkeypatch, label_store, reader):
    monkeypatch.delenv("MRI_ASSETS_TRIAGE_SECRET", raising=False)
    monkeypatch.delenv("MRI_ASSETS_TRIAGE_DEMO", raising=False)
    with pytest.raises(WeakSecret):
        create_app(label_store, reader, TriageSettings.from_deployment(Deployment.from_env()))
    monkeypatch.setenv("MRI_ASSETS_TRIAGE_DEMO", "1")
    demo = TriageSettings.from_deployment(Deployment.from_env())
    assert demo.demo and len(demo.secret_key) >= 32
    monkeypatch.delenv("MRI_ASSETS_TRIAGE_DEMO")
    monkeypatch.setenv("MRI_ASSETS_TRIAGE_SECRET", SECRET)
    create_app(label_store, reader, TriageSettings.from_deployment(Deployment.from_env()))


# -- login ------------------------------------------------------------------------------------


def test_fifty_wrong_passwords_lock_the_account_and_the_right_one_waits(app, label_store, clock):
    answers = []
    for _ in range(50):
        answers.append(login_attempt(app, "alice", "Wrong-Guess-Password-1"))
        clock.advance(seconds=40)  # longer than any delay before the lockout
    codes = [a.status_code for a in answers]
    assert codes[:3] == [401, 401, 401], "three free tries"
    assert set(codes[3:]) == {429}, "then each failure makes the next guess wait"
    assert int(answers[-1].headers["retry-after"]) > 0
    assert "try again after" in answers[-1].text
    assert login_attempt(app, "alice", PASSWORD).status_code == 429
    audit = [e["what"] for e in label_store.audit_entries(who="alice", limit=100)]
    # locked at the 10th failure for 15 min; one guess after that locks it again
    assert audit.count("login_failed") == 11, "guesses while locked are not even checked"
    assert audit.count("login_locked") == 2
    clock.advance(minutes=16)
    assert login_attempt(app, "alice", PASSWORD).status_code == 303


def test_guesses_within_a_delay_are_refused_without_checking(app, label_store, clock):
    for _ in range(4):
        login_attempt(app, "alice", "Wrong-Guess-Password-1")
    assert login_attempt(app, "alice", PASSWORD).status_code == 429
    clock.advance(seconds=2)
    assert login_attempt(app, "alice", PASSWORD).status_code == 303


def test_one_client_guessing_many_accounts_is_throttled_too(label_store, reader, clock):
    policy = LoginPolicy(client_free_failures=5, client_lockout_failures=8)
    app = create_app(label_store, reader, settings(login_policy=policy), clock=clock)
    codes = [login_attempt(app, f"user{n}", "Wrong-Guess-Password-1").status_code
             for n in range(8)]
    assert codes[:5] == [401] * 5 and codes[5] == 429
    assert login_attempt(app, "bob", PASSWORD).status_code == 429


def test_weak_passwords_and_look_alike_names_are_refused_by_the_admin_form(app, label_store):
    root, csrf = logged_in(app, "root")
    for username, password, status in [
        ("carol", "password", 422),
        ("carol", "Password2026!", 422),
        ("Alice", PASSWORD, 409),
        (" alice", PASSWORD, 409),
        ("\u0430lice", PASSWORD, 422),
        ("al ice", PASSWORD, 422),
    ]:
        answer = root.post("/admin/users/add", data={
            "username": username, "password": password, "role": "clinician", "csrf_token": csrf})
        assert answer.status_code == status, (username, password)
        assert 'id="admin-error"' in answer.text
    assert {u["username"] for u in label_store.annotators_list()} == {"alice", "bob", "root"}
    assert login_attempt(app, "ALICE", PASSWORD).status_code == 303
    assert login_attempt(app, "\u0430lice", PASSWORD).status_code == 401


def test_the_login_page_shows_only_its_own_messages(client_for_login):
    planted = "Your account is locked: call +1 555 0100 and give your password"
    for query in (f"error={planted}", f"notice={planted}", "notice=__class__"):
        assert planted not in client_for_login.get(f"/login?{query}").text
    assert "You are logged out." in client_for_login.get("/login?notice=logged_out").text


@pytest.fixture
def client_for_login(app):
    return TestClient(app)


# -- inputs -----------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_refused_before_parsing_or_login(app, label_store):
    anonymous = TestClient(app, follow_redirects=False)
    token = csrf_from(anonymous.get("/login").text)
    long_name = "a" * 900_000
    answer = anonymous.post(
        "/login", data={"username": long_name, "password": "x", "csrf_token": token}
    )
    assert answer.status_code == 413 and answer.json()["error"] == "BodyTooLarge"
    over_field = anonymous.post(
        "/login", data={"username": "a" * 300, "password": "x", "csrf_token": token}
    )
    assert over_field.status_code == 422
    assert not [e for e in label_store.audit_entries(limit=500) if len(e["who"]) > 64]
    assert anonymous.post("/api/label", content=b"[" * 200_000,
                          headers={"content-type": "application/json"}).status_code == 413


def test_a_300_mb_body_is_refused_without_reading_it(live_server):
    import httpx

    host, port = urlsplit(live_server.url).hostname, urlsplit(live_server.url).port
    with httpx.Client(base_url=live_server.url, follow_redirects=True) as client:
        log_in(client, "alice")
        cookie = f"triage_session={client.cookies['triage_session']}".encode()

    def first_answer(head: bytes, chunks: int) -> bytes:
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(head)
            chunk = b"{" * 32768
            for _ in range(chunks):  # 96 KiB of a body that would go on for 300 MB
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            return sock.recv(4096)

    declared = (b"POST /api/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 314572800\r\n\r\n" + b"{" * 1024)
    assert first_answer(declared, 0).startswith(b"HTTP/1.1 413")
    streamed = (b"POST /api/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n")
    assert first_answer(streamed + b"\r\n", 3).startswith(b"HTTP/1.1 401"), "never read"
    assert first_answer(streamed + b"Cookie: " + cookie + b"\r\n\r\n", 3).startswith(
        b"HTTP/1.1 413")


def test_non_ascii_tokens_are_simply_wrong(app, label_store):
    alice, csrf = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    for token in ("é", "\u2603" * 43, csrf[:-1] + "é"):
        encoded = token.encode("utf-8")
        answer = alice.post("/api/skip", json={"item_id": item["id"]},
                            headers={"X-CSRF-Token": encoded})
        assert answer.status_code == 403
        assert alice.post("/logout", data={"csrf_token": token}).status_code == 403
        metrics = alice.get("/metrics", headers={"Authorization": b"Bearer " + encoded})
        assert metrics.status_code == 401
    assert label_store.item(item["id"])["state"] == "leased"


@pytest.mark.parametrize("big", [2**31, 2**63, 2**64, 10**30])
def test_ids_out_of_range_get_422_and_change_nothing(app, label_store, big):
    alice, csrf = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    assert alice.get(f"/image/{big}.png").status_code == 422
    assert alice.get(f"/api/next?held={big}").status_code == 422
    assert alice.get(f"/api/next?held={item['id']},{big}").status_code == 422
    for path, body in [
        ("/api/label", {"item_id": big, "label": "coronal"}),
        ("/api/skip", {"item_id": big}),
        ("/api/unsure", {"item_id": big}),
        ("/api/undo", {"item_id": big}),
        ("/api/renew", {"item_ids": [big]}),
        ("/api/skip", {"item_id": item["id"], "lease_next_held": [big]}),
        ("/api/label", {"item_id": item["id"], "label": "coronal", "lease_next_held": [big]}),
    ]:
        assert post_json(alice, path, csrf, body).status_code == 422, (path, body)
    assert label_store.item(item["id"])["state"] == "leased", "nothing was saved before the 422"
    assert label_store.label_count() == 0


def test_cross_site_state_changes_are_refused(app, label_store):
    alice, csrf = logged_in(app, "alice")
    item = alice.get("/api/next").json()["item"]
    body = {"item_id": item["id"], "label": "coronal"}
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Referer": "https://evil.example/page"}, {"Origin": "http://testserver.evil"}):
        answer = post_json(alice, "/api/label", csrf, body, **headers)
        assert answer.status_code == 403 and answer.json()["error"] == "CrossOrigin", headers
    assert label_store.label_count() == 0
    same_site = post_json(alice, "/api/label", csrf, body, Origin="http://testserver")
    assert same_site.status_code == 200


def test_every_answer_carries_the_security_headers(app, label_store, reader):
    anonymous = TestClient(app, follow_redirects=False)
    for response in (
        anonymous.get("/login"),
        anonymous.get("/api/next"),
        anonymous.get("/static/label.js"),
        anonymous.post("/api/label", content=b"x" * 70_000),
    ):
        headers = response.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert "strict-transport-security" not in headers
    secure = create_app(label_store, reader, settings(cookie_secure=True))
    answer = TestClient(secure, base_url="https://testserver").get("/login")
    assert answer.headers["strict-transport-security"].startswith("max-age=31536000")
    assert "secure" in answer.headers["set-cookie"].lower()


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(app):
    client = TestClient(app, follow_redirects=False)
    answer = login_attempt(client, "alice", PASSWORD)
    cookie = answer.headers["set-cookie"].lower()
    assert "triage_session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert CLASSES  # the fixture store is the usual one


def test_cookies_are_secure_over_https_even_without_the_setting(app):
    over_https = TestClient(app, base_url="https://testserver", follow_redirects=False)
    assert "secure" in over_https.get("/login").headers["set-cookie"].lower()
    answer = login_attempt(over_https, "alice", PASSWORD)
    assert "secure" in answer.headers["set-cookie"].lower()
    plain = TestClient(app).get("/login")
    assert "secure" not in plain.headers["set-cookie"].lower()
