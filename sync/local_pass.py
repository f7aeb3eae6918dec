"""The differ's queries where a local segment lies: in the DuckDB source's own database.

The embedded differ compares a streamed segment with the stored fingerprints in a DuckDB
database of its own (:mod:`sync.delta_pass`): every mapped column of every row crosses
from the source into Arrow, through Python, and into the differ, on one thread. When the
segment is itself a DuckDB query, that crossing is most of a delta's cost (at 10M rows,
~30 s of a ~50 s run with nothing changed). The differ then asks the source's database
instead, on one cursor with up to four threads, and lets only what moved cross
(``docs/how-a-run-works.md``, "A local segment"):

1. **One join** (:func:`survivors_sql`): each row's Custom ID key and raw hash, straight from
   one read of the segment's mapped columns, meet the stored fingerprints on the ids
   themselves. Out come the ids that are new or whose raw hash moved (``known``: moved), and
   the stored ids no row has (the removals): the temporary table ``survivors``, a few rows
   in a delta. It is exact, so the streamed pass's proof that id hashes do not collide is
   not needed here. Nothing else of the segment is kept: no table of every row.
2. **The counts** (:func:`run_pass`): one read of the Custom ID column alone gives how many
   rows and ids there are. A keyed row either meets its stored id (stored ids are unique)
   or survives as new, so the rows that met a stored id are the ids less the new ones; when
   they are no more than the stored ids still there, no stored id is duplicated, and the
   duplicated ids are found among the few new ones. Only otherwise are every id's copies
   counted.
3. **The rows**, only when asked and only what survived: the moved ones
   (:func:`moved_sql`), and the stream (:mod:`sync.stream_sql`, new ids told by
   :data:`NEW_IDS_SQL`), each a query of the segment numbered in read order, or, when they
   are few, :mod:`sync.local_rows`'s two narrow reads. Nothing is held in Python between
   them, whatever their number. A delta whose stream has nothing (no null, new or
   duplicated id) runs no query for it.

No row that did not move leaves DuckDB, and a run where nothing moved and every id is valid
reads the segment's mapped columns once, into one join, and its id column once more.

The raw hash must be the streamed one, or every delta would find every row moved: the
stored hashes were computed over the segment as it comes back from Arrow. So the differ
queries here only when each mapped column's type is the same natively and after that
round trip (:func:`roundtrip_problem`); the same DuckDB then hashes the same values.
Otherwise (a UUID, an ENUM, a HUGEINT: types Arrow carries differently) it streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import duckdb
import pyarrow as pa

from sync.differ import DUPLICATE, KEY, RAW, ROW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW, IdScan
from sync.duckdb_sql import quote_identifier, quote_literal

__all__ = [
    "NEW_IDS_SQL",
    "SORT_PIECE_ROWS",
    "SURVIVORS",
    "WIDE_ROWS",
    "LocalPass",
    "ids_sql",
    "local_memory_limit",
    "memory_mib",
    "moved_sql",
    "narrowed_sql",
    "numbered_sql",
    "out_of_memory",
    "part_condition",
    "piece_bounds",
    "piece_sql",
    "removed_sql",
    "roundtrip_problem",
    "run_pass",
    "segment_counts",
    "stream_parts",
    "stream_size_sql",
    "streamed_condition",
    "streamed_ids_sql",
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
# Past this many rows to hand over, the differ's queries get the larger cap: the survivors
# (every new id), and the few rows' temporary tables (every mapped column of up to
# local_rows.SPARSE_ROWS rows, ~150 bytes a row in the benchmark), are held beside the joins.
# Under 32 MB, a 600,000-row segment with 330,000 stored ids ran out of memory in the pass,
# and a 300,000-row one with 126,000 stored ids in meeting its 174,000 new rows with their
# numbers; the differ then streamed the whole segment instead. Before the pass, the segment's
# rows past the stored ids tell; after it, the moved and streamed rows it found. A run that
# hands over this many sends as many profiles anyway.
WIDE_ROWS: Final = 25_000

# Rows of one sorted piece of an id-ordered stream (a full pass a continuation may follow).
# Sorted whole, a continuation's millions of new rows kept its first request waiting for the
# sort (~50 s at 5M rows); in pieces of consecutive ids, each a query of its own, the first
# leaves after one piece, and each sort stays small.
SORT_PIECE_ROWS: Final = 250_000
# Ids sampled to cut the pieces (their sizes vary with the sample, never their bounds' order).
SORT_SAMPLE_ROWS: Final = 20_000

# Ids one part of a delta's large stream may test its rows against, per MiB of the cap
# (stream_parts). Whether a row's id is new is a hash table of ids, and one over the cap
# makes DuckDB spill the segment's rows beside it: at 10M rows with 5.8M new ids, the stream
# took 22 s under 128 MB and wrote 2.6 GB to disk, against 13 s in four parts of ~1.1M ids
# (each part a read of the segment, ~3.3 s there). 1.9M ids a part still spilled (29 s in
# three); 880k overflowed a 32 MB cap. This keeps a margin under both.
STREAM_IDS_PER_MIB: Final = 8_000

# The temporary table of the rows that survived the narrow pass (key, raw hash, known).
SURVIVORS: Final = "survivors"
# A stream's row whose id the pass found new (no stored fingerprint): exact, and a join on
# the new ids alone, not on every stored one (sync.stream_sql.send_sql's ``new``).
_NEW_IDS: Final = f"SELECT k FROM {SURVIVORS} WHERE NOT known AND NOT gone AND k IS NOT NULL"
NEW_IDS_SQL: Final = f"s.{KEY} IN ({_NEW_IDS})"


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is DuckDB out of memory (raised, or through Arrow's stream reader as an OSError)."""
    return isinstance(error, duckdb.OutOfMemoryException) or "Out of Memory Error" in str(error)


