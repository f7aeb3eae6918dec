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
                  error about its value listed it): not sent again until it changes
                  (``--full`` does);
* ``persistent_unchanged`` — the very payload Batch answered with a per-item error not
                  about its value in :data:`sync.model.PERSISTENT_AFTER_RUNS` runs in a
                  row: not sent again until it changes (``--full`` does);
* ``removed``   — mirror mode only: an id this activation synced that left the segment
                  (found by the differ's anti-join, never by mapping).

Rows the differ did not hand over are unchanged and were never mapped (``skipped_unmapped``).
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from sync.attributes import AttributeColumns, ChangedBodies, changed_bodies
from sync.config import GuardsConfig, SyncMode
from sync.differ import DUPLICATE, JOURNAL_SCHEMA, RAW, ROW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW
from sync.encode import EncodedBatch
from sync.errors import GuardTripped

# The names and their check live apart from planning (sync/guard_names.py), re-exported here.
from sync.guard_names import GUARD_NAMES as GUARD_NAMES
from sync.guard_names import check_guard_names as check_guard_names
from sync.model import Fingerprint, JournalEntry, Reason, Refusal, RowIssue

# How many rejected rows a run record keeps verbatim (counts by reason are always complete).
REJECTED_SAMPLE_SIZE = 50
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
    "persistent_unchanged",
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

    def as_record(self) -> dict[str, object]:
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

    def as_record(self) -> dict[str, object]:
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
    # Canonical JSON of the attributes (sync.fingerprint), sent as it is; with ``send:
    # changed_attributes``, of only the changed ones (the fingerprint is the whole payload's).
    body: bytes


# Profiles to send (or fingerprints to refresh), one row each. ``kind`` is an index into
# _KINDS. A full load builds no Python object per profile between the differ and the wire.
PROFILE_ROWS_SCHEMA = pa.schema(
    [
        pa.field("custom_id", pa.string(), nullable=False),
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("raw", pa.uint64(), nullable=False),
        pa.field("payload", pa.uint64(), nullable=False),
        pa.field("body", pa.string(), nullable=False),
        # The payload's attribute set (sync.attributes), null unless send: changed_attributes.
        pa.field("attributes", pa.binary()),
    ]
)
_KINDS = (Outcome.NEW, Outcome.CHANGED, Outcome.UNCHANGED)
_KIND_CODE = {kind: code for code, kind in enumerate(_KINDS)}


class ProfileRows:
    """Planned profiles in columns (:data:`PROFILE_ROWS_SCHEMA`), in plan order.

    Iterating (or indexing) gives :class:`PlannedSend` tuples, for previews and tests; the
    engine reads the columns. As refreshes, :meth:`entries` gives the journal entries.
    """

    __slots__ = ("table",)

    def __init__(self, table: pa.Table | None = None) -> None:
        self.table: pa.Table = PROFILE_ROWS_SCHEMA.empty_table() if table is None else table

    @classmethod
    def concat(cls, parts: Iterable[ProfileRows]) -> ProfileRows:
        tables = [part.table for part in parts if part.table.num_rows]
        if not tables:
            return cls()
        return cls(pa.concat_tables(tables))

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def __bool__(self) -> bool:
        return bool(self.table.num_rows > 0)

    def slice(self, start: int, length: int | None = None) -> ProfileRows:
        return ProfileRows(self.table.slice(start, length))

    def __iter__(self) -> Iterator[PlannedSend]:
        columns = [self.table.column(name).to_pylist() for name in PROFILE_ROWS_SCHEMA.names]
        for custom_id, kind, raw, payload, body, attributes in zip(*columns, strict=True):
            yield PlannedSend(custom_id, _KINDS[kind], Fingerprint(raw, payload, attributes), body.encode("utf-8"))

    def __getitem__(self, index: int) -> PlannedSend:
        return next(iter(self.slice(index if index >= 0 else len(self) + index, 1)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ProfileRows):
            return bool(self.table.equals(other.table))
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: not hashable

    def ids(self) -> list[str]:
        ids: list[str] = self.table.column("custom_id").to_pylist()
        return ids

    def new_ids(self) -> list[str]:
        """Ids of the profiles this send may create (no stored fingerprint)."""
        new = pc.equal(self.table.column("kind"), _KIND_CODE[Outcome.NEW])
        ids: list[str] = self.table.column("custom_id").filter(new).to_pylist()
        return ids

    def noted_ids(self, *, new: bool) -> list[str]:
        """Ids whose send may leave Batch holding something the stored fingerprints do not say.

        The changed profiles (their stored fingerprint is the old payload), and with
        ``new`` the new ones (mirror mode owns what it may create). An unchanged profile
        a full pass sends again is not among them: Batch holds that payload either way.
        """
        kinds = pc.equal(self.table.column("kind"), _KIND_CODE[Outcome.CHANGED])
        if new:
            kinds = pc.or_(kinds, pc.equal(self.table.column("kind"), _KIND_CODE[Outcome.NEW]))
        ids: list[str] = self.table.column("custom_id").filter(kinds).to_pylist()
        return ids

    def last_id(self) -> str:
        last: str = self.table.column("custom_id")[-1].as_py()
        return last

    def journal(self, acknowledged: Sequence[str] | None = None) -> pa.Table:
        """The journal rows (``sync.differ.JOURNAL_SCHEMA``) of these profiles, or of the acknowledged ones."""
        table = self.table
        if acknowledged is not None and len(acknowledged) != table.num_rows:
            table = table.filter(pc.is_in(table.column("custom_id"), pa.array(acknowledged, pa.string())))
        return pa.table(
            [
                table.column("custom_id"),
                table.column("raw"),
                table.column("payload"),
                table.column("attributes"),
                pa.repeat(pa.scalar(True), table.num_rows),
            ],
            schema=JOURNAL_SCHEMA,
        )

    def without_bodies(self) -> ProfileRows:
        """The same profiles with empty bodies (once a request holds them, only ids and hashes matter)."""
        empty = pa.repeat(pa.scalar("", pa.string()), self.table.num_rows)
        return ProfileRows(self.table.set_column(self.table.schema.get_field_index("body"), "body", empty))

    def entries(self) -> list[JournalEntry]:
        """As journal entries (one Python object per row: for tests and small lists)."""
        return [JournalEntry(send.custom_id, send.fingerprint) for send in self]


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

    sends: ProfileRows = field(default_factory=ProfileRows)
    refreshes: ProfileRows = field(default_factory=ProfileRows)
    rejected: list[RejectedRow] = field(default_factory=list)
    dropped: list[DroppedAttribute] = field(default_factory=list)
    tally: PlanCounts = field(default_factory=PlanCounts)


def plan_rows(
    batch: pa.RecordBatch,
    mapped: EncodedBatch,
    *,
    full: bool,
    duplicates: Mapping[str, int],
    id_column: str,
    refused: Mapping[str, Refusal] | None = None,
    attributes: AttributeColumns | None = None,
) -> BatchPlan:
    """Classify the mapped rows of one differ batch (see the module docstring).

    The decisions are taken in columns (Arrow compute over the whole batch); only rows
    that need a word of their own (rejected, duplicated, refused before, or with a
    dropped attribute) are visited one by one.

    Args:
        batch: A batch from :mod:`sync.diff` (mapped columns plus the differ's columns).
        mapped: The batch's payloads: ``encode_batch(mapper.convert_batch(batch))``. A row
            that lost attributes (``drop_attribute``) is fingerprinted as if each dropped key
            were null, which is what Batch holds for it after the send unless it held a value
            (it keeps that): a previously-null attribute whose new value is invalid is no
            change to send. The body sent still leaves the dropped keys out. The tests'
            row-at-a-time reference (``plan_reference`` in ``tests/support/reference_mapping.py``)
            must agree.
        full: A full pass: every valid row is sent, unchanged ones included.
        duplicates: Custom ID -> copies in the segment, for every duplicated id.
        id_column: The Custom ID column (named in a duplicate's rejection).
        refused: What Batch did not apply before, by custom_id (``StateStore.load_refusals``).
            A row whose payload is one :attr:`sync.model.Refusal.remembered` is not sent
            again (Batch would refuse it again): it is listed with Batch's reason and counted
            ``refused_unchanged`` (a value refusal) or ``persistent_unchanged`` (a
            persistent per-item error). A changed payload is sent as usual.
        attributes: The batch's attribute hashes, for ``send: changed_attributes``
            (:mod:`sync.attributes`): outside a full pass, a changed row with a stored
            attribute set is sent with only its changed attributes, and one whose changes
            Batch holds already (every attribute found) is refreshed, not sent. Its stored
            fingerprint is always the whole payload's, attribute set included.
    """
    plan = BatchPlan()
    plan.tally.counts["rows_mapped"] += batch.num_rows
    if batch.num_rows == 0:
        return plan
    masks = _Masks.of(batch, mapped, full=full)
    partial: ChangedBodies | None = None
    if attributes is not None and not full:
        changed_rows = pc.and_(masks.sent, pc.invert(masks.new))
        partial = changed_bodies(attributes, batch.column(STORED_ATTRIBUTES), changed_rows)
        masks = masks.holding(partial.nothing)
    ids = pa.array(mapped.custom_ids, pa.string())
    words = _RowWords(plan, mapped, masks, batch.column(ROW), duplicates, id_column, refused)
    refused_again = words.say(_rows_needing_a_word(mapped, masks, ids, refused))
    if refused_again:
        masks = masks.without(refused_again)
    _count_outcomes(plan.tally.counts, masks)
    _assemble_profiles(plan, batch, mapped, masks, ids, full=full, attributes=attributes, partial=partial)
    return plan


class _Masks(NamedTuple):
    """The decisions over one batch in columns: one boolean per row each."""

    duplicate: pa.BooleanArray  # its id has copies in the segment
    eligible: pa.BooleanArray  # valid and not duplicated: sent, refreshed, or counted unchanged
    new: pa.BooleanArray  # no stored fingerprint
    unchanged: pa.BooleanArray  # payload equals the acknowledged one
    sent: pa.BooleanArray  # eligible, and changed unless in a full pass
    held: pa.BooleanArray  # payload moved, but Batch holds every attribute of it (changed_attributes)

    @classmethod
    def of(cls, batch: pa.RecordBatch, encoded: EncodedBatch, *, full: bool) -> _Masks:
        has_id = pa.array([custom_id is not None for custom_id in encoded.custom_ids], pa.bool_())
        duplicate = pc.and_(pc.fill_null(batch.column(DUPLICATE), False), has_id)
        eligible = pc.and_(encoded.valid, pc.invert(duplicate))
        stored_payload = batch.column(STORED_PAYLOAD)
        new = pc.is_null(stored_payload)
        unchanged = pc.fill_null(pc.equal(stored_payload, encoded.payloads), False)
        sent = eligible if full else pc.and_(eligible, pc.invert(unchanged))
        return cls(duplicate, eligible, new, unchanged, sent, pa.repeat(pa.scalar(False), len(eligible)))

    def holding(self, held: pa.BooleanArray) -> _Masks:
        """The same decisions with ``held`` rows unchanged: refreshed, not sent (nothing Batch lacks)."""
        return self._replace(
            unchanged=pc.or_(self.unchanged, held), sent=pc.and_(self.sent, pc.invert(held)), held=held
        )

    def without(self, rows: Sequence[int]) -> _Masks:
        """The same decisions with ``rows`` neither eligible nor sent (Batch refused that very payload)."""
        kept = pc.invert(pc.is_in(pa.array(range(len(self.eligible)), pa.int64()), pa.array(rows, pa.int64())))
        return self._replace(eligible=pc.and_(self.eligible, kept), sent=pc.and_(self.sent, kept))


def _rows_needing_a_word(
    encoded: EncodedBatch, masks: _Masks, ids: pa.StringArray, refused: Mapping[str, Refusal] | None
) -> list[int]:
    """The rows to visit one by one, in row order: not eligible, with an issue, or refused before."""
    special = pc.invert(masks.eligible)
    if encoded.issues:
        rows = pa.array(range(len(ids)), pa.int64())
        special = pc.or_(special, pc.is_in(rows, pa.array(list(encoded.issues), pa.int64())))
    if refused:
        special = pc.or_(special, pc.fill_null(pc.is_in(ids, pa.array(list(refused), pa.string())), False))
    indices: list[int] = pc.indices_nonzero(special).to_pylist()
    return indices


@dataclass(frozen=True, slots=True)
class _RowWords:
    """What the rows that need a word of their own add to the plan, one row at a time.

    A rejection (invalid, or a duplicated id), a payload Batch refused before, and each
    dropped attribute: the plan's lists and counts by reason, in row order.
    """

    plan: BatchPlan
    encoded: EncodedBatch
    masks: _Masks
    row_numbers: pa.Array
    duplicates: Mapping[str, int]
    id_column: str
    refused: Mapping[str, Refusal] | None

    def say(self, indices: Iterable[int]) -> list[int]:
        """Word each row; returns those not sent again because Batch refused that very payload."""
        return [index for index in indices if self._say(index)]

    def _say(self, index: int) -> bool:
        custom_id = self.encoded.custom_ids[index]
        row_number: int | None = self.row_numbers[index].as_py()
        issues = self.encoded.issues.get(index, [])
        if self.masks.duplicate[index].as_py():
            self._reject_duplicate(index, row_number, custom_id, issues)
            return False
        if not self.encoded.valid[index].as_py():
            self.plan.tally.counts["rejected"] += 1
            self._count_rejected(issues)
            self.plan.rejected.append(RejectedRow(row_number, custom_id, tuple(issues)))
            return False
        assert custom_id is not None  # a valid row always has an id
        prior = self.refused.get(custom_id) if self.refused else None
        if (
            prior is not None
            and prior.remembered
            and prior.payload == self.encoded.payloads[index].as_py()
            and not self.masks.unchanged[index].as_py()
        ):
            self._hold_back(row_number, custom_id, prior, issues)
            return True
        self._drop(row_number, custom_id, issues, sent=bool(self.masks.sent[index].as_py()))
        return False

    def _reject_duplicate(
        self, index: int, row_number: int | None, custom_id: str | None, issues: list[RowIssue]
    ) -> None:
        # Census-style: every copy of a duplicated id is rejected; Batch keeps what it
        # holds for that person (present in the segment, so never removed).
        counts = self.plan.tally.counts
        counts["rejected"] += 1
        counts["duplicates"] += 1
        self.plan.tally.rejected_by_reason[Reason.DUPLICATE_CUSTOM_ID.value] += 1
        # A copy that is also invalid (or lost an attribute) says so in the counts too.
        if not self.encoded.valid[index].as_py():
            self._count_rejected(issues)
        else:
            self._drop(row_number, custom_id, issues, sent=False)
        assert custom_id is not None
        copies = self.duplicates.get(custom_id, 2)
        issue = RowIssue(self.id_column, Reason.DUPLICATE_CUSTOM_ID, f"appears {copies} times in the segment")
        self.plan.rejected.append(RejectedRow(row_number, custom_id, (issue,)))

    def _hold_back(self, row_number: int | None, custom_id: str, prior: Refusal, issues: list[RowIssue]) -> None:
        """A payload Batch refused before is not sent again: listed with Batch's reason."""
        self._drop(row_number, custom_id, issues, sent=False)
        issue = remembered_issue(prior)
        self.plan.tally.counts["persistent_unchanged" if prior.persistent else "refused_unchanged"] += 1
        self.plan.tally.rejected_by_reason[issue.reason.value] += 1
        self.plan.rejected.append(RejectedRow(row_number, custom_id, (issue,)))

    def _count_rejected(self, issues: list[RowIssue]) -> None:
        by_reason = self.plan.tally.rejected_by_reason
        for reason in {issue.reason.value for issue in issues}:
            by_reason[reason] += 1

    def _drop(self, row_number: int | None, custom_id: str | None, issues: list[RowIssue], *, sent: bool) -> None:
        for issue in issues:
            self.plan.tally.dropped_by_reason[issue.reason.value] += 1
            self.plan.dropped.append(DroppedAttribute(row_number, custom_id, issue, row_sent=sent))


def _count_outcomes(counts: Counter[str], masks: _Masks) -> None:
    new = _count(pc.and_(masks.eligible, masks.new))
    unchanged = _count(pc.and_(masks.eligible, masks.unchanged))
    counts["new"] += new
    counts["unchanged"] += unchanged
    counts["changed"] += _count(masks.eligible) - new - unchanged


def _assemble_profiles(
    plan: BatchPlan,
    batch: pa.RecordBatch,
    encoded: EncodedBatch,
    masks: _Masks,
    ids: pa.StringArray,
    *,
    full: bool,
    attributes: AttributeColumns | None,
    partial: ChangedBodies | None,
) -> None:
    """The plan's sends, and outside a full pass its refreshes, from the batch's columns."""
    changed_or_not = pc.if_else(masks.unchanged, _KIND_CODE[Outcome.UNCHANGED], _KIND_CODE[Outcome.CHANGED])
    kind = pc.if_else(masks.new, _KIND_CODE[Outcome.NEW], changed_or_not)
    bodies = encoded.bodies if partial is None else pc.coalesce(partial.bodies, encoded.bodies)
    sets = pa.nulls(batch.num_rows, pa.binary()) if attributes is None else attributes.sets
    columns = [ids, kind.cast(pa.int8()), batch.column(RAW), encoded.payloads, bodies, sets]
    profiles = pa.table(columns, names=PROFILE_ROWS_SCHEMA.names)
    plan.sends = ProfileRows(_as_profile_rows(profiles.filter(masks.sent)))
    if not full:
        # Same payload as acknowledged (a cosmetic source change, or a mapping change that
        # does not touch this profile): remember the new raw hash so the next run skips
        # mapping the row. The payload fingerprint never moves without a 202.
        # A row whose payload moved while Batch holds every attribute of it (``held``: a
        # mapping that dropped an attribute, with changed_attributes) is refreshed too.
        moved_raw = pc.fill_null(pc.not_equal(batch.column(STORED_RAW), batch.column(RAW)), True)
        refresh = pc.and_(pc.and_(masks.eligible, masks.unchanged), pc.or_(moved_raw, masks.held))
        plan.refreshes = ProfileRows(_as_profile_rows(profiles.filter(refresh)))
        plan.tally.counts["refreshed"] += len(plan.refreshes)


def remembered_issue(prior: Refusal) -> RowIssue:
    """Why a row whose payload Batch did not apply before is not sent again."""
    if prior.persistent:
        detail = (
            f"Batch answered this payload with an error not about its value {prior.runs} runs in a row "
            f"({prior.reason}); not sent again until it changes (--full sends it)"
        )
        return RowIssue(prior.field, Reason.BATCH_PERSISTENT_ERROR, detail)
    detail = f"Batch refused this payload before ({prior.reason}); not sent again until it changes"
    return RowIssue(prior.field, Reason.BATCH_REJECTED, detail)


def _count(mask: pa.BooleanArray) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _as_profile_rows(table: pa.Table) -> pa.Table:
    return table.cast(PROFILE_ROWS_SCHEMA)


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    name: str
    tripped: bool
    overridden: bool
    detail: str

    def as_record(self) -> dict[str, object]:
        return {"guard": self.name, "tripped": self.tripped, "overridden": self.overridden, "detail": self.detail}


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
        counts: ``rows``, ``removed`` and ``changed`` (the differ found the removals exactly;
            ``changed`` is exact when every row that could have changed was mapped before the
            first send, or the count of those rows, which bounds it, when the run sends
            them as they are mapped because the guards hold even if all of them changed).
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
                f"{removed} of {synced} synced profiles left the segment and would be removed ({share:.1f}%, limit "
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


def guard_refusal(activation: str, tripped: Sequence[GuardVerdict], *, trigger: str) -> GuardTripped:
    """The error a run stops with when guards tripped: what tripped, and how to approve it once.

    From the CLI the approval is ``--allow NAME``; the deployed function's message carries it
    in ``"allow"`` (docs/function.md).
    """
    names = ", ".join(v.name for v in tripped)
    if trigger == "cli":
        approve = "rerun with " + " ".join(f"--allow {v.name}" for v in tripped)
    else:
        message = {"activation": activation, "allow": [v.name for v in tripped]}
        approve = f"send the function the message {json.dumps(message)}"
    return GuardTripped(
        f"activation '{activation}': guard(s) {names} tripped, nothing was sent: "
        + "; ".join(v.detail for v in tripped)
        + f". To proceed once, {approve}."
    )
