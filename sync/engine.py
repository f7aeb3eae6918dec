"""One run of one activation: wires the stages, the journal, checkpoints and the run record.

    schema check → lease → compaction → load state → read + map + plan → guards
      → (mirror) intents + owned keys → send upserts → send removals → final flush
      → compact → meta → run record → release lease

The stages are pure (mapping, fingerprint, plan); the edges are injected: the source,
the state store, the Batch client and the clock. Guarantees kept here (ARCHITECTURE.md §3):

1. A fingerprint moves only in :meth:`_Journal.flush`, with entries built from
   acknowledged profiles only (202 and not listed in ``errors``).
3. A crash re-sends at most what was acknowledged since the last flush (every
   ``flush_every_profiles`` / ``flush_every_seconds``).
4. The lease is taken before state is read and every commit is fenced by its token.
5. Rejected rows are counted, sampled and never sent; a config error stops the run
   before the lease is taken and before any row is read.
7. In mirror mode, intents for new ids are durable before their first send.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from sync.batch.client import BatchClient, Endpoint, ProfileUpdate, SendOutcome, choose_endpoint
from sync.config import Activation, SyncMode, mapping_version
from sync.errors import GuardTripped, LeaseHeld, LeaseLost, SyncError, TransientError
from sync.mapping import ProfileMapper, resolve_attribute_types
from sync.model import ActivationMeta, JournalEntry, Lease, Reason, RowIssue
from sync.plan import PayloadSpool, Plan, PlannedSend, Planner, RejectedRow, evaluate_guards, plan_batch
from sync.runconfig import config_as_run
from sync.sources.base import Source
from sync.state.base import StateStore

log = structlog.get_logger("cepsync.engine")


class Clock:
    """Wall time for records and leases, monotonic time for budgets. Replaceable in tests."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class Progress(Protocol):
    """What the engine tells a UI (the CLI draws progress bars; the function logs)."""

    def rows_read(self, rows: int) -> None: ...
    def planned(self, plan: Plan) -> None: ...
    def sending(self, total: int, endpoint: str) -> None: ...
    def sent(self, acknowledged: int, rejected: int, failed: int) -> None: ...


class _NoProgress:
    def rows_read(self, rows: int) -> None:
        pass

    def planned(self, plan: Plan) -> None:
        pass

    def sending(self, total: int, endpoint: str) -> None:
        pass

    def sent(self, acknowledged: int, rejected: int, failed: int) -> None:
        pass


def new_run_id(clock: Clock) -> str:
    """Sortable run id: UTC timestamp then random suffix (``20261129T020304Z-3f9a1c``)."""
    return clock.now().strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class RunOptions:
    """Per-run switches, built by the entry point (CLI, Pub/Sub, HTTP)."""

    trigger: str = "cli"
    trigger_id: str | None = None
    full: bool = False
    allow_guards: tuple[str, ...] = ()
    lease_ttl_seconds: float = 300.0
    time_budget_seconds: float | None = None
    # Stop launching batches this long before the budget ends, to flush and hand over.
    budget_margin_seconds: float = 30.0
    owner: str = field(default_factory=default_owner)
    continuation_of: str | None = None


@dataclass
class RunResult:
    record: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.record["status"])

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    @property
    def needs_continuation(self) -> bool:
        return self.status == "incomplete"


# Exit codes (also documented in the README and `cepsync run --help`).
EXIT_CODES = {
    "succeeded": 0,
    "succeeded_with_rejections": 0,
    "planned": 0,
    "duplicate_trigger": 0,
    "failed": 1,
    "config_error": 2,
    "aborted_by_guard": 3,
    "auth_error": 4,
    "skipped_lease_held": 5,
    "partial": 6,
    "incomplete": 7,
    "interrupted": 130,
}


