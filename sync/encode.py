"""Encode: converted columns → canonical JSON payloads and their fingerprints, in columns.

A full load sends every row, and building a dict per row for ``json.dumps`` to sort and
encode was the largest single cost of the hot path. Here each field of a batch is encoded
once per distinct value (or once per row for a column that does not repeat) into a
*fragment*, ``,"key":value``; Arrow gathers the fragments per row and joins them in sorted
key order. The result is, byte for byte, what :func:`sync.fingerprint.canonical_payload`
writes for the payload dict of a row mapped one value at a time (UTF-8, sorted keys, no
whitespace, non-ASCII kept), so the payload fingerprints stored by earlier versions stay
valid. That row-at-a-time reference lives in the tests (``encode_rows`` in
``tests/support/reference_mapping.py``), and it must agree: ``tests/test_encode.py`` holds
the two together on generated batches.

The request body Batch receives is assembled the same way (:func:`request_array`): no
Python object per profile between the mapped columns and the bytes on the wire.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from sync.convert import Converted
from sync.fingerprint import PAYLOAD_SALT
from sync.mapping import ConvertedBatch, ConvertedField, Failure
from sync.model import RowIssue

# What json.dumps(..., ensure_ascii=False) writes for a str: C code, escapes only '"', '\\'
# and control characters.
_encode_str: Final = json.encoder.encode_basestring
# A custom_id that holds none of these is its own JSON string between quotes.
_NEEDS_ESCAPE: Final = r'[\x00-\x1f"\\]'


def json_value(value: object) -> str:
    """One payload value as canonical JSON (as it appears inside ``canonical_payload``).

    Raises:
        ValueError: A non-finite float (``canonical_payload`` refuses it the same way).
    """
    # Exact types only: a subclass (an IntEnum, say) goes to json.dumps. type() at each
    # test costs about what one cached kind did, and lets the type checker narrow.
    if type(value) is str:
        return _encode_str(value)
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"Out of range float values are not JSON compliant: {value!r}")
        return float.__repr__(value)
    if value is None:
        return "null"
    if type(value) is list and all(type(item) is str for item in value):
        return "[" + ",".join(map(_encode_str, value)) + "]"
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class EncodedBatch:
    """One batch's payloads, in columns.

    Attributes:
        custom_ids: Row -> its Custom ID, or None when the id is missing or invalid.
        issues: Row -> its problems (``ConvertedBatch.issues``); rows without any are absent.
        valid: Row -> it has a payload to send (a rejected row has none).
        bodies: Row -> the canonical JSON of its payload (what is sent), null where not valid.
        payloads: Row -> the payload fingerprint, null where not valid. A row that lost
            attributes (``drop_attribute``) is fingerprinted as if each dropped key were
            null: Batch keeps its old value for a key we leave out, so a previously-null
            attribute whose new value is invalid is no change to send. A key whose nulls
            are kept is left out of the fingerprint when null or dropped, as of the body.
        slots: With ``keep_slots``: the fragments the bodies were joined from, as (key they
            sort by, one fragment per row; "" where the row has none). A dropped attribute
            has no fragment here either, so :mod:`sync.attributes` neither hashes nor sends it.
    """

    custom_ids: list[str | None]
    issues: dict[int, list[RowIssue]]
    valid: pa.BooleanArray
    bodies: pa.StringArray
    payloads: pa.UInt64Array
    slots: tuple[tuple[str, pa.StringArray], ...] | None = None


def encode_batch(converted: ConvertedBatch, *, keep_slots: bool = False) -> EncodedBatch:
    """Encode the payloads of a converted batch (:meth:`ProfileMapper.convert_batch`).

    ``keep_slots``: keep each field's fragments (``send: changed_attributes`` hashes them).
    """
    rows = converted.rows
    valid_rows = [custom_id is not None for custom_id in converted.custom_ids]
    if converted.reject_row:
        for row in converted.issues:
            valid_rows[row] = False
    valid = pa.array(valid_rows, pa.bool_())
    slots: list[tuple[str, pa.StringArray]] = []
    compared_slots: list[tuple[str, pa.StringArray]] = []
    drops = not converted.reject_row and any(field.has_failure for field in converted.fields)
    for field in converted.fields:
        field_slots = _field_slots(field)
        slots.extend(field_slots)
        if drops:
            compared_slots.extend(_field_slots(field, dropped_as_null=True) if field.has_failure else field_slots)
    bodies = join_objects(slots, rows)
    compared = join_objects(compared_slots, rows) if drops else bodies
    # Bodies are the largest arrays of a batch: copied to null the rejected rows' only when there are some.
    return EncodedBatch(
        custom_ids=converted.custom_ids,
        issues=converted.issues,
        valid=valid,
        bodies=bodies if valid.false_count == 0 else pc.if_else(valid, bodies, pa.scalar(None, pa.string())),
        payloads=pc.if_else(valid, payload_fingerprints(compared), pa.scalar(None, pa.uint64())),
        slots=tuple(slots) if keep_slots else None,
    )


def _field_slots(field: ConvertedField, *, dropped_as_null: bool = False) -> list[tuple[str, pa.StringArray]]:
    """The fragments of one field, as (key they sort by, one fragment per row; "" where absent).

    A field writes its bare key for null and its present key (``date(x)``, ``url(x)``)
    for a value; when the two differ they sort apart, so each gets its own slot.

    A field whose nulls are kept (``on_null: keep``) writes nothing for a null, in the body
    and in the fingerprint alike, and so nothing for a dropped value either: both leave
    Batch holding what it held, and "absent" is not "null" (docs/mapping.md, "Nulls").
    """
    key, present_key, values = field.key, field.present_key, field.values
    null = "" if field.keep_null else "," + _encode_str(key) + ":null"
    prefix = "," + _encode_str(present_key) + ":"
    # A failure is left out of the payload (the attribute is dropped), or, in the payload
    # the fingerprint is taken of, written as null (as absent when nulls are kept).
    failed = null if dropped_as_null else ""
    texts: pa.StringArray | None = None
    if field.texts is not None:
        # Rows with a text hold a present value (proven in columns); their code is null, so
        # the fragments gathered from the values below are null there, and filled from it.
        texts = pc.binary_join_element_wise(prefix, field.texts, "")
        if not values:
            if key == present_key:
                return [(key, texts)]
            return [(key, pa.repeat(pa.scalar("", pa.string()), len(texts))), (present_key, texts)]
    value_texts = _value_texts(values) if len(values) >= COLUMN_TEXTS_MIN_VALUES else None
    if value_texts is not None:
        # No failure among the values: a present one is prefix + text, a null one is null.
        written = pc.binary_join_element_wise(prefix, value_texts, "")
        if key == present_key:
            merged_column = _gather(pc.fill_null(written, null), field.codes)
            return [(key, _merged(merged_column, texts))]
        absent = pc.if_else(pc.is_null(value_texts), null, "")
        return [
            (key, _merged(_gather(absent, field.codes), texts, "")),
            (present_key, _merged(_gather(pc.fill_null(written, ""), field.codes), texts)),
        ]
    if key == present_key:
        merged = [
            null if value is None else failed if type(value) is Failure else prefix + json_value(value)
            for value in values
        ]
        return [(key, _merged(_gather(merged, field.codes), texts))]
    nulls = [null if value is None else failed if type(value) is Failure else "" for value in values]
    presents = ["" if value is None or type(value) is Failure else prefix + json_value(value) for value in values]
    return [
        (key, _merged(_gather(nulls, field.codes), texts, "")),
        (present_key, _merged(_gather(presents, field.codes), texts)),
    ]


def _merged(gathered: pa.StringArray, texts: pa.StringArray | None, fill: str | None = None) -> pa.StringArray:
    """The fragments gathered from a field's values, with its rows proven in columns filled in.

    ``texts``: the present fragment of each such row (null for the others). Those rows get
    it, or ``fill`` when given (the bare key's slot of a field whose keys differ).
    """
    if texts is None:
        return gathered
    filled: pa.StringArray = pc.fill_null(gathered, fill) if fill is not None else pc.coalesce(gathered, texts)
    return filled


# A field with at least this many values (distinct values, or rows when the column does not
# repeat) has their JSON written in Arrow when it can (:func:`_value_texts`); below it, the
# Arrow calls cost more than the Python they save.
COLUMN_TEXTS_MIN_VALUES: Final = 64


def _value_texts(values: list[Converted]) -> pa.StringArray | None:
    """What :func:`json_value` writes for each value, in one Arrow column (null for None).

    Only for a field whose values are all integers besides None (a count, points): an
    integer's JSON is its decimal digits (``int.__repr__``), which Arrow's cast writes alike
    for every int64, in one call instead of one Python call per row. Anything else returns
    None and the caller writes the fragments in Python, one value at a time: strings were
    measured no faster through Arrow (building the Arrow column costs what json_value does).
    """
    kinds = set(map(type, values))
    kinds.discard(type(None))
    if kinds != {int}:
        return None
    try:
        integers = pa.array(values, pa.int64())
    except (OverflowError, pa.ArrowInvalid):
        return None  # beyond int64 (the converters never hand such a value on)
    digits: pa.StringArray = integers.cast(pa.string())
    return digits


def _gather(fragments: list[str] | pa.StringArray, codes: pa.Int64Array | None) -> pa.StringArray:
    array = fragments if isinstance(fragments, pa.StringArray) else pa.array(fragments, pa.string())
    return array if codes is None else array.take(codes)


def join_objects(slots: Sequence[tuple[str, pa.StringArray]], rows: int) -> pa.StringArray:
    """Each row's fragments in sorted key order, as one JSON object per row."""
    if not slots:
        return pa.array(["{}"] * rows, pa.string())
    # Keys are unique per mapping (config), so sorting the slots sorts every row's keys.
    ordered = [array for _, array in sorted(slots, key=lambda slot: slot[0])]
    # Every fragment starts with a comma: a row's first fragment opens the object instead.
    # Done on the fragments (a few bytes a row) before the one join that writes the
    # objects, which are not then copied again; usually the first slot opens every row.
    empty: pa.BooleanArray = pa.repeat(pa.scalar(True), rows)  # rows without a fragment so far
    for index, fragments in enumerate(ordered):
        present = pc.greater(pc.binary_length(fragments), 0)
        opens = pc.and_(empty, present)
        if pc.any(opens).as_py():
            opened = pc.binary_replace_slice(fragments, start=0, stop=1, replacement="{")
            ordered[index] = opened if pc.all(opens).as_py() else pc.if_else(opens, opened, fragments)
        empty = pc.and_not(empty, present)
        if not pc.any(empty).as_py():
            return _joined([*ordered, "}"])
    # Some rows have no fragment at all (every field's null kept): "{}".
    return _joined([*ordered, pc.if_else(empty, "{}", "}")])


def _joined(parts: list[pa.StringArray | str]) -> pa.StringArray:
    objects: pa.StringArray = pc.binary_join_element_wise(*parts, "")
    return objects


def payload_fingerprints(bodies: pa.StringArray) -> pa.UInt64Array:
    """:func:`sync.fingerprint.payload_fingerprint_of` of every body, as a uint64 array (nulls → 0)."""
    salted = hashlib.blake2b(PAYLOAD_SALT, digest_size=8)
    filled = bodies if bodies.null_count == 0 else pc.fill_null(bodies, "")
    # Each body hashed where it lies in the array's data (a view, not a bytes copy of it).
    offsets = array("i")
    offsets.frombytes(memoryview(filled.buffers()[1])[filled.offset * 4 : (filled.offset + len(filled) + 1) * 4])
    data = filled.buffers()[2]
    view = memoryview(data) if data is not None else memoryview(b"")
    copy = salted.copy
    digests: list[bytes] = []
    append = digests.append
    for start, end in pairwise(offsets):
        hasher = copy()
        hasher.update(view[start:end])
        # The fingerprint reads the digest big-endian; Arrow's uint64 buffer is little-endian.
        append(hasher.digest()[::-1])
    buffer = pa.py_buffer(b"".join(digests))
    fingerprints: pa.UInt64Array = pa.Array.from_buffers(pa.uint64(), len(bodies), [None, buffer])
    return fingerprints


def json_strings(values: pa.StringArray) -> pa.StringArray:
    """Each string as a JSON string literal (what ``json.dumps(s, ensure_ascii=False)`` writes)."""
    if not pc.any(pc.match_substring_regex(values, _NEEDS_ESCAPE)).as_py():
        quoted: pa.StringArray = pc.binary_join_element_wise('"', values, '"', "")
        return quoted
    return pa.array([_encode_str(value) for value in values.to_pylist()], pa.string())


class RequestBody(NamedTuple):
    """A request's JSON array, and where each of its items ends (``EncodedProfiles.ends``)."""

    payload: bytes
    ends: array[int]


def request_body(custom_ids: pa.StringArray, bodies: pa.StringArray | pa.ChunkedArray) -> RequestBody:
    """The JSON array of profiles a Batch request carries, from ids and canonical bodies.

    ``bodies`` may come in chunks (the slices of the batches a request gathers): they are
    not combined first. ``ends[i]`` is the byte offset just past item ``i`` (8 bytes an
    item, next to the item's few hundred): the client cuts the items Batch failed alone out
    of the array with them, to resend those without re-encoding anything
    (docs/batch-api.md, "Per-item errors").
    """
    if len(custom_ids) == 0:
        return RequestBody(b"[]", array("q"))
    # Each item with the comma that follows it: the items' data, back to back, are then the
    # array's inside, and the only copies of the bodies are this join and the bytes below.
    items = pc.binary_join_element_wise(
        '{"identifiers":{"custom_id":', json_strings(custom_ids), '},"attributes":', bodies, "},", ""
    )
    parts: list[bytes | memoryview] = [b"["]
    for chunk in items.chunks if isinstance(items, pa.ChunkedArray) else [items]:
        if len(chunk):
            offsets, data = chunk.buffers()[1:3]
            first, last = (
                struct.unpack_from("<i", offsets, 4 * chunk.offset)[0],
                struct.unpack_from("<i", offsets, 4 * (chunk.offset + len(chunk)))[0],
            )
            parts.append(memoryview(data)[first:last])
    parts[-1] = parts[-1][:-1]  # the last item's comma
    parts.append(b"]")
    payload = b"".join(parts)
    # Item i ends after "[", the i+1 first items and the i commas between them: where its
    # comma is in the items' data, plus the "[".
    ends = pc.cumulative_sum(pc.binary_length(items).cast(pa.int64()))
    if isinstance(ends, pa.ChunkedArray):
        ends = ends.combine_chunks()
    offsets_out = array("q")
    # The int64 values buffer, as it is (no nulls): 8 bytes an item, no Python int each.
    offsets_out.frombytes(memoryview(ends.buffers()[1])[ends.offset * 8 : (ends.offset + len(ends)) * 8])
    return RequestBody(payload, offsets_out)


def request_array(custom_ids: pa.StringArray, bodies: pa.StringArray) -> bytes:
    """Only the JSON array of :func:`request_body`."""
    return request_body(custom_ids, bodies).payload