def local_memory_limit(stored_rows: int, *, sorts: bool = False, wide: bool = False) -> str:
    """The cap of the differ's queries in the segment's database, for ``stored_rows`` fingerprints.

    ``sorts``: the query sorts the segment's rows (a full pass a continuation may follow),
    which DuckDB cannot do on every thread under 32 MB; it gets the larger cap. So does a
    ``wide`` delta, with more than :data:`WIDE_ROWS` rows to hand over.
    """
    large = sorts or wide or stored_rows > LARGE_STATE_ROWS
    return LARGE_STATE_MEMORY_LIMIT if large else SMALL_STATE_MEMORY_LIMIT


def segment_counts(
    con: duckdb.DuckDBPyConnection, segment_sql: str, key: str, *, after: str | None
) -> tuple[int, int, int]:
    """The segment's rows, keyed rows, and keyed rows at or below ``after``: one read of its id column."""
    ids = ids_sql(segment_sql, key)
    below = "count(*) FILTER (WHERE k <= $after)" if after is not None else "0"
    rows, keyed, below_watermark = con.execute(
        f"SELECT count(*), count(k), {below} FROM ({ids}) segment_ids", {"after": after} if after is not None else {}
    ).fetchone() or (0, 0, 0)
    return int(rows), int(keyed), int(below_watermark)


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


def ids_sql(segment_sql: str, key: str) -> str:
    """Every row's Custom ID key, ``k`` (DuckDB reads the id column alone: the others are not used)."""
    return f"SELECT {key} AS k FROM ({segment_sql}) AS segment"


def survivors_sql(segment_sql: str, key: str, raw: str) -> str:
    """The segment's rows whose id is not stored, or stored with another raw hash; and the stored ids no row has.

    One join of the segment's rows (key and raw hash, computed as they are read) and the
    stored ids with their raw hashes, on the ids themselves, so exact: a row that survives
    is new (not ``known``) or moved (``known``, with its stored raw hash); a null id matches
    nothing and always survives. The stored ids no row has come out ``gone``, with the id
    in ``stored_id``: the removals. The stored payloads stay out of the join (its hash
    table holds ids and raw hashes only); :func:`moved_sql` fetches the moved ones'.
    """
    return (
        f"CREATE OR REPLACE TEMP TABLE {SURVIVORS} AS "
        f"SELECT s.k, s.raw, st.custom_id IS NOT NULL AS known, s.here IS NULL AS gone, st.custom_id AS stored_id, "
        f"st.raw AS stored_raw "
        f"FROM (SELECT {key} AS k, {raw} AS raw, TRUE AS here FROM ({segment_sql}) AS segment) s "
        f"FULL JOIN (SELECT custom_id, raw FROM stored) st ON st.custom_id = s.k "
        f"WHERE s.here IS NULL OR st.custom_id IS NULL OR st.raw <> s.raw"
    )


