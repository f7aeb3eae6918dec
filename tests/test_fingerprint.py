"""Golden values and properties of the fingerprint recipe (sync/fingerprint.py).

The golden literals were computed once and pinned: if one changes, every stored
fingerprint in every deployment would stop matching and the next run would resend
everything. A change here must come with a bump of the recipe's salt and a note.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.fingerprint import canonical_json, canonical_payload, payload_fingerprint

GOLDEN_PAYLOADS: dict[str, dict[str, Any]] = {
    "empty": {},
    "profile": {
        "$email_address": "ann@example.com",
        "$phone_number": "+33612345678",
        "$language": "fr",
        "$region": "FR",
        "$timezone": "Europe/Paris",
        "$email_marketing": "subscribed",
        "$sms_marketing": None,
        "name": "Ann",
        "date(birthdate)": "1990-01-02T00:00:00Z",
        "url(site)": "https://example.com/a?b=c",
        "tags": ["a", "b"],
        "score": 1.5,
        "visits": 42,
        "vip": True,
        "nickname": None,
    },
    "unicode": {"name": "Zoë — 東京 😀", "big": 2**63 - 1, "tiny": 1e-300, "neg": -12.25},
}

GOLDEN_PAYLOAD_FINGERPRINTS = {
    "empty": 8347225426794475124,
    "profile": 4508456136073329483,
    "unicode": 15663270602095303790,
}


def compute_goldens() -> dict[str, dict[str, int]]:
    """Every golden fingerprint, computed now (also called from a subprocess below)."""
    return {
        "payload": {name: payload_fingerprint(payload) for name, payload in GOLDEN_PAYLOADS.items()},
    }


def test_payload_fingerprints_match_pinned_values() -> None:
    assert compute_goldens()["payload"] == GOLDEN_PAYLOAD_FINGERPRINTS


def test_canonical_json_bytes_are_pinned() -> None:
    payload = {"name": "Zoë — 東京 😀", "big": 2**63 - 1, "tiny": 1e-300, "neg": -12.25, "z": -0.0, "l": [None, True]}
    expected = '{"big":9223372036854775807,"l":[null,true],"name":"Zoë — 東京 😀","neg":-12.25,"tiny":1e-300,"z":0.0}'
    assert canonical_json(payload) == expected.encode("utf-8")


@pytest.mark.parametrize("hash_seed", ["0", "4242"])
def test_fresh_interpreter_with_another_hash_seed_gives_the_same_values(hash_seed: str) -> None:
    tests_dir = Path(__file__).resolve().parent
    repo_root = tests_dir.parent
    script = "import json, test_fingerprint as t; print(json.dumps(t.compute_goldens()))"
    env = {
        **os.environ,
        "PYTHONHASHSEED": hash_seed,
        "PYTHONPATH": os.pathsep.join([str(repo_root), str(tests_dir)]),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=repo_root, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(completed.stdout) == {"payload": GOLDEN_PAYLOAD_FINGERPRINTS}


def test_key_order_does_not_change_the_payload_fingerprint() -> None:
    payload = GOLDEN_PAYLOADS["profile"]
    reversed_payload = dict(reversed(list(payload.items())))
    assert list(reversed_payload) != list(payload)
    assert payload_fingerprint(reversed_payload) == payload_fingerprint(payload)


def test_negative_zero_and_zero_have_one_payload_fingerprint() -> None:
    assert payload_fingerprint({"score": -0.0}) == payload_fingerprint({"score": 0.0})
    assert payload_fingerprint({"scores": [-0.0]}) == payload_fingerprint({"scores": [0.0]})
    assert payload_fingerprint({"score": 0.0}) != payload_fingerprint({"score": 1e-300})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_in_payloads(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        payload_fingerprint({"score": bad})
    with pytest.raises(ValueError, match="non-finite"):
        payload_fingerprint({"nested": [1.0, bad]})


def test_canonical_payload_is_canonical_json_of_a_mapped_payload() -> None:
    # The engine's fast path skips the normalising walk because the mapper already wrote
    # finite floats and 0.0 for -0.0: on such a payload the bytes must be the same.
    for payload in GOLDEN_PAYLOADS.values():
        assert canonical_payload(payload) == canonical_json(payload)
    with pytest.raises(ValueError, match="Out of range float"):
        canonical_payload({"x": math.nan})


def test_any_value_change_changes_the_payload_fingerprint() -> None:
    base = GOLDEN_PAYLOADS["profile"]
    assert payload_fingerprint({**base, "name": "Anne"}) != payload_fingerprint(base)
    assert payload_fingerprint({**base, "nickname": ""}) != payload_fingerprint(base)
    assert payload_fingerprint({**base, "visits": 42.0}) != payload_fingerprint(base)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_json_round_trips_through_json_loads(value: Any) -> None:
    encoded = canonical_json(value)
    assert json.loads(encoded) == value
    # Canonical: encoding the decoded value again gives the same bytes.
    assert canonical_json(json.loads(encoded)) == encoded


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_payload_fingerprint_is_insensitive_to_insertion_order(payload: dict[str, Any]) -> None:
    reordered = dict(sorted(payload.items(), reverse=True))
    assert payload_fingerprint(reordered) == payload_fingerprint(payload)
    assert 0 <= payload_fingerprint(payload) < 2**64
