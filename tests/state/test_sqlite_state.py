"""SQLiteStateStore: the shared StateStore contract, plus what only SQLite has (files,
several connections or processes on one file, schema versions, pragmas)."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from member_conformance import MemberStoreContract
from state_conformance import CENTURY, T0, TTL, StateStoreContract, at, entries, fp, run_record

import sync.state.fold as fold_module
import sync.state.sqlite.fingerprints as sqlite_state
from sync.errors import LeaseHeld, LeaseLost
from sync.model import ActivationMeta, Fingerprint, JournalEntry, Lease, Refusal, RefusalKind
from sync.state.base import DELIVERY_RETENTION, StateStore
from sync.state.fold import FOLD_DUE_DOCUMENTS, FOLD_DUE_ROWS, FOLD_DUE_SHARE, fold_due
from sync.state.sqlite import SCHEMA_VERSION, SQLiteStateStore, StateSchemaError
from sync.state.sqlite import intents as sqlite_module

REPO_ROOT = Path(__file__).resolve().parents[2]
LEGACY = Path(__file__).resolve().parent / "legacy_sqlite"


class TestSQLiteStateStore(StateStoreContract, MemberStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[StateStore]:
        s = SQLiteStateStore(tmp_path / "state.db")
        yield s
        s.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "state.db"


# -- files and set-up ------------------------------------------------------------------------


def test_creates_parent_directories_and_a_versioned_schema(db_path: Path) -> None:
    with SQLiteStateStore(db_path):
        pass
    assert db_path.is_file()
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        raw.close()


def test_a_file_from_before_delivery_counts_gains_the_table_on_open(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        store.save_run(run_record("run-1", "act", "2026-01-01T00:00:00Z", trigger_id="msg-1"))
    # The file as schema version 1 first shipped: no deliveries table.
    raw = sqlite3.connect(db_path)
    raw.execute("DROP TABLE deliveries")
    raw.commit()
    raw.close()
    with SQLiteStateStore(db_path) as store:
        assert store.record_delivery_attempt("act", "msg-1", T0) == 1
        assert store.find_run_by_trigger("act", "msg-1") is not None  # nothing else touched
    assert _schema_versions(db_path) == [(SCHEMA_VERSION,)]


def test_a_file_from_before_refusals_gains_the_table_on_open(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
        store.release_lease(lease)
    raw = sqlite3.connect(db_path)
    raw.execute("DROP TABLE refusals")
    raw.commit()
    raw.close()
    with SQLiteStateStore(db_path) as store:
        assert store.load_refusals("act") == {}
        assert store.load_fingerprints("act") == {"u1": fp(1)}
        lease = store.acquire_lease("act", "run-b", TTL, at(2))
        store.record_refusals(lease, [Refusal("u2", 2, "f", "r")])
        assert store.load_refusals("act") == {"u2": Refusal("u2", 2, "f", "r")}


def test_delivery_counts_older_than_the_retention_are_forgotten(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        assert store.record_delivery_attempt("act", "old", T0) == 1
        assert store.record_delivery_attempt("act", "recent", T0 + DELIVERY_RETENTION) == 1
        # Recording anything prunes counts last touched before now - retention.
        store.record_delivery_attempt("act", "new", T0 + DELIVERY_RETENTION + timedelta(seconds=1))
        assert store.delivery_attempts("act", "old") == 0
        assert store.delivery_attempts("act", "recent") == 1


def test_trigger_requests_older_than_the_retention_are_forgotten(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        assert store.record_trigger_request("http:old", "a", T0) == "a"
        assert store.record_trigger_request("http:recent", "a", T0 + DELIVERY_RETENTION) == "a"
        store.record_trigger_request("http:new", "a", T0 + DELIVERY_RETENTION + timedelta(seconds=1))
        # Forgotten: the key is new again; kept: its first request still stands.
        assert store.record_trigger_request("http:old", "b", T0 + DELIVERY_RETENTION + timedelta(seconds=2)) == "b"
        assert store.record_trigger_request("http:recent", "b", T0 + DELIVERY_RETENTION + timedelta(seconds=2)) == "a"


def test_reopening_keeps_one_schema_version_row(db_path: Path) -> None:
    for _ in range(3):
        SQLiteStateStore(db_path).close()
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (1,)
    finally:
        raw.close()


def test_commits_are_fsynced(db_path: Path) -> None:
    # Killing a process cannot show the difference between NORMAL and FULL (the OS page
    # cache survives; only a power loss loses NORMAL's last commits), so the setting
    # that guarantee 1 relies on is asserted directly.
    with SQLiteStateStore(db_path) as store:
        assert store._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # 2 = FULL


def test_refuses_a_newer_schema_version(db_path: Path) -> None:
    SQLiteStateStore(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        raw.execute("DROP TABLE intent_batches")  # a newer schema may differ: we must not "repair" it
    raw.close()
    with pytest.raises(StateSchemaError) as excinfo:
        SQLiteStateStore(db_path)
    message = str(excinfo.value)
    assert str(db_path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    raw = sqlite3.connect(db_path)
    try:
        tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "intent_batches" not in tables
    finally:
        raw.close()


def test_in_memory_store_works(tmp_path: Path) -> None:
    with SQLiteStateStore(":memory:") as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
        assert store.load_fingerprints("act") == {"u1": fp(1)}
    assert list(tmp_path.iterdir()) == []


def test_close_is_idempotent_and_final(db_path: Path) -> None:
    store = SQLiteStateStore(db_path)
    store.close()
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.load_fingerprints("act")


def test_repr_names_the_file_only(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        assert repr(store) == f"SQLiteStateStore({str(db_path)!r})"


# -- durability ------------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(db_path: Path) -> None:
    meta = ActivationMeta(mapping_version="v1", owned_keys={"plan", "$email_address"}, continuation={"n": 1})
    record = run_record("run-1", "act", "2026-01-01T00:00:00Z", trigger_id="msg-1")
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1)), ("u2", Fingerprint(2**64 - 1, 2**63))), at(1))
        store.record_intents(lease, ["u1", "u3"])
        store.save_meta(lease, meta)
        store.save_run(record)
        store.release_lease(lease)

    with SQLiteStateStore(db_path) as store:
        assert store.load_fingerprints("act") == {"u1": fp(1), "u2": Fingerprint(2**64 - 1, 2**63)}
        assert store.load_intents("act") == {"u1", "u3"}
        assert store.load_meta("act") == meta
        assert store.get_run("run-1") == record
        assert store.find_run_by_trigger("act", "msg-1") == record
        # The token counter survived too: the next lease's token is higher.
        assert store.acquire_lease("act", "run-b", TTL, at(2)).token > lease.token


def test_a_failed_commit_leaves_the_transaction_closed(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        new = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            store.commit(old, entries(("u1", fp(1))), at(TTL + 2))
        assert not store._conn.in_transaction
        # The write lock was released: another connection can write at once.
        with SQLiteStateStore(db_path, busy_timeout_seconds=0) as other:
            other.save_run(run_record("run-x", "act", "2026-01-01T00:00:00Z"))
        store.commit(new, entries(("u1", fp(1))), at(TTL + 2))
        assert store.load_fingerprints("act") == {"u1": fp(1)}


# -- several connections / processes on one file --------------------------------------------


def test_lease_exclusion_and_fencing_across_connections(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as first, SQLiteStateStore(db_path) as second:
        lease_a = first.acquire_lease("act", "run-a", TTL, T0)
        with pytest.raises(LeaseHeld) as excinfo:
            second.acquire_lease("act", "run-b", TTL, at(1))
        assert "run-a" in str(excinfo.value)
        assert "2026-01-01T00:01:00+00:00" in str(excinfo.value)  # when it expires

        first.commit(lease_a, entries(("u1", fp(1))), at(2))
        assert second.load_fingerprints("act") == {"u1": fp(1)}

        lease_b = second.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            first.commit(lease_a, entries(("u1", None), ("u2", fp(2))), at(3))
        with pytest.raises(LeaseLost):
            first.record_intents(lease_a, ["u2"])
        second.commit(lease_b, entries(("u3", fp(3))), at(TTL + 2))
        assert first.load_fingerprints("act") == {"u1": fp(1), "u3": fp(3)}
        assert first.load_intents("act") == set()


_CHILD = """
import sys
from datetime import UTC, datetime, timedelta
from sync.errors import LeaseHeld, LeaseLost
from sync.model import Fingerprint, JournalEntry, Lease
from sync.state.sqlite import SQLiteStateStore

