"""Plain data shared by the pipeline stages. No I/O here."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

# A Batch profile's attributes as sent: native `$...` keys, custom keys, `date(x)` / `url(x)`
# wrapped keys, and `None` for "delete this attribute".
Attributes = dict[str, Any]


class Reason(enum.StrEnum):
    """Reason codes for a row that is not sent (or an attribute that is dropped)."""

    MISSING_CUSTOM_ID = "missing_custom_id"
    INVALID_CUSTOM_ID = "invalid_custom_id"
    CUSTOM_ID_TOO_LONG = "custom_id_too_long"
    DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
    INVALID_EMAIL = "invalid_email"
    INVALID_PHONE = "invalid_phone"
    INVALID_LANGUAGE = "invalid_language"
    INVALID_REGION = "invalid_region"
    INVALID_TIMEZONE = "invalid_timezone"
    INVALID_SUBSCRIPTION = "invalid_subscription"
    INVALID_STRING = "invalid_string"
    STRING_TOO_LONG = "string_too_long"
    INVALID_INTEGER = "invalid_integer"
    INVALID_FLOAT = "invalid_float"
    INVALID_BOOLEAN = "invalid_boolean"
    INVALID_DATE = "invalid_date"
    INVALID_URL = "invalid_url"
    INVALID_ARRAY = "invalid_array"
    ARRAY_TOO_LONG = "array_too_long"
    BATCH_REJECTED = "batch_rejected"


@dataclass(frozen=True, slots=True)
class RowIssue:
    """One problem found in one row: which field, which rule, and a human detail.

    The detail may quote the offending value, truncated; it never quotes a secret
    because rows never hold secrets.
    """

    field: str
    reason: Reason
    detail: str


@dataclass(slots=True)
class MappedRow:
    """The outcome of mapping one source row.

    ``attributes`` is the full payload to send (every mapped key, ``None`` where the row
    has no value) or ``None`` when the row is rejected. ``issues`` lists why a row was
    rejected, or which attributes were dropped when the activation says
    ``on_invalid_value: drop_attribute``.
    """

    custom_id: str | None
    attributes: Attributes | None
    issues: list[RowIssue] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        return self.attributes is None


class Fingerprint(NamedTuple):
    """What the state store remembers of one acknowledged profile.

    ``raw`` hashes the source values of the mapped columns, salted with the mapping
    version (an unchanged ``raw`` means the row need not even be mapped). ``payload``
    hashes the canonical payload Batch acknowledged (it decides what is sent).
    Both are unsigned 64-bit integers. A named tuple: one is built per row that moved,
    and a tuple costs a third of a frozen dataclass to make.
    """

    raw: int
    payload: int


@dataclass(frozen=True, slots=True)
class Lease:
    """Permission for one run to commit state for one activation.

    ``token`` is a fencing token: it grows every time the lease changes hands, and
    every commit checks it, so a run whose lease was taken over can never commit.
    """

    activation: str
    owner: str
    token: int
    expires_at: datetime


class JournalEntry(NamedTuple):
    """One acknowledged outcome to commit: a new fingerprint, or (``fingerprint is None``)
    the removal of a profile this activation cleared in mirror mode. (One per acknowledged
    profile: a named tuple, cheap to build.)"""

    custom_id: str
    fingerprint: Fingerprint | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A payload Batch refused for one profile (listed in ``SUCCESS_WITH_PARTIAL_ERRORS``).

    Kept so that the same payload is not sent again run after run: Batch would refuse it
    again. ``payload`` is the refused payload's fingerprint; ``field`` and ``reason`` are
    Batch's own words (the attribute it named, or ``(profile)``).
    """

    custom_id: str
    payload: int
    field: str
    reason: str


@dataclass(slots=True)
class ActivationMeta:
    """Per-activation facts that outlive runs.

    ``owned_keys`` are the Batch attribute names (bare, without ``date()``/``url()``)
    this activation has ever sent: mirror mode clears exactly these on removal.
    """

    mapping_version: str | None = None
    owned_keys: set[str] = field(default_factory=set)
    last_success_run_id: str | None = None
    continuation: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The JSON every state store keeps (owned keys sorted, so the stored text is stable)."""
        return json.dumps(
            {
                "mapping_version": self.mapping_version,
                "owned_keys": sorted(self.owned_keys),
                "last_success_run_id": self.last_success_run_id,
                "continuation": self.continuation,
            },
            ensure_ascii=False,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, body: str) -> ActivationMeta:
        data = json.loads(body)
        return cls(
            mapping_version=data.get("mapping_version"),
            owned_keys=set(data.get("owned_keys") or ()),
            last_success_run_id=data.get("last_success_run_id"),
            continuation=data.get("continuation"),
        )
