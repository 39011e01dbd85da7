"""The label store on SQLite and (integration) on a real PostgreSQL started by a fixture."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from mri_assets.core.agreement import cohen_kappa
from mri_assets.core.budget import LabelBudget, cases_affordable, period_end, period_start
from mri_assets.resources.label_store import (
    SNAPSHOT_SCHEMA,
    AnnotatorExists,
    BudgetExhausted,
    ItemClosed,
    ItemLeasedToOther,
    LabelNotInClassSet,
    LabelStore,
    LabelStoreError,
    LeaseLost,
    UnknownItem,
    migration_heads,
)

CLASSES = ["axial_inferior", "axial_superior", "coronal", "sagittal"]
FAST_HASH = {"argon2_time_cost": 1, "argon2_memory_kib": 8192}


def queue_items(n: int, prefix: str = "img", kind: str = "expert") -> list[dict]:
    return [
        {"image_id": f"{prefix}{i:04d}", "priority": float(i), "reason": "entropy", "kind": kind}
        for i in range(n)
    ]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'labels.db'}"
        return
    server = request.getfixturevalue("postgres_url")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture
def make_store(store_url):
    opened: list[LabelStore] = []

    def make(**config) -> LabelStore:
        store = LabelStore(url=store_url, **{**FAST_HASH, **config})
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.dispose()


@pytest.fixture
def store(make_store) -> LabelStore:
    return make_store(qa_fraction=0.0)


# -- schema -----------------------------------------------------------------------------------


def test_fresh_database_is_migrated_to_the_versioned_head(store, store_url):
    assert store.schema_version() == migration_heads()[0] == "0001_initial"
    tables = set(sa.inspect(sa.create_engine(store_url)).get_table_names())
    assert {
        "queue_items",
        "labels",
        "annotators",
        "audit_log",
        "budget_periods",
        "alembic_version",
    } <= tables


def test_reopening_a_migrated_database_keeps_its_data(make_store):
    first = make_store()
    first.enqueue("pilot", queue_items(3), CLASSES)
    first.dispose()
    assert make_store().stats()["queue_size"] == 3


def test_audit_log_refuses_updates_and_deletes(store, store_url):
    store.record_audit("alice", "login", {"note": "x"})
    engine = sa.create_engine(store_url)
    for statement in ("UPDATE audit_log SET who = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(statement)
    engine.dispose()


def test_sqlite_store_runs_in_wal_mode(tmp_path):
    store = LabelStore(url=f"sqlite:///{tmp_path / 'wal.db'}")
    with store._read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.dispose()


# -- queue ------------------------------------------------------------------------------------


def test_enqueue_never_requeues_queued_or_labeled_image_ids(store):
    assert store.enqueue("pilot", queue_items(4), CLASSES) == 4
    item = store.lease_next("alice")
    store.submit_label(item["id"], "alice", "coronal", 2.0)
    assert store.enqueue("scale", queue_items(6), CLASSES) == 2
    assert store.stats()["queue_size"] == 3 + 2


def test_enqueue_caps_the_queue_at_what_the_budget_pays_for(make_store):
    store = make_store(cases_per_period=5, qa_fraction=0.0)
    assert store.enqueue("pilot", queue_items(8), CLASSES) == 5
    queued_ids = {store.lease_next(f"a{i}")["image_id"] for i in range(5)}
    assert queued_ids == {f"img{i:04d}" for i in range(3, 8)}, "highest priority first"
    assert store.enqueue("pilot", queue_items(3, prefix="new"), CLASSES) == 0


def test_enqueue_refuses_bad_items_with_a_clear_message(store):
    with pytest.raises(LabelStoreError, match="appears twice"):
        store.enqueue("pilot", queue_items(2) + queue_items(1), CLASSES)
    with pytest.raises(LabelStoreError, match="kind must be one of"):
        store.enqueue("pilot", queue_items(1, kind="qa"), CLASSES)
    with pytest.raises(LabelStoreError, match="class_set"):
        store.enqueue("pilot", queue_items(1), [])
    with pytest.raises(LabelStoreError, match="priority"):
        store.enqueue("pilot", [{"image_id": "x", "priority": float("nan")}], CLASSES)


def test_two_annotators_never_lease_the_same_item(store):
    store.enqueue("pilot", queue_items(2), CLASSES)
    first, second = store.lease_next("alice"), store.lease_next("bob")
    assert first["id"] != second["id"]
    assert store.lease_next("carol") is None


def test_concurrent_leases_hand_out_each_item_once(make_store):
    store = make_store(qa_fraction=0.0)
    store.enqueue("pilot", queue_items(40), CLASSES)
    leased: list[int] = []
    lock = threading.Lock()

    def clinician(name: str) -> None:
        mine: list[int] = []
        while (item := store.lease_next(name, held=mine)) is not None:
            mine.append(item["id"])
        with lock:
            leased.extend(mine)

    threads = [threading.Thread(target=clinician, args=(f"c{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(leased) == sorted(set(leased)) and len(leased) == 40


def test_expired_lease_returns_the_item_to_the_queue(store):
    store.enqueue("pilot", queue_items(1), CLASSES)
    now = datetime(2026, 11, 26, 12, 0)
    item = store.lease_next("alice", lease_seconds=60, now=now)
    assert store.lease_next("bob", now=now + timedelta(seconds=30)) is None
    again = store.lease_next("bob", now=now + timedelta(seconds=61))
    assert again["id"] == item["id"]
    with pytest.raises(ItemLeasedToOther):
        store.submit_label(item["id"], "alice", "coronal", 1.0, now=now + timedelta(seconds=62))


def test_an_annotators_own_lease_is_handed_back_unless_held(store):
    store.enqueue("pilot", queue_items(3), CLASSES)
    first = store.lease_next("alice")
    assert store.lease_next("alice")["id"] == first["id"]
    second = store.lease_next("alice", held=[first["id"]])
    assert second["id"] != first["id"]


# -- submitting -------------------------------------------------------------------------------


def test_label_outside_the_class_set_is_refused(store):
    store.enqueue("pilot", queue_items(1), CLASSES)
    item = store.lease_next("alice")
    with pytest.raises(LabelNotInClassSet, match="not in wave 'pilot'"):
        store.submit_label(item["id"], "alice", "tumour", 1.0)
    assert store.label_count() == 0


def test_label_for_an_unknown_item_is_refused(store):
    with pytest.raises(UnknownItem, match="no queue item with id 999"):
        store.submit_label(999, "alice", "coronal", 1.0)


def test_label_for_an_item_leased_to_someone_else_is_refused(store):
    store.enqueue("pilot", queue_items(1), CLASSES)
    item = store.lease_next("alice")
    with pytest.raises(ItemLeasedToOther, match="leased to another annotator"):
        store.submit_label(item["id"], "bob", "coronal", 1.0)


def test_label_after_the_lease_was_lost_is_refused(store):
    store.enqueue("pilot", queue_items(1), CLASSES)
    now = datetime(2026, 11, 26, 12, 0)
    item = store.lease_next("alice", lease_seconds=10, now=now)
    with pytest.raises(LeaseLost, match="expired"):
        store.submit_label(item["id"], "alice", "coronal", 1.0, now=now + timedelta(seconds=11))


def test_labeling_the_same_item_twice_is_refused(store):
    store.enqueue("pilot", queue_items(1), CLASSES)
    item = store.lease_next("alice")
    store.submit_label(item["id"], "alice", "coronal", 1.0)
    with pytest.raises(ItemClosed, match="already done"):
        store.submit_label(item["id"], "alice", "sagittal", 1.0)
    assert store.label_count() == 1


def test_budget_is_never_exceeded_by_concurrent_submissions(make_store):
    make_store(cases_per_period=100).enqueue("pilot", queue_items(20), CLASSES)
    store = make_store(cases_per_period=5, qa_fraction=0.0)
    items = [(f"c{i}", store.lease_next(f"c{i}")) for i in range(20)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(items))

    def submit(annotator: str, item: dict) -> None:
        barrier.wait()
        try:
            store.submit_label(item["id"], annotator, "coronal", 1.0)
            outcomes.append("ok")
        except BudgetExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit, args=pair) for pair in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = store.stats()
    assert outcomes.count("ok") == 5 and outcomes.count("refused") == 15
    assert store.label_count() == 5
    assert stats["budget_left_cases"] == 0
    assert stats["budget_left_eur"] == pytest.approx(5 * 0.55 - 5 * 0.55)


def test_budget_refreshes_in_the_next_period(make_store):
    store = make_store(cases_per_period=1, qa_fraction=0.0)
    now = datetime(2026, 3, 31, 23, 0)
    store.enqueue("pilot", queue_items(1), CLASSES, now=now)
    store.submit_label(store.lease_next("alice", now=now)["id"], "alice", "coronal", 1.0, now=now)
    assert store.stats(now=now)["budget_left_cases"] == 0
    april = datetime(2026, 4, 1, 9, 0)
    assert store.stats(now=april)["budget_left_cases"] == 1
    assert store.enqueue("pilot", queue_items(2, prefix="q2"), CLASSES, now=april) == 1


def test_qa_reread_goes_to_a_different_clinician_and_kappa_is_reported(make_store):
    store = make_store(qa_fraction=1.0)
    store.enqueue("pilot", queue_items(2), CLASSES)
    for label in ("coronal", "sagittal"):
        store.submit_label(store.lease_next("alice")["id"], "alice", label, 1.0)
    spent_after_experts = store.stats()["budget_left_eur"]
    assert store.lease_next("alice") is None, "the first reader never gets the QA item"
    for label in ("coronal", "coronal"):
        qa_item = store.lease_next("bob")
        assert qa_item["kind"] == "qa"
        store.submit_label(qa_item["id"], "bob", label, 1.0)
    stats = store.stats()
    assert stats["qa_pairs"] == 2
    assert stats["kappa"] == pytest.approx(cohen_kappa(["coronal", "sagittal"], ["coronal"] * 2))
    assert stats["budget_left_eur"] == spent_after_experts, "QA is paid by the QA share"
    snapshot = store.labels_snapshot("pilot")
    assert snapshot["kind"].to_list() == ["expert", "expert", "qa", "qa"]


def test_qa_fraction_picks_about_that_share_of_cases(make_store):
    store = make_store(qa_fraction=0.10)
    store.enqueue("pilot", queue_items(100), CLASSES)
    for _ in range(100):
        store.submit_label(store.lease_next("alice")["id"], "alice", "coronal", 0.5)
    qa_items = store.stats()["queue_size"]
    assert 3 <= qa_items <= 20


def test_skip_closes_the_item_and_unsure_passes_it_to_another_clinician(store):
    store.enqueue("pilot", queue_items(2), CLASSES)
    skipped = store.lease_next("alice")
    store.skip(skipped["id"], "alice")
    unsure = store.lease_next("alice")
    store.mark_unsure(unsure["id"], "alice")
    assert store.lease_next("alice") is None
    assert store.lease_next("bob")["id"] == unsure["id"]
    store.mark_unsure(unsure["id"], "bob")
    assert store.item(unsure["id"])["state"] == "skipped"
    assert store.item(skipped["id"])["state"] == "skipped"
    assert store.stats()["budget_left_cases"] == 3000


def test_restart_keeps_labels_and_leases(make_store):
    store = make_store(qa_fraction=0.0)
    store.enqueue("pilot", queue_items(3), CLASSES)
    done = store.lease_next("alice")
    store.submit_label(done["id"], "alice", "coronal", 4.0)
    open_lease = store.lease_next("alice")
    store.dispose()
    reopened = make_store(qa_fraction=0.0)
    assert reopened.label_count() == 1
    assert reopened.lease_next("alice")["id"] == open_lease["id"]
    reopened.submit_label(open_lease["id"], "alice", "sagittal", 2.0)
    assert reopened.label_count() == 2


def test_labels_snapshot_has_a_fixed_schema_and_filters_by_wave(store):
    assert store.labels_snapshot().schema == SNAPSHOT_SCHEMA
    store.enqueue("pilot", queue_items(1), CLASSES)
    store.enqueue("scale", queue_items(1, prefix="s", kind="holdout"), CLASSES)
    for _ in range(2):
        store.submit_label(store.lease_next("alice")["id"], "alice", "coronal", 1.0)
    assert store.labels_snapshot("scale")["queue_kind"].to_list() == ["holdout"]
    assert store.labels_snapshot().height == 2


# -- annotators -------------------------------------------------------------------------------


def test_passwords_are_stored_as_argon2_hashes_and_verified(store, store_url):
    store.add_annotator("alice", "correct horse", "admin")
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM annotators").scalar()
    engine.dispose()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert store.verify_password("alice", "correct horse")
    assert not store.verify_password("alice", "wrong horse")
    assert not store.verify_password("nobody", "correct horse")
    assert store.annotator_role("alice") == "admin"


def test_duplicate_or_invalid_annotators_are_refused(store):
    store.add_annotator("alice", "password1")
    with pytest.raises(AnnotatorExists):
        store.add_annotator("alice", "password2")
    with pytest.raises(LabelStoreError, match="role"):
        store.add_annotator("bob", "password1", "root")
    with pytest.raises(LabelStoreError, match="at least 8"):
        store.add_annotator("bob", "short")


# -- budget and agreement arithmetic (core) ---------------------------------------------------


def test_default_budget_caps_at_1650_eur_for_3000_cases():
    budget = LabelBudget()
    assert budget.cap_eur == pytest.approx(1650.0)
    assert cases_affordable(0.0, budget) == 3000
    assert cases_affordable(1650.0 - 0.55, budget) == 1
    assert cases_affordable(1650.0, budget) == 0
    assert cases_affordable(0.0, budget, cases_used=2999) == 1


def test_budget_periods_are_quarters_by_default():
    assert period_start(datetime(2026, 11, 26), 3).isoformat() == "2026-10-01"
    assert period_end(period_start(datetime(2026, 11, 26), 3), 3).isoformat() == "2027-01-01"
    with pytest.raises(ValueError, match="period_months"):
        LabelBudget(period_months=5)


def test_cohen_kappa_matches_the_textbook_example():
    first = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    second = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="same cases"):
        cohen_kappa(["a"], [])
