"""``$email_address``: addresses validated and normalised."""

from __future__ import annotations

from typing import Any

import pytest

from sync.model import Reason
from tests.support.mapping_support import assert_maps_to, assert_rejected, native_mapper


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ann@example.com", "ann@example.com"),
        ("Alice@Example.COM", "Alice@example.com"),
        ("  bob@example.org  ", "bob@example.org"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        # Internationalised domains go in their ASCII (IDNA) form, the only one Batch
        # accepts; a non-ASCII local part is kept, as Batch's pattern allows it.
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
        ("ab@xn--bcher-kva.de", "ab@xn--bcher-kva.de"),
        ("José@EXAMPLE.com", "José@example.com"),
        ("joë@examplé.fr", "joë@xn--exampl-gva.fr"),
        ("Info@Example.com", "info@example.com"),  # RFC 2142 names are case-insensitive
    ],
)
def test_emails_are_validated_and_normalised(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("email"), value, "$email_address", expected)


@pytest.mark.parametrize(
    "value",
    [
        "not-an-email",
        "a@b",
        "a@@example.com",
        "@example.com",
        "ann@",
        "ann@localhost",
        "ann @example.com",
        "ann@exa_mple.com",
        "a" * 250 + "@example.com",
        "a" * 60 + "@" + ".".join(["b" * 60] * 4) + ".com",
        "用户@例子.广告",  # Batch accepts no internationalised top-level domain (xn--...)
        42,
        True,
        ["ann@example.com"],
    ],
)
def test_invalid_emails(value: Any) -> None:
    assert_rejected(native_mapper("email"), value, Reason.INVALID_EMAIL)
