"""Plan: decide what becomes of each row that moved, and check the guards. Pure: no I/O.

The differ (:mod:`sync.diff`) hands over only the rows that need mapping, with what the
state knows of each (its stored fingerprint, whether its id is duplicated). After mapping,
:func:`plan_rows` gives each one an :class:`Outcome`:

* ``new``       — valid, no stored fingerprint: send (mirror: record an intent first);
* ``changed``   — valid, payload fingerprint differs from the acknowledged one: send;
* ``unchanged`` — payload equals what Batch acknowledged: not sent, except in a full pass
                  (FULL ONLY, ``--full``) which sends every valid row;
* ``refresh``   — unchanged payload but moved raw values (``fr`` → ``FR``): nothing to send,
                  the stored raw hash is updated so the next run skips mapping the row;
* ``rejected``  — invalid value, bad or duplicated custom_id: never sent, state untouched,
                  and the person still counts as *in the segment* (never removed for it);
* ``refused_unchanged`` — the very payload Batch refused in an earlier run (a partial
                  error listed it): not sent again until it changes (``--full`` does);
* ``removed``   — mirror mode only: an id this activation synced that left the segment
                  (found by the differ's anti-join, never by mapping).

Rows the differ did not hand over are unchanged and were never mapped (``skipped_unmapped``).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa

from sync.config import GuardsConfig, SyncMode
from sync.diff import DUPLICATE, RAW, ROW, STORED_PAYLOAD, STORED_RAW
from sync.errors import ConfigError
from sync.fingerprint import canonical_payload, payload_fingerprint_of
from sync.model import Fingerprint, JournalEntry, MappedRow, Reason, Refusal, RowIssue

# How many rejected rows a run record keeps verbatim (counts by reason are always complete).
REJECTED_SAMPLE_SIZE = 50
GUARD_NAMES = ("empty_segment", "removed_percent", "changed_percent")
COUNT_KEYS = (
    "rows",
    "new",
    "changed",
    "unchanged",
    "skipped_unmapped",
    "removed",
    "rejected",
    "duplicates",
    "refreshed",
    "refused_unchanged",
)


class Outcome(enum.StrEnum):
    NEW = "new"
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    REFRESH = "refresh"
    REJECTED = "rejected"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class RejectedRow:
    row_number: int | None  # None: refused by Batch, after planning
    custom_id: str | None
    issues: tuple[RowIssue, ...]

    def as_record(self) -> dict[str, Any]:
        return {
            "row": self.row_number,
            "custom_id": self.custom_id,
            "issues": [{"field": i.field, "reason": i.reason.value, "detail": i.detail} for i in self.issues],
        }


@dataclass(frozen=True, slots=True)
class DroppedAttribute:
    """One attribute left out of a row under ``drop_attribute`` (a ``--rejects`` line of its own)."""

    row_number: int | None
    custom_id: str | None
    issue: RowIssue
    row_sent: bool  # the row itself was sent without the attribute (else: unchanged or rejected)

    def as_record(self) -> dict[str, Any]:
        issue = self.issue
        return {
            "row": self.row_number,
            "custom_id": self.custom_id,
            "issues": [{"field": issue.field, "reason": issue.reason.value, "detail": issue.detail}],
            "attribute_dropped": True,
            "row_sent": self.row_sent,
        }


class PlannedSend(NamedTuple):
    """One profile to send: its canonical payload and what to store once Batch acknowledged it."""

    custom_id: str
    kind: Outcome  # new | changed | unchanged (a full pass sends those too)
    fingerprint: Fingerprint
    body: bytes  # canonical JSON of the attributes (sync.fingerprint), sent as it is


@dataclass
class PlanCounts:
    """Counts per outcome (and why rows were rejected or attributes dropped), added up over batches."""

    counts: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    dropped_by_reason: Counter[str] = field(default_factory=Counter)

    def add(self, other: PlanCounts) -> None:
        self.counts.update(other.counts)
        self.rejected_by_reason.update(other.rejected_by_reason)
        self.dropped_by_reason.update(other.dropped_by_reason)

    def summary(self) -> dict[str, int]:
        return {key: self.counts.get(key, 0) for key in COUNT_KEYS}


@dataclass
class BatchPlan:
    """The outcome of one mapped batch."""

    sends: list[PlannedSend] = field(default_factory=list)
    refreshes: list[JournalEntry] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    dropped: list[DroppedAttribute] = field(default_factory=list)
    tally: PlanCounts = field(default_factory=PlanCounts)


def plan_rows(
    batch: pa.RecordBatch,
    mapped: Sequence[MappedRow],
    *,
    full: bool,
    duplicates: Mapping[str, int],
    id_column: str,
    payload_keys: Sequence[tuple[str, str]] = (),
    refused: Mapping[str, Refusal] | None = None,
) -> BatchPlan:
    """Classify the mapped rows of one differ batch (see the module docstring).

    Args:
        batch: A batch from :mod:`sync.diff` (mapped columns plus the differ's columns).
        mapped: ``mapper.map_batch(batch)``, one per row, in order.
        full: A full pass: every valid row is sent, unchanged ones included.
        duplicates: Custom ID -> copies in the segment, for every duplicated id.
        id_column: The Custom ID column (named in a duplicate's rejection).
        payload_keys: ``ProfileMapper.payload_keys``. A row that lost attributes
            (``drop_attribute``) is fingerprinted as if each dropped key were null, which is
            what Batch holds for it after the send unless it held a value (it keeps that):
            a previously-null attribute whose new value is invalid is no change to send.
            The body sent still leaves the dropped keys out.
        refused: Payloads Batch refused before, by custom_id (``StateStore.load_refusals``).
            A row whose payload is the one Batch refused is not sent again (Batch would
            refuse it again): it is listed with Batch's reason and counted
            ``refused_unchanged``. A changed payload is sent as usual.
    """
    plan = BatchPlan()
    counts = plan.tally.counts
    by_reason = plan.tally.rejected_by_reason
    dropped = plan.tally.dropped_by_reason
    rows = batch.column(ROW).to_pylist()
    raws = batch.column(RAW).to_pylist()
    is_duplicate = batch.column(DUPLICATE).to_pylist()
    stored_raws = batch.column(STORED_RAW).to_pylist()
    stored_payloads = batch.column(STORED_PAYLOAD).to_pylist()
    counts["rows_mapped"] += len(mapped)
    for index, row in enumerate(mapped):
        custom_id = row.custom_id
        if is_duplicate[index] and custom_id is not None:
            # Census-style: every copy of a duplicated id is rejected; Batch keeps what it
            # holds for that person (present in the segment, so never removed).
            counts["rejected"] += 1
            counts["duplicates"] += 1
            by_reason[Reason.DUPLICATE_CUSTOM_ID.value] += 1
            # A copy that is also invalid (or lost an attribute) says so in the counts too.
            if row.attributes is None:
                for reason in {issue.reason.value for issue in row.issues}:
                    by_reason[reason] += 1
            else:
                for issue in row.issues:
                    dropped[issue.reason.value] += 1
                    plan.dropped.append(DroppedAttribute(rows[index], custom_id, issue, row_sent=False))
            copies = duplicates.get(custom_id, 2)
            issue = RowIssue(id_column, Reason.DUPLICATE_CUSTOM_ID, f"appears {copies} times in the segment")
            plan.rejected.append(RejectedRow(rows[index], custom_id, (issue,)))
            continue
        attributes = row.attributes
        if attributes is None:
            counts["rejected"] += 1
            for reason in {issue.reason.value for issue in row.issues}:
                by_reason[reason] += 1
            plan.rejected.append(RejectedRow(rows[index], custom_id, tuple(row.issues)))
            continue
        assert custom_id is not None  # a row with attributes always has an id
        body = canonical_payload(attributes)
        compared = body
        if row.issues and payload_keys:
            dropped_keys = [key for key, present in payload_keys if key not in attributes and present not in attributes]
            if dropped_keys:
                compared = canonical_payload({**attributes, **dict.fromkeys(dropped_keys)})
        fingerprint = Fingerprint(raw=raws[index], payload=payload_fingerprint_of(compared))
        stored_payload = stored_payloads[index]
        if stored_payload is None:
            kind = Outcome.NEW
        elif stored_payload != fingerprint.payload:
            kind = Outcome.CHANGED
        else:
            kind = Outcome.UNCHANGED
        prior = refused.get(custom_id) if refused else None
        if prior is not None and prior.payload == fingerprint.payload and kind is not Outcome.UNCHANGED:
            counts["refused_unchanged"] += 1
            by_reason[Reason.BATCH_REJECTED.value] += 1
            for issue in row.issues:
                dropped[issue.reason.value] += 1
                plan.dropped.append(DroppedAttribute(rows[index], custom_id, issue, row_sent=False))
            detail = f"Batch refused this payload before ({prior.reason}); not sent again until it changes"
            issue = RowIssue(prior.field, Reason.BATCH_REJECTED, detail)
            plan.rejected.append(RejectedRow(rows[index], custom_id, (issue,)))
            continue
        counts[kind.value] += 1
        sent = kind is not Outcome.UNCHANGED or full
        for issue in row.issues:
            dropped[issue.reason.value] += 1
            plan.dropped.append(DroppedAttribute(rows[index], custom_id, issue, row_sent=sent))
        if not sent:
            if stored_raws[index] != fingerprint.raw:
                # Same payload as acknowledged (a cosmetic source change, or a mapping change
                # that does not touch this profile): remember the new raw hash so the next run
                # skips mapping the row. The payload fingerprint never moves without a 202.
                counts["refreshed"] += 1
                plan.refreshes.append(JournalEntry(custom_id, fingerprint))
            continue
        plan.sends.append(PlannedSend(custom_id, kind, fingerprint, body))
    return plan


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    name: str
    tripped: bool
    overridden: bool
    detail: str

    def as_record(self) -> dict[str, Any]:
        return {"guard": self.name, "tripped": self.tripped, "overridden": self.overridden, "detail": self.detail}


def check_guard_names(names: Iterable[str], *, field: str) -> tuple[str, ...]:
    """Guards a person or a message asks to override for one run, each once, in the order given.

    Raises:
        ConfigError: a name is not a guard's; the error names ``field`` and lists the guards.
    """
    wanted = tuple(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in GUARD_NAMES]
    if unknown:
        # A name may come from an untrusted message: quoted, and cut short.
        quoted = ", ".join(repr(name[:40]) for name in unknown)
        raise ConfigError(f"unknown guard(s) {quoted}; known: {', '.join(GUARD_NAMES)}", field=field)
    return wanted


def evaluate_guards(
    counts: Mapping[str, int],
    guards: GuardsConfig,
    *,
    synced_before: int,
    sync_mode: SyncMode,
    allow: Iterable[str] = (),
) -> list[GuardVerdict]:
    """Check a run's counts against the activation's guards, before anything is sent.

    Args:
        counts: ``rows``, ``removed`` and ``changed`` (exact: the differ found the removals,
            and every row that could have changed was mapped before the first send).
        guards: The activation's guards.
        synced_before: Profiles this activation had synced (stored fingerprints + intents).
        sync_mode: Removals are only guarded in mirror mode.
        allow: Guards overridden for this run only (CLI ``--allow``).
    """
    allowed = set(allow)
    unknown = allowed - set(GUARD_NAMES)
    if unknown:
        raise ValueError(f"unknown guard(s) {sorted(unknown)}; known: {', '.join(GUARD_NAMES)}")
    verdicts: list[GuardVerdict] = []
    synced = synced_before
    rows = counts.get("rows", 0)

    empty = guards.abort_on_empty_segment and rows == 0 and synced > 0
    verdicts.append(
        GuardVerdict(
            "empty_segment",
            empty,
            empty and "empty_segment" in allowed,
            f"segment returned {rows} rows while {synced} profiles are synced",
        )
    )
    if sync_mode is SyncMode.MIRROR:
        removed = counts.get("removed", 0)
        share = 100.0 * removed / synced if synced else 0.0
        tripped = synced > 0 and share > guards.max_removed_percent
        verdicts.append(
            GuardVerdict(
                "removed_percent",
                tripped,
                tripped and "removed_percent" in allowed,
                f"{removed} of {synced} synced profiles would be cleared ({share:.1f}%, limit "
                f"{guards.max_removed_percent:g}%)",
            )
        )
    changed = counts.get("changed", 0)
    share = 100.0 * changed / synced if synced else 0.0
    tripped = synced > 0 and share > guards.max_changed_percent
    verdicts.append(
        GuardVerdict(
            "changed_percent",
            tripped,
            tripped and "changed_percent" in allowed,
            f"{changed} of {synced} synced profiles changed ({share:.1f}%, limit {guards.max_changed_percent:g}%)",
        )
    )
    return verdicts
