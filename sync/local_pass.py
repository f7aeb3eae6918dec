"""The differ's queries where a local segment lies: in the DuckDB source's own database.

The embedded differ compares a streamed segment with the stored fingerprints in a DuckDB
database of its own (:mod:`sync.delta_pass`): every mapped column of every row crosses
from the source into Arrow, through Python, and into the differ, on one thread. When the
segment is itself a DuckDB query, that crossing is most of a delta's cost (at 10M rows,
~30 s of a ~50 s run with nothing changed). The differ then asks the source's database
instead, on one cursor with up to four threads, and lets only what moved cross
(``docs/how-a-run-works.md``, "A local segment"):

1. **One narrow read** (:func:`seen_sql`): each row's Custom ID key and raw hash, into the
   temporary table ``seen`` — the id scan's table, so the counts, duplicates and removals
   come from it, as they come from the streamed pass's id file.
2. **The survivors** (:func:`survivors_sql`): one join of ``seen`` and the stored
   fingerprints on the ids themselves gives the ids that are new or whose raw hash moved
   (``known``: moved), and the stored ids no row has (the removals). It is exact, so the
   streamed pass's proof that id hashes do not collide is not needed here. ``seen`` is
   dropped once the scan has ended; the survivors stay on the cursor.
3. **The rows**, only when asked and only what survived: the moved ones
   (:func:`moved_sql`), and the stream (:mod:`sync.stream_sql`, new ids told by
   :data:`NEW_IDS_SQL`), each a query of the segment numbered in read order. Nothing is
   held in Python between them, whatever their number.

No row that did not move leaves DuckDB, and a run where nothing moved and every id is valid
reads the segment's mapped columns once, into two 8-byte hashes and its ids.

The raw hash must be the streamed one, or every delta would find every row moved: the
stored hashes were computed over the segment as it comes back from Arrow. So the differ
queries here only when each mapped column's type is the same natively and after that
round trip (:func:`roundtrip_problem`); the same DuckDB then hashes the same values.
Otherwise (a UUID, an ENUM, a HUGEINT: types Arrow carries differently) it streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import duckdb
import pyarrow as pa

from sync.differ import DUPLICATE, KEY, RAW, ROW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW
from sync.duckdb_sql import quote_identifier, quote_literal

__all__ = [
    "NEW_IDS_SQL",
    "SORT_PIECE_ROWS",
    "SURVIVORS",
    "local_memory_limit",
    "moved_sql",
    "narrowed_sql",
    "numbered_sql",
    "out_of_memory",
    "piece_bounds",
    "piece_sql",
    "removed_sql",
    "roundtrip_problem",
    "run_pass",
    "seen_sql",
    "streamed_condition",
    "survivor_counts_sql",
    "survivors_sql",
]

# The cap of the pass's queries in the segment's database, spilling past it. DuckDB fills
# its cache of the file's blocks up to the cap as the pass reads every mapped column, so the
# cap is also what the pass adds to the run's peak memory. Measured on the benchmark's
# segment (docs/how-a-run-works.md, "A local segment"): at 1M stored ids, 32 MB gives the
# lowest peak (230 MB against 318 MB at 128 MB) for ~0.3 s more; at 10M, 128 MB gives a
# peak of 715 MB against 839 MB at 256 MB, in the same time.
SMALL_STATE_MEMORY_LIMIT: Final = "32MB"
LARGE_STATE_MEMORY_LIMIT: Final = "128MB"
LARGE_STATE_ROWS: Final = 2_000_000

# Rows of one sorted piece of an id-ordered stream (a full pass a continuation may follow).
# Sorted whole, a continuation's millions of new rows kept its first request waiting for the
# sort (~50 s at 5M rows); in pieces of consecutive ids, each a query of its own, the first
# leaves after one piece, and each sort stays small.
SORT_PIECE_ROWS: Final = 250_000
# Ids sampled to cut the pieces (their sizes vary with the sample, never their bounds' order).
SORT_SAMPLE_ROWS: Final = 20_000

# The temporary table of the rows that survived the narrow pass (key, raw hash, known).
SURVIVORS: Final = "survivors"
# A stream's row whose id the pass found new (no stored fingerprint): exact, and a join on
# the new ids alone, not on every stored one (sync.stream_sql.send_sql's ``new``).
_NEW_IDS: Final = f"SELECT k FROM {SURVIVORS} WHERE NOT known AND NOT gone AND k IS NOT NULL"
NEW_IDS_SQL: Final = f"s.{KEY} IN ({_NEW_IDS})"


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is DuckDB out of memory (raised, or through Arrow's stream reader as an OSError)."""
    return isinstance(error, duckdb.OutOfMemoryException) or "Out of Memory Error" in str(error)


