"""Plain data shared by the pipeline stages. No I/O here."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Final, NamedTuple


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
    # A number a Batch float (a 64-bit double) cannot hold without losing digits.
    INEXACT_NUMBER = "inexact_number"
    INVALID_BOOLEAN = "invalid_boolean"
    INVALID_DATE = "invalid_date"
    INVALID_URL = "invalid_url"
    INVALID_ARRAY = "invalid_array"
    ARRAY_TOO_LONG = "array_too_long"
    # Batch answered a per-item error (docs/batch-api.md, "Per-item errors"): about the value
    # (remembered); not about it (failed for this run, sent again by the next); not about it,
    # but for the same payload PERSISTENT_AFTER_RUNS runs in a row (remembered).
    BATCH_REJECTED = "batch_rejected"
    BATCH_ITEM_ERROR = "batch_item_error"
    BATCH_PERSISTENT_ERROR = "batch_persistent_error"

    @property
    def from_batch(self) -> bool:
        """Batch's answer, not a check of ours."""
        return self in _BATCH_REASONS


_BATCH_REASONS: Final = frozenset({Reason.BATCH_REJECTED, Reason.BATCH_ITEM_ERROR, Reason.BATCH_PERSISTENT_ERROR})


@dataclass(frozen=True, slots=True)
class RowIssue:
    """One problem found in one row: which field, which rule, and a human detail.

    The detail may quote the offending value, truncated; it never quotes a secret
    because rows never hold secrets.
    """

    field: str
    reason: Reason
    detail: str


class Fingerprint(NamedTuple):
    """What the state store remembers of one acknowledged profile.

    ``raw`` hashes the source values of the mapped columns, salted with the mapping
    version (an unchanged ``raw`` means the row need not even be mapped). ``payload``
    hashes the canonical payload Batch acknowledged (it decides what is sent).
    Both are unsigned 64-bit integers. ``attributes`` (``send: changed_attributes`` only)
    is the sorted set of the payload's attribute hashes, 4 bytes each (:mod:`sync.attributes`),
    or None where it is not kept. A named tuple: one is built per row that moved, and a
    tuple costs a third of a frozen dataclass to make.
    """

    raw: int
    payload: int
    attributes: bytes | None = None


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


# The ``field`` of an entry whose error named no attribute (the whole profile).
NO_ATTRIBUTE: Final = "(profile)"

# Runs in a row that must end with a per-item error not about the value, for the same
# payload, before that payload is remembered like a refusal ("persistent") and no longer
# sent while it stays the same (docs/batch-api.md, "Per-item errors"). One or two could be a bad
# hour at Batch; three scheduled runs in a row failing the same payload, each after its own
# in-run retries, is an error that resending does not fix, and stops costing a request a run.
PERSISTENT_AFTER_RUNS: Final = 3


@dataclass(frozen=True, slots=True)
class IntentsNote:
    """What one ``record_intents`` call wrote: its ids, and where the store keeps them.

    The engine hands it back to ``retire_intents`` once every id of it is settled, so a
    store that wrote the note as documents of its own can drop those whole, instead of
    writing a clear of every id (docs/how-state-is-kept.md, "Intents").
    """

    custom_ids: tuple[str, ...]
    # Store-specific names of what holds the note (Firestore: its journal document ids).
    documents: tuple[str, ...] = ()


class RefusalKind(enum.StrEnum):
    """Why Batch did not apply a payload (``sync.batch.item_errors``)."""

    # The error was about the data: Batch will refuse this payload again. Remembered at once.
    VALUE = "value"
    # Another per-item error (category server, unknown, none): only remembered once it came
    # back PERSISTENT_AFTER_RUNS runs in a row for the same payload.
    ITEM_ERROR = "item_error"


_KINDS: Final = frozenset(kind.value for kind in RefusalKind)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A payload Batch did not apply for one profile (listed in ``SUCCESS_WITH_PARTIAL_ERRORS``).

    A value refusal (``kind`` VALUE) is kept so that the same payload is not sent again
    run after run: Batch would refuse it again. Any other per-item error (``kind``
    ITEM_ERROR) is kept with ``runs``, the runs in a row it ended for this very payload: it
    is still sent, until that reaches :data:`PERSISTENT_AFTER_RUNS` (:attr:`persistent`).
    ``payload`` is the payload's fingerprint; ``field`` and ``reason`` are Batch's own words
    (the attribute it named, or ``(profile)``).
    """

    custom_id: str
    payload: int
    field: str
    reason: str
    kind: RefusalKind = RefusalKind.VALUE
    runs: int = 1

    @classmethod
    def read(cls, custom_id: str, payload: int, field: str, reason: str, kind: object, runs: object) -> Refusal:
        """An entry as a state store holds it, whichever version of cepsync wrote it.

        Entries written before kinds existed (``kind`` None) were every per-item error Batch
        answered, each kept as a value refusal: the loss of issue 18. One that names an
        attribute is a value refusal by today's rule too. One that does not (``(profile)``)
        may have been a ``server`` error: it is read as an item error seen once, so the next
        run sends it again and Batch's answer says which it is (a value refusal costs that
        one resend; a lost update is repaired). A kind this version does not know is read
        as an item error too: misreading it costs a resend, never an update.
        """
        if kind is None:
            known = RefusalKind.VALUE if field != NO_ATTRIBUTE else RefusalKind.ITEM_ERROR
        else:
            known = RefusalKind(kind) if kind in _KINDS else RefusalKind.ITEM_ERROR
        counted = runs if isinstance(runs, int) and not isinstance(runs, bool) and runs >= 1 else 1
        return cls(custom_id, payload, field, reason, known, counted)

    @property
    def persistent(self) -> bool:
        """A per-item error not about the value, for this payload, :data:`PERSISTENT_AFTER_RUNS` runs in a row."""
        return self.kind is RefusalKind.ITEM_ERROR and self.runs >= PERSISTENT_AFTER_RUNS

    @property
    def remembered(self) -> bool:
        """Whether this payload is not sent again while it stays the same (``--full`` sends it)."""
        return self.kind is RefusalKind.VALUE or self.persistent

    def following(self, prior: Refusal | None) -> Refusal:
        """This run's entry for the id, counted after ``prior`` (the entry it had before the run).

        An item error's count goes on only after an item error for the very same payload: a
        changed payload, or one that was a value refusal, starts again at one run.
        """
        if (
            self.kind is RefusalKind.ITEM_ERROR
            and prior is not None
            and prior.kind is RefusalKind.ITEM_ERROR
            and prior.payload == self.payload
        ):
            return replace(self, runs=prior.runs + 1)
        return self


@dataclass(slots=True)
class ActivationMeta:
    """Per-activation facts that outlive runs.

    ``owned_keys`` are the Batch attribute names (bare, without ``date()``/``url()``)
    this activation has ever sent: mirror mode clears exactly these on removal.
    """

    mapping_version: str | None = None
    owned_keys: set[str] = field(default_factory=set)
    last_success_run_id: str | None = None
    continuation: dict[str, object] | None = None

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
