"""What the rejections table keeps of an issue: the real mapper's details, split so that a
value never reaches ``detail`` unless the activation opts in, whatever the value holds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.config import AttributeType
from sync.convert import DETAIL_VALUE_LENGTH
from sync.results.schema import batch_reason, split_detail
from tests.support.mapping_support import custom_mapper, map_one, native_mapper

# Values built to confuse a parser: the separators the details use, quotes, colons.
TRICKY = ("a: b", "x, got str y", "it's", 'say "hi": now', "expected 'true' or 'false': no", ": ", "")


def _issue(field: str, attribute: AttributeType | None, value: Any) -> tuple[str, str]:
    mapper = native_mapper(field) if attribute is None else custom_mapper(attribute)
    row = map_one(mapper, value)
    assert row.issues, value
    issue = row.issues[0]
    return issue.reason.value, issue.detail


@pytest.mark.parametrize("value", TRICKY)
@pytest.mark.parametrize(
    ("field", "attribute"),
    [("email", None), ("phone", None), ("language", None), ("region", None), ("timezone", None)],
)
def test_a_native_fields_value_is_cut_out_of_the_detail(field: str, attribute: None, value: str) -> None:
    if not value.strip():
        return  # blank is "no value", never an issue
    reason, detail = _issue(field, attribute, value)
    message, quoted = split_detail(reason, detail)
    assert len(repr(value)) <= DETAIL_VALUE_LENGTH  # quoted whole
    assert quoted == repr(value)
    assert message is not None
    assert f"{message}: {quoted}" == detail


@given(st.one_of(st.floats(allow_nan=True), st.text(min_size=1), st.lists(st.integers(), max_size=3)))
def test_a_wrong_types_value_is_cut_out_of_the_detail(value: Any) -> None:
    row = map_one(custom_mapper(AttributeType.INTEGER), value)
    if not row.issues:
        return
    issue = row.issues[0]
    message, quoted = split_detail(issue.reason.value, issue.detail)
    assert quoted is not None
    assert message is not None
    assert issue.detail == f"{message} {quoted}" or issue.detail == f"{message}: {quoted}"
    # The message is one of the fixed texts: it holds nothing of the value.
    assert message.startswith(("expected ", "not a whole number", "outside the signed"))
    assert "'" not in message or message.startswith("expected ")


def test_details_without_a_value_and_batchs_reasons_stay_whole() -> None:
    assert split_detail("missing_custom_id", "custom_id is null") == ("custom_id is null", None)
    assert split_detail("duplicate_custom_id", "appears 2 times in the segment") == (
        "appears 2 times in the segment",
        None,
    )
    detail = "Batch: invalid value: 'x'"
    assert split_detail("batch_rejected", detail) == (detail, None)


@pytest.mark.parametrize(
    ("reason", "detail", "expected"),
    [
        ("batch_rejected", "Batch: value too long", "value too long"),
        (
            "batch_persistent_error",
            "Batch: boom, for this payload 3 runs in a row: persistent, not sent again until it changes "
            "(--full sends it)",
            "boom",
        ),
        (
            "batch_persistent_error",
            "Batch answered this payload with an error not about its value 4 runs in a row (boom (x)); not sent "
            "again until it changes (--full sends it)",
            "boom (x)",
        ),
        ("batch_rejected", "Batch refused this payload before (too long); not sent again until it changes", "too long"),
        ("invalid_email", "not a valid email address: 'x'", None),
    ],
)
def test_batchs_reason_is_read_out_of_every_detail_the_engine_writes(
    reason: str, detail: str, expected: str | None
) -> None:
    assert batch_reason(reason, detail) == expected