def removed_sql(ids: str | None) -> str:
    """The synced ids no segment row has, sorted, each with whether it is stored (else an intent).

    The stored ones are the survivors' ``gone``; the intents (few), when there are some,
    meet the segment's ids (``ids``: :func:`ids_sql`).
    """
    intents = (
        f" UNION ALL SELECT custom_id, FALSE FROM intents ANTI JOIN ({ids}) s ON s.k = intents.custom_id"
        if ids is not None
        else ""
    )
    return (
        f"SELECT custom_id, bool_or(is_stored) FROM ("
        f"SELECT stored_id AS custom_id, TRUE AS is_stored FROM {SURVIVORS} WHERE gone{intents}"
        f") synced GROUP BY custom_id ORDER BY custom_id"
    )


def memory_mib(con: duckdb.DuckDBPyConnection) -> float:
    """The memory cap in force on ``con``'s database, in MiB (DuckDB shows it as, say, ``122.0 MiB``)."""
    ((shown,),) = con.execute("SELECT current_setting('memory_limit')").fetchall()
    number, _, unit = str(shown).partition(" ")
    scale = {"bytes": 1 / 2**20, "KiB": 1 / 2**10, "MiB": 1.0, "GiB": 2.0**10, "TiB": 2.0**20}.get(unit)
    if scale is None:
        raise ValueError(f"DuckDB shows its memory limit as {shown!r}, not a size in bytes, KiB, MiB, GiB or TiB")
    return float(number) * scale


def numbered_sql(segment_sql: str, columns: Sequence[str]) -> str:
    """The segment's ``columns`` with :data:`ROW`, each row's number in read order (from 1)."""
    selected = ", ".join(quote_identifier(c) for c in columns)
    return f"SELECT {selected}, row_number() OVER () AS {ROW} FROM ({segment_sql}) AS segment"


def moved_sql(segment_sql: str, columns: Sequence[str], key: str, raw: str, selected: str | None = None) -> str:
    """The moved rows (known survivors, not duplicated), with their stored fingerprints, re-checked.

    Rows are numbered in read order and narrowed to the moved ids before anything is hashed
    again (or ``selected``: those rows, as :func:`sync.local_rows.sparse_rows` gives them),
    and met with the survivors (their stored raw hashes) on the id itself; a row whose raw
    hash is its stored one after all (the segment changed since the pass) does not come out.
    The stored payloads and attribute sets of the moved ids alone are fetched, by probing the
    stored table through them. Columns: the mapped ones, :data:`ROW`, :data:`KEY`,
    :data:`RAW`, then the duplicate flag and the stored fingerprint, as every differ's
    batches have them.
    """
    moved = f"SELECT k, stored_raw FROM {SURVIVORS} WHERE known AND NOT gone"
    rows = selected or narrowed_sql(segment_sql, columns, key, raw, f"{KEY} IN (SELECT k FROM ({moved}) m)")
    fingerprints = f"SELECT custom_id, payload, attributes FROM stored SEMI JOIN ({moved}) m ON m.k = stored.custom_id"
    return (
        f"SELECT c.*, FALSE AS {DUPLICATE}, v.stored_raw AS {STORED_RAW}, f.payload AS {STORED_PAYLOAD}, "
        f"f.attributes AS {STORED_ATTRIBUTES} FROM ({rows}) c JOIN ({moved}) v ON v.k = c.{KEY} "
        f"JOIN ({fingerprints}) f ON f.custom_id = c.{KEY} "
        f"ANTI JOIN duplicates d ON d.k = c.{KEY} WHERE v.stored_raw <> c.{RAW}"
    )


