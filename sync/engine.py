"""One run of one activation, as a straight line of stages (``docs/how-a-run-works.md``):

    prepare → lease → recover → scan → plan moved rows → guards → claim
      → stream (read → diff → map → send, in one pipeline) → removals → settle → finish

The stages are pure (:mod:`sync.diff` in DuckDB, :mod:`sync.mapping`, :mod:`sync.plan`);
the edges are injected: the source, the state store, the Batch client and the clock.
Guarantees kept here (the numbers are those of the README's table):

1. A fingerprint moves only through the journal (:class:`sync.send.Journal`), fed by
   acknowledged profiles only.
3. A crash re-sends at most what was acknowledged since the last journal flush.
4. The lease is taken before state is read and every commit is fenced by its token.
5. Rejected rows are counted, sampled and never sent; a config error stops the run before
   the lease is taken and before any row is read.
7. In mirror mode, a new id's intent is durable before the request that creates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from sync.batch.client import BatchClient, SendOutcome, choose_endpoint
from sync.batch.endpoint import Endpoint
from sync.config import Activation, AttributeType, DiffMode, RunType, SyncMode, mapping_version
from sync.diff import SegmentDiff, raw_salt
from sync.differ import KEY, IdScan
from sync.encode import encode_batch
from sync.errors import GuardTripped, LeaseHeld, LeaseLost, SyncError
from sync.fingerprint import payload_fingerprint_of
from sync.mapping import ProfileMapper, resolve_attribute_types
from sync.memory import release_free_memory, tune_allocators
from sync.model import NO_ATTRIBUTE, PERSISTENT_AFTER_RUNS, ActivationMeta, Lease, Reason, Refusal, RowIssue
from sync.plan import (
    REJECTED_SAMPLE_SIZE,
    BatchPlan,
    PlanCounts,
    ProfileRows,
    RejectedRow,
    evaluate_guards,
    plan_rows,
    remembered_issue,
)
from sync.record import EXIT_CODES, RunRecord, RunStatus, StageTimings, exit_code_of, is_retryable, status_of_error
from sync.results import hook as results_hook
from sync.runconfig import config_as_run
from sync.send import IntentWindow, Journal, Sender, SendGroup, removal_body
from sync.sources.base import Source
from sync.state.base import StateStore, operation_counts, operations_between
from sync.warehouse import hook as warehouse
from sync.workers import AUTO_POOL_MIN_ROWS, MappingPool, auto_workers

if TYPE_CHECKING:
    from sync.warehouse.diff import WarehouseDiff

__all__ = ["EXIT_CODES", "Clock", "PlanPreview", "Progress", "Run", "RunOptions", "RunResult"]

log = structlog.get_logger("cepsync.engine")

# Batch refusals kept verbatim in the run record (after the planning sample).
BATCH_REJECTED_SAMPLE_SIZE = 100
# Counts every run that sends starts at 0 (docs/run-record.md): what became of each profile
# sent, and what Batch's per-item errors came to.
SEND_COUNTS: Final = (
    "sent",
    "acknowledged",
    "rejected_by_batch",
    "failed",
    "item_errors_retried",
    "failed_by_item_error",
    "persistent",
)
# Plan counts of payloads not sent again because Batch did not apply them before.
REMEMBERED_COUNTS: Final = ("refused_unchanged", "persistent_unchanged")
# Mapped send groups waiting for a free request slot. The slots themselves (`concurrency`
# requests, most of them waiting for the rate limiter's next token) are the buffer against
# Batch's pace; the mapping thread works one group ahead of them. A mass-update group holds
# ~3 MB of bodies, so every group queued per slot cost ~12 MB at the peak of a 1M full load
# for the same wall time (docs/how-a-run-works.md, "Memory").
QUEUED_GROUPS: Final = 1
# Rows mapped between two hand-backs of freed memory to the OS (sync/memory.py).
TRIM_EVERY_ROWS = 50_000
# Intents are noted for this many profiles of send groups at once (at least one group): one
# state append per 2,000 profiles on /update, one per request on mass-update. Not the flush
# window: a large one would hold the first request back.
INTENT_WINDOW_PROFILES: Final = 2_000
# The run record is saved with the checkpoint at most this often (seconds; one document).
CHECKPOINT_RECORD_SECONDS: Final = 5.0


class Clock:
    """Wall time for records and leases, monotonic time for budgets. Replaceable in tests."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class Progress(Protocol):
    """What the engine tells a UI (the CLI draws progress bars; the function logs)."""

    def rows_read(self, rows: int) -> None: ...
    def planned(self, counts: dict[str, int]) -> None: ...
    def sending(self, total: int, endpoint: str) -> None: ...
    def sent(self, acknowledged: int, rejected: int, failed: int) -> None: ...


class _NoProgress:
    def rows_read(self, rows: int) -> None:
        pass

    def planned(self, counts: dict[str, int]) -> None:
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
    # Stop launching requests this long before the budget ends, to flush and hand over.
    budget_margin_seconds: float = 30.0
    owner: str = field(default_factory=default_owner)
    continuation_of: str | None = None
    # HTTP triggers: a request sent again with the same key runs again unless the run it
    # started succeeded (docs/function.md, "Idempotency"). Pub/Sub redeliveries keep the rule
    # of _duplicate_trigger: any ended run that is not a retryable failure is a duplicate.
    rerun_unless_succeeded: bool = False
    # Worker processes that map batches (sync.workers). None: as many as the machine spares
    # for large runs (none on two cores or fewer); 0: map in the pipeline's own thread.
    map_workers: int | None = None


@dataclass
class RunResult:
    record: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.record["status"])

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.status)

    @property
    def needs_continuation(self) -> bool:
        return self.status == RunStatus.INCOMPLETE.value


