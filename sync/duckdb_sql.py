"""What every local DuckDB database of ours shares: quoting, and a bounded memory footprint.

Three places open one: the DuckDB source (the user's file, read-only), the differ
(``sync/diff.py``) and the journal fold (``sync/state/fold.py``). Each caps its memory and
spills past the cap to a temporary directory of its own, and hands freed memory back instead
of caching up to 128 MB per thread and 512 MB after bulk frees (DuckDB's defaults): a
function instance is sized, and billed, by its peak memory (docs/how-a-run-works.md,
"Memory").
"""

from __future__ import annotations

import duckdb


def quote_identifier(name: str) -> str:
    """SQL-quote one identifier (DuckDB doubles any quote)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """SQL-quote one string literal."""
    return "'" + text.replace("'", "''") + "'"


def bound_memory(con: duckdb.DuckDBPyConnection, *, memory_limit: str, spill_directory: str) -> None:
    """Cap ``con``'s database at ``memory_limit``, spilling to ``spill_directory``; free eagerly."""
    con.execute(f"SET temp_directory = {quote_literal(spill_directory)}")
    con.execute(f"SET memory_limit = {quote_literal(memory_limit)}")
    con.execute("SET allocator_flush_threshold = '16MB'")
    con.execute("SET allocator_bulk_deallocation_flush_threshold = '16MB'")
