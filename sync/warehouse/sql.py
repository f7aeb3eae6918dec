"""The SQL a warehouse-diff run sends to BigQuery, as pure functions (pinned by tests).

Every value is a named query parameter (``@cepsync_*``, a prefix the segment's own
parameters cannot use by accident); every identifier is either a table reference built
from validated parts (:func:`table_sql`) or a mapped column name quoted with backticks after
:func:`column_sql` checked it. Nothing a user typed is spliced into SQL except the segment
query itself, which runs as a subquery exactly as the BigQuery source runs it.

The raw hash recipe (``diff: warehouse``)::

    CAST(CONCAT('0x', SUBSTR(TO_HEX(MD5(TO_JSON_STRING(STRUCT(@cepsync_salt AS s, c1 AS f1, …)))), 1, 15)) AS INT64)

the first 60 bits of the MD5 of the row as JSON, a non-negative INT64 read back as the
engine's uint64. Not ``FARM_FINGERPRINT``: the local emulator runs that as a Python function
per row and stalls past a few thousand rows, while MD5 is native there and on BigQuery alike
(docs/warehouse-diff.md, "Why MD5"). The salt names the mapping
version and the engine (:func:`raw_salt`), so a hash from the DuckDB differ never matches
one from BigQuery: switching modes re-maps each row once (a "refresh", nothing is sent).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from google.cloud import bigquery

from sync.differ import DUPLICATE, KEY, RAW, ROW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW
from sync.errors import ConfigError

# The diff result's column saying what a row is: a segment row that is 'moved', 'new' or
# 'bad' (null or duplicated id), or one of the id scan's figures (:data:`SCAN_KINDS`).
KIND: Final = "__cepsync_kind"
# The diff result's count column: a figure's value, a duplicated id's copies (NULL on segment rows).
COUNT: Final = "__cepsync_n"
ROW_KINDS: Final = ("moved", "new", "bad")
SCAN_KINDS: Final = ("rows", "null_ids", "distinct", "matched", "synced", "stored", "duplicate", "removed")
FINGERPRINTS: Final = "cepsync_fingerprints"
JOURNAL: Final = "cepsync_journal"
FENCE: Final = "cepsync_fence"
# BigQuery column names: letters, digits and underscores, not starting with a digit.
# The stored fingerprint's columns each row carries out: (state table column, output column).
STORED_OUTPUT: Final = (("raw", STORED_RAW), ("payload", STORED_PAYLOAD), ("attributes", STORED_ATTRIBUTES))
_COLUMN: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
_PROJECT: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_DATASET: Final = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
_TABLE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,1023}$")

FINGERPRINTS_SCHEMA: Final = [
    bigquery.SchemaField("activation", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("custom_id", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("raw", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("payload", "INT64", mode="REQUIRED"),
    # The attribute set (send: changed_attributes), NULL where not kept; a column added to
    # tables created before it (WarehouseFingerprints.ensure_tables).
    bigquery.SchemaField("attributes", "BYTES", mode="NULLABLE"),
    # The lease token of the run that acknowledged it (run records carry lease_token), and
    # its position in that run's journal: the merge keeps the newest (token, flush, pos).
    bigquery.SchemaField("token", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("flush", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("pos", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("acknowledged_at", "TIMESTAMP", mode="REQUIRED"),
]
JOURNAL_SCHEMA: Final = [*FINGERPRINTS_SCHEMA, bigquery.SchemaField("put", "BOOL", mode="REQUIRED")]
FENCE_SCHEMA: Final = [
    bigquery.SchemaField("activation", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("token", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("registered_at", "TIMESTAMP", mode="REQUIRED"),
]


def table_sql(reference: bigquery.TableReference) -> str:
    """```project.dataset.table``` after checking each part is a plain identifier."""
    if not (
        _PROJECT.match(reference.project) and _DATASET.match(reference.dataset_id) and _TABLE.match(reference.table_id)
    ):
        raise ConfigError(f"not a plain BigQuery table reference: {reference}", field="diff.dataset")
    return f"`{reference.project}.{reference.dataset_id}.{reference.table_id}`"


def column_sql(name: str) -> str:
    if not _COLUMN.match(name):
        raise ConfigError(f"column {name!r} cannot be used by the warehouse diff", field="mapping")
    return f"`{name}`"


def key_sql(column: str, field_type: str) -> str:
    """The Custom ID as the mapper writes it: a STRING as is, an INT64 as its decimal digits."""
    ref = column_sql(column)
    if field_type == "STRING":
        return ref
    if field_type in ("INT64", "INTEGER"):
        return f"CAST({ref} AS STRING)"
    raise ConfigError(
        f"the warehouse diff needs a STRING or INT64 Custom ID column; '{column}' is {field_type}",
        field="mapping.custom_id",
    )


def raw_sql(columns: Sequence[str]) -> str:
    fields = ", ".join(f"{column_sql(c)} AS f{i}" for i, c in enumerate(columns, 1))
    row = f"TO_JSON_STRING(STRUCT(@cepsync_salt AS s, {fields}))"
    # 15 hex digits = 60 bits: always a valid, non-negative INT64 (16 could overflow the cast).
    return f"CAST(CONCAT('0x', SUBSTR(TO_HEX(MD5({row})), 1, 15)) AS INT64)"


def raw_salt(mapping_version: str, types: Sequence[str]) -> str:
    return f"cepsync/raw/bq2|{mapping_version}|bigquery-warehouse|{';'.join(types)}"


def _rows_sql(segment: str, columns: Sequence[str], key: str) -> str:
    selected = ", ".join(column_sql(c) for c in columns)
    return (
        f"SELECT {selected}, {key} AS {KEY}, {raw_sql(columns)} AS {RAW}, "
        f"COUNT(*) OVER (PARTITION BY {key}) AS copies FROM {segment}"
    )


def _output(columns: Sequence[str]) -> str:
    selected = ", ".join(f"seg.{column_sql(c)}" for c in columns)
    return (
        f"{selected}, CAST(NULL AS INT64) AS {ROW}, seg.{KEY}, seg.{RAW}, "
        f"(seg.{KEY} IS NOT NULL AND seg.copies > 1) AS {DUPLICATE}, "
        + ", ".join(f"st.{name} AS {output}" for name, output in STORED_OUTPUT)
    )


def _stored_sql(fingerprints: str) -> str:
    """The stored fingerprints, zero (no attribute set) for the unconfirmed ids.

    A send of theirs may have landed unacknowledged.
    """
    unconfirmed = "custom_id IN UNNEST(@cepsync_unconfirmed)"
    return (
        f"st AS (SELECT custom_id, IF({unconfirmed}, 0, raw) AS raw, IF({unconfirmed}, 0, payload) AS payload, "
        f"IF({unconfirmed}, NULL, attributes) AS attributes "
        f"FROM {fingerprints} WHERE activation = @cepsync_activation)"
    )


def _figure(columns: Sequence[str], kind: str, key: str, count: str) -> str:
    """One id-scan line of the diff result: the segment row's columns NULL, then kind, key, count."""
    # In _output's order: mapped columns, ROW, KEY, RAW, DUPLICATE, the stored columns.
    nulls = ["NULL"] * len(columns) + ["NULL", key, "NULL", "NULL"] + ["NULL"] * len(STORED_OUTPUT)
    return f"SELECT {', '.join(nulls)}, {kind}, {count}"