@dataclass
class PlanPreview:
    """A dry run's outcome: the record plus a sample of what would be sent and cleared."""

    record: dict[str, Any]
    sample_changes: list[dict[str, Any]]
    sample_removals: list[str]


@dataclass
class _Prepared:
    mapper: ProfileMapper
    version: str
    schema: pa.Schema
    types: dict[str, AttributeType]


@dataclass
class _Scan:
    """What the state and one read of the id column say, before any row is mapped."""

    diff: SegmentDiff | WarehouseDiff
    ids: IdScan
    meta: ActivationMeta
    full: bool  # every valid row is sent (FULL ONLY, --full, or a continued full pass)
    watermark: str | None  # a continued full pass skips ids at or below it
    version: str  # the mapping version (prepare computed it)
    # Intents an earlier run left unsettled (a crash, failed requests): usually none.
    stale_intents: frozenset[str] = frozenset()


@dataclass
class _Moved:
    """Rows with a stored fingerprint whose raw values moved, mapped before the first send."""

    sends: ProfileRows
    refreshes: ProfileRows
    tally: PlanCounts


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
        self._started_perf = time.perf_counter()
        self._lease: Lease | None = None
        self._journal: Journal | None = None
        self._stages = StageTimings()
        self._reject_lock = threading.Lock()
        self._stop = threading.Event()
        # Rows Batch refused, by reason (added to the planning's rejections in the record).
        self._refused: dict[str, int] = {}
        # What Batch did not apply in earlier runs (by custom_id: refusals of the value, and
        # per-item errors with their count of runs in a row), and the ids Batch acknowledged
        # a payload for in this run (their entry is forgotten).
        self._refusals: dict[str, Refusal] = {}
        self._refusals_cleared: list[str] = []
        # Removals held back because Batch refused that very clearing payload before, by count name.
        self._held_removals: dict[str, int] = {}
        self.log = log.bind(activation=activation.name, run_id=self.run_id)
        self.run = RunRecord(
            run_id=self.run_id,
            activation=activation.name,
            started_at=self.clock.now().isoformat(),
            run_type=activation.run_type.value,
            sync_mode=activation.sync_mode.value,
            trigger={"kind": self.options.trigger, "id": self.options.trigger_id},
            trigger_id=self.options.trigger_id,
            continuation_of=self.options.continuation_of,
            config=config_as_run(activation),
            allow=list(self.options.allow_guards),
        )

    @property
    def record(self) -> dict[str, Any]:
        """The run record as stored (a snapshot)."""
        return self.run.to_dict()

    # -- public --------------------------------------------------------------------------
    def prepare(self) -> _Prepared:
        """Check the mapping against the source schema; raises ConfigError before any read."""
        schema = self.source.schema()
        self.store = warehouse.warehouse_store(self.activation, self.store)  # diff: warehouse: BigQuery state
        types = resolve_attribute_types(self.activation, schema, source=self.activation.origin)
        return _Prepared(ProfileMapper(self.activation, types), mapping_version(self.activation), schema, types)

    async def plan_only(self, *, sample: int = 5) -> PlanPreview:
        """Dry run: read, diff, map and check guards. No lease, no send, no state change."""
        tune_allocators()
        prepared = self.prepare()
        meta = self.store.load_meta(self.activation.name)
        scan = await self._scan(prepared, meta)
        changes: list[dict[str, Any]] = []
        try:
            moved = await asyncio.to_thread(self._plan_moved, prepared, scan)
            self._check_guards(scan, moved, raise_on_trip=False)
            tally = PlanCounts()
            tally.add(moved.tally if not scan.full else PlanCounts())

            def preview() -> None:
                for group in self._produce_sends(prepared, scan, moved, tally, group_size=sample or 1):
                    for send in group.upserts:
                        if len(changes) < sample:
                            attributes = json.loads(send.body)
                            changes.append(
                                {"custom_id": send.custom_id, "kind": send.kind.value, "attributes": attributes}
                            )

            await asyncio.to_thread(preview)
            self._fill_counts(scan, moved, tally)
        finally:
            scan.diff.close()
        self.run.status = RunStatus.PLANNED
        self.run.ended_at = self.clock.now().isoformat()
        self.run.timings["stages"] = self._stages.as_dict()
        return PlanPreview(self.record, changes, scan.ids.removed[:sample])

    async def execute(self) -> RunResult:
        """The whole run. Never raises for an expected failure: the run record says what happened."""
        tune_allocators()
        try:
            prepared = self.prepare()
        except SyncError as error:
            return self._finish_early(status_of_error(error), error)
        ops_before = operation_counts(self.store)
        duplicate = self._duplicate_trigger()
        if duplicate is not None:
            self.run.duplicate_of = duplicate
            return self._finish_early(RunStatus.DUPLICATE_TRIGGER, None)
        try:
            self._lease = await asyncio.to_thread(
                self.store.acquire_lease,
                self.activation.name,
                self.options.owner,
                self.options.lease_ttl_seconds,
                self.clock.now(),
            )
        except LeaseHeld as error:
            self.log.info("lease held by another run; exiting", detail=str(error))
            return self._finish_early(RunStatus.SKIPPED_LEASE_HELD, error)
        self.run.lease_token = self._lease.token
        # The results tables (docs/results.md): None unless the activation has `results:`.
        results = results_hook.collector(self.activation, self.run)
        if results is not None:
            self.rejects = results.tee(self.rejects)
        # Renewed from now on: what follows talks to the state store, which can take a while
        # (a remote Firestore), and a short lease must not expire meanwhile.
        renewer = asyncio.create_task(self._renew_lease_forever())
        try:
            await asyncio.to_thread(self._close_abandoned_runs)
            await asyncio.to_thread(self.store.save_run, self.record)
            await self._under_lease(prepared)
        except GuardTripped as error:
            self.run.status = RunStatus.ABORTED_BY_GUARD
            self.run.error = str(error)
        except asyncio.CancelledError:
            # Ctrl-C, SIGTERM, or a caller cancelling us: keep what Batch acknowledged.
            self._stop.set()
            self.run.status = RunStatus.INTERRUPTED
            self.run.error = "interrupted: profiles Batch acknowledged so far were committed; the next run goes on"
            if self._journal is not None:
                try:
                    await self._journal.flush()
                except Exception as error:  # the state store itself may be what failed
                    self.run.error += f" (final commit failed: {error})"
            raise
        except SyncError as error:
            self._stop.set()
            # Classified by family (sync/record.py): a config error found mid-run (a Custom ID
            # column of a type no id can have) is config_error, like one found before it.
            self.run.status = status_of_error(error)
            self.run.error = str(error)
            self.run.retryable = is_retryable(error)
            self.log.error("run failed", error=str(error))
        except Exception as error:
            # Unknown (a warehouse or state-store outage, say): a retry may succeed.
            self._stop.set()
            self.run.status = RunStatus.FAILED
            self.run.retryable = True
            self.run.error = f"unexpected {type(error).__name__}: {error}"
            self.log.exception("run failed unexpectedly")
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            self.run.ended_at = self.clock.now().isoformat()
            self.run.timings["total_seconds"] = round(self.clock.monotonic() - self._started_monotonic, 3)
            self.run.timings["stages"] = self._stages.as_dict()
            self.run.extra.update(warehouse.costs(self.store))
            self.run.state_ops = operations_between(self.store, ops_before)
            self.store.save_run(self.record)
            with contextlib.suppress(SyncError):  # lost already: nothing to release
                self.store.release_lease(self._lease)
        self.log.info("run finished", status=self.run.status.value, counts=self.run.counts)
        if results is not None:  # after the commit and the lease's release; records its own failure
            await asyncio.to_thread(results.finish, self.run, self.store, self.source)
        return RunResult(self.record)

    # -- stages ----------------------------------------------------------------------------
    async def _under_lease(self, prepared: _Prepared) -> None:
        lease = self._current_lease()
        await asyncio.to_thread(self.store.compact, lease, self.clock.now())  # recover a crashed run's journal
        meta = await asyncio.to_thread(self.store.load_meta, self.activation.name)
        scan = await self._scan(prepared, meta)
        try:
            moved = await asyncio.to_thread(self._plan_moved, prepared, scan)
            release_free_memory()
            self._check_guards(scan, moved, raise_on_trip=True)
            await self._claim(prepared, scan)
            tally = PlanCounts()
            if not scan.full:
                tally.add(moved.tally)
            sender = await self._stream(prepared, scan, moved, tally)
            # The differ (and the stored fingerprints it holds) is done before the state is
            # compacted, so the two never take memory at the same time.
            scan.diff.close()
            release_free_memory()
            await self._settle(scan, moved, sender)
        finally:
            scan.diff.close()
            release_free_memory()
        self._finish(prepared, scan, sender)
        await asyncio.to_thread(self.store.save_meta, self._current_lease(), scan.meta)

    async def _scan(self, prepared: _Prepared, meta: ActivationMeta) -> _Scan:
        """Load the state as arrays and read the id column: counts, duplicates, removals."""
        activation = self.activation
        mirror = activation.sync_mode is SyncMode.MIRROR
        # Intents an earlier run noted and never settled: ids it may have sent without a
        # committed acknowledgement. Mirror mode owns them; in both modes, what Batch holds
        # for them may differ from their stored fingerprint (docs/how-state-is-kept.md).
        intents = await asyncio.to_thread(self.store.load_intents, activation.name)
        if intents:
            self.run.counts["unconfirmed"] = len(intents)
        self._refusals = await asyncio.to_thread(self.store.load_refusals, activation.name)
        continuation = meta.continuation or {}
        full = self.options.full or activation.run_type is RunType.FULL_ONLY or bool(continuation.get("full"))
        watermark = continuation.get("watermark") if full else None
        engine = self.source.engine
        salt = raw_salt(prepared.version, prepared.schema, prepared.mapper.columns, engine)
        if activation.diff.mode is DiffMode.WAREHOUSE:
            diff: SegmentDiff | WarehouseDiff = warehouse.open_diff(
                activation,
                self.store,
                columns=prepared.mapper.columns,
                schema=prepared.schema,
                mapping_version=prepared.version,
                intents=sorted(intents) if mirror else (),
                unconfirmed=sorted(intents),
                on_rows=self.progress.rows_read,
            )
        else:
            stored = await asyncio.to_thread(self.store.load_fingerprint_table, activation.name)
            diff = SegmentDiff(
                self.source,
                columns=prepared.mapper.columns,
                schema=prepared.schema,
                stored=stored,
                intents=sorted(intents) if mirror else (),
                unconfirmed=sorted(intents),
                salt=salt,
                on_rows=self.progress.rows_read,
                after=str(watermark) if watermark else None,
            )
        try:
            ids = await asyncio.to_thread(diff.scan_ids)
        except BaseException:
            diff.close()
            raise
        release_free_memory()  # the id scan's hash tables are gone; so is their memory
        if activation.sync_mode is not SyncMode.MIRROR:
            ids.removed = []
        elif ids.removed and self._refusals and not self.options.full:
            ids.removed = self._hold_refused_removals(ids.removed, meta)
        self.run.full = full
        self.run.source = self.source.stats()
        self.progress.planned({"rows": ids.rows})
        return _Scan(diff, ids, meta, full, str(watermark) if watermark else None, prepared.version, frozenset(intents))

    def _hold_refused_removals(self, removed: list[str], meta: ActivationMeta) -> list[str]:
        """``removed`` without the ids whose clearing payload Batch refused before (listed, counted).

        A refused removal is remembered like a refused upsert (:meth:`Sender._remember`): by
        the removal payload's fingerprint, so a change of the owned keys sends it again, and
        ``--full`` does too.
        """
        payload = payload_fingerprint_of(removal_body(meta.owned_keys))
        kept: list[str] = []
        for custom_id in removed:
            prior = self._refusals.get(custom_id)
            if prior is None or not prior.remembered or prior.payload != payload:
                kept.append(custom_id)
                continue
            name = "persistent_unchanged" if prior.persistent else "refused_unchanged"
            self._held_removals[name] = self._held_removals.get(name, 0) + 1
            self._note_batch_issue(custom_id, remembered_issue(prior), listed=True)
        return kept

    def _plan_moved(self, prepared: _Prepared, scan: _Scan) -> _Moved:
        """Map the rows whose stored fingerprint may have changed: the changed count is exact."""
        tally = PlanCounts()
        sends: list[ProfileRows] = []
        refreshes: list[ProfileRows] = []
        for batch in scan.diff.moved_rows():
            planned = self._map_and_plan(prepared, scan, batch, full=False)
            tally.add(planned.tally)
            if not scan.full:
                sends.append(planned.sends)
                refreshes.append(planned.refreshes)
                self._keep_rejected(planned)
        return _Moved(ProfileRows.concat(sends), ProfileRows.concat(refreshes), tally)

    def _map_and_plan(self, prepared: _Prepared, scan: _Scan, batch: pa.RecordBatch, *, full: bool) -> BatchPlan:
        started = time.perf_counter()
        encoded = encode_batch(prepared.mapper.convert_batch(batch))
        planned = plan_rows(
            batch,
            encoded,
            full=full,
            duplicates=scan.ids.duplicates,
            id_column=self.activation.mapping.custom_id,
            payload_keys=prepared.mapper.payload_keys,
            # --full (or a full message) is the way to send refused payloads again anyway.
            refused=None if self.options.full else self._refusals,
        )
        self._stages.map += time.perf_counter() - started
        return planned

    def _check_guards(self, scan: _Scan, moved: _Moved, *, raise_on_trip: bool) -> None:
        activation = self.activation
        counts = {"rows": scan.ids.rows, "removed": len(scan.ids.removed), "changed": moved.tally.counts["changed"]}
        verdicts = evaluate_guards(
            counts,
            activation.guards,
            synced_before=scan.ids.synced,
            sync_mode=activation.sync_mode,
            allow=self.options.allow_guards,
        )
        self.run.guards = [v.as_record() for v in verdicts]
        if scan.ids.rows == 0 and scan.ids.synced == 0 and not self.run.warnings:
            # The empty-segment guard protects synced profiles; here there are none, so an
            # empty first run is allowed (a new segment may be empty) but never silent.
            warning = (
                "the segment returned no rows and this activation has synced nothing yet: check source.query "
                "(or source.table) if profiles were expected"
            )
            self.run.warnings.append(warning)
            self.log.warning("empty segment on a first run", detail=warning)
        tripped = [v for v in verdicts if v.tripped and not v.overridden]
        if tripped and raise_on_trip:
            self._fill_counts(scan, moved, moved.tally)
            names = ", ".join(v.name for v in tripped)
            if self.options.trigger == "cli":
                approve = "rerun with " + " ".join(f"--allow {v.name}" for v in tripped)
            else:  # the deployed function: its message carries the approval
                message = {"activation": activation.name, "allow": [v.name for v in tripped]}
                approve = f"send the function the message {json.dumps(message)}"
            raise GuardTripped(
                f"activation '{activation.name}': guard(s) {names} tripped, nothing was sent: "
                + "; ".join(v.detail for v in tripped)
                + f". To proceed once, {approve}."
            )

    async def _claim(self, prepared: _Prepared, scan: _Scan) -> None:
        """Own the keys this mapping writes (mirror clears exactly those), before any send."""
        owned = set(scan.meta.owned_keys) | set(prepared.mapper.owned_keys)
        if owned != scan.meta.owned_keys:
            scan.meta.owned_keys = owned
            await asyncio.to_thread(self.store.save_meta, self._current_lease(), scan.meta)

    def _produce_sends(
        self, prepared: _Prepared, scan: _Scan, moved: _Moved, tally: PlanCounts, *, group_size: int
    ) -> Iterator[SendGroup]:
        """Read, diff, map and plan the rows to send, one group (one request) at a time.

        Runs in a worker thread: DuckDB and Arrow release the GIL, the mapping does not.
        """
        pending = moved.sends
        pool = self._mapping_pool(prepared, scan)
        try:
            if pool is None:
                planned_batches: Iterator[BatchPlan] = (
                    self._map_and_plan(prepared, scan, batch, full=scan.full) for batch in self._batches_to_send(scan)
                )
            else:
                planned_batches = self._timed(pool.map_in_order(self._batches_to_send(scan), full=scan.full))
            rows_since_trim = 0
            for planned in planned_batches:
                rows_since_trim += len(planned.sends) + len(planned.refreshes) + len(planned.rejected)
                if rows_since_trim >= TRIM_EVERY_ROWS:
                    rows_since_trim = 0
                    release_free_memory()
                tally.add(planned.tally)
                self._keep_rejected(planned)
                if planned.sends:
                    pending = ProfileRows.concat([pending, planned.sends])
                while len(pending) >= group_size:
                    group, pending = pending.slice(0, group_size), pending.slice(group_size)
                    yield SendGroup(upserts=group)
                if self._stop.is_set():
                    return
        finally:
            if pool is not None:
                pool.close()
        for start in range(0, len(pending), group_size):
            yield SendGroup(upserts=pending.slice(start, group_size))

    def _batches_to_send(self, scan: _Scan) -> Iterator[pa.RecordBatch]:
        """The differ's rows to send; a continued full pass drops what its first legs sent."""
        skipped = scan.ids.below_watermark  # what the differ already left out
        if scan.watermark is not None:
            self.run.counts["skipped_by_checkpoint"] = skipped
        # A full pass that may hand over to a continuation (a run with a time budget) sends
        # in id order, for its watermark. The embedded differ sorts in this process's memory
        # (~120 MB a million rows), so it sorts only then; BigQuery sorts on its side.
        may_continue = self.options.time_budget_seconds is not None or not isinstance(scan.diff, SegmentDiff)
        ordered = scan.full and may_continue
        for batch in scan.diff.rows_to_send(full=scan.full, ordered=ordered):
            if self._stop.is_set():
                return
            if scan.watermark is not None:
                keys = batch.column(KEY)
                keep = pc.or_kleene(pc.greater(keys, pa.scalar(scan.watermark, pa.string())), pc.is_null(keys))
                before = batch.num_rows
                batch = batch.filter(keep)
                skipped += before - batch.num_rows
                self.run.counts["skipped_by_checkpoint"] = skipped
                if batch.num_rows == 0:
                    continue
            yield batch

    def _mapping_pool(self, prepared: _Prepared, scan: _Scan) -> MappingPool | None:
        """Worker processes for the mapping, when asked for or when the run is large enough."""
        workers = self.options.map_workers
        if workers is None:
            rows = scan.ids.new_ids + (scan.ids.matched if scan.full else 0)
            workers = auto_workers() if rows >= AUTO_POOL_MIN_ROWS else 0
        if workers <= 0:
            return None
        self.run.timings["map_workers"] = workers
        return MappingPool(
            workers,
            self.activation,
            prepared.types,
            scan.ids.duplicates,
            self.activation.mapping.custom_id,
            # --full (or a full message) is the way to send refused payloads again anyway.
            refused=None if self.options.full else self._refusals,
        )

    def _timed(self, results: Iterator[tuple[BatchPlan, float]]) -> Iterator[BatchPlan]:
        for planned, seconds in results:
            self._stages.map += seconds
            yield planned

    async def _stream(self, prepared: _Prepared, scan: _Scan, moved: _Moved, tally: PlanCounts) -> Sender | None:
        """The pipeline: a worker thread reads and maps; the event loop sends as groups arrive."""
        activation = self.activation
        ids = scan.ids
        expected = len(moved.sends) + ids.new_ids + (ids.matched if scan.full else 0) + len(ids.removed)
        endpoint = choose_endpoint(
            activation.destination.endpoint, expected, activation.destination.mass_update_threshold
        )
        counts = self.run.counts
        counts.update(dict.fromkeys(SEND_COUNTS, 0))
        journal = self._journal = Journal(
            self.store,
            self._current_lease,
            every_profiles=activation.journal.flush_every_profiles,
            every_seconds=activation.journal.flush_every_seconds,
            clock=self.clock.monotonic,
            now=self.clock.now,
            stale_intents=scan.stale_intents,
        )
        sender: Sender | None = None
        if self.client is None:
            raise RuntimeError("a run that sends needs a Batch client")
        async with self.client as client:
            sender = Sender(
                client,
                endpoint,
                concurrency=activation.destination.concurrency,
                journal=journal,
                deadline=self._deadline,
                budget_exhausted=self._budget_exhausted,
                mirror=activation.sync_mode is SyncMode.MIRROR,
                removal_attributes=removal_body(scan.meta.owned_keys),
                on_outcome=self._absorb,
            )
            journal.on_flush = self._checkpoint_for(sender)
            try:
                await self._pump(prepared, scan, moved, tally, sender, endpoint, expected)
                if ids.removed and not sender.incomplete and not sender.failed:
                    await self._send_removals(sender, ids.removed, endpoint.send_batch)
                await sender.drain()
            finally:
                self._settle_counts(sender)
            if sender.started_at is not None:
                # How long after the run started its first request left (the pipeline streams).
                self.run.timings["first_request_seconds"] = round(sender.started_at - self._started_perf, 3)
            # From the first request to the last answer (0 when nothing was sent).
            self._stages.send = time.perf_counter() - sender.started_at if sender.started_at else 0.0
        self.run.endpoint = endpoint.value if sender.tally.requests else None
        return sender

    async def _send_removals(self, sender: Sender, removed: list[str], batch: int) -> None:
        """Mirror removals, a window of groups at a time, each window noted (in a worker thread) first."""
        groups = [SendGroup(removals=removed[start : start + batch]) for start in range(0, len(removed), batch)]
        per_window = max(1, INTENT_WINDOW_PROFILES // batch)
        for start in range(0, len(groups), per_window):
            noted = await asyncio.to_thread(self._note_window, groups[start : start + per_window])
            for group in noted:
                if not await sender.submit(group):
                    return

    async def _pump(
        self,
        prepared: _Prepared,
        scan: _Scan,
        moved: _Moved,
        tally: PlanCounts,
        sender: Sender,
        endpoint: Endpoint,
        expected: int,
    ) -> None:
        """Feed the mapping thread's groups to the sender, under backpressure."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SendGroup | BaseException | None] = asyncio.Queue(maxsize=QUEUED_GROUPS)
        announced = False

        def produce() -> None:
            try:
                groups = self._produce_sends(prepared, scan, moved, tally, group_size=endpoint.send_batch)
                groups = self._note_intents(groups, window=INTENT_WINDOW_PROFILES)
                for group in groups:
                    asyncio.run_coroutine_threadsafe(queue.put(group), loop).result()
                    if self._stop.is_set():
                        break
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()
            except BaseException as error:  # handed to the event loop, raised there
                asyncio.run_coroutine_threadsafe(queue.put(error), loop).result()

        producer = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if not announced:
                    announced = True
                    self.progress.sending(expected, endpoint.value)
                if not await sender.submit(item):
                    break
        finally:
            self._stop.set()
            # Unblock the producer if it waits on a full queue, then wait for it to end.
            while not producer.done():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                await asyncio.sleep(0.01)
            self._fill_counts(scan, moved, tally)

    async def _settle(self, scan: _Scan, moved: _Moved, sender: Sender | None) -> None:
        """Commit what was acknowledged, then refreshes; settle the intents no longer needed."""
        assert self._journal is not None
        journal = self._journal
        await journal.close()
        incomplete = self._incomplete(sender)
        if moved.refreshes and not incomplete and not scan.full:
            for start in range(0, len(moved.refreshes), 10_000):
                journal.add(moved.refreshes.slice(start, 10_000).journal())
                await journal.flush()
        if sender is not None:
            entries = sender.tally.refusals + self._count_item_failures(sender.tally.item_failures)
            if entries:
                await asyncio.to_thread(self.store.record_refusals, self._current_lease(), entries)
        if self._refusals_cleared:
            await asyncio.to_thread(self.store.clear_refusals, self._current_lease(), self._refusals_cleared)
        await asyncio.to_thread(self.store.compact, self._current_lease(), self.clock.now())

    def _finish(self, prepared: _Prepared, scan: _Scan, sender: Sender | None) -> None:
        """The run's status, and the activation meta (continuation, mapping version, success)."""
        assert self._journal is not None
        meta = scan.meta
        tally = sender.tally if sender is not None else None
        self._stages.commit = self._journal.commit_seconds
        self._stages.batch_wait = tally.wire_seconds if tally else 0.0
        self._stages.rate_limit_wait = tally.wait_seconds if tally else 0.0
        self._stages.read = scan.diff.seconds["read"]
        self._stages.hash_and_diff = scan.diff.seconds["hash_and_diff"]
        timings = self.run.timings
        timings["send_seconds"] = round(self._stages.send, 3)
        timings["wire_seconds"] = round(self._stages.batch_wait, 3)
        timings["wait_seconds"] = round(self._stages.rate_limit_wait, 3)
        timings["commit_seconds"] = round(self._journal.commit_seconds, 3)
        self.run.journal = {"flushes": self._journal.flushes, "committed": self._journal.committed}
        if tally and tally.failures:
            self.run.error = "; ".join(tally.failures)
        counts = self.run.counts
        if sender is not None and self._incomplete(sender):
            meta.continuation = {
                "run_id": self.options.continuation_of or self.run_id,
                "full": scan.full,
                "watermark": sender.watermark.value if scan.full else None,
            }
            self.run.status = RunStatus.INCOMPLETE
            return
        meta.continuation = None
        meta.mapping_version = prepared.version
        if counts.get("failed"):
            self.run.status = RunStatus.PARTIAL
            return
        meta.last_success_run_id = self.run_id
        rejected = sum(counts.get(key, 0) for key in ("rejected", "rejected_by_batch", *REMEMBERED_COUNTS))
        self.run.status = RunStatus.SUCCEEDED_WITH_REJECTIONS if rejected else RunStatus.SUCCEEDED

    # -- bookkeeping -------------------------------------------------------------------------
    def _fill_counts(self, scan: _Scan, moved: _Moved, tally: PlanCounts) -> None:
        """The record's counts: the id scan's, the moved rows', and what the stream planned."""
        version = scan.version
        meta = scan.meta
        self.run.mapping_version = {
            "current": version,
            "previous": meta.mapping_version,
            "changed": meta.mapping_version is not None and meta.mapping_version != version,
        }
        ids = scan.ids
        counts = self.run.counts
        summary = tally.summary()
        skipped = 0 if scan.full else max(0, ids.matched - moved.tally.counts["rows_mapped"])
        summary["rows"] = ids.rows
        summary["skipped_unmapped"] = skipped
        summary["unchanged"] += skipped
        summary["removed"] = len(ids.removed)
        for name, held in self._held_removals.items():
            summary[name] = summary.get(name, 0) + held
        counts.update(summary)
        self.run.rejected_by_reason = dict(tally.rejected_by_reason)
        self.run.dropped_attributes_by_reason = dict(tally.dropped_by_reason)
        for key, value in self._refused.items():
            self.run.rejected_by_reason[key] = self.run.rejected_by_reason.get(key, 0) + value
        if self.run.mapping_version["changed"]:
            self.run.mapping_version["explanation"] = (
                f"the mapping changed since the last successful run ({meta.mapping_version} → {version}): every row "
                f"was mapped again; {counts['changed']} profiles whose payload differs are resent, the others "
                "are unchanged"
            )

    def _keep_rejected(self, planned: BatchPlan) -> None:
        if self.rejects is not None and planned.dropped:
            with self._reject_lock:
                for dropped in planned.dropped:
                    self.rejects({"run_id": self.run_id, "activation": self.activation.name, **dropped.as_record()})
        if not planned.rejected:
            return
        rows = sorted(planned.rejected, key=lambda rejected: rejected.row_number or 0)
        with self._reject_lock:
            samples = self.run.rejected_samples
            for rejected in rows:
                if self.rejects is not None:
                    self._reject_row(rejected)
                if len(samples) < REJECTED_SAMPLE_SIZE:
                    samples.append(rejected.as_record())
            samples.sort(key=lambda sample: sample["row"] or 0)

    def _settle_counts(self, sender: Sender) -> None:
        """``sent`` is every profile a request carried; one Batch did not answer for (a request
        stopped by a 401 or an unreachable host) is ``failed`` like a transient failure."""
        counts = self.run.counts
        attempted = sender.tally.attempted
        counts["sent"] = attempted
        answered = counts.get("acknowledged", 0) + counts.get("rejected_by_batch", 0)
        counts["failed"] = max(counts.get("failed", 0), attempted - answered)

    def _absorb(self, outcome: SendOutcome) -> None:
        counts = self.run.counts
        counts["sent"] = counts.get("sent", 0) + len(outcome.acknowledged) + len(outcome.rejected) + len(outcome.failed)
        counts["acknowledged"] = counts.get("acknowledged", 0) + len(outcome.acknowledged)
        counts["rejected_by_batch"] = counts.get("rejected_by_batch", 0) + len(outcome.rejected)
        counts["failed"] = counts.get("failed", 0) + len(outcome.failed)
        counts["item_errors_retried"] = counts.get("item_errors_retried", 0) + outcome.item_retries
        counts["failed_by_item_error"] = counts.get("failed_by_item_error", 0) + len(outcome.item_failures)
        if self._refusals:
            self._refusals_cleared.extend(c for c in outcome.acknowledged if c in self._refusals)
        for rejection in outcome.rejected:
            issue = RowIssue(rejection.attribute or NO_ATTRIBUTE, Reason.BATCH_REJECTED, f"Batch: {rejection.reason}")
            self._note_batch_issue(rejection.custom_id, issue, listed=True)
        self.progress.sent(len(outcome.acknowledged), len(outcome.rejected), len(outcome.failed))

    def _count_item_failures(self, failures: list[Refusal]) -> list[Refusal]:
        """This run's per-item failures as state entries, each counted after the id's entry before the run.

        Each is counted (``persistent`` once it reaches the bound) and sampled with Batch's
        reason; a persistent one is listed like a refusal (``--rejects``), since it is not
        sent again while its payload stays the same.
        """
        entries = [failure.following(self._refusals.get(failure.custom_id)) for failure in failures]
        for entry in entries:
            if entry.persistent:
                self.run.counts["persistent"] = self.run.counts.get("persistent", 0) + 1
                detail = (
                    f"Batch: {entry.reason}, for this payload {entry.runs} runs in a row: persistent, not sent "
                    "again until it changes (--full sends it)"
                )
                issue = RowIssue(entry.field, Reason.BATCH_PERSISTENT_ERROR, detail)
            else:
                detail = (
                    f"Batch: {entry.reason} (not about the value; {entry.runs} of {PERSISTENT_AFTER_RUNS} runs "
                    "in a row before it counts as persistent): failed after retries, sent again next run"
                )
                issue = RowIssue(entry.field, Reason.BATCH_ITEM_ERROR, detail)
            self._note_batch_issue(entry.custom_id, issue, listed=entry.persistent)
        return entries

    def _note_batch_issue(self, custom_id: str, issue: RowIssue, *, listed: bool) -> None:
        """Count and sample one of Batch's per-item answers; ``listed``: a ``--rejects`` line too."""
        reason = issue.reason.value
        # _refused survives the planning's recount of rejected_by_reason (_fill_counts).
        self._refused[reason] = self._refused.get(reason, 0) + 1
        self.run.rejected_by_reason[reason] = self.run.rejected_by_reason.get(reason, 0) + 1
        row = RejectedRow(None, custom_id, (issue,))
        with self._reject_lock:
            if listed and self.rejects is not None:
                self._reject_row(row)
            if len(self.run.rejected_samples) < BATCH_REJECTED_SAMPLE_SIZE:
                self.run.rejected_samples.append(row.as_record())

    def _checkpoint_for(self, sender: Sender) -> Callable[[], Any]:
        saved_at: list[float | None] = [None]

        async def checkpoint() -> None:
            # The run record follows the commits, so a killed run still shows how far it got;
            # at most every CHECKPOINT_RECORD_SECONDS: it is one document, and a mass-update
            # run commits every second (Firestore sustains about one write a second per
            # document). What resumes a run is the journal, not this copy.
            assert self._journal is not None
            self.run.checkpoint = {
                "at": self.clock.now().isoformat(),
                "acknowledged": self.run.counts.get("acknowledged", 0),
                "committed": self._journal.committed,
                "watermark": sender.watermark.value,
            }
            now = self.clock.monotonic()
            if saved_at[0] is not None and now - saved_at[0] < CHECKPOINT_RECORD_SECONDS:
                return
            saved_at[0] = now
            await asyncio.to_thread(self.store.save_run, self.record)

        return checkpoint

    def _note_intents(self, groups: Iterable[SendGroup], *, window: int) -> Iterator[SendGroup]:
        """Note the ids a window of groups may change in Batch, in one append, then hand the groups on.

        Guarantee 7 (an id Batch may hold is always known) needs a new id noted before the
        request that could create it (mirror mode). And any send that can leave Batch
        holding something the stored fingerprints do not say (a changed payload, a
        removal) is noted too: if its acknowledgement is lost (a crash, a dropped answer),
        the next run reads the note as "unconfirmed" and sends the id again, even if its row
        came back to the acknowledged value. Noting a window of groups rather than each
        request keeps a run's state writes to a few per window (docs/how-state-is-kept.md).
        A crash leaves notes for ids never sent: harmless, they are only sent again.
        """
        held: list[SendGroup] = []
        profiles = 0
        for group in groups:
            held.append(group)
            profiles += len(group.upserts) + len(group.removals)
            if profiles >= window:
                yield from self._noted(held)
                held, profiles = [], 0
        yield from self._noted(held)

    def _note_window(self, held: list[SendGroup]) -> list[SendGroup]:
        return list(self._noted(held))

    def _noted(self, held: list[SendGroup]) -> Iterator[SendGroup]:
        mirror = self.activation.sync_mode is SyncMode.MIRROR
        per_group = [group.removals or group.upserts.noted_ids(new=mirror) for group in held]
        noted = [custom_id for ids in per_group for custom_id in ids]
        window = None
        if noted:
            note = self.store.record_intents(self._current_lease(), noted)
            window = IntentWindow(note, outstanding=sum(1 for ids in per_group if ids))
        for group, ids in zip(held, per_group, strict=True):
            group.intents_noted = True
            if ids:
                group.intents = window
            yield group

    def _reject_row(self, rejected: RejectedRow) -> None:
        assert self.rejects is not None
        self.rejects({"run_id": self.run_id, "activation": self.activation.name, **rejected.as_record()})

    def _duplicate_trigger(self) -> str | None:
        """The run a redelivered trigger already started, if it must not run again."""
        if not self.options.trigger_id:
            return None
        previous = self.store.find_run_by_trigger(self.activation.name, self.options.trigger_id)
        if previous is not None and self.options.rerun_unless_succeeded:
            succeeded = (RunStatus.SUCCEEDED, RunStatus.SUCCEEDED_WITH_REJECTIONS)
            return str(previous["run_id"]) if RunStatus.of(previous.get("status")) in succeeded else None
        # A redelivery after a retryable failure must run again: that is why the function raised.
        if (
            previous is not None
            and previous.get("status") not in (RunStatus.RUNNING, RunStatus.SKIPPED_LEASE_HELD, RunStatus.ABANDONED)
            and not previous.get("retryable")
        ):
            return str(previous["run_id"])
        return None

    def _close_abandoned_runs(self) -> None:
        """Runs still marked running once we hold the lease were killed or timed out: say so."""
        for record in self.store.list_runs(self.activation.name, 20):
            if record.get("status") == RunStatus.RUNNING.value and record["run_id"] != self.run_id:
                record["status"] = RunStatus.ABANDONED.value
                record["error"] = (
                    "the run stopped without finishing (process killed or timed out); what it committed up to "
                    "its last checkpoint is kept, the rest was planned again by the next run"
                )
                record["abandoned_noticed_by"] = self.run_id
                self.store.save_run(record)

    def _incomplete(self, sender: Sender | None) -> bool:
        """The pass did not finish within the time budget: a continuation goes on from the checkpoint.

        Either no request could start any more, or requests that started were cut by the
        budget's deadline (their rows failed for this run and are resent by the continuation).
        """
        if sender is None:
            return False
        return sender.incomplete or (sender.tally.failed > 0 and self._budget_exhausted())

    # -- time ------------------------------------------------------------------------------
    def _current_lease(self) -> Lease:
        assert self._lease is not None, "no lease taken"
        return self._lease

    def _budget_exhausted(self) -> bool:
        budget = self.options.time_budget_seconds
        if budget is None:
            return False
        elapsed = self.clock.monotonic() - self._started_monotonic
        return elapsed >= budget - self.options.budget_margin_seconds

    def _deadline(self) -> float:
        """No request may keep retrying past the time budget or the lease expiry."""
        lease = self._current_lease()
        ttl = self.options.lease_ttl_seconds
        lease_left = (lease.expires_at - self.clock.now()).total_seconds()
        if lease_left >= ttl / 2:
            # The renewer is keeping up (it extends the lease to a full ttl every ttl/3, so a
            # healthy lease never has less than two thirds left): count on that renewal rather
            # than on what the current lease has left, or a short lease would fail a request
            # whose rate-limit wait is longer than a fraction of the ttl. A lease that renewal
            # stopped extending falls below half and bounds requests by its real expiry again
            # (and no commit outlives it: every commit is fenced).
            lease_left = ttl
        # Keep a margin before expiry.
        margin = min(5.0, ttl * 0.25)
        deadline = self.clock.monotonic() + max(lease_left - margin, 0.0)
        budget = self.options.time_budget_seconds
        if budget is not None:
            deadline = min(deadline, self._started_monotonic + budget - self.options.budget_margin_seconds / 2)
        return deadline

    async def _renew_lease_forever(self) -> None:
        """Keep the lease at least two thirds of its ttl ahead.

        Each renewal is due once a third of the ttl has passed since the expiry was set,
        counted from the lease itself rather than from the last wake-up: a first state
        call can be slow (a cold client's first Firestore request took over a second on
        the emulator) and eat into a short lease before this task even starts.
        """
        ttl = self.options.lease_ttl_seconds
        while True:
            left = (self._current_lease().expires_at - self.clock.now()).total_seconds()
            await asyncio.sleep(max(left - ttl * 2 / 3, 0.05))
            try:
                renewed = await asyncio.to_thread(self.store.renew_lease, self._current_lease(), ttl, self.clock.now())
            except LeaseLost:
                self.log.error("lease lost: another run took over; no further commit will succeed")
                return
            self._lease = renewed

    def _finish_early(self, status: RunStatus, error: BaseException | None) -> RunResult:
        self.run.status = status
        self.run.error = str(error) if error else None
        self.run.ended_at = self.clock.now().isoformat()
        if status is RunStatus.SKIPPED_LEASE_HELD:  # visible in history; config errors never got this far
            self.store.save_run(self.record)
        return RunResult(self.record)
