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
from sync.encode import (
    encode_batch,
    json_strings,
    json_value,
    payload_fingerprints,
    request_array,
    request_body,
)
from sync.fingerprint import canonical_payload, payload_fingerprint_of
from tests.support.reference_mapping import encode_rows, map_row
from tests.test_mapping_columns import batches, make_mapper


def assert_encodes_like_rows(batch: pa.RecordBatch, policy: str, region: str | None) -> None:
    mapper = make_mapper(batch.schema, policy, region)
    rows = [map_row(mapper, row) for row in batch.to_pylist()]
    expected = encode_rows(rows, mapper.payload_keys)
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


def test_json_strings_escape_only_when_a_value_needs_it() -> None:
    assert json_strings(pa.array(["a", "é"])).to_pylist() == ['"a"', '"é"']
    assert json_strings(pa.array(["a", 'b"'])).to_pylist() == ['"a"', '"b\\""']


def test_payload_fingerprints_are_the_row_by_row_ones() -> None:
    bodies = ['{"a":1}', "{}", '{"é":"✓"}']
    fingerprints = payload_fingerprints(pa.array(bodies, pa.string())).to_pylist()
    assert fingerprints == [payload_fingerprint_of(body.encode("utf-8")) for body in bodies]
    assert payload_fingerprints(pa.array([], pa.string())).to_pylist() == []