class _Journal:
    """Acknowledged outcomes waiting to be committed; flushed by count, by time, and at the end."""

    def __init__(self, store: StateStore, lease_box: list[Lease], activation: Activation, clock: Clock) -> None:
        self._store = store
        self._lease_box = lease_box
        self._every = activation.journal.flush_every_profiles
        self._seconds = activation.journal.flush_every_seconds
        self._clock = clock
        self._pending: list[JournalEntry] = []
        self._last_flush = clock.monotonic()
        self._lock = asyncio.Lock()
        self.flushes = 0
        self.committed = 0
        self.commit_seconds = 0.0
        self.on_flush: Callable[[], Awaitable[None]] | None = None

    def add(self, entries: Sequence[JournalEntry]) -> None:
        self._pending.extend(entries)

    def due(self) -> bool:
        return bool(self._pending) and (
            len(self._pending) >= self._every or self._clock.monotonic() - self._last_flush >= self._seconds
        )

    async def flush(self) -> None:
        async with self._lock:
            entries, self._pending = self._pending, []
            self._last_flush = self._clock.monotonic()
            if not entries:
                return
            started = time.perf_counter()
            lease = self._lease_box[0]
            await asyncio.to_thread(self._store.commit, lease, entries, self._clock.now())
            self.commit_seconds += time.perf_counter() - started
            self.flushes += 1
            self.committed += len(entries)
            if self.on_flush is not None:
                await self.on_flush()


