"""The Custom ID: what is accepted, how it is normalised, and that a bad one always rejects the row."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from sync.model import Reason
from tests.support.mapping_support import make_mapper
from tests.support.reference_mapping import map_row


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("u1", "u1"),
        (" padded id ", " padded id "),  # ids are whitespace-sensitive: never trimmed
        ("MiXeD", "MiXeD"),
        ("nullable", "nullable"),
        ("x" * 1024, "x" * 1024),
        (42, "42"),
        (-7, "-7"),
        (0, "0"),
        (2**70, str(2**70)),
        (Decimal("123"), "123"),
        (Decimal("1.2E+3"), "1200"),
    ],
)
def test_valid_custom_ids(value: Any, expected: str) -> None:
    row = map_row(make_mapper(), {"id": value})
    assert row.custom_id == expected
    assert row.attributes == {}
    assert row.issues == []


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, Reason.MISSING_CUSTOM_ID),
        ("", Reason.MISSING_CUSTOM_ID),
        ("   ", Reason.MISSING_CUSTOM_ID),
        ("\t\n", Reason.MISSING_CUSTOM_ID),
        ("null", Reason.INVALID_CUSTOM_ID),
        ("NULL", Reason.INVALID_CUSTOM_ID),
        ("Undefined", Reason.INVALID_CUSTOM_ID),
        ("nan", Reason.INVALID_CUSTOM_ID),
        ("NaN", Reason.INVALID_CUSTOM_ID),
        (1.5, Reason.INVALID_CUSTOM_ID),
        (2.0, Reason.INVALID_CUSTOM_ID),
        (True, Reason.INVALID_CUSTOM_ID),
        (Decimal("1.5"), Reason.INVALID_CUSTOM_ID),
        (Decimal("NaN"), Reason.INVALID_CUSTOM_ID),
        (b"u1", Reason.INVALID_CUSTOM_ID),
        (["u1"], Reason.INVALID_CUSTOM_ID),
        (date(2024, 1, 1), Reason.INVALID_CUSTOM_ID),
        ("x" * 1025, Reason.CUSTOM_ID_TOO_LONG),
        (10**1025, Reason.CUSTOM_ID_TOO_LONG),
    ],
)
@pytest.mark.parametrize("policy", ["reject_row", "drop_attribute"])
def test_bad_custom_ids_always_reject_the_row(value: Any, reason: Reason, policy: str) -> None:
    mapper = make_mapper({"email": "email"}, on_invalid_value=policy)
    row = map_row(mapper, {"id": value, "email": "ann@example.com"})
    assert row.rejected
    assert row.custom_id is None
    assert [(issue.field, issue.reason) for issue in row.issues] == [("id", reason)]


def test_a_bad_custom_id_still_reports_the_other_problems_of_the_row() -> None:
    mapper = make_mapper({"email": "email", "phone": "phone"})
    row = map_row(mapper, {"id": None, "email": "not-an-email", "phone": "+33612345678"})
    assert row.rejected
    assert [(i.field, i.reason) for i in row.issues] == [
        ("id", Reason.MISSING_CUSTOM_ID),
        ("email", Reason.INVALID_EMAIL),
    ]
