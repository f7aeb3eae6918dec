"""The columnar encoder against the row-at-a-time reference, byte for byte.

``encode_batch(mapper.convert_batch(batch))`` must give every row the exact bytes
``canonical_payload`` writes for the dict ``map_row`` builds, the same payload fingerprint
(dropped attributes counted as null), the same validity and the same issues: the payload
fingerprints stored by earlier versions must stay valid, or every profile would be resent.
The request array must be what the client assembled from ``ProfileUpdate`` items.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.batch.client import EncodedProfiles, ProfileUpdate
from sync.config_file import parse_activation
from sync.encode import (
    COLUMN_TEXTS_MIN_VALUES,
    _value_texts,
    encode_batch,
    json_strings,
    json_value,
    payload_fingerprints,
    request_array,
    request_body,
)
from sync.fingerprint import canonical_payload, payload_fingerprint_of
from sync.mapping import ProfileMapper, resolve_attribute_types
from tests.support.reference_mapping import encode_rows, map_row
from tests.test_mapping_columns import ATTRIBUTES, MAPPING, TYPES, batches, make_mapper


def assert_encodes_like_rows(
    batch: pa.RecordBatch, policy: str, region: str | None, mapper: ProfileMapper | None = None
) -> None:
    mapper = mapper or make_mapper(batch.schema, policy, region)
    rows = [map_row(mapper, row) for row in batch.to_pylist()]
    expected = encode_rows(rows, mapper.payload_keys, mapper.kept_null_keys)
    actual = encode_batch(mapper.convert_batch(batch))
    assert actual.custom_ids == expected.custom_ids
    assert actual.issues == expected.issues
    assert actual.valid.to_pylist() == expected.valid.to_pylist()
    assert actual.bodies.to_pylist() == expected.bodies.to_pylist()
    assert actual.payloads.to_pylist() == expected.payloads.to_pylist()
    for row, body in zip(rows, actual.bodies.to_pylist(), strict=True):
        if row.attributes is not None:
            assert body is not None
            assert body.encode("utf-8") == canonical_payload(row.attributes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=batches(),
    policy=st.sampled_from(["reject_row", "drop_attribute"]),
    region=st.sampled_from(["FR", None]),
)
def test_columnar_payloads_are_the_canonical_bytes_of_map_row(
    batch: pa.RecordBatch, policy: str, region: str | None
) -> None:
    assert_encodes_like_rows(batch, policy, region)


NATIVE_FIELDS_MAPPED = [field for field in MAPPING if field != "custom_id"]


def null_policy_mapper(
    schema: pa.Schema, policy: str, default: str, natives: dict[str, str], attributes: list[str | None]
) -> ProfileMapper:
    """The columns test's mapping, with an activation null policy and per-field overrides."""
    activation = parse_activation(
        {
            "name": "columns",
            "source": {"type": "duckdb", "database": "segment.duckdb", "table": "segment"},
            "destination": {"api_key_env": "BATCH_KEY", "project_key_env": "BATCH_PROJECT"},
            "mapping": {**MAPPING, "on_null": natives},
            "attributes": [
                {**attribute, **({} if own is None else {"on_null": own})}
                for attribute, own in zip(ATTRIBUTES, attributes, strict=True)
            ],
            "on_invalid_value": policy,
            "on_null": default,
        },
        source="columns.yaml",
    )
    return ProfileMapper(activation, resolve_attribute_types(activation, schema, source="columns.yaml"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=batches(),
    policy=st.sampled_from(["reject_row", "drop_attribute"]),
    default=st.sampled_from(["clear", "keep"]),
    natives=st.dictionaries(st.sampled_from(NATIVE_FIELDS_MAPPED), st.sampled_from(["clear", "keep"])),
    attributes=st.lists(st.sampled_from([None, "clear", "keep"]), min_size=len(ATTRIBUTES), max_size=len(ATTRIBUTES)),
)
def test_kept_nulls_are_left_out_of_bodies_and_fingerprints_as_map_row_leaves_them_out(
    batch: pa.RecordBatch, policy: str, default: str, natives: dict[str, str], attributes: list[str | None]
) -> None:
    mapper = null_policy_mapper(batch.schema, policy, default, natives, attributes)
    assert_encodes_like_rows(batch, policy, None, mapper)


def test_a_kept_null_is_absent_not_null_and_a_dropped_kept_value_is_absent_too() -> None:
    batch = pa.RecordBatch.from_pylist(
        [
            {"id": "a", "email": None, "c_string": None, "c_integer": 1},
            {"id": "b", "email": None, "c_string": "x", "c_integer": None},
            {"id": "c", "email": "not-an-email", "c_string": None, "c_integer": 2},
        ],
        schema=pa.schema(
            [("id", pa.string()), ("email", pa.string()), ("c_string", pa.string()), ("c_integer", pa.int64())]
        ),
    )
    config = {
        "name": "kept",
        "source": {"type": "duckdb", "database": "segment.duckdb", "table": "segment"},
        "destination": {"api_key_env": "BATCH_KEY", "project_key_env": "BATCH_PROJECT"},
        "mapping": {"custom_id": "id", "email": "email", "on_null": {"email": "keep"}},
        "attributes": [{"column": "c_string", "on_null": "keep"}, {"column": "c_integer"}],
        "on_invalid_value": "drop_attribute",
    }
    activation = parse_activation(config, source="kept.yaml")
    mapper = ProfileMapper(activation, resolve_attribute_types(activation, batch.schema, source="kept.yaml"))
    assert mapper.kept_null_keys == {"$email_address", "c_string"}
    encoded = encode_batch(mapper.convert_batch(batch))
    assert encoded.bodies.to_pylist() == ['{"c_integer":1}', '{"c_integer":null,"c_string":"x"}', '{"c_integer":2}']
    # The invalid email is dropped: absent from the fingerprint as a kept null is, so rows a and c
    # differ only by c_integer, and a row whose kept attributes are all null fingerprints as "{...}" alone.
    assert encoded.payloads.to_pylist()[2] == payload_fingerprint_of(b'{"c_integer":2}')
    assert encoded.payloads.to_pylist()[0] == payload_fingerprint_of(b'{"c_integer":1}')
    # Under clear, the same null is sent as null, and fingerprints apart from "absent".
    cleared = parse_activation(
        {
            **config,
            "mapping": {"custom_id": "id", "email": "email"},
            "attributes": [{"column": "c_string"}, {"column": "c_integer"}],
        },
        source="kept.yaml",
    )
    clear_mapper = ProfileMapper(cleared, resolve_attribute_types(cleared, batch.schema, source="kept.yaml"))
    clear = encode_batch(clear_mapper.convert_batch(batch))
    assert clear.bodies.to_pylist()[0] == '{"$email_address":null,"c_integer":1,"c_string":null}'
    assert clear.payloads.to_pylist()[0] != encoded.payloads.to_pylist()[0]


def long_batch(column: str, cells: pa.Array) -> pa.RecordBatch:
    """A batch of ``len(cells)`` rows: valid ids, ``column`` holding ``cells``, every other column null."""
    rows = len(cells)
    arrays = {name: pa.nulls(rows, choices[0][0]) for name, choices in TYPES.items()}
    arrays["id"] = pa.array([f"u{row}" for row in range(rows)], pa.string())
    arrays[column] = cells
    return pa.RecordBatch.from_pydict(arrays)


LONG = st.integers(COLUMN_TEXTS_MIN_VALUES, 3 * COLUMN_TEXTS_MIN_VALUES)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rows=LONG,
    arrow_type=st.sampled_from([pa.int64(), pa.uint64(), pa.int32()]),
    policy=st.sampled_from(["reject_row", "drop_attribute"]),
)
def test_a_long_integer_column_is_encoded_in_columns_like_rows(
    data: st.DataObject, rows: int, arrow_type: pa.DataType, policy: str
) -> None:
    """A column long enough for its integers to be written by Arrow (uint64 adds values beyond
    int64, refused by the converter, which keep the fragments in Python)."""
    bits = arrow_type.bit_width
    low, high = (0, 2**bits - 1) if arrow_type == pa.uint64() else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    edges = st.sampled_from([low, high, 0, -1 if low < 0 else 1])
    cells = data.draw(st.lists(st.none() | edges | st.integers(low, high), min_size=rows, max_size=rows))
    assert_encodes_like_rows(long_batch("c_integer", pa.array(cells, arrow_type)), policy, None)


