"""Send: profiles to Batch, concurrently and rate-limited, with the journal and the checkpoint.

Guarantees kept here (``docs/how-a-run-works.md``):

1. A fingerprint moves only through :meth:`Journal.flush`, fed by acknowledged profiles
   (202 and not listed in ``errors``).
3. A crash re-sends at most what was acknowledged since the last flush (every
   ``journal.flush_every_profiles`` / ``flush_every_seconds``).
7. An id's intent is durable before the request that could create it (mirror mode) or
   change what Batch holds for it (a changed payload, a removal) leaves: the producer
   notes a window of groups in one append (:class:`IntentWindow`), and the sender refuses
   a group that was not noted. Once every id of a window is committed, the window's note
   is retired whole; until then each commit clears the ids it made durable, so ids that
   failed stay noted, and the next run sends them again whatever their fingerprint.

The sender consumes :class:`SendGroup`\\ s (one request each) from an asyncio queue that the
mapping thread fills while it reads, so the first request leaves after the first batch is
mapped, and a full load is bound by Batch's rate rather than by our CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import pyarrow as pa

from sync.batch.client import BatchClient, EncodedProfiles, ProfileUpdate, SendOutcome
from sync.batch.endpoint import Endpoint
from sync.differ import FingerprintStore
from sync.encode import request_body
from sync.fingerprint import canonical_json, payload_fingerprint_of
from sync.logs import get_logger
from sync.model import NO_ATTRIBUTE, IntentsNote, JournalEntry, Lease, Refusal, RefusalKind
from sync.plan import ProfileRows
from sync.state import core
from sync.state.base import IntentStore

log = get_logger("cepsync.send")


@dataclass(eq=False)
class IntentWindow:
    """The noted ids of a window of send groups (new in mirror mode, changed, removed), noted by one append.

    Every group of the window reports here once answered; the journal retires the note
    when every group was answered and every noted id acknowledged and committed
    (docs/how-state-is-kept.md, "Intents"). Touched on the event loop only.
    """

    note: IntentsNote
    outstanding: int  # groups of the window not answered yet
    acknowledged: list[str] = field(default_factory=list)  # noted ids acknowledged, not in a commit yet
    committing: list[str] = field(default_factory=list)  # noted ids in the commit under way
    partial: bool = False  # a noted id of the window was not acknowledged

    def answered(self, acknowledged: Sequence[str], *, all_acknowledged: bool) -> None:
        self.outstanding -= 1
        self.acknowledged.extend(acknowledged)
        self.partial = self.partial or not all_acknowledged


@dataclass
class _Settlement:
    """What a commit settled: notes to retire whole, intents to clear."""

    retire: list[IntentsNote] = field(default_factory=list)
    clear: list[str] = field(default_factory=list)


class Journal:
    """Acknowledged outcomes waiting to be committed; flushed by count, by time, and at the end.

    Intents are settled after the commit that makes them unnecessary: a window's note is
    retired once all its ids are committed; until then (or if some failed), the ids each
    commit makes durable are cleared.
    ``stale_intents``: intents an earlier run left (noted, never settled); this run's notes
    do not hold them, so those of its ids are cleared explicitly once committed.
    """

    def __init__(
        self,
        fingerprints: FingerprintStore,
        intents: IntentStore,
        lease: Callable[[], Lease],
        *,
        every_profiles: int,
        every_seconds: float,
        clock: Callable[[], float],
        now: Callable[[], datetime],
        stale_intents: frozenset[str] = frozenset(),
    ) -> None:
        self._fingerprints = fingerprints
        self._intents = intents
        self._lease = lease
        self._stale = stale_intents
        self._every = every_profiles
        self._seconds = every_seconds
        self._clock = clock
        self._now = now
        # Acknowledged outcomes: the sender's columns (JOURNAL_SCHEMA tables) or entries.
        self._pending: list[pa.Table | Sequence[JournalEntry]] = []
        self._pending_rows = 0
        # Stale intents to clear once the pending entries are committed (forgotten ids).
        self._pending_clear: list[str] = []
        # Intent windows not settled yet (in the order they were first answered).
        self._windows: list[IntentWindow] = []
        self._last_flush = clock()
        self._lock = asyncio.Lock()
        self.flushes = 0
        self.committed = 0
        self.commit_seconds = 0.0

    def add(
        self,
        entries: Sequence[JournalEntry] | pa.Table,
        *,
        window: IntentWindow | None = None,
        noted_acknowledged: Sequence[str] = (),
        all_noted_acknowledged: bool = True,
    ) -> None:
        """Entries to commit, and the intents they settle once committed.

        ``window``: the intent window of the group these entries answer, with the group's
        noted ids that Batch acknowledged, and whether it acknowledged all of them.

        An intent only matters until the id's fingerprint (or its removal) is durable, so it
        is settled right after the commit that made it so, flush by flush: a million-profile
        first sync never holds a million ids to settle at its end.
        """
        rows = entries.num_rows if isinstance(entries, pa.Table) else len(entries)
        if rows:
            self._pending.append(entries)
            self._pending_rows += rows
        if window is not None:
            window.answered(noted_acknowledged, all_acknowledged=all_noted_acknowledged)
            if all(known is not window for known in self._windows):
                self._windows.append(window)

    def forget(self, custom_ids: Sequence[str]) -> None:
        """Drop ids from the state without any send (mirror, ``on_remove: keep``).

        Their fingerprints are deleted by the next commit, and the intents an earlier run
        left for them are cleared right after it: until then they still count as synced,
        so a crash in between only forgets them again.
        """
        self._pending.append([JournalEntry(custom_id, None) for custom_id in custom_ids])
        self._pending_rows += len(custom_ids)
        self._pending_clear.extend(custom_id for custom_id in custom_ids if custom_id in self._stale)

    def due(self) -> bool:
        return self._pending_rows > 0 and (
            self._pending_rows >= self._every or self._clock() - self._last_flush >= self._seconds
        )

    async def flush(self) -> None:
        async with self._lock:
            await self._flush(final=False)

    async def close(self) -> None:
        """The last flush: commit what is left, then settle every window, answered or not.

        A window with groups never answered (the run stopped sending) clears the ids it
        committed; its other ids stay owned.
        """
        async with self._lock:
            await self._flush(final=True)

    async def _flush(self, *, final: bool) -> None:
        pending, rows, self._pending, self._pending_rows = self._pending, self._pending_rows, [], 0
        # What this commit settles is fixed now, with the entries it commits: a group
        # answered while the commit is under way waits for the next one.
        cleared, self._pending_clear = self._pending_clear, []
        for window in self._windows:
            window.committing, window.acknowledged = window.acknowledged, []
        self._last_flush = self._clock()
        if pending:
            started = time.perf_counter()
            lease, now = self._lease(), self._now()
            # One worker-thread hop: gathering the pending tables and committing them.
            await asyncio.to_thread(
                lambda: self._fingerprints.commit(lease, _one_table(lease.activation, pending), now)
            )
            self.commit_seconds += time.perf_counter() - started
            self.flushes += 1
            self.committed += rows
        # After the commit: a crash before the intents are settled leaves intents for
        # stored ids, harmless (both say "synced"), never an acknowledged id without either.
        settlement = self._settle(cleared, final=final)
        if settlement.retire or settlement.clear:
            await asyncio.to_thread(self._apply, settlement)

    def _settle(self, cleared: list[str], *, final: bool) -> _Settlement:
        """Which notes the commit just made retire-able, and which intents it lets go (event loop).

        A window whose every id is now committed is retired whole. Otherwise the ids this
        commit made durable are cleared at once, so that a crash before the window settles
        re-sends only what was not committed (guarantee 3: the unflushed window), not the
        window's committed ids as unconfirmed.
        """
        settlement = _Settlement(clear=cleared)
        open_windows: list[IntentWindow] = []
        for window in self._windows:
            committed, window.committing = window.committing, []
            done = window.outstanding == 0 and not window.acknowledged
            if done and not window.partial:
                settlement.retire.append(window.note)
                settlement.clear.extend(custom_id for custom_id in committed if custom_id in self._stale)
                continue
            settlement.clear.extend(committed)
            if not done and not final:
                open_windows.append(window)
        self._windows = open_windows
        return settlement

    def _apply(self, settlement: _Settlement) -> None:
        lease = self._lease()
        for note in settlement.retire:
            self._intents.retire_intents(lease, note)
        if settlement.clear:
            self._intents.clear_intents(lease, settlement.clear)


class Watermark:
    """The highest custom_id below which every group was fully answered (full passes send in id order).

    A continuation of a full pass skips ids at or below it: the send checkpoint. A group
    with failed rows stops the watermark for good in this run, so a continuation resends
    from there (acknowledged rows after it are resent too: idempotent, and bounded).
    """

    def __init__(self) -> None:
        self._done: set[int] = set()
        self._next = 0
        self._last_ids: dict[int, str] = {}
        self._blocked_at: int | None = None
        self.value: str | None = None

    def complete(self, index: int, last_id: str, *, clean: bool) -> None:
        if not clean and (self._blocked_at is None or index < self._blocked_at):
            self._blocked_at = index
        self._done.add(index)
        self._last_ids[index] = last_id
        while self._next in self._done and (self._blocked_at is None or self._next < self._blocked_at):
            self.value = self._last_ids.pop(self._next)
            self._done.discard(self._next)
            self._next += 1


@dataclass
class SendGroup:
    """One request's worth: upserts (in id order within a full pass) or removals.

    ``intents_noted``: in mirror mode, the new ids of ``upserts`` are durable intents
    (noted for a window of groups at once, before any of them is sent).
    """

    upserts: ProfileRows = field(default_factory=ProfileRows)
    removals: list[str] = field(default_factory=list)
    intents_noted: bool = False
    # The window whose note holds this group's new ids (None: the window had none).
    intents: IntentWindow | None = None


@dataclass
class SendTally:
    """What the sends of one run came to."""

    attempted: int = 0
    acknowledged: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    wire_seconds: float = 0.0
    wait_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    cleared: int = 0
    # Ids that left a mirror segment, dropped from the state with nothing sent (on_remove: keep).
    forgotten: int = 0
    # Payloads Batch refused (a partial error about the value), remembered so they are not
    # sent again unchanged, and those it failed with another per-item error after every
    # retry (kind ITEM_ERROR, one run: the engine counts the runs in a row).
    refusals: list[Refusal] = field(default_factory=list)
    item_failures: list[Refusal] = field(default_factory=list)
    # Profiles resent within the run after a per-item error not about the value.
    item_retries: int = 0
    # Acknowledged ids that had an entry for a payload Batch did not apply before: Batch
    # applied this one, so the entry is forgotten at the end of the run.
    acknowledged_remembered: list[str] = field(default_factory=list)

    def count(self, outcome: SendOutcome) -> None:
        """Add one request's outcome to the counts."""
        self.wire_seconds += outcome.wire_seconds
        self.wait_seconds += outcome.wait_seconds
        self.retries += max(0, outcome.attempts - 1)
        self.rate_limited += outcome.rate_limited
        self.item_retries += outcome.item_retries
        self.acknowledged += len(outcome.acknowledged)
        self.rejected += len(outcome.rejected)
        self.failed += len(outcome.failed)
        if outcome.failure and len(self.failures) < 5:
            self.failures.append(outcome.failure)