def local_memory_limit(stored_rows: int, *, sorts: bool = False) -> str:
    """The cap of the differ's queries in the segment's database, for ``stored_rows`` fingerprints.

    ``sorts``: the query sorts the segment's rows (a full pass a continuation may follow),
    which DuckDB cannot do on every thread under 32 MB; it gets the larger cap.
    """
    return LARGE_STATE_MEMORY_LIMIT if sorts or stored_rows > LARGE_STATE_ROWS else SMALL_STATE_MEMORY_LIMIT


def roundtrip_problem(
    con: duckdb.DuckDBPyConnection, segment_sql: str, schema: pa.Schema, columns: Sequence[str]
) -> str | None:
    """Why a mapped column would hash otherwise here than streamed through Arrow, or None.

    Compares each column's DuckDB type in the segment query with its DuckDB type once read
    back from the Arrow type the source streams it as (``schema``).
    """
    probe = pa.table({name: pa.array([], schema.field(name).type) for name in columns})
    con.register("__cepsync_roundtrip", probe)
    try:
        selected = ", ".join(quote_identifier(c) for c in columns)
        streamed = con.sql(f"SELECT {selected} FROM __cepsync_roundtrip").types
        native = con.sql(f"SELECT {selected} FROM ({segment_sql}) AS segment").types
    finally:
        con.unregister("__cepsync_roundtrip")
    for name, here, there in zip(columns, native, streamed, strict=True):
        if str(here) != str(there):
            return f"column {name!r} is {here} in DuckDB and {there} once streamed through Arrow"
    return None


def seen_sql(segment_sql: str, key: str, raw: str) -> str:
    """``seen``: every row's key and raw hash, from one read of the segment's mapped columns."""
    return f"CREATE OR REPLACE TEMP TABLE seen AS SELECT {key} AS k, {raw} AS raw FROM ({segment_sql}) AS segment"


def survivors_sql() -> str:
    """The ``seen`` rows whose id is not stored, or stored with another raw hash; and the stored ids not seen.

    One join on the ids themselves, so exact: a row that survives is new (not ``known``) or
    moved (``known``, with its stored fingerprint); a null id matches nothing and always
    survives. The stored ids no row has come out ``gone``, with the id in ``stored_id``:
    the removals.
    """
    return (
        f"CREATE OR REPLACE TEMP TABLE {SURVIVORS} AS "
        f"SELECT s.k, s.raw, st.custom_id IS NOT NULL AS known, s.here IS NULL AS gone, st.custom_id AS stored_id, "
        f"st.raw AS stored_raw, st.payload AS stored_payload, st.attributes AS stored_attributes "
        f"FROM (SELECT k, raw, TRUE AS here FROM seen) s "
        f"FULL JOIN stored st ON st.custom_id = s.k "
        f"WHERE s.here IS NULL OR st.custom_id IS NULL OR st.raw <> s.raw"
    )


def survivor_counts_sql() -> str:
    """How many segment rows moved (known survivors, not gone)."""
    return f"SELECT count(*) FROM {SURVIVORS} WHERE known AND NOT gone"


def removed_sql() -> str:
    """The synced ids no segment row has, sorted, each with whether it is stored (else an intent).

    The stored ones are the survivors' ``gone``; the intents (few) meet the segment's ids.
    """
    return (
        f"SELECT custom_id, bool_or(is_stored) FROM ("
        f"SELECT stored_id AS custom_id, TRUE AS is_stored FROM {SURVIVORS} WHERE gone "
        f"UNION ALL SELECT custom_id, FALSE FROM intents "
        f"ANTI JOIN (SELECT k FROM seen WHERE k IS NOT NULL) s ON s.k = intents.custom_id"
        f") synced GROUP BY custom_id ORDER BY custom_id"
    )


def numbered_sql(segment_sql: str, columns: Sequence[str]) -> str:
    """The segment's ``columns`` with :data:`ROW`, each row's number in read order (from 1)."""
    selected = ", ".join(quote_identifier(c) for c in columns)
    return f"SELECT {selected}, row_number() OVER () AS {ROW} FROM ({segment_sql}) AS segment"


