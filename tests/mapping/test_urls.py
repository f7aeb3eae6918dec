"""URL attributes: at most 2048 characters, under ``url(name)``."""

from __future__ import annotations

from typing import Any

import pytest

from sync.config import AttributeType
from sync.model import Reason
from tests.support.mapping_support import assert_rejected, custom_mapper, map_one


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://example.com", "https://example.com"),
        ("http://example.com/a/b?c=d&e=f#g", "http://example.com/a/b?c=d&e=f#g"),
        ("https://user@example.com:8443/x", "https://user@example.com:8443/x"),
        ("https://bücher.de/straße", "https://bücher.de/straße"),
        ("myapp://home/offers", "myapp://home/offers"),
        ("myapp:///home", "myapp:///home"),  # deep link with an empty authority
        (" https://example.com/padded ", "https://example.com/padded"),
        ("https://example.com/" + "a" * 2028, "https://example.com/" + "a" * 2028),
        ("", None),
        ("  ", None),
    ],
)
def test_urls(value: str, expected: str | None) -> None:
    row = map_one(custom_mapper(AttributeType.URL, name="site"), value)
    assert row.issues == []
    if expected is None:
        assert len(value) == 0 or value.isspace()
        assert row.attributes == {"site": None}
    else:
        assert len(expected) <= 2048
        assert row.attributes == {"url(site)": expected}


@pytest.mark.parametrize(
    "value",
    [
        "example.com",
        "www.example.com/path",
        "mailto:ann@example.com",
        "https://",
        "http:///path",
        "https:/example.com",
        "https://exa mple.com",
        "https://example.com/\nx",
        "https://example.com/\tx",
        "https://[::1",
        "https://example.com/" + "a" * 2029,
        "//example.com",
        5,
        ["https://example.com"],
    ],
)
def test_invalid_urls(value: Any) -> None:
    assert_rejected(custom_mapper(AttributeType.URL, name="site"), value, Reason.INVALID_URL)
