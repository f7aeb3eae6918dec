"""The SQL of the differ's stream: the rows a run maps and sends, with their stored fingerprints.

:class:`sync.diff.SegmentDiff` runs it over the segment streamed into its own database,
or, for a DuckDB segment, in the segment's own database (``docs/how-a-run-works.md``, "A
local segment"); either way it reads ``stored`` (the fingerprints) and ``duplicates`` (the
id scan's duplicated ids) beside the segment's rows.
"""

from __future__ import annotations

from sync.differ import DUPLICATE, KEY, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW

__all__ = ["send_sql"]


def send_sql(selected: str, *, stored: bool, full: bool, new_by_hash: bool, ordered: bool) -> str:
    """Rows to map and send from ``selected`` (mapped columns, row, key, raw hash, past any watermark).

    Args:
        selected: The segment's rows, as :meth:`sync.diff.SegmentDiff._select` gives them.
        stored: There are stored fingerprints to join.
        full: Every row (a full pass); otherwise the new ones and the bad or duplicated ids'.
        new_by_hash: The id scan proved that no new id's hash is a stored id's (a smaller join).
        ordered: In Custom ID order (a full pass with a send checkpoint needs it).
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
    if new_by_hash:
        # As below, but the stored ids are met by their 8-byte hashes: the id scan found
        # that no new id's hash is a stored id's, so a row whose id hash is not stored is
        # exactly a row without a stored fingerprint (the hash table is ~40% smaller).
        return (
            f"SELECT s.*, {flags}, sd.raw AS {STORED_RAW}, sd.payload AS {STORED_PAYLOAD}, "
            f"sd.attributes AS {STORED_ATTRIBUTES} "
            f"FROM ({selected}) s LEFT JOIN duplicates d ON d.k = s.{KEY} "
            f"LEFT JOIN (SELECT custom_id, raw, payload, attributes FROM stored "
            f"SEMI JOIN duplicates ON duplicates.k = stored.custom_id) sd ON sd.custom_id = s.{KEY} "
            f"WHERE s.{KEY} IS NULL OR d.k IS NOT NULL "
            f"OR hash(s.{KEY}) NOT IN (SELECT hash(custom_id) FROM stored) {order}"
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