def narrowed_sql(segment_sql: str, columns: Sequence[str], key: str, raw: str, condition: str) -> str:
    """The segment's rows whose ``condition`` on :data:`KEY` holds: numbered in read order, hashed after narrowing.

    Columns: the mapped ones, :data:`ROW`, :data:`KEY`, :data:`RAW`.
    """
    selected = ", ".join(quote_identifier(c) for c in columns)
    keyed = f"SELECT {selected}, {ROW}, {key} AS {KEY} FROM ({numbered_sql(segment_sql, columns)}) AS numbered"
    return f"SELECT s.*, {raw} AS {RAW} FROM ({keyed}) s WHERE {condition}"


def _above(after: str | None) -> str:
    return "" if after is None else f" AND k > {quote_literal(after)}"


def streamed_ids_sql(after: str | None) -> str:
    """A delta's stream after the pass: its new and duplicated ids (``k``) above ``after`` (continuations)."""
    return f"{_NEW_IDS}{_above(after)} UNION SELECT k FROM duplicates WHERE k IS NOT NULL{_above(after)}"


def stream_size_sql(after: str | None) -> str:
    """How many rows a delta's stream has without an id, and at most how many with one (above ``after``)."""
    return (
        f"SELECT (SELECT count(*) FROM {SURVIVORS} WHERE k IS NULL AND NOT gone), "
        f"(SELECT count(*) FROM {SURVIVORS} WHERE NOT known AND NOT gone AND k IS NOT NULL{_above(after)}) "
        f"+ (SELECT coalesce(sum(copies), 0) FROM duplicates WHERE k IS NOT NULL{_above(after)})"
    )


def streamed_condition(after: str | None) -> str:
    """A delta's stream after the pass: null, new or duplicated ids, above ``after`` (continuations)."""
    wanted = f"({KEY} IS NULL OR {KEY} IN ({_NEW_IDS}) OR {KEY} IN (SELECT k FROM duplicates))"
    return wanted if after is None else f"{wanted} AND ({KEY} IS NULL OR {KEY} > {quote_literal(after)})"