class Budget(Protocol):
    """What the sender asks of time (``sync.lease.LeaseKeeper`` answers)."""

    def deadline(self) -> float:
        """The monotonic time no request may outlive (lease expiry, time budget)."""

    def budget_exhausted(self) -> bool:
        """True once no new request may start (the run hands over to a continuation)."""


class Sender:
    """Sends groups under the activation's concurrency limit; the client paces and retries.

    Args:
        client: The Batch client (already entered).
        endpoint: The endpoint every request of the run uses.
        concurrency: Requests in flight at once.
        journal: Where acknowledged fingerprints go.
        budget: When requests must end, and when no new one may start.
        mirror: Mirror mode: every group with new ids must arrive with its intents noted.
        removal_attributes: The ``null`` payload a removal sends (:func:`removal_body`); its
            fingerprint is what a refused removal is remembered by.
        remembered: Ids with an entry for a payload Batch did not apply before (their
            acknowledgements are listed in :attr:`SendTally.acknowledged_remembered`).
        on_answer: Told (acknowledged, rejected, failed) of every request (a progress bar).

    What the requests came to is returned as values, in :attr:`tally` (counts, Batch's
    refusals and per-item failures): the engine's run book reads it.
    """

    def __init__(
        self,
        client: BatchClient,
        endpoint: Endpoint,
        *,
        concurrency: int,
        journal: Journal,
        budget: Budget,
        mirror: bool,
        removal_attributes: bytes,
        remembered: Container[str] = frozenset(),
        on_answer: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self._client = client
        self._endpoint = endpoint
        self._semaphore = asyncio.Semaphore(concurrency)
        self._journal = journal
        self._budget = budget
        self._remembered = remembered
        self._mirror = mirror
        self._removal = removal_attributes
        self._removal_payload = payload_fingerprint_of(removal_attributes)
        self._on_answer = on_answer
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._index = 0
        self.watermark = Watermark()
        self.tally = SendTally()
        self.incomplete = False
        self.started_at: float | None = None

    @property
    def failed(self) -> bool:
        return bool(self._errors)

    async def submit(self, group: SendGroup) -> bool:
        """Start one request (waits for a free slot). False when the run must stop sending."""
        await self._semaphore.acquire()
        if self._errors:
            self._semaphore.release()
            return False
        if self._budget.budget_exhausted():
            self._semaphore.release()
            self.incomplete = True
            log.warning("time budget nearly spent: handing over to a continuation", group=self._index)
            return False
        if self.started_at is None:
            self.started_at = time.perf_counter()
        task = asyncio.create_task(self._send(self._index, group))
        self._index += 1
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._errors.append(task.exception())  # type: ignore[arg-type]  # checked just above

    async def _send(self, index: int, group: SendGroup) -> None:
        try:
            profiles, noted = self._request_of(group)
            self.tally.attempted += len(profiles)
            self.tally.requests += 1
            self._client.transport.ready()  # the session first: its making must not eat the deadline
            outcome = await self._client.send(self._endpoint, profiles, deadline=self._budget.deadline())
            self.tally.count(outcome)
            # An id whose value Batch refused was answered, and not applied: its intent is
            # settled as an acknowledged one is. (A refusal is about the value, so an earlier
            # unanswered attempt of this same payload was not applied either.) Left noted, it
            # would be "unconfirmed" in every later run, and sent again once its row came back
            # to the value Batch holds (docs/how-state-is-kept.md, "Intents").
            settled = outcome.acknowledged
            if outcome.rejected:
                settled = [*outcome.acknowledged, *(r.custom_id for r in outcome.rejected)]
            if group.upserts:
                self._journal_upserts(index, group, outcome, noted, settled)
            else:
                self._journal_removals(group, outcome, settled)
            if self._remembered:
                self.tally.acknowledged_remembered.extend(c for c in outcome.acknowledged if c in self._remembered)
            if self._on_answer is not None:
                self._on_answer(len(outcome.acknowledged), len(outcome.rejected), len(outcome.failed))
            if self._journal.due():
                await self._journal.flush()
        finally:
            self._semaphore.release()

    def _request_of(self, group: SendGroup) -> tuple[list[ProfileUpdate] | EncodedProfiles, list[str]]:
        """The request's profiles, and the ids of it that had to be noted before it leaves.

        An upsert group hands its bodies to the request and keeps what the journal needs.
        """
        if not group.upserts:
            if not group.intents_noted:
                raise RuntimeError("a removal group reached the sender before its intents were noted")
            return [ProfileUpdate(custom_id, encoded=self._removal) for custom_id in group.removals], []
        upserts = group.upserts
        noted = upserts.noted_ids(new=self._mirror)
        if noted and not group.intents_noted:
            # Guarantee 7: own what we may create, or change, durably, before the request leaves.
            raise RuntimeError("a group reached the sender before its intents were noted")
        ids, bodies = upserts.table.column("custom_id"), upserts.table.column("body")
        body = request_body(ids.combine_chunks(), bodies)
        profiles = EncodedProfiles(ids.to_pylist(), body.payload, body.ends)
        del body, bodies
        # The request holds the bodies now; what is left is what the journal needs.
        group.upserts = upserts.without_bodies()
        return profiles, noted

    def _journal_upserts(
        self, index: int, group: SendGroup, outcome: SendOutcome, noted: list[str], settled: list[str]
    ) -> None:
        """An upsert request's acknowledged profiles into the journal, with the intents they settle."""
        upserts = group.upserts
        everything = len(outcome.acknowledged) == len(upserts)
        all_noted = True
        if noted and len(settled) != len(upserts):
            answered = set(settled)
            all_noted = all(custom_id in answered for custom_id in noted)
            noted = [custom_id for custom_id in noted if custom_id in answered]
        self._journal.add(
            upserts.journal(None if everything else outcome.acknowledged),
            window=group.intents,
            noted_acknowledged=noted,
            all_noted_acknowledged=all_noted,
        )
        if outcome.rejected or outcome.item_failures:
            payloads = {send.custom_id: send.fingerprint.payload for send in upserts}
            self._remember(outcome, payloads.get)
        self.watermark.complete(index, upserts.last_id(), clean=not outcome.failed)

    def _journal_removals(self, group: SendGroup, outcome: SendOutcome, settled: list[str]) -> None:
        """A removal request's acknowledged ids into the journal (deleted), with the intents they settle."""
        self._journal.add(
            [JournalEntry(custom_id, None) for custom_id in outcome.acknowledged],
            window=group.intents,
            noted_acknowledged=settled,
            all_noted_acknowledged=len(settled) == len(group.removals),
        )
        self.tally.cleared += len(outcome.acknowledged)
        # A refused removal is remembered by the removal payload's fingerprint, as a
        # refused upsert is by its own: not sent again while the owned keys stay the same.
        self._remember(outcome, lambda _custom_id: self._removal_payload)

    def _remember(self, outcome: SendOutcome, payload_of: Callable[[str], int | None]) -> None:
        """Batch's refusals and per-item failures of one request, by the payload each answered."""
        tally = self.tally
        for rejection in outcome.rejected:
            payload = payload_of(rejection.custom_id)
            if payload is not None:
                tally.refusals.append(
                    Refusal(rejection.custom_id, payload, rejection.attribute or NO_ATTRIBUTE, rejection.reason)
                )
        for failure in outcome.item_failures:
            payload = payload_of(failure.custom_id)
            if payload is not None:
                tally.item_failures.append(
                    Refusal(
                        failure.custom_id,
                        payload,
                        failure.attribute or NO_ATTRIBUTE,
                        failure.describe(),
                        RefusalKind.ITEM_ERROR,
                    )
                )

    def forget(self, removed: Sequence[str]) -> None:
        """Mirror removals under ``on_remove: keep``: nothing is sent, the ids leave the state.

        Batch keeps the profiles as they are; what the state remembered of them goes with
        them (fingerprints, earlier intents, remembered refusals), so one that comes back
        to the segment is synced as new.
        """
        self._journal.forget(removed)
        self.tally.forgotten += len(removed)
        if self._remembered:
            self.tally.acknowledged_remembered.extend(c for c in removed if c in self._remembered)

    async def drain(self) -> None:
        """Wait for every request in flight; re-raise the first fatal error (after a flush)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._errors:
            # Commit what was acknowledged before the fatal error, then report it.
            await self._journal.close()
            raise self._errors[0]


def removal_body(owned_keys: Iterable[str]) -> bytes:
    """What a mirror removal sends: every owned key, null, as canonical JSON (so
    ``payload_fingerprint_of`` of it is the fingerprint a refusal of it is remembered by)."""
    return canonical_json(dict.fromkeys(sorted(owned_keys)))


def _one_table(activation: str, pending: list[pa.Table | Sequence[JournalEntry]]) -> pa.Table:
    """The pending outcomes as one journal table (``sync.state.core.JOURNAL_SCHEMA``), oldest first."""
    tables = [part if isinstance(part, pa.Table) else core.journal_table(activation, part) for part in pending]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class IntentNoter:
    """Notes the ids a window of send groups may change in Batch, in one append, then hands the groups on.

    Guarantee 7 (an id Batch may hold is always known) needs a new id noted before the
    request that could create it (mirror mode). And any send that can leave Batch holding
    something the stored fingerprints do not say (a changed payload, a removal) is noted
    too: if its acknowledgement is lost (a crash, a dropped answer), the next run reads the
    note as "unconfirmed" and sends the id again, even if its row came back to the
    acknowledged value. Noting a window of groups rather than each request keeps a run's
    state writes to a few per window (docs/how-state-is-kept.md). A crash leaves notes for
    ids never sent: harmless, they are only sent again.

    Args:
        intents: Where intents are noted.
        lease: The current lease (each note is fenced by it).
        mirror: Mirror mode: new ids are noted too.
    """

    def __init__(self, intents: IntentStore, lease: Callable[[], Lease], *, mirror: bool) -> None:
        self._intents = intents
        self._lease = lease
        self._mirror = mirror

    def in_windows(self, groups: Iterable[SendGroup], *, window: int) -> Iterator[SendGroup]:
        """``groups``, each window of about ``window`` profiles noted before any of it is handed on."""
        held: list[SendGroup] = []
        profiles = 0
        for group in groups:
            held.append(group)
            profiles += len(group.upserts) + len(group.removals)
            if profiles >= window:
                yield from self.note(held)
                held, profiles = [], 0
        yield from self.note(held)

    def note(self, held: list[SendGroup]) -> list[SendGroup]:
        """Note one window's ids in one append; the groups, marked noted."""
        per_group = [group.removals or group.upserts.noted_ids(new=self._mirror) for group in held]
        noted = [custom_id for ids in per_group for custom_id in ids]
        window = None
        if noted:
            note = self._intents.record_intents(self._lease(), noted)
            window = IntentWindow(note, outstanding=sum(1 for ids in per_group if ids))
        for group, ids in zip(held, per_group, strict=True):
            group.intents_noted = True
            if ids:
                group.intents = window
        return held
