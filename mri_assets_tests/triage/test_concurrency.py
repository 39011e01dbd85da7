"""20 simulated clinicians label at once against a real uvicorn server on loopback."""

from __future__ import annotations

import threading

import httpx
import pytest

from mri_assets.resources.object_store import LocalObjectStore
from mri_assets.triage.app import create_app
from mri_assets.triage.slice_reader import SliceReader
from mri_assets_tests.services import free_port
from mri_assets_tests.triage.conftest import (
    CLASSES,
    LiveServer,
    add_users,
    image_ids,
    log_in,
    make_store,
    settings,
    write_slices_shard,
)

CLINICIANS = [f"clinician{i:02d}" for i in range(20)]
BUDGET_CASES = 40


def clinician_session(base_url: str, username: str, accepted: list, refusals: list) -> None:
    with httpx.Client(base_url=base_url, timeout=60, follow_redirects=True) as client:
        csrf = log_in(client, username)
        while True:
            item = client.get("/api/next").json()["item"]
            if item is None:
                return
            label = CLASSES[(item["id"] + len(username)) % len(CLASSES)]
            response = client.post(
                "/api/label",
                json={"item_id": item["id"], "label": label, "seconds_spent": 0.1},
                headers={"X-CSRF-Token": csrf},
            )
            if response.status_code == 200:
                accepted.append((response.json()["label_id"], item["id"], username, label))
            else:
                refusals.append(response.json()["error"])
                if response.json()["error"] == "BudgetExhausted":
                    client.post(
                        "/api/skip", json={"item_id": item["id"]}, headers={"X-CSRF-Token": csrf}
                    )


@pytest.mark.slow
def test_twenty_clinicians_never_double_label_lose_labels_or_overspend(tmp_path):
    ids = image_ids(60)
    write_slices_shard(tmp_path / "store", "pilot", ids)
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    make_store(url, cases_per_period=1000).enqueue(
        "pilot", [{"image_id": i, "priority": float(n)} for n, i in enumerate(ids)], CLASSES
    )
    store = make_store(url, cases_per_period=BUDGET_CASES, qa_fraction=0.25)
    add_users(store, CLINICIANS)
    reader = SliceReader(LocalObjectStore(root=str(tmp_path / "store")))
    accepted: list[tuple[int, int, str, str]] = []
    refusals: list[str] = []
    with LiveServer(create_app(store, reader, settings()), free_port()) as server:
        threads = [
            threading.Thread(target=clinician_session, args=(server.url, name, accepted, refusals))
            for name in CLINICIANS
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    snapshot = store.labels_snapshot()
    stats = store.stats()
    store.dispose()
    assert sorted(snapshot["label_id"].to_list()) == sorted(a[0] for a in accepted), "no label lost"
    assert snapshot["item_id"].is_unique().all(), "no item labeled twice"
    experts = snapshot.filter(snapshot["kind"] == "expert")
    assert experts["image_id"].is_unique().all(), "no image labeled twice except as QA"
    assert experts.height == BUDGET_CASES, "the budget is spent exactly, never exceeded"
    assert stats["budget_left_cases"] == 0
    assert stats["budget_left_eur"] == pytest.approx(BUDGET_CASES * 0.55 - BUDGET_CASES * 0.55)
    assert set(refusals) <= {"BudgetExhausted"}
    qa = snapshot.filter(snapshot["kind"] == "qa").join(
        experts.select("image_id", first_reader="annotator"), on="image_id"
    )
    assert (qa["annotator"] != qa["first_reader"]).all(), "QA goes to a different clinician"
