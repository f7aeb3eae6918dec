"""The Source protocol: what the engine needs from a warehouse."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa


class Source(Protocol):
    def schema(self) -> pa.Schema:
        """Column names and types of the segment, without reading its rows.

        Called before the run takes its lease, so a missing mapped column is a config
        error before anything is read or sent.
        """

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The segment's rows, only ``columns``, as Arrow record batches (bounded memory)."""

    def stats(self) -> dict[str, Any]:
        """Facts for the run record once reading is done (rows read, bytes processed, job id...)."""

    def close(self) -> None:
        """Release connections."""