def stream_parts(ids: int, *, cap_mib: float) -> int:
    """Parts to cut a delta's large stream into, so that each tests its rows against at most ``ids / parts`` ids."""
    per_part = max(1, int(cap_mib * STREAM_IDS_PER_MIB))
    return max(1, -(-ids // per_part))


def part_condition(after: str | None, part: int, parts: int, *, by_stored: bool) -> str:
    """:func:`streamed_condition` for the keyed rows whose id's hash falls in ``part`` of ``parts`` (null ids: part 0).

    Each keyed row lies in exactly one part, and the part's test holds only that part's
    ids: the new ones (the survivors'), or, ``by_stored``, the stored ones, whose absence
    is the same thing: a keyed row whose id no stored fingerprint has is what the pass
    found new. Duplicated ids' rows come out in their own id's part, each once.
    """
    mine = f"hash({KEY}) % {parts} = {part}"
    if by_stored:
        new = f"{KEY} NOT IN (SELECT custom_id FROM stored WHERE hash(custom_id) % {parts} = {part})"
    else:
        new = f"{KEY} IN ({_NEW_IDS} AND hash(k) % {parts} = {part})"
    keyed = f"({KEY} IS NOT NULL AND {mine} AND ({new} OR {KEY} IN (SELECT k FROM duplicates)))"
    wanted = f"({KEY} IS NULL OR {keyed})" if part == 0 else keyed
    return wanted if after is None else f"{wanted} AND ({KEY} IS NULL OR {KEY} > {quote_literal(after)})"


@dataclass(frozen=True)
class LocalPass:
    """What :func:`run_pass` found: the id scan, the duplicated ids (``k``, ``copies``), and how many rows moved.

    ``stored_duplicates``: some stored id comes more than once (else every duplicated id is new).
    """

    scan: IdScan
    duplicates: pa.Table
    moved: int
    stored_duplicates: bool


def run_pass(
    con: duckdb.DuckDBPyConnection,
    segment_sql: str,
    key: str,
    raw: str,
    *,
    stored_rows: int,
    intents: int,
    after: str | None,
    counts: tuple[int, int, int],
) -> LocalPass:
    """The delta's pass in ``con`` (``stored``, ``intents``, an empty ``duplicates``): survivors and counts.

    ``stored_rows`` and ``intents``: how many stored fingerprints and intents there are;
    ``after``: a continued full pass's watermark; ``counts``: :func:`segment_counts`, taken
    first (the join then needs every block of the cap, and DuckDB's cache of the id column's
    blocks does not outlive it: it would stay, ~6 MB a million rows). Fills ``duplicates``.
    """
    ids = ids_sql(segment_sql, key)
    rows, keyed, below_watermark = counts
    con.execute(survivors_sql(segment_sql, key, raw))
    new_rows, gone, moved = con.execute(
        f"SELECT count(*) FILTER (WHERE NOT known AND NOT gone AND k IS NOT NULL), count(*) FILTER (WHERE gone), "
        f"count(*) FILTER (WHERE known AND NOT gone) FROM {SURVIVORS}"
    ).fetchone() or (0, 0, 0)
    # Every keyed row meets its stored id (one at most: stored ids are unique) or survives as
    # new. The rows that met one outnumber the stored ids still in the segment exactly when a
    # stored id comes more than once; otherwise duplicated ids are new ones, all survivors.
    stored_copies = int(keyed) - int(new_rows) - (stored_rows - int(gone))
    if stored_copies:
        # Among the ids whose 8-byte hash repeats (the duplicated ones, and the rare distinct
        # ids whose hashes collide), counted exactly: no hash table of every id as a string.
        con.execute(
            f"INSERT INTO duplicates WITH segment_ids AS ({ids}) SELECT k, count(*) FROM segment_ids "
            "SEMI JOIN (SELECT hash(k) AS h FROM segment_ids WHERE k IS NOT NULL GROUP BY h HAVING count(*) > 1) c "
            "ON c.h = hash(segment_ids.k) WHERE k IS NOT NULL GROUP BY k HAVING count(*) > 1"
        )
    else:
        con.execute(
            f"INSERT INTO duplicates SELECT k, count(*) FROM {SURVIVORS} WHERE NOT known AND NOT gone "
            "AND k IS NOT NULL GROUP BY k HAVING count(*) > 1"
        )
    copies = con.sql("SELECT k, copies FROM duplicates ORDER BY k").to_arrow_table()
    duplicates = dict(zip(copies["k"].to_pylist(), copies["copies"].to_pylist(), strict=True))
    distinct = int(keyed) - sum(duplicates.values()) + len(duplicates)
    removed = con.execute(removed_sql(ids if intents else None)).fetchall()
    # Stored ids are unique: those in the segment are the stored ones less those that left,
    # and the matched ones are those less the duplicated ones.
    stored_duplicated = 0
    if stored_copies:
        ((stored_duplicated,),) = con.execute(
            "SELECT count(*) FROM stored SEMI JOIN duplicates ON duplicates.k = stored.custom_id"
        ).fetchall()
    matched = stored_rows - int(gone) - int(stored_duplicated)
    # Intent ids are unique: the synced ids are the stored ones plus the intents not stored.
    overlap = 0
    if intents:
        ((overlap,),) = con.execute("SELECT count(*) FROM stored SEMI JOIN intents USING (custom_id)").fetchall()
    scan = IdScan(
        rows=int(rows),
        null_ids=int(rows) - int(keyed),
        duplicates=duplicates,
        matched=matched,
        new_ids=distinct - len(duplicates) - matched,
        removed=[custom_id for custom_id, _ in removed],
        synced=stored_rows + intents - int(overlap),
        below_watermark=int(below_watermark),
        moved=int(moved),
    )
    return LocalPass(scan=scan, duplicates=copies, moved=int(moved), stored_duplicates=bool(stored_copies))


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
