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
    MAX_ITEM_ID,
    SNAPSHOT_SCHEMA,
    AnnotatorExists,
    BudgetExhausted,
    CannotUndo,
    InvalidUsername,
    ItemClosed,
    ItemLeasedToOther,
    LabelNotInClassSet,
    LabelStore,
    LabelStoreError,
    LastAdmin,
    LeaseLost,
    LoginPolicy,
    UnknownItem,
    WeakPassword,
    migration_heads,
)

CLASSES = ["axial_inferior", "axial_superior", "coronal", "sagittal"]
FAST_HASH = {"argon2_time_cost": 1, "argon2_memory_kib": 8192}
STRONG = "Tulip-Harbor-7-Quartz"


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
    assert store.schema_version() == migration_heads()[0] == "0002_sessions_and_accounts"
    tables = set(sa.inspect(sa.create_engine(store_url)).get_table_names())
    assert {
        "queue_items",
        "labels",
        "annotators",
        "audit_log",
        "budget_periods",
        "sessions",
        "login_throttle",
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
    store.add_annotator("alice", "correct horse staple", "admin")
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM annotators").scalar()
    engine.dispose()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert store.verify_password("alice", "correct horse staple")
    assert not store.verify_password("alice", "wrong horse staple")
    assert not store.verify_password("nobody", "correct horse staple")
    assert store.annotator_role("alice") == "admin"


def test_duplicate_or_invalid_annotators_are_refused(store):
    store.add_annotator("alice", STRONG)
    with pytest.raises(AnnotatorExists):
        store.add_annotator("alice", STRONG + "x")
    with pytest.raises(LabelStoreError, match="role"):
        store.add_annotator("bob", STRONG, "root")
    with pytest.raises(WeakPassword, match="at least 12"):
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


# -- accounts, sessions, throttling (issue 16) ------------------------------------------------

T0 = datetime(2026, 11, 26, 12, 0)
HASH_A, HASH_B = "a" * 64, "b" * 64


def test_usernames_are_folded_and_look_alikes_refused(store):
    assert store.add_annotator(" Alice ", STRONG) == "alice"
    for look_alike in ("ALICE", "alice", "\uff41lice", "a1ice", "\u0430lice"):
        with pytest.raises((AnnotatorExists, InvalidUsername)):
            store.add_annotator(look_alike, STRONG)
    for bad in ("al ice", "al\u200bice", "<b>", "", "x" * 65, "\u0430bc\u0064"):
        with pytest.raises(InvalidUsername):
            store.add_annotator(bad, STRONG)
    assert store.authenticate("  ALICE", STRONG) == "alice"
    assert store.authenticate("\u0430lice", STRONG) is None


@pytest.mark.parametrize(
    "password",
    ["password", "password-123", "P@ssw0rd2024!", "Summer2026!", "123456789012", "aaaaaaaaaaaaaa",
     "qwertyuiop12", "carol-secret-carol"],
)
def test_weak_passwords_are_refused(store, password):
    with pytest.raises(WeakPassword):
        store.add_annotator("carol", password)


def test_a_session_lives_until_logout_idle_or_its_end(store):
    store.add_annotator("alice", STRONG)
    made = store.create_session("alice", HASH_A, lifetime_s=3600, client="10.0.0.1", now=T0)
    found, why = store.session_for(HASH_A, idle_s=1800, now=T0 + timedelta(minutes=10))
    assert found.username == "alice" and found.csrf == made.csrf and why is None
    assert store.session_for("f" * 64, idle_s=1800, now=T0) == (None, "unknown")
    assert store.session_for(HASH_A, idle_s=1800, now=T0 + timedelta(minutes=41)) == (None, "idle")
    assert store.session_for(HASH_A, idle_s=1800, now=T0 + timedelta(minutes=11)) == (None, "idle")
    store.create_session("alice", HASH_B, lifetime_s=600, now=T0)
    for minute in (4, 8):  # activity keeps it from idling, not from its absolute end
        assert store.session_for(HASH_B, idle_s=300, touch_after_s=0,
                                 now=T0 + timedelta(minutes=minute))[0] is not None
    assert store.session_for(HASH_B, idle_s=300, now=T0 + timedelta(minutes=10)) == (
        None, "expired")


@pytest.mark.parametrize(
    "change", ["logout", "disable", "delete", "demote", "password", "admin_ends"]
)
def test_sessions_end_with_logout_and_every_account_change(store, change):
    store.add_annotator("root", STRONG, "admin")
    store.add_annotator("alice", STRONG, "admin")
    session = store.create_session("alice", HASH_A, lifetime_s=3600)
    assert store.session_for(HASH_A, idle_s=1800)[0].role == "admin"
    {
        "logout": lambda: store.end_session(session.id, "logged_out", by="alice"),
        "disable": lambda: store.disable_annotator("alice", by="root"),
        "delete": lambda: store.delete_annotator("alice", by="root"),
        "demote": lambda: store.set_role("alice", "clinician", by="root"),
        "password": lambda: store.reset_password("alice", "Other-Lantern-42-Moss", by="root"),
        "admin_ends": lambda: store.end_session(session.id, "ended_by_admin", by="root"),
    }[change]()
    found, why = store.session_for(HASH_A, idle_s=1800)
    assert found is None and why in ("logged_out", "revoked", "ended_by_admin")
    assert store.sessions_list(idle_s=1800) == []
    if change in ("disable", "delete"):
        assert store.authenticate("alice", STRONG) is None
    if change == "delete":
        assert [u["state"] for u in store.annotators_list()] == ["active", "deleted"]
        with pytest.raises(AnnotatorExists):
            store.add_annotator("alice", STRONG)


def test_the_last_active_admin_cannot_be_demoted_disabled_or_deleted(store):
    store.add_annotator("root", STRONG, "admin")
    for act in (lambda: store.set_role("root", "clinician"), lambda: store.disable_annotator("root"),
                lambda: store.delete_annotator("root")):
        with pytest.raises(LastAdmin):
            act()


def test_failed_logins_lock_the_account_with_growing_delays_then_a_lockout(store):
    store.add_annotator("alice", STRONG)
    policy = LoginPolicy()
    locks = []
    for n in range(12):
        now = T0 + timedelta(seconds=n)
        locks.append(store.record_login_failure("Alice", "10.0.0.9", policy, now=now).locked_until)
    delays = [None if u is None else (u - (T0 + timedelta(seconds=n))).total_seconds()
              for n, u in enumerate(locks)]
    assert delays[:3] == [None, None, None]
    assert delays[3:9] == [1, 2, 4, 8, 16, 32]
    assert delays[9:] == [900, 900, 900]
    keys = store.throttle_keys("alice", "10.0.0.9")
    assert store.login_locked_until(keys, now=T0 + timedelta(seconds=20)) is not None
    assert store.login_locked_until(keys, now=T0 + timedelta(minutes=16)) is None
    whats = [e["what"] for e in store.audit_entries(limit=50)]
    assert whats.count("login_failed") == 12 and whats.count("login_locked") == 3
    store.unlock_annotator("alice")
    assert store.login_locked_until(keys[:1], now=T0 + timedelta(seconds=20)) is None


def test_undo_takes_back_the_latest_label_refunds_it_and_withdraws_its_qa(make_store):
    store = make_store(qa_fraction=1.0, cases_per_period=10)
    store.enqueue("pilot", queue_items(2), CLASSES)
    first = store.lease_next("alice", now=T0)
    second = store.lease_next("alice", held=[first["id"]], now=T0)
    store.submit_label(first["id"], "alice", "coronal", 1.0, now=T0)
    store.submit_label(second["id"], "alice", "sagittal", 1.0, now=T0)
    with pytest.raises(CannotUndo, match="latest"):
        store.undo(first["id"], "alice", now=T0)
    with pytest.raises(CannotUndo):
        store.undo(second["id"], "bob", now=T0)
    before = store.stats(now=T0)
    back = store.undo(second["id"], "alice", now=T0 + timedelta(seconds=30))
    assert back["id"] == second["id"] and back["lease_expires_at"] == second["lease_expires_at"]
    after = store.stats(now=T0)
    assert after["budget_left_cases"] == before["budget_left_cases"] + 1
    assert after["queue_size"] == before["queue_size"], "the QA re-read went, the item came back"
    assert store.label_count() == 1
    store.submit_label(second["id"], "alice", "coronal", 1.0, now=T0 + timedelta(seconds=40))
    with pytest.raises(CannotUndo, match="ended"):
        store.undo(second["id"], "alice", now=T0 + timedelta(seconds=301))
    whats = [e["what"] for e in store.audit_entries(what="undo")]
    assert whats == ["undo"]


def test_undo_of_a_skip_and_not_once_the_qa_read_is_out(make_store):
    store = make_store(qa_fraction=1.0)
    store.enqueue("pilot", queue_items(2), CLASSES)
    skipped = store.lease_next("alice", now=T0)
    store.skip(skipped["id"], "alice", now=T0)
    assert store.undo(skipped["id"], "alice", now=T0)["id"] == skipped["id"]
    store.submit_label(skipped["id"], "alice", "coronal", 1.0, now=T0)
    qa = store.lease_next("bob", now=T0)
    assert qa["kind"] == "qa"
    with pytest.raises(CannotUndo, match="re-read"):
        store.undo(skipped["id"], "alice", now=T0)


def test_renewed_leases_outlive_their_first_end_and_lost_ones_are_reported(store):
    store.enqueue("pilot", queue_items(2), CLASSES)
    item = store.lease_next("alice", lease_seconds=60, now=T0)
    renewed = store.renew_leases("alice", [item["id"], 999], 60, now=T0 + timedelta(seconds=50))
    assert list(renewed) == [item["id"]]
    assert store.lease_next("bob", held=[], now=T0 + timedelta(seconds=90))["id"] != item["id"]
    store.submit_label(item["id"], "alice", "coronal", 1.0, now=T0 + timedelta(seconds=100))


def test_a_case_without_pixels_is_skipped_for_everyone_and_listed_for_the_admin(store):
    store.enqueue("pilot", queue_items(2), CLASSES)
    broken = store.lease_next("alice")
    store.flag_missing_pixels(broken["id"], by="alice")
    assert store.lease_next("alice")["id"] != broken["id"]
    assert store.lease_next("bob") is None
    assert [i["id"] for i in store.flagged_items()] == [broken["id"]]
    assert store.requeue_flagged(None, by="root") == 1
    assert store.lease_next("bob")["id"] == broken["id"]


@pytest.mark.parametrize("bad", [0, -1, MAX_ITEM_ID + 1, 2**63, 2**64 + 5, True, "7", 1.5])
def test_item_ids_out_of_range_are_refused_not_crashed_on(store, bad):
    store.enqueue("pilot", queue_items(1), CLASSES)
    for act in (lambda: store.submit_label(bad, "alice", "coronal", 1.0),
                lambda: store.skip(bad, "alice"), lambda: store.undo(bad, "alice")):
        with pytest.raises(UnknownItem):
            act()
    with pytest.raises(LabelStoreError):
        store.lease_next("alice", held=[bad])
    assert store.item(bad) is None


def test_queue_status_says_when_the_budget_is_spent(make_store):
    make_store(cases_per_period=10).enqueue("pilot", queue_items(2), CLASSES, now=T0)
    store = make_store(cases_per_period=1, qa_fraction=0.0)
    assert store.queue_status(now=T0)["status"] == "open"
    first = store.lease_next("alice", now=T0)
    second = store.lease_next("alice", held=[first["id"]], now=T0)
    store.submit_label(first["id"], "alice", "coronal", 1.0, now=T0)
    status = store.queue_status(now=T0)
    assert status == {"status": "budget_spent", "budget_left_cases": 0, "resumes_on": "2027-01-01"}
    with pytest.raises(BudgetExhausted) as refused:
        store.submit_label(second["id"], "alice", "coronal", 1.0, now=T0)
    assert refused.value.resumes_on.isoformat() == "2027-01-01"
    assert store.lease_next("alice", now=T0) is None, "no expert case once the budget is spent"


def test_admin_reports_kappa_per_pair_weekly_counts_and_burn_down(make_store):
    store = make_store(qa_fraction=1.0, cases_per_period=10)
    store.enqueue("pilot", queue_items(2), CLASSES, now=T0)
    for label in ("coronal", "sagittal"):
        store.submit_label(store.lease_next("alice", now=T0)["id"], "alice", label, 1.0, now=T0)
    for label in ("coronal", "coronal"):
        store.submit_label(store.lease_next("bob", now=T0)["id"], "bob", label, 1.0, now=T0)
    (pair,) = store.kappa_per_pair()
    assert pair["pair"] == ("alice", "bob") and pair["cases"] == 2
    weeks = store.labels_by_week(weeks=2, now=T0)
    assert weeks["by_annotator"] == {"alice": [0, 2], "bob": [0, 2]}
    assert weeks["by_class"]["coronal"] == [0, 3]
    burn = store.burn_down(now=T0)
    assert burn["cap_eur"] == pytest.approx(5.5) and burn["left_eur"] == pytest.approx(4.4)


def test_migration_from_the_first_revision_folds_existing_names(store_url):
    from alembic import command
    from alembic.config import Config

    from mri_assets.resources.label_store import MIGRATIONS_DIR

    engine = sa.create_engine(store_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001_initial")
        for n, name in enumerate(["Alice", "alice ", "Bob"]):
            conn.execute(
                sa.text("INSERT INTO annotators (username, password_hash, role, created_at) "
                        "VALUES (:u, 'x', 'clinician', :t)"),
                {"u": name, "t": T0 + timedelta(seconds=n)},
            )
    engine.dispose()
    store = LabelStore(url=store_url, **FAST_HASH)
    try:
        rows = {u["username"]: u["can_log_in"] for u in store.annotators_list()}
        assert rows == {"Alice": True, "alice ": False, "Bob": True}
        assert store.annotator_role("bob") == "clinician"
    finally:
        store.dispose()
