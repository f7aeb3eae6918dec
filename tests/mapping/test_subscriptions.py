"""``$email_marketing`` and ``$sms_marketing``: the spellings of consent a warehouse uses."""

from __future__ import annotations

from typing import Any

import pytest

from sync.model import Reason
from tests.support.mapping_support import NATIVE_FIELDS, assert_maps_to, assert_rejected, native_mapper

SUBSCRIPTION_TABLE = [
    *[
        (value, "subscribed")
        for value in (
            True,
            1,
            "subscribed",
            "SUBSCRIBED",
            " true ",
            "True",
            "yes",
            "Y",
            "1",
            "opt_in",
            "opt-in",
            "optin",
            "OPTED_IN",
            "opted-in",
        )
    ],
    *[
        (value, "unsubscribed")
        for value in (
            False,
            0,
            "unsubscribed",
            "false",
            "FALSE",
            "no",
            "n",
            "0",
            "opt_out",
            "opt-out",
            "optout",
            "opted_out",
            "Opted-Out",
        )
    ],
]


@pytest.mark.parametrize("field", ["email_marketing", "sms_marketing"])
@pytest.mark.parametrize(("value", "expected"), SUBSCRIPTION_TABLE)
def test_subscriptions(field: str, value: Any, expected: str) -> None:
    assert_maps_to(native_mapper(field), value, NATIVE_FIELDS[field], expected)


@pytest.mark.parametrize("value", ["maybe", "reset", "subscribe", 2, -1, 1.0, ["yes"]])
def test_invalid_subscriptions(value: Any) -> None:
    assert_rejected(native_mapper("email_marketing"), value, Reason.INVALID_SUBSCRIPTION)
