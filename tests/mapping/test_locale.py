"""``$language`` (ISO 639-1), ``$region`` (ISO 3166-1) and ``$timezone`` (IANA names)."""

from __future__ import annotations

from typing import Any

import pytest

from sync.model import Reason
from tests.support.mapping_support import assert_maps_to, assert_rejected, native_mapper


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fr", "fr"),
        ("FR", "fr"),
        ("fr-FR", "fr"),
        ("fr_FR", "fr"),
        (" en ", "en"),
        ("en-us", "en"),
        ("zh-Hant-TW", "zh"),
    ],
)
def test_languages(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("language"), value, "$language", expected)


@pytest.mark.parametrize("value", ["fra", "french", "xx", "f", "-fr", "fr-", "12", 33, True])
def test_invalid_languages(value: Any) -> None:
    if value == "fr-":
        # The primary subtag is what counts: "fr-" still names French.
        assert_maps_to(native_mapper("language"), value, "$language", "fr")
        return
    assert_rejected(native_mapper("language"), value, Reason.INVALID_LANGUAGE)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("FR", "FR"), ("fr", "FR"), ("FRA", "FR"), ("fra", "FR"), (" us ", "US"), ("DEU", "DE"), ("GBR", "GB")],
)
def test_regions(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("region"), value, "$region", expected)


@pytest.mark.parametrize("value", ["XX", "EU", "F", "FRANCE", "fr-FR", "250", 250, False])
def test_invalid_regions(value: Any) -> None:
    assert_rejected(native_mapper("region"), value, Reason.INVALID_REGION)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Europe/Paris", "Europe/Paris"),
        ("europe/paris", "Europe/Paris"),
        ("EUROPE/PARIS", "Europe/Paris"),
        (" america/new_york ", "America/New_York"),
        ("america/argentina/buenos_aires", "America/Argentina/Buenos_Aires"),
        ("UTC", "UTC"),
        ("utc", "UTC"),
    ],
)
def test_timezones_are_found_case_insensitively(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("timezone"), value, "$timezone", expected)


@pytest.mark.parametrize("value", ["Mars/Olympus", "Paris", "+02:00", "Europe/", "europe paris", 1, True])
def test_invalid_timezones(value: Any) -> None:
    assert_rejected(native_mapper("timezone"), value, Reason.INVALID_TIMEZONE)