def moved_sql(segment_sql: str, columns: Sequence[str], key: str, raw: str) -> str:
    """The moved rows (known survivors, not duplicated), with their stored fingerprints, re-checked.

    Rows are numbered in read order, narrowed to the moved ids before anything is hashed
    again, and met with the survivors (their stored fingerprints) on the id itself; a row
    whose raw hash is its stored one after all (the segment changed since the pass) does
    not come out. Columns: the mapped ones, :data:`ROW`, :data:`KEY`, :data:`RAW`, then the
    duplicate flag and the stored fingerprint, as every differ's batches have them.
    """
    moved = f"SELECT k, stored_raw, stored_payload, stored_attributes FROM {SURVIVORS} WHERE known AND NOT gone"
    return (
        f"SELECT c.*, FALSE AS {DUPLICATE}, v.stored_raw AS {STORED_RAW}, v.stored_payload AS {STORED_PAYLOAD}, "
        f"v.stored_attributes AS {STORED_ATTRIBUTES} FROM ("
        f"{narrowed_sql(segment_sql, columns, key, raw, f'{KEY} IN (SELECT k FROM ({moved}) m)')}"
        f") c JOIN ({moved}) v ON v.k = c.{KEY} "
        f"ANTI JOIN duplicates d ON d.k = c.{KEY} WHERE v.stored_raw <> c.{RAW}"
    )


def narrowed_sql(segment_sql: str, columns: Sequence[str], key: str, raw: str, condition: str) -> str:
    """The segment's rows whose ``condition`` on :data:`KEY` holds: numbered in read order, hashed after narrowing.

    Columns: the mapped ones, :data:`ROW`, :data:`KEY`, :data:`RAW`.
    """
    selected = ", ".join(quote_identifier(c) for c in columns)
    keyed = f"SELECT {selected}, {ROW}, {key} AS {KEY} FROM ({numbered_sql(segment_sql, columns)}) AS numbered"
    return f"SELECT s.*, {raw} AS {RAW} FROM ({keyed}) s WHERE {condition}"


def streamed_condition(after: str | None) -> str:
    """A delta's stream after the pass: null, new or duplicated ids, above ``after`` (continuations)."""
    wanted = f"({KEY} IS NULL OR {KEY} IN ({_NEW_IDS}) OR {KEY} IN (SELECT k FROM duplicates))"
    return wanted if after is None else f"{wanted} AND ({KEY} IS NULL OR {KEY} > {quote_literal(after)})"


def run_pass(con: duckdb.DuckDBPyConnection, segment_sql: str, key: str, raw: str) -> tuple[int, int]:
    """The delta's pass in ``con`` (``stored``, ``intents`` registered): ``seen``, then the survivors.

    Returns how many rows there are, and how many of them moved (known survivors).
    """
    con.execute(seen_sql(segment_sql, key, raw))
    ((rows,),) = con.execute("SELECT count(*) FROM seen").fetchall()
    con.execute(survivors_sql())
    ((known,),) = con.execute(survivor_counts_sql()).fetchall()
    return int(rows), int(known)


def piece_bounds(con: duckdb.DuckDBPyConnection, ids_sql: str, key: str, *, after: str | None, rows: int) -> list[str]:
    """Ids that cut the segment's rows above ``after`` into pieces of about :data:`SORT_PIECE_ROWS`.

    ``ids_sql`` reads the segment's Custom ID column; ``rows`` is how many rows lie above
    ``after``. The bounds come from a sample of the ids, sorted and deduplicated: none when
    the rows make one piece.
    """
    pieces = -(-rows // SORT_PIECE_ROWS)
    if pieces <= 1:
        return []
    wanted = "k IS NOT NULL" if after is None else f"k > {quote_literal(after)}"
    sample = con.execute(
        f"SELECT k FROM (SELECT k FROM (SELECT {key} AS k FROM ({ids_sql}) AS segment) WHERE {wanted}) "
        f"USING SAMPLE reservoir({SORT_SAMPLE_ROWS} ROWS) REPEATABLE (20) ORDER BY k"
    ).fetchall()
    keys = [k for (k,) in sample]
    return sorted({keys[len(keys) * n // pieces] for n in range(1, pieces)}) if keys else []


def piece_sql(selected: str, lower: str | None, upper: str | None) -> str:
    """The rows of ``selected`` with an id in (``lower``, ``upper``]; the null ids with the last piece."""
    conditions = []
    if lower is not None:
        conditions.append(f"{KEY} > {quote_literal(lower)}")
    if upper is not None:
        conditions.append(f"{KEY} <= {quote_literal(upper)}")
    where = " AND ".join(conditions) or "TRUE"
    if upper is None:
        where = f"{KEY} IS NULL OR ({where})"
    return f"SELECT * FROM ({selected}) AS piece WHERE {where}"
