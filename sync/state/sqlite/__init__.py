"""SQLite state store: the embedded default for local runs, the demo and most tests.

One database file holds every activation's lease, fingerprints, mirror intents, meta
and run records. Two overlapping runs (two processes) may open the same file: the
lease row, read and written inside ``BEGIN IMMEDIATE`` transactions, makes the second
one exit cleanly, and the fencing token checked in every run-owned write makes a run
whose lease was taken over unable to commit anything.

Layout (schema version 4)::

    schema_version(version)
    leases(activation PK, owner, token, expires_at_us)      -- expires_at_us NULL = released
    fingerprint_base(activation, chunk, rows, blob)         -- PK (activation, chunk): packed fingerprints
    fingerprint_journal(activation, seq, rows, blob)        -- PK (activation, seq): one per commit
    intent_batches(activation, seq, rows, lo, hi, blob)     -- PK (activation, seq): packed mirror intents
    meta(activation PK, body JSON)
    runs(run_id PK, activation, started_at, trigger_id, record JSON)
    deliveries(activation, trigger_id, attempts, first_at_us, last_at_us)  -- PK (activation, trigger_id)
    trigger_requests(trigger_id PK, request_digest, first_at_us, last_at_us)
    refusals(activation, custom_id, payload, field, reason, kind, runs)  -- PK (activation, custom_id)

Fingerprints are packed, as in the Firestore store: a run loads a million of them as a
handful of Arrow IPC blobs (``custom_id, raw, payload, attributes``: the attribute set of
``send: changed_attributes``, null otherwise; blobs written before it have no such column and
read as null), read straight into the Arrow table the differ joins against, with no Python
object per profile. Each :meth:`SQLiteStateStore.commit` appends one journal blob (the same
columns and ``put``;
absolute values, so applying one twice changes nothing); :meth:`SQLiteStateStore.compact`
folds the journal into the base chunks in the same fenced transaction, at the start of a run
(after a crash) and at its end.

Mirror intents are packed too: each :meth:`SQLiteStateStore.record_intents` call (one request
group) appends one blob of its ids (``custom_id``), with the smallest and largest id (``lo``,
``hi``) beside it. :meth:`SQLiteStateStore.clear_intents` reads only the blobs whose range
meets the cleared ids', and rewrites or deletes those that held one; many small blobs are
merged into sorted ones of ``_INTENT_CHUNK_ROWS`` ids. An id may sit in several blobs; it is
an intent while any holds it, and a clear removes it from all.

Older files are converted when opened, in the transaction that reads their version: schema
version 1 kept one row per fingerprint, versions 1 and 2 one ``intents`` row per id, and
version 3's refusals had no ``kind`` nor ``runs`` (:meth:`sync.model.Refusal.read` reads
them). Version 4 came with the refusal kinds because a version-3 cepsync would read an item
error's row as a value refusal, and never send that profile again.

The package is one class, :class:`SQLiteStateStore`, composed of one mixin per state role
(:mod:`sync.state.base`): :class:`~sync.state.sqlite.fingerprints.FingerprintTables`,
:class:`~sync.state.sqlite.leases.LeaseTables`, :class:`~sync.state.sqlite.intents.IntentTables`
and :class:`~sync.state.sqlite.runs.RunTables`, over the connection they share
(:class:`~sync.state.sqlite.connection.SQLiteTables`). Mixins rather than parts the store
delegates to, because every role writes through the one connection, the one lock and the one
``BEGIN IMMEDIATE`` transaction that checks the lease: a part would need all three handed to
it, and then be a mixin in all but name. The schema and its migrations
(:mod:`sync.state.sqlite.schema`) and the opening of the file (:mod:`sync.state.sqlite.store`)
are their own rooms, so a role's module holds its tables' reads and writes only.
"""

from sync.state.sqlite.connection import StateNotInitialised, StateSchemaError
from sync.state.sqlite.schema import SCHEMA_VERSION
from sync.state.sqlite.store import SQLiteStateStore

__all__ = ["SCHEMA_VERSION", "SQLiteStateStore", "StateNotInitialised", "StateSchemaError"]