t0 = datetime(2026, 1, 1, tzinfo=UTC)
store = SQLiteStateStore(sys.argv[1])
try:
    store.acquire_lease("act", "child", 60.0, t0 + timedelta(seconds=1))
except LeaseHeld as exc:
    print("held:", exc)
forged = Lease("act", "child", int(sys.argv[2]), t0 + timedelta(seconds=60))
try:
    store.commit(forged, [JournalEntry("from-child", Fingerprint(1, 1))], t0)
except LeaseLost:
    print("lost")
print("seen:", sorted(store.load_fingerprints("act")))
store.close()
"""


def test_lease_exclusion_across_processes(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "parent", TTL, T0)
        store.commit(lease, entries(("from-parent", fp(1))), at(1))
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(db_path), str(lease.token)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        lines = child.stdout.splitlines()
        assert lines[0].startswith("held: ")
        assert "parent" in lines[0]
        assert lines[1:] == ["lost", "seen: ['from-parent']"]
        assert store.load_fingerprints("act") == {"from-parent": fp(1)}


def test_a_writer_waits_for_another_connections_transaction(db_path: Path) -> None:
    SQLiteStateStore(db_path).close()
    blocker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release_soon() -> None:
        released.wait(0.3)
        blocker.execute("COMMIT")

    thread = threading.Thread(target=release_soon)
    thread.start()
    try:
        with SQLiteStateStore(db_path, busy_timeout_seconds=30) as store:
            lease = store.acquire_lease("act", "run-a", TTL, T0)  # waits, then succeeds
            assert lease.owner == "run-a"
    finally:
        released.set()
        thread.join()
        blocker.close()


def test_a_writer_gives_up_after_the_busy_timeout(db_path: Path) -> None:
    with SQLiteStateStore(db_path, busy_timeout_seconds=0.05) as store:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                store.acquire_lease("act", "run-a", TTL, T0)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.acquire_lease("act", "run-a", TTL, T0).token == 1


def test_usable_from_worker_threads(db_path: Path) -> None:
    errors: list[BaseException] = []
    with SQLiteStateStore(db_path) as store:

        def run(activation: str) -> None:
            try:
                lease = store.acquire_lease(activation, "worker", TTL, T0)
                for chunk in range(20):
                    store.commit(lease, [JournalEntry(f"{activation}-{chunk}-{n}", fp(n)) for n in range(50)], T0)
                    store.record_intents(lease, [f"{activation}-{chunk}"])
            except BaseException as exc:  # reported to the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(f"act-{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        for i in range(4):
            assert len(store.load_fingerprints(f"act-{i}")) == 20 * 50
            assert len(store.load_intents(f"act-{i}")) == 20


# -- SQLite-specific validation and admin ----------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 2**64, 2**70, True])
def test_out_of_range_fingerprint_raises_and_writes_nothing(db_path: Path, bad: int) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        batch = [JournalEntry("good", fp(1)), JournalEntry("bad-id", Fingerprint(raw=1, payload=bad))]
        with pytest.raises(ValueError, match="bad-id") as excinfo:
            store.commit(lease, batch, at(1))
        assert "'act'" in str(excinfo.value)
        assert store.load_fingerprints("act") == {}


def test_naive_datetimes_are_refused(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        with pytest.raises(ValueError, match="timezone-aware"):
            store.acquire_lease("act", "run-a", TTL, datetime(2026, 1, 1))
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        with pytest.raises(ValueError, match="timezone-aware"):
            store.renew_lease(lease, TTL, datetime(2026, 1, 1))


@pytest.mark.parametrize("ttl", [0.0, -5.0])
def test_non_positive_ttl_is_refused(db_path: Path, ttl: float) -> None:
    with SQLiteStateStore(db_path) as store:
        with pytest.raises(ValueError, match="ttl_seconds"):
            store.acquire_lease("act", "run-a", ttl, T0)
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        with pytest.raises(ValueError, match="ttl_seconds"):
            store.renew_lease(lease, ttl, at(1))


def test_reset_judges_the_lease_by_the_given_now(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
        with pytest.raises(LeaseHeld, match="run-a"):
            store.reset("act", now=at(TTL - 1))
        assert store.load_fingerprints("act") == {"u1": fp(1)}
        store.reset("act", now=at(TTL))  # expired: a crashed run does not block a reset
        assert store.load_fingerprints("act") == {}


def test_reset_refuses_under_the_wall_clock_default(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        store.acquire_lease("act", "run-a", CENTURY, T0)
        with pytest.raises(LeaseHeld):
            store.reset("act")


def test_run_records_need_an_id_and_an_activation_and_json(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        with pytest.raises(ValueError, match="run_id"):
            store.save_run({"activation": "act"})
        with pytest.raises(ValueError, match="activation"):
            store.save_run({"run_id": "run-1"})
        with pytest.raises(TypeError, match="run-1"):
            store.save_run({"run_id": "run-1", "activation": "act", "when": object()})
        with pytest.raises(ValueError, match="limit"):
            store.list_runs("act", limit=-1)
        assert store.get_run("run-1") is None
        assert store.list_runs("act", limit=0) == []


def test_meta_with_a_non_json_continuation_is_refused(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        with pytest.raises(TypeError, match="'act'"):
            store.save_meta(lease, ActivationMeta(continuation={"at": T0}))
        assert store.load_meta("act") == ActivationMeta()


def test_meta_owned_keys_are_stored_sorted(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.save_meta(lease, ActivationMeta(owned_keys={"zeta", "alpha", "$email_address"}))
    raw = sqlite3.connect(db_path)
    try:
        (body,) = raw.execute("SELECT body FROM meta WHERE activation = 'act'").fetchone()
    finally:
        raw.close()
    assert '"owned_keys": ["$email_address", "alpha", "zeta"]' in body


def test_stats_count_writes(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        before = store.stats()
        store.commit(lease, entries(("u1", fp(1)), ("u2", fp(2)), ("u3", fp(3))), at(1))
        store.commit(lease, entries(("u1", None)), at(2))
        after = store.stats()
        assert after["transactions"] - before["transactions"] == 2
        assert after["rows_written"] - before["rows_written"] == 4
        assert after["statements"] > before["statements"]
        store.load_fingerprints("act")
        assert store.stats()["rows_written"] == after["rows_written"]


def test_a_version_1_file_is_converted_to_packed_fingerprints_on_open(db_path: Path) -> None:
    # A database as schema version 1 wrote it: one row per fingerprint, u64 stored signed.
    db_path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(db_path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1)")
    raw.execute(
        "CREATE TABLE fingerprints (activation TEXT NOT NULL, custom_id TEXT NOT NULL, raw INTEGER NOT NULL, "
        "payload INTEGER NOT NULL, PRIMARY KEY (activation, custom_id)) WITHOUT ROWID"
    )
    big = 2**64 - 5  # stored as its two's complement
    raw.executemany(
        "INSERT INTO fingerprints VALUES (?, ?, ?, ?)",
        [("act", "u1", 1, 2), ("act", "é-2", big - 2**64, 7), ("other", "u1", 3, 4)],
    )
    raw.commit()
    raw.close()
    with SQLiteStateStore(db_path) as store:
        assert store.load_fingerprints("act") == {"u1": Fingerprint(1, 2), "é-2": Fingerprint(big, 7)}
        assert store.load_fingerprints("other") == {"u1": Fingerprint(3, 4)}
    check = sqlite3.connect(db_path)
    try:
        assert check.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        tables = {name for (name,) in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "fingerprints" not in tables
    finally:
        check.close()


def test_a_run_leaves_a_small_journal_for_a_later_run_and_folds_it_once_it_is_due(db_path: Path) -> None:
    # compact(when_due=True), as a run calls it: a first sync's journal folds (nothing is
    # stored); a delta's, below FOLD_DUE_SHARE of the stored fingerprints, stays, and is
    # applied by each load; the run that brings the journal to the share folds all of it.
    stored = 4_000
    share = int(FOLD_DUE_SHARE * stored)
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        expected = {f"u{n:05d}": fp(n) for n in range(stored)}
        store.commit(lease, [JournalEntry(k, v) for k, v in expected.items()], at(1))
        store.compact(lease, at(1), when_due=True)
        raw = sqlite3.connect(db_path)
        try:

            def journal() -> tuple[int, int]:
                row = raw.execute("SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM fingerprint_journal").fetchone()
                return int(row[0]), int(row[1])

            assert journal() == (0, 0)
            delta = share // 2 - 1
            for run, start in enumerate((0, delta)):
                batch = [JournalEntry(f"u{n:05d}", fp(10_000 + n)) for n in range(start, start + delta)]
                store.commit(lease, batch, at(2 + run))
                expected.update(dict(batch))
                store.compact(lease, at(2 + run), when_due=True)
                assert journal() == (run + 1, (run + 1) * delta)  # left for a later run
                assert store.load_fingerprints("act") == expected
            # The third delta brings the journal past the share: all of it is folded.
            batch = [JournalEntry(f"u{n:05d}", None) for n in range(2 * delta, 2 * delta + 3)]
            store.commit(lease, batch, at(5))
            for entry in batch:
                expected.pop(entry.custom_id)
            store.compact(lease, at(5), when_due=True)
            assert journal() == (0, 0)
            assert raw.execute("SELECT SUM(rows) FROM fingerprint_base").fetchone() == (len(expected),)
        finally:
            raw.close()
        assert store.load_fingerprints("act") == expected


def test_the_fold_check_counts_stored_fingerprints_without_reading_their_blobs(db_path: Path) -> None:
    # compact(when_due=True) sums the chunks' rows at the start and the end of every run: a
    # covering index answers it, never the table (whose rows carry the blobs), in a new
    # file and in one an older cepsync wrote without the index.
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
        store.compact(lease, at(1))
    raw = sqlite3.connect(db_path)
    query = "SELECT COALESCE(SUM(rows), 0) FROM fingerprint_base WHERE activation = ?"
    try:
        plan = " ".join(str(row) for row in raw.execute("EXPLAIN QUERY PLAN " + query, ("act",)))
        assert "COVERING INDEX fingerprint_base_rows" in plan
        raw.execute("DROP INDEX fingerprint_base_rows")
        raw.commit()
    finally:
        raw.close()
    with SQLiteStateStore(db_path) as store:
        assert store.load_fingerprints("act") == {"u1": fp(1)}
    raw = sqlite3.connect(db_path)
    try:
        plan = " ".join(str(row) for row in raw.execute("EXPLAIN QUERY PLAN " + query, ("act",)))
        assert "COVERING INDEX fingerprint_base_rows" in plan
    finally:
        raw.close()


def test_fold_due_weighs_the_journal_against_the_stored_fingerprints() -> None:
    assert not fold_due(journal_rows=0, journal_documents=0, stored_rows=0)
    assert fold_due(journal_rows=1, journal_documents=1, stored_rows=0)  # a first sync
    assert not fold_due(journal_rows=49, journal_documents=3, stored_rows=1_000)
    assert fold_due(journal_rows=50, journal_documents=3, stored_rows=1_000)
    assert fold_due(journal_rows=1, journal_documents=FOLD_DUE_DOCUMENTS + 1, stored_rows=10**9)
    assert not fold_due(journal_rows=FOLD_DUE_ROWS, journal_documents=10, stored_rows=10**8)
    assert fold_due(journal_rows=FOLD_DUE_ROWS + 1, journal_documents=10, stored_rows=10**8)


def test_commits_append_journal_blobs_that_compaction_folds(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1)), ("u2", fp(2))), at(1))
        store.commit(lease, entries(("u2", None), ("u3", fp(3)), ("u1", fp(9))), at(2))
        expected = {"u1": fp(9), "u3": fp(3)}
        assert store.load_fingerprints("act") == expected
        raw = sqlite3.connect(db_path)
        try:
            assert raw.execute("SELECT COUNT(*) FROM fingerprint_journal").fetchone() == (2,)
            store.compact(lease, at(3))
            assert raw.execute("SELECT COUNT(*) FROM fingerprint_journal").fetchone() == (0,)
            assert raw.execute("SELECT SUM(rows) FROM fingerprint_base").fetchone() == (2,)
        finally:
            raw.close()
        assert store.load_fingerprints("act") == expected


# -- mirror intents: packed blobs, upgrades ----------------------------------------------------

# The intents table of schema versions 1 and 2: one row per id.
_V2_INTENTS_DDL = (
    "CREATE TABLE intents (activation TEXT NOT NULL, custom_id TEXT NOT NULL, "
    "PRIMARY KEY (activation, custom_id)) WITHOUT ROWID"
)


def _tables(path: Path) -> set[str]:
    raw = sqlite3.connect(path)
    try:
        return {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        raw.close()


def _intent_blobs(path: Path, activation: str = "act") -> list[tuple[int, int, bytes, bytes, bytes]]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute(
            "SELECT seq, rows, lo, hi, blob FROM intent_batches WHERE activation = ? ORDER BY seq", (activation,)
        ).fetchall()
    finally:
        raw.close()


def test_a_version_2_file_from_the_previous_release_keeps_its_intents(db_path: Path) -> None:
    # state_v2.db was written by cepsync at schema version 2 (README.md beside it).
    db_path.parent.mkdir(parents=True)
    shutil.copyfile(LEGACY / "state_v2.db", db_path)
    assert "intents" in _tables(db_path)
    with SQLiteStateStore(db_path) as store:
        assert store.load_intents("act") == {"u1", "new-1", "é-2", "用户-42", "with space"}
        assert store.load_intents("other") == {"x"}
        # Everything else of the file is as it was.
        assert store.load_fingerprints("act") == {"u1": Fingerprint(1, 2), "é-2": Fingerprint(2**64 - 1, 7)}
        assert store.load_meta("act") == ActivationMeta(mapping_version="v1", owned_keys={"plan"})
        assert [r["run_id"] for r in store.list_runs("act")] == ["run-v2"]
        lease = store.acquire_lease("act", "run-v3", TTL, T0)
        assert lease.token == 2  # the token counter survived
        store.clear_intents(lease, ["u1", "用户-42", "never-recorded"])
        store.record_intents(lease, ["new-2"])
        assert store.load_intents("act") == {"new-1", "é-2", "with space", "new-2"}
    assert "intents" not in _tables(db_path)
    with SQLiteStateStore(db_path) as store:
        assert store.load_intents("act") == {"new-1", "é-2", "with space", "new-2"}
        assert store.load_intents("other") == {"x"}
    assert _schema_versions(db_path) == [(SCHEMA_VERSION,)]


def test_a_version_3_file_keeps_its_refusals_as_value_refusals(db_path: Path) -> None:
    # state_v3.db was written by cepsync at schema version 3 (README.md beside it).
    db_path.parent.mkdir(parents=True)
    shutil.copyfile(LEGACY / "state_v3.db", db_path)
    with SQLiteStateStore(db_path) as store:
        # Version 3 kept every per-item error as a refusal of the value. One naming an
        # attribute is one today too; one naming none may have been a server error: it is
        # sent again (an item error seen once) and Batch's answer says which it is.
        assert store.load_refusals("act") == {
            "u1": Refusal("u1", 2**64 - 1, "firstname", "too long", RefusalKind.VALUE, 1),
            "é-2": Refusal("é-2", 7, "(profile)", "server: internal error", RefusalKind.ITEM_ERROR, 1),
        }
        assert [r.remembered for r in store.load_refusals("act").values()] == [True, False]
        assert store.load_fingerprints("act") == {"u1": Fingerprint(1, 2)}
        assert [r["run_id"] for r in store.list_runs("act")] == ["run-v3"]
        lease = store.acquire_lease("act", "run-v4", TTL, T0)
        assert lease.token == 2
        item_error = Refusal("é-2", 8, "(profile)", "server: again", RefusalKind.ITEM_ERROR, 2)
        store.record_refusals(lease, [item_error])
        assert store.load_refusals("act")["é-2"] == item_error
    assert _schema_versions(db_path) == [(SCHEMA_VERSION,)]
    with SQLiteStateStore(db_path) as store:
        assert store.load_refusals("act")["é-2"] == item_error


def test_a_version_2_file_with_many_intents_becomes_sorted_chunks(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
    # The same file as version 2 held it: per-id intent rows.
    count = 2 * sqlite_module._INTENT_CHUNK_ROWS + 123
    ids = [f"id-{n:07d}" for n in range(count)]
    random.Random(7).shuffle(ids)
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("DROP TABLE intent_batches")
        raw.execute(_V2_INTENTS_DDL)
        raw.executemany("INSERT INTO intents VALUES ('act', ?)", [(i,) for i in ids])
        raw.execute("INSERT INTO intents VALUES ('other', 'é')")
        raw.execute("UPDATE schema_version SET version = 2")
    raw.close()
    with SQLiteStateStore(db_path) as store:
        assert store.load_intents("act") == set(ids)
        assert store.load_intents("other") == {"é"}
        assert store.load_fingerprints("act") == {"u1": fp(1)}
        blobs = _intent_blobs(db_path)
        assert [rows for _, rows, _, _, _ in blobs] == [
            sqlite_module._INTENT_CHUNK_ROWS,
            sqlite_module._INTENT_CHUNK_ROWS,
            123,
        ]
        # Sorted chunks: each blob's range ends before the next one's starts.
        assert all(blobs[k][3] < blobs[k + 1][2] for k in range(len(blobs) - 1))
        assert blobs[0][2] == b"id-0000000"
        assert blobs[-1][3] == f"id-{count - 1:07d}".encode()
        # Clearing one id rewrites only the chunk whose range holds it.
        lease = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        store.clear_intents(lease, ["id-0060000"])
        after = _intent_blobs(db_path)
        assert [b[1] for b in after] == [sqlite_module._INTENT_CHUNK_ROWS, sqlite_module._INTENT_CHUNK_ROWS - 1, 123]
        assert after[0] == blobs[0]
        assert after[2] == blobs[2]
        assert store.load_intents("act") == set(ids) - {"id-0060000"}
    assert "intents" not in _tables(db_path)


def test_a_version_1_file_gets_its_intents_packed_too(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(db_path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1)")
    raw.execute(
        "CREATE TABLE fingerprints (activation TEXT NOT NULL, custom_id TEXT NOT NULL, raw INTEGER NOT NULL, "
        "payload INTEGER NOT NULL, PRIMARY KEY (activation, custom_id)) WITHOUT ROWID"
    )
    raw.execute("INSERT INTO fingerprints VALUES ('act', 'u1', 1, 2)")
    raw.execute(_V2_INTENTS_DDL)
    raw.executemany("INSERT INTO intents VALUES (?, ?)", [("act", "u2"), ("act", "ü3"), ("b", "u2")])
    raw.commit()
    raw.close()
    with SQLiteStateStore(db_path) as store:
        assert store.load_fingerprints("act") == {"u1": Fingerprint(1, 2)}
        assert store.load_intents("act") == {"u2", "ü3"}
        assert store.load_intents("b") == {"u2"}
    assert not {"intents", "fingerprints"} & _tables(db_path)


def test_a_clear_rewrites_only_the_blobs_that_held_a_cleared_id(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        for group in range(5):  # like a full pass: groups of consecutive ids
            store.record_intents(lease, [f"u{group}-{n:03d}" for n in range(100)])
        before = _intent_blobs(db_path)
        assert [(seq, rows) for seq, rows, _, _, _ in before] == [(k, 100) for k in range(1, 6)]
        written = store.stats()["rows_written"]
        store.clear_intents(lease, [f"u1-{n:03d}" for n in range(50, 100)] + [f"u2-{n:03d}" for n in range(100)])
        after = _intent_blobs(db_path)
        assert [(seq, rows) for seq, rows, _, _, _ in after] == [(1, 100), (2, 50), (4, 100), (5, 100)]
        assert after[1][2:4] == (b"u1-000", b"u1-049")  # the rewritten blob's range shrank
        assert [after[0], *after[2:]] == [before[0], *before[3:]]
        assert store.stats()["rows_written"] - written == 2  # one blob rewritten, one deleted


def test_many_small_intent_blobs_are_merged(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        rng = random.Random(3)
        recorded: set[str] = set()
        # Groups whose requests failed: their intents stay, with ids spread over the key space.
        for _ in range(3 * sqlite_module._INTENT_MERGE_AT):
            group = [f"id-{rng.randrange(100_000):05d}" for _ in range(20)]
            store.record_intents(lease, group)
            recorded.update(group)
            assert len(_intent_blobs(db_path)) <= sqlite_module._INTENT_MERGE_AT + 1
        assert store.load_intents("act") == recorded
        blobs = _intent_blobs(db_path)
        assert sum(rows for _, rows, _, _, _ in blobs) < 3 * sqlite_module._INTENT_MERGE_AT * 20  # repeats folded
        cleared = set(rng.sample(sorted(recorded), 500))
        store.clear_intents(lease, cleared)
        assert store.load_intents("act") == recorded - cleared


# Ids whose byte order differs from a naive one: empty, NUL, DEL, multi-byte UTF-8.
ODD_IDS_SAMPLE = ("émilie", "用户-42", "emoji-🎉", "a\x00b", "a", "", "Z", "~", "\x7f", "é" * 40)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_intents_behave_as_a_set_under_random_records_and_clears(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Tiny chunks and an early merge, so a few hundred operations cross every path: partial
    # rewrites, deleted blobs, merges into several chunks, repeats inside and across blobs.
    monkeypatch.setattr(sqlite_module, "_INTENT_CHUNK_ROWS", 7)
    monkeypatch.setattr(sqlite_module, "_INTENT_MERGE_AT", 4)
    rng = random.Random(seed)
    universe = [*ODD_IDS_SAMPLE, *(f"u{n}" for n in range(60))]
    model: set[str] = set()
    with SQLiteStateStore(db_path) as store:
        other = store.acquire_lease("other", "run-o", TTL, T0)
        store.record_intents(other, ["u1", "émilie"])
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        for _ in range(300):
            ids = [rng.choice(universe) for _ in range(rng.randrange(0, 12))]
            if rng.random() < 0.55:
                store.record_intents(lease, ids)
                model.update(ids)
            else:
                store.clear_intents(lease, ids)
                model.difference_update(ids)
            assert store.load_intents("act") == model
    with SQLiteStateStore(db_path) as store:
        assert store.load_intents("act") == model
        assert store.load_intents("other") == {"u1", "émilie"}


# -- compaction ------------------------------------------------------------------------------


def _schema_versions(path: Path) -> list[tuple[int]]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute("SELECT version FROM schema_version").fetchall()
    finally:
        raw.close()


def _base_chunks(path: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT chunk, rows FROM fingerprint_base WHERE activation = 'a' ORDER BY chunk").fetchall()


def test_compacting_new_ids_fills_the_last_chunk_instead_of_adding_one_per_run(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("a", "run", TTL, at(0))
        expected: dict[str, Fingerprint] = {}
        for run in range(3):
            batch = {f"id-{run}-{n}": fp(run * 10 + n) for n in range(4)}
            store.commit(lease, entries(*batch.items()), at(1))
            store.commit(lease, entries((f"id-{run}-late", fp(run + 100))), at(1))
            expected |= batch | {f"id-{run}-late": fp(run + 100)}
            store.compact(lease, at(2))
            assert store.load_fingerprints("a") == expected
        assert _base_chunks(db_path) == [(0, 15)]


def test_compacting_a_journal_that_updates_deletes_or_repeats_ids_folds_it(db_path: Path) -> None:
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("a", "run", TTL, at(0))
        store.commit(lease, entries(("x", fp(1)), ("y", fp(2)), ("z", fp(3))), at(1))
        store.compact(lease, at(2))
        journals = [
            [entries(("x", fp(11)), ("new", fp(4)))],  # updates a stored id
            [entries(("y", None))],  # deletes one
            [entries(("twice", fp(5))), entries(("twice", fp(6)))],  # repeats a new id
        ]
        for commits in journals:
            for commit in commits:
                store.commit(lease, commit, at(3))
            store.compact(lease, at(4))
        assert store.load_fingerprints("a") == {"x": fp(11), "z": fp(3), "new": fp(4), "twice": fp(6)}
        assert sum(rows for _chunk, rows in _base_chunks(db_path)) == 4


def test_appended_fingerprints_are_cut_into_full_chunks_across_journal_blobs(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_state, "_CHUNK_ROWS", 4)
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("a", "run", TTL, at(0))
        expected: dict[str, Fingerprint] = {}
        for run in range(3):
            for blob in range(2):
                batch = {f"id-{run}-{blob}-{n}": fp(run * 100 + blob * 10 + n) for n in range(3 - blob)}
                store.commit(lease, entries(*batch.items()), at(1))
                expected |= batch
            store.compact(lease, at(2))
        assert _base_chunks(db_path) == [(0, 4), (1, 4), (2, 4), (3, 3)]
        assert store.load_fingerprints("a") == expected
        store.commit(lease, entries(("id-0-0-0", None), ("id-2-1-1", fp(7))), at(3))
        store.compact(lease, at(4))
        del expected["id-0-0-0"]
        assert store.load_fingerprints("a") == expected | {"id-2-1-1": fp(7)}


def _chunk_blobs(path: Path) -> dict[int, bytes]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT chunk, blob FROM fingerprint_base WHERE activation = 'a' ORDER BY chunk")
        return {chunk: bytes(blob) for chunk, blob in rows}


def _stored(store: SQLiteStateStore, count: int) -> tuple[Lease, dict[str, Fingerprint]]:
    """``count`` ids committed and compacted (ids ``id-000000``...), under a lease kept for the test."""
    lease = store.acquire_lease("a", "run", TTL, at(0))
    expected: dict[str, Fingerprint] = {f"id-{n:06d}": fp(n) for n in range(count)}
    store.commit(lease, entries(*expected.items()), at(1))
    store.compact(lease, at(2))
    return lease, expected


def _commit_changes(
    store: SQLiteStateStore,
    lease: Lease,
    rng: random.Random,
    expected: dict[str, Fingerprint],
    *,
    commits: int,
    per_commit: tuple[int, int] = (2, 6),
) -> None:
    """A journal of updates, deletions, new ids and repeats (never the first six ids), applied to ``expected``.

    ``per_commit``: the fewest and most entries a commit adds to the first deletion.
    """
    stored = len(expected)
    pool = [f"id-{n:06d}" for n in range(6, stored + stored // 2)]
    for number in range(commits):
        picked = rng.sample(pool, rng.randint(*per_commit))
        commit = [(custom_id, None if rng.random() < 0.3 else fp(rng.randint(1000, 9999))) for custom_id in picked]
        if number == 0:
            commit.append((f"id-{stored - 1:06d}", None))  # a deletion: never the append-only path
        store.commit(lease, entries(*commit), at(3))
        for custom_id, value in commit:
            if value is None:
                expected.pop(custom_id, None)
            else:
                expected[custom_id] = value


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("journal", ["one chunk", "several chunks"])
def test_a_journal_folds_a_chunk_at_a_time_like_the_reference(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, journal: str
) -> None:
    """A journal that updates, deletes and repeats ids, new ones too, of at most a chunk (a
    delta) or of several (several deltas' journals, once due), folded a stored chunk at a
    time (SQLite on this thread, the lookup on a worker): the reference's fingerprints, no
    chunk over its size, and the first chunk, which no entry touches, not rewritten."""
    monkeypatch.setattr(sqlite_state, "_CHUNK_ROWS", 6)
    rng = random.Random(seed)
    with SQLiteStateStore(db_path) as store:
        lease, expected = _stored(store, 40)
        before = _chunk_blobs(db_path)
        if journal == "one chunk":
            _commit_changes(store, lease, rng, expected, commits=rng.randint(1, 2), per_commit=(1, 1))
        else:
            _commit_changes(store, lease, rng, expected, commits=rng.randint(3, 6))
        store.compact(lease, at(4))
        assert store.load_fingerprints("a") == expected
        chunks = _base_chunks(db_path)
        assert all(rows <= 6 for _chunk, rows in chunks)
        assert sum(rows for _chunk, rows in chunks) == len(expected)
        assert _chunk_blobs(db_path)[0] == before[0]  # untouched: not rewritten
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM fingerprint_journal").fetchone() == (0,)


@pytest.mark.parametrize("seed", range(6))
def test_a_journal_past_the_chunked_fold_goes_through_the_spilling_fold_like_the_reference(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """A journal larger than the chunked fold takes (a --full run that changed most profiles)
    and not only adding ids: the reference's fingerprints, written back as full chunks."""
    monkeypatch.setattr(sqlite_state, "_CHUNK_ROWS", 6)
    monkeypatch.setattr(sqlite_state, "_FOLD_BY_CHUNK_ROWS", 4)
    rng = random.Random(seed)
    with SQLiteStateStore(db_path) as store:
        lease, expected = _stored(store, 40)
        _commit_changes(store, lease, rng, expected, commits=rng.randint(3, 6))
        store.compact(lease, at(4))
        assert store.load_fingerprints("a") == expected
        rows = [rows for _chunk, rows in _base_chunks(db_path)]
        full, last = divmod(len(expected), 6)
        assert rows == [6] * full + ([last] if last else [])
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM fingerprint_journal").fetchone() == (0,)


def test_the_spilling_fold_holds_more_than_its_cap(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state and journal larger than the fold's cap (here 32 MB): DuckDB cannot hold them, so
    the fold completes only by spilling to disk, and gives the reference's fingerprints."""
    monkeypatch.setattr(sqlite_state, "_CHUNK_ROWS", 100_000)
    monkeypatch.setattr(sqlite_state, "_FOLD_BY_CHUNK_ROWS", 1_000)
    monkeypatch.setattr(fold_module, "FOLD_MEMORY_LIMIT", "32MB")
    count = 600_000
    width = "x" * 48  # ids of ~60 bytes: ~36 MB of ids alone in the stored table
    rng = random.Random(7)
    with SQLiteStateStore(db_path) as store:
        lease = store.acquire_lease("a", "run", TTL, at(0))
        for start in range(0, count, 100_000):
            part = [(f"{width}-{n:07d}", fp(n)) for n in range(start, start + 100_000)]
            store.commit(lease, entries(*part), at(1))
        store.compact(lease, at(2))
        changed = rng.sample(range(count), 30_000)
        commit = [(f"{width}-{n:07d}", None if n % 3 == 0 else fp(n + count)) for n in changed]
        commit += [(f"{width}-{n:07d}", fp(n)) for n in range(count, count + 5_000)]
        store.commit(lease, entries(*commit), at(3))
        store.compact(lease, at(4))
        loaded = store.load_fingerprints("a")
    expected = {f"{width}-{n:07d}": fp(n) for n in range(count + 5_000)}
    for custom_id, value in commit:
        if value is None:
            del expected[custom_id]
        else:
            expected[custom_id] = value
    assert loaded == expected


def test_runs_opening_a_new_state_file_at_the_same_moment_all_open_it(tmp_path: Path) -> None:
    # Two runs started at once (Pub/Sub redelivers, schedules overlap) open the same new file:
    # both switch it to WAL and create the schema. SQLite can answer "database is locked" to
    # the switch without waiting (the fault campaign's overlapping starts hit it once in 60);
    # the loser must wait its turn, then exit as "lease held", not fail as a config error.
    failures: list[str] = []
    for round_number in range(40):
        path = tmp_path / f"state-{round_number}.db"
        start = threading.Barrier(8)

        def open_it(path: Path = path, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                SQLiteStateStore(path).close()
            except sqlite3.Error as error:  # collected: the assertion below names them
                failures.append(repr(error))

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
