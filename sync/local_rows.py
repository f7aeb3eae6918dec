"""A few of a local segment's rows, with their read-order numbers, without numbering every row's columns.

After a local delta pass (:mod:`sync.local_pass`), the rows to map are few: the moved ones,
and the stream's null, new and duplicated ids. Numbering the segment's rows in read order
(``row_number() OVER ()`` over every mapped column) makes DuckDB hold every row's columns on
one thread before the first comes out: ~0.25 s at 1M rows, for a handful of rows. Instead,
when they are at most :data:`SPARSE_ROWS` (``docs/how-a-run-works.md``, "A local segment"):

1. **The numbers** (``sparse_numbers``): the Custom ID column alone is numbered in read order
   and narrowed to the wanted ids (and the null ones): one narrow column, ~0.03 s a million.
2. **The rows** (``sparse_rows``): the segment's mapped columns, narrowed to the same ids as
   they are read (on every thread), kept in read order (DuckDB keeps a query's order when
   it creates a table from it).
3. **Met**: both reads are the same query of the same database, so they hold the same rows.
   When the second kept the read order (a plain filter does: a few ids written out), the
   n-th row of the one is the n-th number of the other. Filtered by a hash join (more ids)
   on every thread, DuckDB hands the rows over in any order: an earlier version, meeting
   them in order only, numbered every row on most deltas after all. Then each row meets
   its number on its Custom ID and its rank among that id's copies (null ids ranked
   together): ids are unique but for duplicated and null ones, and copies ranked in any
   order are only interchangeable when their values are all equal.
4. **Or not**: when neither way meets every row with one number of the same id (a segment
   query whose rows change from one read to the next), or two copies of an id met by id
   differ in a value, the caller numbers every row as before. Only then is anything read
   a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import duckdb

from sync.differ import KEY, RAW, ROW
from sync.duckdb_sql import quote_identifier, quote_literal

__all__ = ["LISTED_IDS", "SPARSE_ROWS", "drop_sparse_rows", "sparse_rows"]

# The most rows fetched this way (beyond, every row is numbered: the rows to map then cost
# far more than numbering). The two temporary tables hold them, spilling past the cap.
SPARSE_ROWS: Final = 250_000
# The most ids written into the queries as literals (more, and DuckDB's filter of them costs
# more than the join with their table: ~1.3 s a million rows for 1,000 ids).
LISTED_IDS: Final = 32

_NUMBERS: Final = "sparse_numbers"
_ROWS: Final = "sparse_rows"
_IDS: Final = "sparse_ids"
# Column names of the differ's own, never a mapped column's.
_K: Final = "__cepsync_sparse_key"
_N: Final = "__cepsync_sparse_row"
_ORDINAL: Final = "__cepsync_sparse_ordinal"
_COPY: Final = "__cepsync_sparse_copy"  # a row's rank among its id's copies


def sparse_rows(
    con: duckdb.DuckDBPyConnection,
    segment_sql: str,
    columns: Sequence[str],
    key: str,
    raw: str,
    *,
    ids: str,
    nulls: bool,
) -> str | None:
    """The rows whose Custom ID key ``ids`` gives (a query of ``k``), and the null ids' if ``nulls``.

    Returns a query of them (the mapped ``columns``, :data:`ROW`, :data:`KEY`, :data:`RAW`,
    in read order), or None when the two reads disagree: then number every row. The
    temporary tables stay until :func:`drop_sparse_rows`.
    """
    if any(column.lower() == "rowid" for column in columns):
        return None  # the tables' own row ids would be shadowed by the column
    con.execute(f"CREATE OR REPLACE TEMP TABLE {_IDS} AS SELECT DISTINCT k FROM ({ids}) wanted WHERE k IS NOT NULL")
    listed = con.execute(f"SELECT k FROM {_IDS} ORDER BY k LIMIT {LISTED_IDS + 1}").fetchall()
    # A few ids are written out: DuckDB then filters the segment's id column as it reads it,
    # and skips the blocks whose bounds hold none of them (new ids are often the latest).
    among = ", ".join(quote_literal(k) for (k,) in listed) if len(listed) <= LISTED_IDS else None

    def wanted(expression: str) -> str:
        if among is None:
            condition = f"{expression} IN (SELECT k FROM {_IDS})"
        else:
            condition = f"{expression} IN ({among})" if among else "FALSE"
        return f"({expression} IS NULL OR {condition})" if nulls else condition

    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_NUMBERS} AS "
        f"SELECT {_K}, {_N}, row_number() OVER (ORDER BY {_N}) AS {_ORDINAL}, "
        f"row_number() OVER (PARTITION BY {_K} ORDER BY {_N}) AS {_COPY} "
        f"FROM (SELECT {key} AS {_K}, row_number() OVER () AS {_N} FROM ({segment_sql}) AS segment) numbered "
        f"WHERE {wanted(_K)}"
    )
    selected = ", ".join(quote_identifier(c) for c in columns)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_ROWS} AS SELECT {selected}, {key} AS {KEY} "
        f"FROM ({segment_sql}) AS segment WHERE {wanted(key)}"
    )
    mapped = ", ".join(f"r.{quote_identifier(c)}" for c in columns)
    for ranked, met, by_id in _MEETINGS:
        if _meet(con, ranked, met) and not (by_id and _unlike_copies(con, selected)):
            numbered = f"({ranked}) r JOIN {_NUMBERS} n ON {met}"
            return f"SELECT {mapped}, n.{_N} AS {ROW}, r.{KEY}, {raw} AS {RAW} FROM {numbered}"
    drop_sparse_rows(con)
    return None


# How the rows meet their numbers (the module's docstring, step 3): the table's n-th row is
# the n-th number (the read kept its order); or, met by id, a row meets the number of its
# id's copy of the same rank (ranked in the table's order, whatever it is).
_MEETINGS: Final = (
    (f"SELECT *, row_number() OVER (ORDER BY rowid) AS {_ORDINAL} FROM {_ROWS}", f"n.{_ORDINAL} = r.{_ORDINAL}", False),
    (
        f"SELECT *, row_number() OVER (PARTITION BY {KEY} ORDER BY rowid) AS {_ORDINAL} FROM {_ROWS}",
        f"n.{_K} IS NOT DISTINCT FROM r.{KEY} AND n.{_COPY} = r.{_ORDINAL}",
        True,
    ),
)


def _meet(con: duckdb.DuckDBPyConnection, ranked: str, met: str) -> bool:
    """Whether every row meets one number and every number one row, with the same id."""
    ((disagreements,),) = con.execute(
        f"SELECT count(*) FROM ({ranked}) r FULL JOIN {_NUMBERS} n ON {met} "
        f"WHERE n.{_ORDINAL} IS NULL OR r.{_ORDINAL} IS NULL OR n.{_K} IS DISTINCT FROM r.{KEY}"
    ).fetchall()
    return not disagreements


def _unlike_copies(con: duckdb.DuckDBPyConnection, selected: str) -> bool:
    """Whether two copies of an id (or two rows without one) differ in a value (met by id, which is whose?)."""
    ((unlike,),) = con.execute(
        f"SELECT count(*) FROM (SELECT {KEY} FROM {_ROWS} GROUP BY {KEY} "
        f"HAVING count(*) > 1 AND count(DISTINCT row({selected})) > 1) copies"
    ).fetchall()
    return bool(unlike)


def drop_sparse_rows(con: duckdb.DuckDBPyConnection) -> None:
    """Drop :func:`sparse_rows`'s temporary tables."""
    for table in (_IDS, _NUMBERS, _ROWS):
        con.execute(f"DROP TABLE IF EXISTS {table}")
