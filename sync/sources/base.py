"""The Source protocol: what the engine needs from a warehouse."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    import duckdb


class Source(Protocol):
    # The engine that reads the segment, as the raw hash's salt names it (sync.raw_hash.raw_salt):
    # the same values read by another engine may come as other Arrow types, so a change of
    # engine re-maps every row once. Stated by each source and never derived from a class
    # name, so renaming a class re-maps nothing; tests/test_diff.py pins the strings.
    engine: str

    def schema(self) -> pa.Schema:
        """Column names and types of the segment, without reading its rows.

        Called before the run takes its lease, so a missing mapped column is a config
        error before anything is read or sent.
        """

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The segment's rows, only ``columns``, as Arrow record batches (bounded memory)."""

    def stats(self) -> dict[str, object]:
        """Facts for the run record once reading is done (rows read, bytes processed, job id...)."""

    def close(self) -> None:
        """Release connections."""


class LocalSegment(Protocol):
    """A segment in a local DuckDB database, which the embedded differ may query where it lies.

    ``sync.local_pass`` runs a delta's pass there, with the database's threads, instead of
    streaming every row through Python (``docs/how-a-run-works.md``, "A local segment").
    """

    def segment_sql(self, columns: list[str]) -> str:
        """SQL of the segment's ``columns``, every row, in the order :meth:`Source.read_batches` reads them."""

    def differ_cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own on the segment's database for the differ's queries (its to close)."""

    def differ_settings(
        self, cursor: duckdb.DuckDBPyConnection, memory_limit: str, *, sorts: bool
    ) -> AbstractContextManager[None]:
        """The differ's settings (threads, a cap; one thread if ``sorts``) while its queries run; restored after."""


def local_segment(source: object) -> LocalSegment | None:
    """``source`` as a :class:`LocalSegment`, or None when its segment is not local."""
    found = getattr(source, "local_segment", None)
    return found() if callable(found) else None
