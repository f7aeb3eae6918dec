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
3. **Met in order**: the n-th row of the one is the n-th number of the other. Both reads are
   the same query of the same database, so they agree; should they not (a segment query
   whose rows change from one read to the next), the ids met in order differ, and the
   caller numbers every row as before. Only then is anything read a second time.
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
        f"SELECT {_K}, {_N}, row_number() OVER (ORDER BY {_N}) AS {_ORDINAL} "
        f"FROM (SELECT {key} AS {_K}, row_number() OVER () AS {_N} FROM ({segment_sql}) AS segment) numbered "
        f"WHERE {wanted(_K)}"
    )
    selected = ", ".join(quote_identifier(c) for c in columns)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_ROWS} AS SELECT {selected}, {key} AS {KEY} "
        f"FROM ({segment_sql}) AS segment WHERE {wanted(key)}"
    )
    ordered = f"SELECT *, row_number() OVER (ORDER BY rowid) AS {_ORDINAL} FROM {_ROWS}"
    ((disagreements,),) = con.execute(
        f"SELECT count(*) FROM ({ordered}) r FULL JOIN {_NUMBERS} n ON n.{_ORDINAL} = r.{_ORDINAL} "
        f"WHERE n.{_ORDINAL} IS NULL OR r.{_ORDINAL} IS NULL OR n.{_K} IS DISTINCT FROM r.{KEY}"
    ).fetchall()
    if disagreements:
        drop_sparse_rows(con)
        return None
    mapped = ", ".join(f"r.{quote_identifier(c)}" for c in columns)
    return (
        f"SELECT {mapped}, n.{_N} AS {ROW}, r.{KEY}, {raw} AS {RAW} "
        f"FROM ({ordered}) r JOIN {_NUMBERS} n ON n.{_ORDINAL} = r.{_ORDINAL}"
    )


def drop_sparse_rows(con: duckdb.DuckDBPyConnection) -> None:
    """Drop :func:`sparse_rows`'s temporary tables."""
    for table in (_IDS, _NUMBERS, _ROWS):
        con.execute(f"DROP TABLE IF EXISTS {table}")