class _Watermark:
    """The highest custom_id below which every batch was fully answered (sends are sorted by id).

    A continuation of a full pass skips ids at or below it: the send checkpoint. A batch
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


class Run:
    """Runs one activation once. Build with the edges, then ``await run.execute()``."""

    def __init__(
        self,
        activation: Activation,
        *,
        source: Source,
        store: StateStore,
        client: BatchClient | None,
        options: RunOptions | None = None,
        clock: Clock | None = None,
        progress: Progress | None = None,
        rejects: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.activation = activation
        # Every rejected row as a record (the run record keeps a sample): `cepsync run --rejects`.
        self.rejects = rejects
        self.source = source
        self.store = store
        self.client = client
        self.options = options or RunOptions()
        self.clock = clock or Clock()
        self.progress: Progress = progress or _NoProgress()
        self.run_id = new_run_id(self.clock)
        self._started_monotonic = self.clock.monotonic()
        self._lease_box: list[Lease] = []
        self._spool: PayloadSpool | None = None
        self._journal: _Journal | None = None
        self.log = log.bind(activation=activation.name, run_id=self.run_id)
        self.record: dict[str, Any] = {
            "run_id": self.run_id,
            "activation": activation.name,
            "trigger": {"kind": self.options.trigger, "id": self.options.trigger_id},
            "trigger_id": self.options.trigger_id,
            "continuation_of": self.options.continuation_of,
            "started_at": self.clock.now().isoformat(),
            "ended_at": None,
            "status": "running",
            "run_type": activation.run_type.value,
            "sync_mode": activation.sync_mode.value,
            "full": False,
            "endpoint": None,
            "mapping_version": None,
            "counts": {},
            "rejected_by_reason": {},
            "dropped_attributes_by_reason": {},
            "rejected_samples": [],
            "guards": [],
            "timings": {},
            "checkpoint": None,
            "source": {},
            "lease_token": None,
            "error": None,
            "config": config_as_run(activation),
        }

    # -- public --------------------------------------------------------------------------
    def prepare(self) -> tuple[ProfileMapper, str]:
        """Check the mapping against the source schema; raises ConfigError before any read."""
        schema = self.source.schema()
        types = resolve_attribute_types(self.activation, schema, source=self.activation.origin)
        return ProfileMapper(self.activation, types), mapping_version(self.activation)

    async def plan_only(self) -> tuple[Plan, dict[str, Any]]:
        """Dry run: read, map, plan and check guards. No lease, no send, no state change."""
        mapper, version = self.prepare()
        meta = self.store.load_meta(self.activation.name)
        plan = await self._build_plan(mapper, version, meta)
        verdicts = evaluate_guards(
            plan, self.activation.guards, sync_mode=self.activation.sync_mode, allow=self.options.allow_guards
        )
        self._fill_plan_record(plan, version, meta)
        self.record["guards"] = [v.as_record() for v in verdicts]
        self.record["status"] = "planned"
        self.record["ended_at"] = self.clock.now().isoformat()
        return plan, self.record

    async def execute(self) -> RunResult:
        """The whole run. Never raises for an expected failure: the run record says what happened."""
        try:
            mapper, version = self.prepare()
        except SyncError as error:
            return self._finish_early("config_error" if error.exit_code == 2 else "failed", error)
        if self.options.trigger_id:
            previous = self.store.find_run_by_trigger(self.activation.name, self.options.trigger_id)
            # A redelivery after a retryable failure must run again: that is why the function raised.
            if (
                previous is not None
                and previous.get("status") not in ("running", "skipped_lease_held", "abandoned")
                and not previous.get("retryable")
            ):
                self.record["duplicate_of"] = previous["run_id"]
                return self._finish_early("duplicate_trigger", None)
        try:
            lease = await asyncio.to_thread(
                self.store.acquire_lease,
                self.activation.name,
                self.options.owner,
                self.options.lease_ttl_seconds,
                self.clock.now(),
            )
        except LeaseHeld as error:
            self.log.info("lease held by another run; exiting", detail=str(error))
            return self._finish_early("skipped_lease_held", error)
        self._lease_box.append(lease)
        self.record["lease_token"] = lease.token
        self._close_abandoned_runs()
        self.store.save_run(self.record)
        renewer = asyncio.create_task(self._renew_lease_forever())
        try:
            await self._execute_under_lease(mapper, version)
        except GuardTripped as error:
            self.record["status"] = "aborted_by_guard"
            self.record["error"] = str(error)
        except asyncio.CancelledError:
            # Ctrl-C, SIGTERM, or a caller cancelling us: keep what Batch acknowledged.
            self.record["status"] = "interrupted"
            self.record["error"] = (
                "interrupted: profiles Batch acknowledged so far were committed; the next run goes on"
            )
            if self._journal is not None:
                try:
                    await self._journal.flush()
                except Exception as error:  # the state store itself may be what failed
                    self.record["error"] += f" (final commit failed: {error})"
            raise
        except SyncError as error:
            self.record["status"] = "auth_error" if error.exit_code == 4 else "failed"
            self.record["error"] = str(error)
            self.record["retryable"] = isinstance(error, TransientError)
            self.log.error("run failed", error=str(error))
        except Exception as error:
            # Unknown (a warehouse or state-store outage, say): a retry may succeed.
            self.record["status"] = "failed"
            self.record["retryable"] = True
            self.record["error"] = f"unexpected {type(error).__name__}: {error}"
            self.log.exception("run failed unexpectedly")
        finally:
            if self._spool is not None:
                self._spool.close()
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            self.record["ended_at"] = self.clock.now().isoformat()
            self.record["timings"]["total_seconds"] = round(self.clock.monotonic() - self._started_monotonic, 3)
            self.store.save_run(self.record)
            with contextlib.suppress(SyncError):  # lost already: nothing to release
                self.store.release_lease(self._lease_box[0])
        self.log.info("run finished", status=self.record["status"], counts=self.record["counts"])
        return RunResult(self.record)

    # -- stages ----------------------------------------------------------------------------
    async def _build_plan(self, mapper: ProfileMapper, version: str, meta: ActivationMeta) -> Plan:
        activation = self.activation
        stored = await asyncio.to_thread(self.store.load_fingerprints, activation.name)
        intents = (
            await asyncio.to_thread(self.store.load_intents, activation.name)
            if activation.sync_mode is SyncMode.MIRROR
            else set()
        )
        full = self.options.full
        if meta.continuation and meta.continuation.get("full"):
            full = True  # a continued full pass stays full
        planner = Planner(
            run_type=activation.run_type,
            sync_mode=activation.sync_mode,
            full=full,
            stored=stored,
            intents=intents,
            on_reject=None if self.rejects is None else self._reject_row,
        )
        columns = mapper.columns
        id_column = activation.mapping.custom_id
        progress = self.progress

        def read_and_plan() -> Plan:
            started = time.perf_counter()
            rows_before = 0
            for batch in self.source.read_batches(columns):
                plan_batch(
                    planner,
                    mapper,
                    batch,
                    columns=columns,
                    id_column=id_column,
                    mapping_version=version,
                    first_row_number=rows_before + 1,
                )
                rows_before += batch.num_rows
                progress.rows_read(batch.num_rows)
            plan = planner.finish()
            self.record["timings"]["read_and_plan_seconds"] = round(time.perf_counter() - started, 3)
            return plan

        plan = await asyncio.to_thread(read_and_plan)
        self._spool = plan.spool
        self.record["source"] = self.source.stats()
        progress.planned(plan)
        return plan

    def _fill_plan_record(self, plan: Plan, version: str, meta: ActivationMeta) -> None:
        self.record["full"] = plan.full
        self.record["mapping_version"] = {
            "current": version,
            "previous": meta.mapping_version,
            "changed": meta.mapping_version is not None and meta.mapping_version != version,
        }
        if self.record["mapping_version"]["changed"]:
            self.record["mapping_version"]["explanation"] = (
                f"the mapping changed since the last successful run ({meta.mapping_version} → {version}): every row "
                f"was mapped again; {plan.counts['changed']} profiles whose payload differs are resent, the others "
                "are unchanged"
            )
        self.record["counts"] = dict(plan.summary())
        self.record["rejected_by_reason"] = dict(plan.rejected_by_reason)
        self.record["dropped_attributes_by_reason"] = dict(plan.dropped_by_reason)
        self.record["rejected_samples"] = [sample.as_record() for sample in plan.rejected_samples]

    async def _execute_under_lease(self, mapper: ProfileMapper, version: str) -> None:
        activation = self.activation
        lease = self._lease_box[0]
        await asyncio.to_thread(self.store.compact, lease, self.clock.now())  # recover a crashed run's journal
        meta = self.store.load_meta(activation.name)
        plan = await self._build_plan(mapper, version, meta)
        self._fill_plan_record(plan, version, meta)
        self.log.info("plan ready", **plan.summary())

        verdicts = evaluate_guards(
            plan, activation.guards, sync_mode=activation.sync_mode, allow=self.options.allow_guards
        )
        self.record["guards"] = [v.as_record() for v in verdicts]
        tripped = [v for v in verdicts if v.tripped and not v.overridden]
        if tripped:
            names = ", ".join(v.name for v in tripped)
            raise GuardTripped(
                f"activation '{activation.name}': guard(s) {names} tripped, nothing was sent: "
                + "; ".join(v.detail for v in tripped)
                + f". To proceed once, rerun with --allow {tripped[0].name}."
            )

        sends = plan.sends
        continuation = meta.continuation
        if continuation and continuation.get("watermark") and plan.full:
            watermark = continuation["watermark"]
            skipped = sum(1 for s in sends if s.custom_id <= watermark)
            sends = [s for s in sends if s.custom_id > watermark]
            self.record["counts"]["skipped_by_checkpoint"] = skipped

        # Mirror: own what we may send (guarantee 7), durably, before the first send.
        owned = set(meta.owned_keys) | set(mapper.owned_keys)
        if activation.sync_mode is SyncMode.MIRROR and plan.new_ids:
            for start in range(0, len(plan.new_ids), 5_000):
                await asyncio.to_thread(self.store.record_intents, lease, plan.new_ids[start : start + 5_000])
        if owned != meta.owned_keys:
            meta.owned_keys = owned
            await asyncio.to_thread(self.store.save_meta, lease, meta)

        journal = self._journal = _Journal(self.store, self._lease_box, activation, self.clock)
        counts = self.record["counts"]
        counts.update({"sent": 0, "acknowledged": 0, "rejected_by_batch": 0, "failed": 0})
        samples: list[dict[str, Any]] = self.record["rejected_samples"]
        total = len(sends) + len(plan.removals)
        endpoint = choose_endpoint(activation.destination.endpoint, total, activation.destination.mass_update_threshold)
        self.record["endpoint"] = endpoint.value
        watermark = _Watermark()
        incomplete = False
        wire = wait = 0.0
        cleared: list[str] = []
        acknowledged_new: list[str] = []
        new_ids = set(plan.new_ids) if activation.sync_mode is SyncMode.MIRROR else set()
        failures: list[str] = []

        async def checkpoint() -> None:
            # The run record follows each commit, so a killed run still shows how far it got.
            self.record["checkpoint"] = {
                "at": self.clock.now().isoformat(),
                "acknowledged": counts["acknowledged"],
                "committed": journal.committed,
                "watermark": watermark.value,
            }
            snapshot = copy.deepcopy(self.record)
            await asyncio.to_thread(self.store.save_run, snapshot)

        journal.on_flush = checkpoint

        def absorb(outcome: SendOutcome, fingerprints: dict[str, Any], removal: bool) -> None:
            nonlocal wire, wait
            wire += outcome.wire_seconds
            wait += outcome.wait_seconds
            counts["acknowledged"] += len(outcome.acknowledged)
            counts["rejected_by_batch"] += len(outcome.rejected)
            counts["failed"] += len(outcome.failed)
            if outcome.failure and len(failures) < 5:
                failures.append(outcome.failure)
            if removal:
                journal.add([JournalEntry(custom_id, None) for custom_id in outcome.acknowledged])
                cleared.extend(outcome.acknowledged)
            else:
                journal.add([JournalEntry(custom_id, fingerprints[custom_id]) for custom_id in outcome.acknowledged])
                if new_ids:
                    acknowledged_new.extend(c for c in outcome.acknowledged if c in new_ids)
            for rejection in outcome.rejected:
                by_reason = self.record["rejected_by_reason"]
                by_reason[Reason.BATCH_REJECTED.value] = by_reason.get(Reason.BATCH_REJECTED.value, 0) + 1
                issue = RowIssue(
                    rejection.attribute or "(profile)", Reason.BATCH_REJECTED, f"Batch: {rejection.reason}"
                )
                refused = RejectedRow(None, rejection.custom_id, (issue,))
                if self.rejects is not None:
                    self._reject_row(refused)
                if len(samples) < 100:
                    samples.append(refused.as_record())
            self.progress.sent(len(outcome.acknowledged), len(outcome.rejected), len(outcome.failed))

        started_send = time.perf_counter()
        if total:
            assert self.client is not None, "a run that sends needs a Batch client"
            self.progress.sending(total, endpoint.value)
            async with self.client:
                removal_payload = {key: None for key in sorted(owned)}
                batches: list[tuple[list[PlannedSend] | None, list[str] | None]] = []
                size = endpoint.send_batch
                for start in range(0, len(sends), size):
                    batches.append((sends[start : start + size], None))
                for start in range(0, len(plan.removals), size):
                    batches.append((None, plan.removals[start : start + size]))
                incomplete = await self._send_all(
                    batches, endpoint, plan, removal_payload, journal, watermark, absorb, counts
                )
        # Commit what was acknowledged, then the raw-hash refreshes (payload equal: nothing to send).
        await journal.flush()
        if plan.refreshes and not incomplete:
            for start in range(0, len(plan.refreshes), 10_000):
                journal.add(plan.refreshes[start : start + 10_000])
                await journal.flush()
        # Intents are no longer needed once an id is fingerprinted (acknowledged) or cleared.
        if cleared or acknowledged_new:
            await asyncio.to_thread(self.store.clear_intents, self._lease_box[0], cleared + acknowledged_new)
        await asyncio.to_thread(self.store.compact, self._lease_box[0], self.clock.now())

        timings = self.record["timings"]
        timings["send_seconds"] = round(time.perf_counter() - started_send, 3)
        timings["wire_seconds"] = round(wire, 3)
        timings["wait_seconds"] = round(wait, 3)
        timings["commit_seconds"] = round(journal.commit_seconds, 3)
        self.record["journal"] = {"flushes": journal.flushes, "committed": journal.committed}
        if failures:
            self.record["error"] = "; ".join(failures)

        # `meta` was read under this lease and nobody else writes it meanwhile: no second read.
        if incomplete:
            meta.continuation = {
                "run_id": self.options.continuation_of or self.run_id,
                "full": plan.full,
                "watermark": watermark.value,
            }
            self.record["status"] = "incomplete"
        else:
            meta.continuation = None
            meta.mapping_version = version
            if counts["failed"]:
                self.record["status"] = "partial"
            else:
                meta.last_success_run_id = self.run_id
                rejected = counts["rejected"] + counts["rejected_by_batch"]
                self.record["status"] = "succeeded_with_rejections" if rejected else "succeeded"
        await asyncio.to_thread(self.store.save_meta, self._lease_box[0], meta)

    async def _send_all(
        self,
        batches: list[tuple[list[PlannedSend] | None, list[str] | None]],
        endpoint: Endpoint,
        plan: Plan,
        removal_payload: dict[str, Any],
        journal: _Journal,
        watermark: _Watermark,
        absorb: Callable[[SendOutcome, dict[str, Any], bool], None],
        counts: dict[str, Any],
    ) -> bool:
        """Send every batch under the concurrency limit; True if the time budget cut it short."""
        assert self.client is not None
        client = self.client
        semaphore = asyncio.Semaphore(self.activation.destination.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        errors: list[BaseException] = []
        incomplete = False

        async def send_one(index: int, upserts: list[PlannedSend] | None, removals: list[str] | None) -> None:
            try:
                if upserts is not None:
                    profiles = [ProfileUpdate(s.custom_id, plan.spool.read(s.offset, s.length)) for s in upserts]
                    fingerprints: dict[str, Any] = {s.custom_id: s.fingerprint for s in upserts}
                else:
                    assert removals is not None
                    profiles = [ProfileUpdate(custom_id, removal_payload) for custom_id in removals]
                    fingerprints = {}
                counts["sent"] += len(profiles)
                outcome = await client.send(endpoint, profiles, deadline=self._deadline())
                absorb(outcome, fingerprints, upserts is None)
                if upserts is not None:
                    watermark.complete(index, upserts[-1].custom_id, clean=not outcome.failed)
                if journal.due():
                    await journal.flush()
            finally:
                semaphore.release()

        def on_done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())  # type: ignore[arg-type]  # checked just above

        for index, (upserts, removals) in enumerate(batches):
            await semaphore.acquire()
            if errors:
                semaphore.release()
                break
            if self._budget_exhausted():
                semaphore.release()
                incomplete = True
                self.log.warning("time budget nearly spent: handing over to a continuation", batch=index)
                break
            task = asyncio.create_task(send_one(index, upserts, removals))
            tasks.add(task)
            task.add_done_callback(on_done)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if errors:
            # Commit what was acknowledged before the fatal error, then report it.
            await journal.flush()
            raise errors[0]
        return incomplete

    def _reject_row(self, rejected: RejectedRow) -> None:
        assert self.rejects is not None
        self.rejects({"run_id": self.run_id, "activation": self.activation.name, **rejected.as_record()})

    def _close_abandoned_runs(self) -> None:
        """Runs still marked running once we hold the lease were killed or timed out: say so."""
        for record in self.store.list_runs(self.activation.name, 20):
            if record.get("status") == "running" and record["run_id"] != self.run_id:
                record["status"] = "abandoned"
                record["error"] = (
                    "the run stopped without finishing (process killed or timed out); what it committed up to "
                    "its last checkpoint is kept, the rest was planned again by the next run"
                )
                record["abandoned_noticed_by"] = self.run_id
                self.store.save_run(record)

    # -- time ------------------------------------------------------------------------------
    def _budget_exhausted(self) -> bool:
        budget = self.options.time_budget_seconds
        if budget is None:
            return False
        elapsed = self.clock.monotonic() - self._started_monotonic
        return elapsed >= budget - self.options.budget_margin_seconds

    def _deadline(self) -> float:
        """No request may keep retrying past the time budget or the lease expiry."""
        lease = self._lease_box[0]
        lease_left = (lease.expires_at - self.clock.now()).total_seconds()
        # Keep a margin before expiry (the renewer extends the lease every ttl/3).
        margin = min(5.0, self.options.lease_ttl_seconds * 0.25)
        deadline = self.clock.monotonic() + max(lease_left - margin, 0.0)
        budget = self.options.time_budget_seconds
        if budget is not None:
            deadline = min(deadline, self._started_monotonic + budget - self.options.budget_margin_seconds / 2)
        return deadline

    async def _renew_lease_forever(self) -> None:
        ttl = self.options.lease_ttl_seconds
        while True:
            await asyncio.sleep(max(ttl / 3, 0.05))
            try:
                renewed = await asyncio.to_thread(self.store.renew_lease, self._lease_box[0], ttl, self.clock.now())
            except LeaseLost:
                self.log.error("lease lost: another run took over; no further commit will succeed")
                return
            self._lease_box[0] = renewed

    def _finish_early(self, status: str, error: BaseException | None) -> RunResult:
        self.record["status"] = status
        self.record["error"] = str(error) if error else None
        self.record["ended_at"] = self.clock.now().isoformat()
        if status == "skipped_lease_held":  # visible in history; config errors never got this far
            self.store.save_run(self.record)
        return RunResult(self.record)