def diff_sql(segment: str, columns: Sequence[str], key: str, fingerprints: str) -> str:
    """The run's one scan of the segment: the rows that may need mapping, and the id scan's figures.

    Its result (an anonymous table) holds the rows that are new, moved, or carry a null or
    duplicated id (``KIND`` 'new', 'moved', 'bad'), then one line per figure of the id
    scan: counts, duplicated ids with their copies and, in mirror mode, the ids that left
    (``KIND`` in :data:`SCAN_KINDS`). Everything after it reads that result, never the
    segment: the segment is referenced once, so BigQuery bills its columns once.
    """
    figures = [
        _figure(columns, "'rows'", "NULL", "(SELECT COUNT(*) FROM seg)"),
        _figure(columns, "'null_ids'", "NULL", f"(SELECT COUNTIF({KEY} IS NULL) FROM seg)"),
        _figure(columns, "'distinct'", "NULL", "(SELECT COUNT(*) FROM counts)"),
        _figure(
            columns,
            "'matched'",
            "NULL",
            "(SELECT COUNT(*) FROM counts JOIN st ON st.custom_id = counts.k WHERE counts.n = 1)",
        ),
        _figure(columns, "'synced'", "NULL", "(SELECT COUNT(*) FROM synced)"),
        _figure(columns, "'stored'", "NULL", "(SELECT COUNT(*) FROM st)"),
        _figure(columns, "'duplicate'", "k", "n") + " FROM counts WHERE n > 1",
        _figure(columns, "'removed'", "synced.custom_id", "0")
        + " FROM synced LEFT JOIN counts ON counts.k = synced.custom_id WHERE @cepsync_mirror AND counts.k IS NULL",
    ]
    return (
        f"WITH seg AS ({_rows_sql(segment, columns, key)}),\n"
        f"{_stored_sql(fingerprints)},\n"
        f"counts AS (SELECT {KEY} AS k, COUNT(*) AS n FROM seg WHERE {KEY} IS NOT NULL GROUP BY {KEY}),\n"
        "synced AS (SELECT custom_id FROM st UNION DISTINCT "
        "SELECT custom_id FROM UNNEST(@cepsync_intents) AS custom_id)\n"
        f"SELECT {_output(columns)},\n"
        f"  CASE WHEN seg.{KEY} IS NULL OR seg.copies > 1 THEN 'bad' "
        f"WHEN st.custom_id IS NULL THEN 'new' ELSE 'moved' END AS {KIND}, CAST(NULL AS INT64) AS {COUNT}\n"
        f"FROM seg LEFT JOIN st ON st.custom_id = seg.{KEY}\n"
        f"WHERE seg.{KEY} IS NULL OR seg.copies > 1 OR st.custom_id IS NULL OR st.raw <> seg.{RAW}\n"
        + "\n".join(f"UNION ALL {figure}" for figure in figures)
    )


