"""``$phone_number``: numbers normalised to E.164, with and without a default region."""

from __future__ import annotations

from typing import Any

import pytest

from sync.model import Reason
from tests.support.mapping_support import assert_maps_to, assert_rejected, native_mapper


@pytest.mark.parametrize(
    ("value", "region", "expected"),
    [
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("06.12.34.56.78", "FR", "+33612345678"),
        ("+33 6 12 34 56 78", "FR", "+33612345678"),
        ("+33 6 12 34 56 78", None, "+33612345678"),
        ("0033 6 12 34 56 78", "FR", "+33612345678"),
        (" +33612345678 ", None, "+33612345678"),
        ("(650) 253-0000", "US", "+16502530000"),
        ("+1 650-253-0000", "FR", "+16502530000"),
        ("+44 20 7946 0958", None, "+442079460958"),
        ("020 7946 0958", "GB", "+442079460958"),
        (612345678, "FR", "+33612345678"),  # an integer column lost the leading 0
        (33612345678, "FR", "+33612345678"),
        (33612345678, None, "+33612345678"),  # an integer cannot hold the "+"
        (16502530000, None, "+16502530000"),
    ],
)
def test_phones_are_normalised_to_e164(value: Any, region: str | None, expected: str) -> None:
    assert_maps_to(native_mapper("phone", default_phone_region=region), value, "$phone_number", expected)


@pytest.mark.parametrize(
    ("value", "region"),
    [
        ("06 12 34 56 78", None),  # national number, no region to read it with
        ("12", "FR"),
        ("abc", "FR"),
        ("+33 1", None),
        ("+33 6 12 34 56 789 012", None),
        ("+999 123456", None),
        ("0" * 300, "FR"),
        (612345678, None),
        (-612345678, "FR"),
        (True, "FR"),
        (6.12345678e8, "FR"),
        (["+33612345678"], None),
    ],
)
def test_invalid_phones(value: Any, region: str | None) -> None:
    assert_rejected(native_mapper("phone", default_phone_region=region), value, Reason.INVALID_PHONE)
