"""The differ's two recipes: the Custom ID key and the raw hash of a row, in DuckDB SQL.

The **raw hash** recipe is DuckDB's ``hash()`` over the mapped columns, salted with the
mapping version, the columns' Arrow types, the source engine and the DuckDB version::

    hash('<salt>', c1, c2, …, cn)        -- UBIGINT, order-sensitive over its arguments

It only says "the source values may have moved": a mismatch (a DuckDB upgrade, say) costs
one re-mapping, never a wrong send, because the payload fingerprint (computed in Python from
the canonical payload, :mod:`sync.fingerprint`) alone decides what is sent.

The **key** is the Custom ID as the mapper writes it (:func:`key_sql`): the string itself,
or the decimal digits of an integer id. It must equal the mapper's ``custom_id`` exactly,
or a stored fingerprint would be missed (a resend) and, in mirror mode, the profile taken
for a removal; ``tests/test_diff.py`` holds the two together on every id type.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import pyarrow as pa

from sync.duckdb_sql import quote_identifier
from sync.errors import ConfigError

__all__ = ["key_sql", "raw_salt"]


def key_sql(column: str, arrow_type: pa.DataType) -> str:
    """SQL for the Custom ID key of ``column``, exactly as ``sync.mapping`` writes the id.

    Strings are taken as they are (never trimmed: Batch ids are whitespace-sensitive);
    integers become their decimal digits; a decimal becomes the digits of its integral value
    and NULL when it has a fraction (the mapper rejects such an id, so it has no key).
    """
    ref = quote_identifier(column)
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return f"CAST({ref} AS VARCHAR)"
    if pa.types.is_integer(arrow_type):
        return f"CAST({ref} AS VARCHAR)"
    if pa.types.is_decimal(arrow_type):
        if arrow_type.scale == 0:
            return f"CAST(CAST({ref} AS HUGEINT) AS VARCHAR)"
        return f"CASE WHEN {ref} = trunc({ref}) THEN CAST(CAST({ref} AS HUGEINT) AS VARCHAR) END"
    raise ConfigError(
        f"column '{column}' of Arrow type {arrow_type} cannot hold a Custom ID", field="mapping.custom_id"
    )


def raw_salt(mapping_version: str, schema: pa.Schema, columns: Sequence[str], engine: str) -> str:
    """What the raw hash is salted with: mapping version, column types, source engine, DuckDB.

    ``engine`` is the source's :attr:`sync.sources.base.Source.engine`: a name each source
    states explicitly (a class rename must never re-map every profile).
    """
    types = ";".join(f"{name}:{schema.field(name).type}" for name in columns)
    return f"cepsync/raw/2|{mapping_version}|{engine}|duckdb {duckdb.__version__}|{types}"
