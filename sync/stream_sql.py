"""The SQL of the differ's stream: the rows a run maps and sends, with their stored fingerprints.

:class:`sync.diff.SegmentDiff` runs it over the segment streamed into its own database,
or, for a DuckDB segment, in the segment's own database (``docs/how-a-run-works.md``, "A
local segment"); either way it reads ``stored`` (the fingerprints) and ``duplicates`` (the
id scan's duplicated ids) beside the segment's rows.
"""

from __future__ import annotations

from typing import Final

from sync.differ import DUPLICATE, KEY, RAW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW

__all__ = ["NEW_BY_HASH_SQL", "send_sql", "streamed_moved_sql"]

# A row's id is new when its 8-byte hash is no stored id's (exact once the id scan proved it).
NEW_BY_HASH_SQL: Final = f"hash(s.{KEY}) NOT IN (SELECT hash(custom_id) FROM stored)"


def send_sql(
    selected: str, *, stored: bool, full: bool, new: str | None, ordered: bool, stored_duplicates: bool = True
) -> str:
    """Rows to map and send from ``selected`` (mapped columns, row, key, raw hash, past any watermark).

    Args:
        selected: The segment's rows, as :meth:`sync.diff.SegmentDiff._select` gives them.
        stored: There are stored fingerprints to join.
        full: Every row (a full pass); otherwise the new ones and the bad or duplicated ids'.
        new: How to tell a row's id new without a join on every stored id, or None: a
            condition on ``s.__cepsync_key`` (:data:`NEW_BY_HASH_SQL` once the id scan proved
            that no new id's hash is a stored id's; a local pass's own new ids).
        ordered: In Custom ID order (a full pass with a send checkpoint needs it).
        stored_duplicates: Some duplicated id may be stored (else, known from a local pass,
            a delta's rows need no stored fingerprint, and the stored table is not read).
    """
    order = f"ORDER BY s.{KEY}" if ordered else ""
    flags = f"d.k IS NOT NULL AS {DUPLICATE}"
    if not stored:
        # Nothing stored: every row is new, and there is nothing to join.
        return (
            f"SELECT s.*, {flags}, CAST(NULL AS UBIGINT) AS {STORED_RAW}, "
            f"CAST(NULL AS UBIGINT) AS {STORED_PAYLOAD}, CAST(NULL AS BLOB) AS {STORED_ATTRIBUTES} "
            f"FROM ({selected}) s LEFT JOIN duplicates d ON d.k = s.{KEY} {order}"
        )
    if full:
        return (
            f"SELECT s.*, {flags}, st.raw AS {STORED_RAW}, st.payload AS {STORED_PAYLOAD}, "
            f"st.attributes AS {STORED_ATTRIBUTES} "
            f"FROM ({selected}) s LEFT JOIN stored st ON st.custom_id = s.{KEY} "
            f"LEFT JOIN duplicates d ON d.k = s.{KEY} {order}"
        )
    if new is not None and not stored_duplicates:
        # A delta's rows are new or without an id: none has a stored fingerprint.
        return (
            f"SELECT s.*, {flags}, CAST(NULL AS UBIGINT) AS {STORED_RAW}, "
            f"CAST(NULL AS UBIGINT) AS {STORED_PAYLOAD}, CAST(NULL AS BLOB) AS {STORED_ATTRIBUTES} "
            f"FROM ({selected}) s LEFT JOIN duplicates d ON d.k = s.{KEY} "
            f"WHERE s.{KEY} IS NULL OR d.k IS NOT NULL OR {new} {order}"
        )
    if new is not None:
        # As below, but a new id is told without joining every stored id: by its 8-byte hash
        # once the id scan found that no new id's hash is a stored id's (a row whose id hash
        # is not stored is then exactly a row without a stored fingerprint: the hash table
        # is ~40% smaller), or by the local pass's exact list of new ids.
        return (
            f"SELECT s.*, {flags}, sd.raw AS {STORED_RAW}, sd.payload AS {STORED_PAYLOAD}, "
            f"sd.attributes AS {STORED_ATTRIBUTES} "
            f"FROM ({selected}) s LEFT JOIN duplicates d ON d.k = s.{KEY} "
            f"LEFT JOIN (SELECT custom_id, raw, payload, attributes FROM stored "
            f"SEMI JOIN duplicates ON duplicates.k = stored.custom_id) sd ON sd.custom_id = s.{KEY} "
            f"WHERE s.{KEY} IS NULL OR d.k IS NOT NULL OR {new} {order}"
        )
    # Only rows without a stored fingerprint and rows with a duplicated id come out, so
    # the join against every stored id needs the ids alone (its hash table is then
    # about half as large); the few duplicated rows take their stored fingerprints
    # from the stored rows of the duplicated ids, found by probing the stored table
    # through the small table of duplicates.
    return (
        f"SELECT s.*, {flags}, sd.raw AS {STORED_RAW}, sd.payload AS {STORED_PAYLOAD}, "
        f"sd.attributes AS {STORED_ATTRIBUTES} "
        f"FROM ({selected}) s LEFT JOIN (SELECT custom_id FROM stored) st ON st.custom_id = s.{KEY} "
        f"LEFT JOIN duplicates d ON d.k = s.{KEY} "
        f"LEFT JOIN (SELECT custom_id, raw, payload, attributes FROM stored "
        f"SEMI JOIN duplicates ON duplicates.k = stored.custom_id) sd ON sd.custom_id = s.{KEY} "
        f"WHERE st.custom_id IS NULL OR d.k IS NOT NULL {order}"
    )


def streamed_moved_sql(selected: str) -> str:
    """The moved rows of ``selected`` (stored ids whose raw hash moved, not duplicated), with their fingerprints.

    Two joins, so that neither holds the stored ids as strings (~100 bytes an id with their
    hashes): the segment first meets the stored (hash of id, raw hash) pairs, 16 bytes an
    id, and keeps the rows whose id hash is stored beside another raw hash. That is every
    moved row, and maybe a few more when two ids' hashes collide. Only those candidates
    (few in a delta) are then built into the exact join on the id, which the stored table
    probes: it drops the extra ones and brings the stored hashes.
    """
    return (
        f"SELECT c.*, FALSE AS {DUPLICATE}, st.raw AS {STORED_RAW}, st.payload AS {STORED_PAYLOAD}, "
        f"st.attributes AS {STORED_ATTRIBUTES} "
        f"FROM stored st JOIN ("
        f"SELECT s.* FROM ({selected}) s "
        f"SEMI JOIN (SELECT hash(custom_id) AS h, raw FROM stored) sh "
        f"ON sh.h = hash(s.{KEY}) AND sh.raw <> s.{RAW}"
        f") c ON st.custom_id = c.{KEY} "
        f"ANTI JOIN duplicates d ON d.k = c.{KEY} WHERE st.raw <> c.{RAW}"
    )