@settings(max_examples=100, deadline=None)
@given(
    cells=st.lists(
        st.none() | st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-(2**63), 2**63 - 1, 0]),
        min_size=1,
        max_size=200,
    )
)
def test_integers_written_by_arrow_are_what_json_value_writes(cells: list[int | None]) -> None:
    texts = _value_texts(list(cells))
    if all(cell is None for cell in cells):
        assert texts is None  # nothing to gain: the fragments are all null
        return
    assert texts is not None
    assert texts.to_pylist() == [None if cell is None else json_value(cell) for cell in cells]


def test_values_other_than_integers_keep_the_python_path() -> None:
    assert _value_texts(["a", None] * 40) is None
    assert _value_texts([1, 2.5] * 40) is None
    assert _value_texts([True, 1] * 40) is None  # a bool is not written as an integer
    assert _value_texts([2**63, 1] * 40) is None  # beyond int64


scalars = (
    st.text()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_one_value_is_encoded_as_canonical_json_would(value: Any) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert json_value(value) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), [1.0, float("nan")]])
def test_a_non_finite_float_is_refused_as_canonical_json_refuses_it(value: Any) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_payload({"x": value})
    with pytest.raises(ValueError, match="JSON compliant"):
        json_value(value)


HOSTILE_IDS = ["plain", 'quo"te', "back\\slash", "tab\there", "nul\x00byte", "é→✓", "\u2028", "line\nfeed", ""]


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.text(min_size=1) | st.sampled_from(HOSTILE_IDS), min_size=1, max_size=8))
def test_the_request_array_is_what_the_client_built_item_by_item(ids: list[str]) -> None:
    bodies = [canonical_payload({"$language": "fr", "n": index}) for index in range(len(ids))]
    expected = (
        b"[" + b",".join(ProfileUpdate(c, encoded=b).request_bytes() for c, b in zip(ids, bodies, strict=True)) + b"]"
    )
    actual = request_array(pa.array(ids, pa.string()), pa.array([b.decode() for b in bodies], pa.string()))
    assert actual == expected
    assert [item["identifiers"]["custom_id"] for item in json.loads(actual)] == ids


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1) | st.sampled_from(HOSTILE_IDS), min_size=1, max_size=8, unique=True),
    data=st.data(),
)
def test_any_subset_of_a_request_is_cut_out_without_re_encoding(ids: list[str], data: st.DataObject) -> None:
    bodies = [canonical_payload({"firstname": f"Ann ✓ {index}", "n": index}) for index in range(len(ids))]
    body = request_body(pa.array(ids, pa.string()), pa.array([b.decode() for b in bodies], pa.string()))
    whole = EncodedProfiles(ids, body.payload, body.ends)
    assert list(whole.ends) == list(
        EncodedProfiles.of([ProfileUpdate(c, encoded=b) for c, b in zip(ids, bodies, strict=True)]).ends
    )
    indices = data.draw(st.lists(st.sampled_from(range(len(ids))), unique=True))
    part = whole.subset(indices)
    expected = [ProfileUpdate(ids[i], encoded=bodies[i]).request_bytes() for i in indices]
    assert part.payload == b"[" + b",".join(expected) + b"]"
    assert part.ids == [ids[i] for i in indices]
    # A subset of a subset is cut the same way (the client resends what fails again).
    if indices:
        again = part.subset([len(indices) - 1])
        assert json.loads(again.payload) == [json.loads(expected[-1])]


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1) | st.sampled_from(HOSTILE_IDS), min_size=1, max_size=10),
    data=st.data(),
)
def test_a_request_of_bodies_in_chunks_is_the_request_of_the_same_bodies_in_one(
    ids: list[str], data: st.DataObject
) -> None:
    """The sender hands the bodies as slices of the batches a request gathers (offsets not at 0)."""
    bodies = [canonical_payload({"firstname": f"Ann ✓ {index}", "n": index}).decode() for index in range(len(ids))]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=4)))
    lead = data.draw(st.lists(st.sampled_from(bodies), max_size=3))  # rows before the slice, in its batch
    whole = pa.array(lead + bodies, pa.string())
    chunks = [
        whole.slice(len(lead) + start, end - start) for start, end in zip([0, *cuts], [*cuts, len(ids)], strict=True)
    ]
    chunked = request_body(pa.array(ids, pa.string()), pa.chunked_array(chunks, pa.string()))
    one = request_body(pa.array(ids, pa.string()), pa.array(bodies, pa.string()))
    assert chunked.payload == one.payload
    assert list(chunked.ends) == list(one.ends)
    assert [item["attributes"] for item in json.loads(chunked.payload)] == [json.loads(b) for b in bodies]