def scan_result_sql(result: str) -> str:
    """The id scan's figures from a diff result (a few rows: counts, duplicated and removed ids)."""
    kinds = ", ".join(f"'{kind}'" for kind in SCAN_KINDS)
    return f"SELECT {KIND} AS kind, {KEY} AS k, {COUNT} AS n FROM {result} WHERE {KIND} IN ({kinds})"


def full_sql(segment: str, columns: Sequence[str], key: str, fingerprints: str, *, ordered: bool) -> str:
    """A full pass: every row, with its stored fingerprint when there is one."""
    order = f"\nORDER BY seg.{KEY}" if ordered else ""
    return (
        f"WITH seg AS ({_rows_sql(segment, columns, key)}),\n"
        f"{_stored_sql(fingerprints)}\n"
        f"SELECT {_output(columns)}\n"
        f"FROM seg LEFT JOIN st ON st.custom_id = seg.{KEY}{order}"
    )


def result_part_sql(result: str, *, moved: bool) -> str:
    """The moved rows, or the new and bad ones, of a diff result (a small table: only the changes)."""
    condition = f"{KIND} = 'moved'" if moved else f"{KIND} IN ('new', 'bad')"
    return f"SELECT * EXCEPT ({KIND}, {COUNT}) FROM {result} WHERE {condition}"


def _latest_journal(journal: str, fence: str) -> str:
    return (
        "SELECT custom_id, raw, payload, attributes, put, token, flush, pos, acknowledged_at "
        f"FROM {journal} WHERE activation = @cepsync_activation AND token <= @cepsync_token "
        f"AND @cepsync_token = (SELECT MAX(token) FROM {fence} WHERE activation = @cepsync_activation)\n"
        "  QUALIFY ROW_NUMBER() OVER (PARTITION BY custom_id ORDER BY token DESC, flush DESC, pos DESC) = 1"
    )


_NEWER: Final = (
    "(j.token > t.token OR (j.token = t.token AND (j.flush > t.flush OR (j.flush = t.flush AND j.pos >= t.pos))))"
)


def stored_count_sql(fingerprints: str, journal: str) -> str:
    """How many fingerprints (and journal rows) the activation has in BigQuery: is its state here?"""
    return (
        f"SELECT (SELECT COUNT(*) FROM {fingerprints} WHERE activation = @cepsync_activation) "
        f"+ (SELECT COUNT(*) FROM {journal} WHERE activation = @cepsync_activation) AS n"
    )


# The fence row that holds an activation's token offset (set when a state store adopts the
# fence): keyed by a name no activation can have ('#' is not allowed in activation names).
OFFSET_KEY: Final = "CONCAT(@cepsync_activation, '#offset')"


