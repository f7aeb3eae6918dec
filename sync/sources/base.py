"""The Source protocol: what the engine needs from a warehouse."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa


class Source(Protocol):
    # The engine that reads the segment, as the raw hash's salt names it (sync.diff.raw_salt):
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