def test_json_strings_escape_only_when_a_value_needs_it() -> None:
    assert json_strings(pa.array(["a", "é"])).to_pylist() == ['"a"', '"é"']
    assert json_strings(pa.array(["a", 'b"'])).to_pylist() == ['"a"', '"b\\""']


def test_payload_fingerprints_are_the_row_by_row_ones() -> None:
    bodies = ['{"a":1}', "{}", '{"é":"✓"}']
    fingerprints = payload_fingerprints(pa.array(bodies, pa.string())).to_pylist()
    assert fingerprints == [payload_fingerprint_of(body.encode("utf-8")) for body in bodies]
    assert payload_fingerprints(pa.array([], pa.string())).to_pylist() == []


def test_payload_fingerprints_of_a_slice_hash_its_own_bodies() -> None:
    """Bodies are hashed where they lie in the array's data: a slice starts part way into it."""
    bodies = ['{"a":1}', "{}", '{"é":"✓"}', '{"b":[1,2]}', ""]
    whole = pa.array(bodies, pa.string())
    for start in range(len(bodies)):
        part = payload_fingerprints(whole.slice(start, 2)).to_pylist()
        assert part == [payload_fingerprint_of(body.encode("utf-8")) for body in bodies[start : start + 2]]
    # A null (a rejected row's body) is hashed as the empty body, as before.
    with_null = payload_fingerprints(pa.array([None, '{"a":1}'], pa.string())).to_pylist()
    assert with_null == [payload_fingerprint_of(b""), payload_fingerprint_of(b'{"a":1}')]