def last_activity_sql(fingerprints: str, journal: str, fence: str) -> str:
    """The fence's newest token, the token offset, and the last trace any run of the activation left."""
    epoch = "TIMESTAMP '1970-01-01 00:00:00+00'"
    return (
        f"SELECT (SELECT MAX(token) FROM {fence} WHERE activation = @cepsync_activation) AS token, "
        f"(SELECT IFNULL(MAX(token), 0) FROM {fence} WHERE activation = {OFFSET_KEY}) AS offset, "
        "GREATEST("
        f"IFNULL((SELECT MAX(registered_at) FROM {fence} WHERE activation = @cepsync_activation), {epoch}), "
        f"IFNULL((SELECT MAX(acknowledged_at) FROM {journal} WHERE activation = @cepsync_activation), {epoch}), "
        f"IFNULL((SELECT MAX(acknowledged_at) FROM {fingerprints} WHERE activation = @cepsync_activation), {epoch})"
        ") AS last_seen"
    )


def set_offset_sql(fence: str) -> str:
    """Adoption: the activation's tokens are lease tokens plus ``@cepsync_offset`` from now on."""
    return (
        f"INSERT INTO {fence} (activation, token, registered_at) "
        f"VALUES ({OFFSET_KEY}, @cepsync_offset, CURRENT_TIMESTAMP())"
    )


def register_fence_sql(fence: str) -> str:
    """The run's token (its lease token plus the activation's offset, 0 unless adopted) enters the fence."""
    return (
        f"INSERT INTO {fence} (activation, token, registered_at) "
        f"SELECT @cepsync_activation, @cepsync_lease_token + IFNULL(MAX(token), 0), CURRENT_TIMESTAMP() "
        f"FROM {fence} WHERE activation = {OFFSET_KEY}"
    )


def fence_sql(fence: str) -> str:
    """The fence's newest token, and the activation's token offset."""
    return (
        f"SELECT (SELECT MAX(token) FROM {fence} WHERE activation = @cepsync_activation) AS token, "
        f"(SELECT IFNULL(MAX(token), 0) FROM {fence} WHERE activation = {OFFSET_KEY}) AS offset"
    )


def merge_sql(fingerprints: str, journal: str, fence: str) -> str:
    """Fold the journal into the state table, fenced: a token that is not the newest merges nothing.

    Idempotent (the newest ``(token, flush, pos)`` wins, a replay changes nothing), so a
    crash between this statement and :func:`drop_merged_sql` only means the next run merges
    the same rows again.
    """
    return (
        f"MERGE {fingerprints} AS t\n"
        f"USING ({_latest_journal(journal, fence)}) AS j\n"
        "ON t.activation = @cepsync_activation AND t.custom_id = j.custom_id\n"
        f"WHEN MATCHED AND NOT j.put AND {_NEWER} THEN DELETE\n"
        f"WHEN MATCHED AND j.put AND {_NEWER} THEN UPDATE SET raw = j.raw, payload = j.payload, "
        "attributes = j.attributes, token = j.token, flush = j.flush, pos = j.pos, "
        "acknowledged_at = j.acknowledged_at\n"
        "WHEN NOT MATCHED AND j.put THEN INSERT (activation, custom_id, raw, payload, attributes, token, flush, pos, "
        "acknowledged_at) VALUES (@cepsync_activation, j.custom_id, j.raw, j.payload, j.attributes, j.token, j.flush, "
        "j.pos, j.acknowledged_at)"
    )


def drop_merged_sql(journal: str, fence: str) -> str:
    return (
        f"DELETE FROM {journal} WHERE activation = @cepsync_activation AND token <= @cepsync_token "
        f"AND @cepsync_token = (SELECT MAX(token) FROM {fence} WHERE activation = @cepsync_activation)"
    )


def folded_sql(fingerprints: str, journal: str) -> str:
    """Every acknowledged fingerprint of the activation: the state table with its journal applied."""
    return (
        "SELECT custom_id, raw, payload, attributes FROM (\n"
        "  SELECT * FROM (\n"
        "    SELECT custom_id, raw, payload, attributes, TRUE AS put, token, flush, pos "
        f"FROM {fingerprints} WHERE activation = @cepsync_activation\n"
        "    UNION ALL SELECT custom_id, raw, payload, attributes, put, token, flush, pos "
        f"FROM {journal} WHERE activation = @cepsync_activation\n"
        "  ) WHERE TRUE\n"
        "  QUALIFY ROW_NUMBER() OVER (PARTITION BY custom_id ORDER BY token DESC, flush DESC, pos DESC) = 1\n"
        ") WHERE put"
    )


def forget_sql(table: str) -> str:
    return f"DELETE FROM {table} WHERE activation = @cepsync_activation"
