"""Property-based test over every route of the triage app's OpenAPI schema: no input gets a 5xx.

Hypothesis draws an operation from the schema the app generates (`app.openapi()`), then the
caller (anonymous, clinician or admin), the path, query and body parameters the operation names
plus unknown ones, each from adversarial values (huge and negative integers, NaN, non-ASCII and
control characters, nested junk, real item ids and labels), raw bodies of the wrong type or over
the size limit, a right or wrong CSRF token, a same- or cross-site Origin. The answer must be
below 500. The example count is capped so the test runs in `make test` in seconds; under CI the
examples are derandomized (the same every run).
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mri_assets.resources.label_store import LoginPolicy, token_hash
from mri_assets.triage.app import create_app
from mri_assets_tests.triage.conftest import CLASSES, PASSWORD, SECRET, csrf_from, log_in
from mri_assets_tests.triage.conftest import settings as app_settings

MAX_EXAMPLES = 600
PROTECTED = {"alice", "root"}  # the callers' own accounts stay usable throughout
NO_CLIENT_LOCK = LoginPolicy(client_free_failures=10**6, client_lockout_failures=10**6 + 1)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        ["coronal", "sagittal", "", " ", "é", "\u0430lice", "\x00", "../../etc/passwd",
         "<script>alert(1)</script>", "9" * 400, "1,2,3", "admin", "clinician", "true", "NaN"]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8,
)
_text_values = st.one_of(
    st.text(max_size=60),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["", "1", "0", "-1", "2147483648", "9223372036854775808", "coronal", "é" * 3,
                     "alice", "admin", "disable", "true", "2026-02-30", "2026-01-01", "x" * 300]),
)


def _resolve(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def operations(app) -> list[dict]:
    spec = app.openapi()
    components = spec.get("components", {}).get("schemas", {})
    found = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {})
            media, fields = None, []
            for media, content in body.items():
                fields = list(_resolve(content["schema"], components).get("properties", {}))
            found.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "query": [p["name"] for p in op.get("parameters", []) if p["in"] == "query"],
                    "path_params": [p["name"] for p in op.get("parameters", [])
                                    if p["in"] == "path"],
                    "media": media,
                    "fields": fields,
                }
            )
    return found


class Callers:
    """Logged-in clients for a clinician and an admin; logged in again whenever a request
    ended their session (logout, an admin action)."""

    def __init__(self, app, store):
        self.app, self.store = app, store
        self.clients = {"anonymous": TestClient(app, raise_server_exceptions=False,
                                                follow_redirects=False, client=("10.66.0.1", 1))}
        self.csrf = {"anonymous": csrf_from(self.clients["anonymous"].get("/login").text)}
        for role, name, address in (("clinician", "alice", "10.0.0.2"), ("admin", "root",
                                                                          "10.0.0.3")):
            self.clients[role] = TestClient(app, raise_server_exceptions=False,
                                            client=(address, 1))
            self.csrf[role] = None
            self.names = getattr(self, "names", {}) | {role: name}

    def get(self, role: str) -> tuple[TestClient, str]:
        client = self.clients[role]
        if role != "anonymous":
            token = client.cookies.get("triage_session")
            alive = token and self.store.session_for(token_hash(SECRET, token), 1800, touch=False)[0]
            if not alive:
                client.cookies.clear()
                client.follow_redirects = True
                self.csrf[role] = log_in(client, self.names[role], PASSWORD)
                client.follow_redirects = False
        return client, self.csrf[role]


@pytest.fixture
def callers(label_store, reader):
    app = create_app(label_store, reader, app_settings(login_policy=NO_CLIENT_LOCK))
    return Callers(app, label_store)


@st.composite
def requests(draw, ops: list[dict], item_ids: list[int]):
    op = draw(st.sampled_from(ops))
    role = draw(st.sampled_from(["anonymous", "clinician", "clinician", "admin", "admin"]))
    real_ids = st.sampled_from(item_ids)
    path = op["path"]
    for name in op["path_params"]:
        if name == "item_id":
            value = draw(st.one_of(real_ids, st.integers(min_value=-(2**70), max_value=2**70),
                                   st.text(min_size=1, max_size=20)))
        else:
            value = draw(st.one_of(st.sampled_from(["disable", "enable", "delete", "unlock"]),
                                   st.text(min_size=1, max_size=20)))
        path = path.replace("{" + name + "}", quote(str(value), safe=""))
    query = {name: draw(_text_values | real_ids.map(str)) for name in op["query"]
             if draw(st.booleans())}
    if draw(st.integers(0, 4)) == 0:
        query.update(draw(st.dictionaries(st.text(min_size=1, max_size=8), _text_values,
                                          max_size=2)))
    fields = {}
    plausible = {
        "item_id": real_ids,
        "lease_next_held": st.lists(real_ids, max_size=3),
        "item_ids": st.lists(real_ids, max_size=3),
        "label": st.sampled_from(CLASSES),
        "seconds_spent": st.floats(min_value=0, max_value=100),
        "username": st.sampled_from(["dave", "Erin", "frank-2", "bob"]),
        "password": st.sampled_from([PASSWORD, "Quiet-Meadow-19-Fern", "password", "short"]),
        "role": st.sampled_from(["clinician", "admin"]),
        "session_id": st.integers(1, 5),
    }
    for name in op["fields"]:
        if draw(st.integers(0, 5)) == 0:
            continue  # leave a required field out now and then
        adversarial = _values if op["media"] == "application/json" else _text_values
        if name in plausible and draw(st.integers(0, 2)) > 0:
            fields[name] = draw(plausible[name])
        else:
            fields[name] = draw(adversarial)
    if draw(st.integers(0, 4)) == 0:
        fields.update(draw(st.dictionaries(st.text(min_size=1, max_size=8), _values,
                                           min_size=1, max_size=2)))
    body_kind = draw(st.sampled_from(["fields"] * 6 + ["raw", "huge", "none"]))
    headers = {}
    csrf_kind = draw(st.sampled_from(["right"] * 4 + ["wrong", "none"]))
    if csrf_kind == "wrong":
        headers["X-CSRF-Token"] = draw(st.text(max_size=60)).encode("utf-8")
    if draw(st.integers(0, 9)) == 0:
        headers["Origin"] = draw(st.sampled_from(["https://evil.example", "null",
                                                  "http://testserver"]))
    raw = draw(st.binary(max_size=200)) if body_kind == "raw" else None
    return {"op": op, "role": role, "path": path, "query": query, "fields": fields,
            "body_kind": body_kind, "csrf_kind": csrf_kind, "headers": headers, "raw": raw,
            "content_type": draw(st.sampled_from(["application/json",
                                                  "application/x-www-form-urlencoded",
                                                  "text/plain", "multipart/form-data"]))}


def send(callers: Callers, request: dict):
    client, csrf = callers.get(request["role"])
    op, headers = request["op"], dict(request["headers"])
    fields = dict(request["fields"])
    if str(fields.get("username", "")).strip().casefold() in PROTECTED:
        fields["username"] = "dave"
    if request["csrf_kind"] == "right" and csrf:
        headers.setdefault("X-CSRF-Token", csrf)
        if op["media"] == "application/x-www-form-urlencoded":
            fields.setdefault("csrf_token", csrf)
    kwargs = {"params": request["query"], "headers": headers}
    if op["method"] in ("POST", "PUT", "PATCH", "DELETE"):
        kind = request["body_kind"]
        if kind == "fields" and op["media"] == "application/x-www-form-urlencoded":
            kwargs["data"] = {str(k): v if isinstance(v, str) else json.dumps(v)
                              for k, v in fields.items()}
        elif kind == "fields":
            kwargs["content"] = json.dumps(fields).encode()
            headers["Content-Type"] = "application/json"
        elif kind == "raw":
            kwargs["content"] = request["raw"]
            headers["Content-Type"] = request["content_type"]
        elif kind == "huge":
            kwargs["content"] = b"{" * 70_000
            headers["Content-Type"] = request["content_type"]
    return client.request(op["method"], request["path"], **kwargs)


def test_no_input_to_any_route_gets_a_5xx(callers, label_store):
    ops = operations(callers.app)
    assert len(ops) >= 20
    label_store.enqueue("extra", [{"image_id": f"extra-{n}", "priority": -1.0}
                                  for n in range(60)], CLASSES)
    held: list[int] = []
    for _ in range(40):  # leases of the clinician's, so that answers about them can succeed
        held.append(label_store.lease_next("alice", lease_seconds=3600, held=held[-60:])["id"])
    item_ids = held + [1, 2, 3]
    seen_statuses: set[int] = set()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=os.environ.get("CI") == "true",
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests(ops, item_ids))
    def no_server_error(request):
        response = send(callers, request)
        seen_statuses.add(response.status_code)
        assert response.status_code < 500, (
            f"{request['op']['method']} {request['path']} as {request['role']}: "
            f"{response.status_code} {response.text[:300]}"
        )

    no_server_error()
    assert {200, 303, 401, 403, 413, 422} <= seen_statuses, seen_statuses
