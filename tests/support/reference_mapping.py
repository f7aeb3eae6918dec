"""The row-at-a-time reference mapping: one dict per row, each value converted in turn.

The engine maps in columns: :meth:`sync.mapping.ProfileMapper.convert_batch` runs each
converter once per distinct value of a column, :func:`sync.encode.encode_batch` writes the
JSON bodies and their fingerprints without a dict per row, and :func:`sync.plan.plan_rows`
decides in Arrow. This module keeps, in the tests only, the obvious form of each step,
which the columnar one must agree with value for value:

* :func:`map_row` maps one row dict (``RecordBatch.to_pylist()``) with the mapper's own
  converters, one value at a time, into a :class:`MappedRow`;
* :func:`map_batch` is ``convert_batch`` read back as one :class:`MappedRow` per row: what
  ``[map_row(mapper, row) for row in batch.to_pylist()]`` must equal;
* :func:`encode_rows` builds an :class:`sync.encode.EncodedBatch` from mapped rows with
  ``canonical_payload``, one dict at a time;
* :func:`plan_reference` plans mapped rows through ``plan_rows`` by way of ``encode_rows``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from sync.convert import Failure, Value, convert_custom_id
from sync.encode import EncodedBatch
from sync.fingerprint import canonical_payload, payload_fingerprint_of
from sync.mapping import ProfileMapper
from sync.model import Refusal, RowIssue
from sync.plan import BatchPlan, plan_rows

# A Batch profile's attributes as sent: native `$...` keys, custom keys, `date(x)` / `url(x)`
# wrapped keys, and `None` for "delete this attribute".
Attributes = dict[str, Value | None]


@dataclass(slots=True)
class MappedRow:
    """The outcome of mapping one source row.

    ``attributes`` is the full payload to send (every mapped key, ``None`` where the row
    has no value) or ``None`` when the row is rejected. ``issues`` lists why a row was
    rejected, or which attributes were dropped when the activation says
    ``on_invalid_value: drop_attribute``.
    """

    custom_id: str | None
    attributes: Attributes | None
    issues: list[RowIssue] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        return self.attributes is None


def map_row(mapper: ProfileMapper, row: Mapping[str, object]) -> MappedRow:
    """Map one source row; never raises on any value of any type.

    Args:
        mapper: The activation's mapper (its converters, in payload order).
        row: Column name -> value, as produced by ``RecordBatch.to_pylist()``. A
            missing column reads as null.

    Returns:
        The payload with every mapped key (``None`` where the row has no value), or
        ``attributes=None`` when the row is rejected. ``issues`` lists every problem
        found, each naming the source column. A bad custom_id always rejects the row
        (``custom_id`` is then ``None``); a bad attribute value rejects it under
        ``reject_row`` and is left out of the payload under ``drop_attribute``.
    """
    id_column = mapper.id_column
    issues: list[RowIssue] = []
    custom_id: str | None
    converted_id = convert_custom_id(row.get(id_column))
    if isinstance(converted_id, Failure):
        issues.append(RowIssue(id_column, converted_id.reason, converted_id.detail))
        custom_id = None
    else:
        custom_id = converted_id

    attributes: Attributes = {}
    for column, key, present_key, convert, keep_null in mapper.fields:
        value = row.get(column)
        # on_null: keep: a null is left out of the payload (Batch keeps what it holds).
        if value is None:
            if not keep_null:
                attributes[key] = None
            continue
        result = convert(value)
        if result is None:
            if not keep_null:
                attributes[key] = None
        elif isinstance(result, Failure):
            issues.append(RowIssue(column, result.reason, result.detail))
        else:
            attributes[present_key] = result

    if custom_id is None:
        return MappedRow(custom_id=None, attributes=None, issues=issues)
    if issues and mapper.reject_row:
        return MappedRow(custom_id=custom_id, attributes=None, issues=issues)
    return MappedRow(custom_id=custom_id, attributes=attributes, issues=issues)


def map_batch(mapper: ProfileMapper, batch: pa.RecordBatch) -> list[MappedRow]:
    """Map every row of a record batch in columns: must be ``[map_row(mapper, row) for row in batch.to_pylist()]``.

    The converters run in columns (:meth:`ProfileMapper.convert_batch`, what the engine
    runs); the payload dicts are then assembled row by row, in the same key and issue order
    as :func:`map_row`. The engine does not build dicts at all (it encodes the converted
    columns straight to JSON, :mod:`sync.encode`): this is the form the tests and the mapping
    benchmark compare.
    """
    converted = mapper.convert_batch(batch)
    payloads: list[Attributes] = [{} for _ in range(converted.rows)]
    for converted_field in converted.fields:
        results = converted_field.results()
        key, present_key = converted_field.key, converted_field.present_key
        for payload, result in zip(payloads, results, strict=True):
            if result is None:
                if not converted_field.keep_null:
                    payload[key] = None
            elif not isinstance(result, Failure):
                payload[present_key] = result
    mapped: list[MappedRow] = []
    for row, (custom_id, payload) in enumerate(zip(converted.custom_ids, payloads, strict=True)):
        row_issues = converted.issues.get(row, [])
        if custom_id is None:
            mapped.append(MappedRow(custom_id=None, attributes=None, issues=row_issues))
        elif row_issues and converted.reject_row:
            mapped.append(MappedRow(custom_id=custom_id, attributes=None, issues=row_issues))
        else:
            mapped.append(MappedRow(custom_id=custom_id, attributes=payload, issues=row_issues))
    return mapped


def encode_rows(
    mapped: Sequence[MappedRow], payload_keys: Sequence[tuple[str, str]] = (), kept: Collection[str] = ()
) -> EncodedBatch:
    """The columns of :func:`sync.encode.encode_batch`, from rows mapped one by one: the reference.

    Args:
        mapped: Mapped rows, in batch order.
        payload_keys: ``ProfileMapper.payload_keys``, to find the attributes a row lost
            (fingerprinted as if each were null, as ``encode_batch`` does).
        kept: ``ProfileMapper.kept_null_keys``: a lost attribute whose nulls are kept is
            left out of the fingerprint too (absent, not null).
    """
    bodies: list[str | None] = []
    payloads: list[int | None] = []
    issues: dict[int, list[RowIssue]] = {}
    for row, mapped_row in enumerate(mapped):
        if mapped_row.issues:
            issues[row] = mapped_row.issues
        attributes = mapped_row.attributes
        if attributes is None or mapped_row.custom_id is None:
            bodies.append(None)
            payloads.append(None)
            continue
        body = canonical_payload(attributes)
        compared = body
        if mapped_row.issues and payload_keys:
            dropped = [
                key
                for key, present in payload_keys
                if key not in attributes and present not in attributes and key not in kept
            ]
            if dropped:
                compared = canonical_payload({**attributes, **dict.fromkeys(dropped)})
        bodies.append(body.decode("utf-8"))
        payloads.append(payload_fingerprint_of(compared))
    return EncodedBatch(
        custom_ids=[row.custom_id for row in mapped],
        issues=issues,
        valid=pa.array([body is not None for body in bodies], pa.bool_()),
        bodies=pa.array(bodies, pa.string()),
        payloads=pa.array(payloads, pa.uint64()),
    )


def plan_reference(
    batch: pa.RecordBatch,
    mapped_rows: Sequence[MappedRow],
    *,
    full: bool,
    duplicates: Mapping[str, int],
    id_column: str,
    payload_keys: Sequence[tuple[str, str]] = (),
    refused: Mapping[str, Refusal] | None = None,
) -> BatchPlan:
    """:func:`sync.plan.plan_rows` of rows mapped one by one (their payloads by :func:`encode_rows`)."""
    return plan_rows(
        batch,
        encode_rows(mapped_rows, payload_keys),
        full=full,
        duplicates=duplicates,
        id_column=id_column,
        refused=refused,
    )
