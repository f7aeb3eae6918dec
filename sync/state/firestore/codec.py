"""The blobs of shard and journal documents: Arrow IPC streams, zstd-compressed.

A blob holds one table: ``custom_id`` (and for fingerprints ``raw``, ``payload`` as u64 and
``attributes``, an activation's attribute set or null), plus ``put`` in a journal blob (false:
the entry deletes the id). Reading one is a handful
of C-level calls with no Python object per record, and its columns are what the differ
joins against. zstd, not SQLite's lz4: on "user-NNNNNNN" ids and random fingerprints it
packs 20 % tighter (about as tight as the zlib packing it replaces), which is fewer shard
documents to read per run.

Blobs written before this format (zlib-packed columns, see :mod:`.legacy`) are read as
they are; a compaction rewrites every shard it touches in this format.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.differ import FINGERPRINT_COLUMNS, FINGERPRINT_SCHEMA, JOURNAL_SCHEMA, with_attributes
from sync.errors import FatalError
from sync.state import core
from sync.state.firestore import legacy
from sync.state.firestore.layout import Namespace
from sync.state.fold import has_repeats

_IPC_OPTIONS: Final = core.ipc_write_options("zstd")
# Every IPC stream starts with a continuation marker; a legacy zlib stream never does.
_IPC_MARKER: Final = b"\xff\xff\xff\xff"
_INTENT_SCHEMA: Final = pa.schema([("custom_id", pa.string())])
_INTENT_JOURNAL_SCHEMA: Final = _INTENT_SCHEMA.append(pa.field("put", pa.bool_()))

# Upper bound of the uncompressed bytes one record adds to a blob, besides its id's UTF-8 and
# its attribute set: an offset (4), raw and payload (8 + 8), the attribute set's offset (4),
# validity bits, a put flag (1).
RECORD_FIXED_BYTES: Final = 4 + 8 + 8 + 4 + 1 + 1
# Upper bound of what a blob holds besides its records (schema, batch header, padding).
BLOB_OVERHEAD_BYTES: Final = 2048


class StateCorruptError(FatalError):
    """A state document cannot be decoded (written by an unknown version, or damaged)."""


def schema(ns: Namespace, *, journal: bool) -> pa.Schema:
    if ns.with_values:
        return JOURNAL_SCHEMA if journal else FINGERPRINT_SCHEMA
    return _INTENT_JOURNAL_SCHEMA if journal else _INTENT_SCHEMA


def encode(table: pa.Table) -> bytes:
    blob: bytes = core.pack_table(table, _IPC_OPTIONS).to_pybytes()
    return blob


def decode(blob: bytes, ns: Namespace, *, journal: bool, where: str) -> pa.Table:
    """The table a shard (``journal`` False) or journal blob holds, whichever format wrote it."""
    expected = schema(ns, journal=journal)
    if blob[:4] == _IPC_MARKER:
        return core.unpack_table(blob, expected, where, StateCorruptError)
    try:
        table = legacy.decode(blob, ns.key, journal=journal, where=where)
        return (with_attributes(table) if ns.with_values else table).cast(expected)
    except legacy.LegacyBlobError as exc:
        raise StateCorruptError(str(exc)) from exc


def intent_table(custom_ids: list[str], *, put: bool) -> pa.Table:
    """Intents noted (``put``) or cleared, as a journal table."""
    return pa.table(
        [pa.array(custom_ids, pa.string()), pa.array([put] * len(custom_ids), pa.bool_())],
        schema=_INTENT_JOURNAL_SCHEMA,
    )


def latest_table(ns: Namespace, journal: Iterable[pa.Table]) -> pa.Table:
    """Journal tables (oldest first) folded to one entry per id, the last one (``put`` kept).

    In columns, never a Python object per entry: a crashed million-profile first sync
    leaves a million entries to fold.
    """
    tables = [entries(ns, table) for table in journal]
    return last_per_id(pa.concat_tables(tables) if tables else schema(ns, journal=True).empty_table())


def entries(ns: Namespace, table: pa.Table) -> pa.Table:
    """A journal table of ``ns`` in its canonical columns.

    ``custom_id`` [, ``raw``, ``payload``, ``attributes``], ``put``.
    """
    journal_schema = schema(ns, journal=True)
    if ns.with_values:
        table = with_attributes(table)
    canonical: pa.Table = table.select(journal_schema.names).cast(journal_schema)
    return canonical


def last_per_id(journal: pa.Table) -> pa.Table:
    """Entries in write order folded to the last entry of each id (an Arrow sort, no hash table).

    Sorted by id, then by position descending: each id's first row is its last entry. That
    costs the sort's indices and one copy, about half of what a window function over the
    same entries holds (measured on a million ids noted then cleared).
    """
    if not has_repeats(journal.column("custom_id")):
        return journal
    position = pa.array(range(journal.num_rows), pa.int64())
    ordered = journal.append_column("position", position).sort_by(
        [("custom_id", "ascending"), ("position", "descending")]
    )
    ids = ordered.column("custom_id")
    changed = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    first = pa.chunked_array([pa.array([True]), *changed.chunks], pa.bool_())
    folded: pa.Table = ordered.filter(first).drop_columns(["position"])
    return folded


def shard_table(ns: Namespace, records: pa.Table) -> pa.Table:
    """Records (``custom_id`` [, ``raw``, ``payload``, ``attributes``]) as a shard's table, sorted by id.

    Sorted so that blobs are deterministic and shared id prefixes pack tighter.
    """
    if ns.with_values:
        records = with_attributes(records)
    columns = list(FINGERPRINT_COLUMNS) if ns.with_values else ["custom_id"]
    ordered: pa.Table = records.select(columns).sort_by("custom_id")
    return ordered.cast(schema(ns, journal=False))
