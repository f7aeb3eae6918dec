"""One run of one activation, as a straight line of stages (``docs/how-a-run-works.md``):

    prepare → lease → recover → scan → audience scan → moved rows (mapped, or left to the stream) → guards → claim
      → stream (read → diff → map → send, in one pipeline) → removals → settle → finish

The stages are pure (:mod:`sync.plan` through :class:`sync.planner.Planner`), or edges the run is
handed: the source, the state store, the differ and its fingerprint store (:class:`sync.differ.DifferFactory`,
built by ``sync.runtime``), the Batch client, the clock. The rooms around the run each keep one concern:
the lease and time (:mod:`sync.lease`), the counts and samples (:mod:`sync.runbook`), the requests and the
journal (:mod:`sync.send`), the audience (:mod:`sync.audience`). Guarantees kept here (the numbers are
those of the README's table):

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
import threading
import time
from dataclasses import dataclass
from typing import Final

import pyarrow as pa

from sync.audience import AudienceRun
from sync.batch.client import BatchClient, choose_endpoint
from sync.batch.endpoint import Endpoint
from sync.config import Activation, AttributeType, DiffMode, RunType, SyncMode, mapping_version
from sync.convention import resolve_mapping
from sync.differ import DifferFactory, DiffRequest
from sync.errors import ConfigError, GuardTripped, LeaseHeld, SyncError
from sync.lease import LeaseKeeper
from sync.logs import get_logger
from sync.mapping import ProfileMapper
from sync.memory import release_free_memory, tune_allocators
from sync.model import ActivationMeta, Refusal
from sync.pipeline import Moved, Producer, Scan
from sync.plan import GuardVerdict, PlanCounts, evaluate_guards, guard_refusal
from sync.planner import Planner
from sync.policies import RemovalPolicy
from sync.record import EXIT_CODES, RunRecord, RunStatus, StageTimings, is_retryable, status_of_error
from sync.removals import send_removals
from sync.results import hook as results_hook
from sync.runbook import RejectSink, RunBook
from sync.runconfig import config_as_run
from sync.runs import (
    Clock,
    NoProgress,
    PlanPreview,
    Progress,
    RunOptions,
    RunResult,
    close_abandoned_runs,
    duplicate_trigger,
    new_run_id,
)
from sync.send import IntentNoter, Journal, Sender, SendGroup, removal_body
from sync.sources.base import Source
from sync.state.base import StateStore, operation_counts, operations_between

__all__ = ["EXIT_CODES", "Clock", "PlanPreview", "Progress", "Run", "RunOptions", "RunResult"]

log = get_logger("cepsync.engine")

# Mapped send groups waiting for a free request slot. The slots themselves (`concurrency` requests, most of
# them waiting for the rate limiter's next token) are the buffer against Batch's pace; the mapping thread works
# one group ahead of them. A mass-update group holds ~3 MB of bodies, so every group queued per slot cost
# ~12 MB at the peak of a 1M full load for the same wall time (docs/how-a-run-works.md, "Memory").
QUEUED_GROUPS: Final = 1
# Intents are noted for this many profiles of send groups at once (at least one group): one state append
# per 2,000 profiles on /update, one per request on mass-update. Not the flush window: a large one would
# hold the first request back.
INTENT_WINDOW_PROFILES: Final = 2_000
# The run record is saved with the checkpoint at most this often (seconds; one document).
CHECKPOINT_RECORD_SECONDS: Final = 5.0


@dataclass
class _Prepared:
    mapper: ProfileMapper
    version: str
    schema: pa.Schema
    types: dict[str, AttributeType]


class Run:
    """Runs one activation once. Build with the edges, then ``await run.execute()``.

    ``differ``: the activation's differ and fingerprint store (``sync.runtime.open_differ``);
    by default the embedded differ over ``source`` with the fingerprints in ``store``.
    """

    def __init__(
        self,
        activation: Activation,
        *,
        source: Source,
        store: StateStore,
        client: BatchClient | None,
        differ: DifferFactory | None = None,
        options: RunOptions | None = None,
        clock: Clock | None = None,
        progress: Progress | None = None,
        rejects: RejectSink | None = None,
    ) -> None:
        self.activation = activation
        self.source = source
        self.store = store
        self._differ_injected = differ is not None
        if differ is None:
            # The embedded differ (DuckDB, pyarrow.compute) loads when a run diffs in this process.
            from sync.diff import EmbeddedDiffer

            differ = EmbeddedDiffer(source, store)
        self.differ: DifferFactory = differ
        self.fingerprints = self.differ.fingerprints
        self.client = client
        self.options = options or RunOptions()
        self.clock = clock or Clock()
        self.progress: Progress = progress or NoProgress()
        self.run_id = self.options.run_id or new_run_id(self.clock)
        self._started_perf = time.perf_counter()
        self.keeper = LeaseKeeper(store, activation.name, self.options, self.clock)
        self._journal: Journal | None = None
        self._sender: Sender | None = None
        # What Batch's per-item answers come to in the state (refusals, per-item failures).
        self._answers: list[Refusal] = []
        self._stages = StageTimings()
        self._stop = threading.Event()
        self._checkpoint_saved: float | None = None
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
        # Every rejected row as a record (the run record keeps a sample): `cepsync run --rejects`.
        self.book = RunBook(self.run, rejects=rejects)
        self.audience = AudienceRun(activation, store, self.run, self.keeper)  # a no-op without `audience:`

    @property
    def record(self) -> dict[str, object]:
        """The run record's JSON form, as stored (a snapshot)."""
        return self.run.to_dict()

    # -- public --------------------------------------------------------------------------
    def prepare(self) -> _Prepared:
        """Check the mapping against the source schema; raises ConfigError before any read."""
        if self.activation.diff.mode is DiffMode.WAREHOUSE and not self._differ_injected:
            raise ConfigError(
                "diff mode 'warehouse' needs its BigQuery differ: build the run with sync.runtime.open_differ",
                source=f"activation '{self.activation.name}'",
                field="diff.mode",
            )
        schema = self.source.schema()
        activation, types = resolve_mapping(self.activation, schema, source=self.activation.origin)
        if activation is not self.activation:  # a mapping convention, expanded (sync/convention.py)
            self.run.config, self.activation = config_as_run(self.activation, resolved=activation), activation
        return _Prepared(ProfileMapper(activation, types), mapping_version(activation), schema, types)

    async def plan_only(self, *, sample: int = 5) -> PlanPreview:
        """Dry run: read, diff, map and check guards. No lease, no send, no state change."""
        tune_allocators()
        prepared = self.prepare()
        meta = self.store.load_meta(self.activation.name)
        scan = await self._scan(prepared, meta)
        changes: list[dict[str, object]] = []
        try:
            producer = self._producer(scan)
            moved = await asyncio.to_thread(producer.moved)
            await self.audience.scan(self.source, prepared.schema)
            self._check_guards(scan, moved, raise_on_trip=False)
            tally = PlanCounts()
            tally.add(moved.tally if not scan.full else PlanCounts())

            def preview() -> None:
                for group in producer.groups(moved, tally, group_size=sample or 1):
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
        return PlanPreview(self.run.to_dict(), changes, scan.ids.removed[:sample])

    async def execute(self) -> RunResult:
        """The whole run. Never raises for an expected failure: the run record says what happened."""
        tune_allocators()
        try:
            prepared = self.prepare()
        except SyncError as error:
            return self._finish_early(status_of_error(error), error)
        ops_before = operation_counts(self.store)
        duplicate = duplicate_trigger(self.store, self.activation.name, self.options)
        if duplicate is not None:
            self.run.duplicate_of = duplicate
            return self._finish_early(RunStatus.DUPLICATE_TRIGGER, None)
        try:
            lease = await asyncio.to_thread(self.keeper.acquire)
        except LeaseHeld as error:
            self.log.info("lease held by another run; exiting", detail=str(error))
            return self._finish_early(RunStatus.SKIPPED_LEASE_HELD, error)
        self.run.lease_token = lease.token
        # The results tables (docs/results.md): None unless the activation has `results:`.
        results = results_hook.collector(self.activation, self.run)
        if results is not None:
            self.book.rejects = results.tee(self.book.rejects)
        # Renewed from now on: what follows talks to the state store, which can take a while (a remote
        # Firestore), and a short lease must not expire meanwhile.
        renewer = asyncio.create_task(self.keeper.renew_forever())
        try:
            await asyncio.to_thread(close_abandoned_runs, self.store, self.activation.name, self.run_id)
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
                    await self._checkpoint(save=False)  # the record below says how far it got
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
            self.run.timings["total_seconds"] = round(self.keeper.elapsed(), 3)
            self.run.timings["stages"] = self._stages.as_dict()
            self.run.extra.update(self.differ.record())
            self.run.state_ops = operations_between(self.store, ops_before)
            self.store.save_run(self.record)
            with contextlib.suppress(SyncError):  # lost already: nothing to release
                self.keeper.release()
        self.log.info("run finished", status=self.run.status.value, counts=self.run.counts)
        if results is not None:  # after the commit and the lease's release; records its own failure
            await asyncio.to_thread(results.finish, self.run, self.store, self.source)
        return RunResult(self.run)

    # -- stages ----------------------------------------------------------------------------
    async def _under_lease(self, prepared: _Prepared) -> None:
        lease = self.keeper.lease
        await asyncio.to_thread(self.fingerprints.compact, lease, self.clock.now(), when_due=True)  # once due
        meta = await asyncio.to_thread(self.store.load_meta, self.activation.name)
        scan = await self._scan(prepared, meta)
        # Imports the run will need in a moment, on threads while DuckDB reads the rows to map (sync.preload).
        if scan.may_map:
            prepared.mapper.warm()  # the validators the converters load on first use
        if self.client is not None and scan.may_send:
            self.client.transport.warm()  # aiohttp
        try:
            producer = self._producer(scan)
            await self.audience.scan(self.source, prepared.schema)
            # The moved rows are mapped before anything is sent, so the guards judge their
            # exact count, unless the guards hold even if every one of them changed: then the
            # stream maps them, and their first group leaves as soon as it is full.
            map_moved = self._guards_hold_for_any_change(scan)
            if map_moved:
                moved = Moved.to_map()
            else:
                moved = await asyncio.to_thread(producer.moved)
                release_free_memory()
            self._check_guards(scan, moved, raise_on_trip=True, changed=scan.ids.moved if map_moved else None)
            await self._claim(prepared, scan)
            tally = PlanCounts()
            if not scan.full and not map_moved:
                tally.add(moved.tally)
            sender = await self._stream(producer, moved, tally, map_moved=map_moved)
            if map_moved:  # the record's verdicts, on the exact count (below the bound that held)
                self.run.guards = [v.as_record() for v in self._verdicts(scan, moved.tally.counts["changed"])]
            # The differ (and its stored fingerprints) is done before the state is compacted: never both in memory.
            scan.diff.close()
            release_free_memory()
            await self._settle(scan, moved, sender)
        finally:
            scan.diff.close()
            release_free_memory()
        self._finish(prepared, scan, sender)
        await asyncio.to_thread(self.store.save_meta, self.keeper.lease, scan.meta)

    async def _scan(self, prepared: _Prepared, meta: ActivationMeta) -> Scan:
        """Load the state as arrays and read the id column: counts, duplicates, removals."""
        activation = self.activation
        mirror = activation.sync_mode is SyncMode.MIRROR
        # Intents an earlier run noted and never settled: ids it may have sent without a committed ack.
        # Mirror mode owns them; in both modes, what Batch holds may differ from their stored fingerprint.
        intents = await asyncio.to_thread(self.store.load_intents, activation.name)
        if intents:
            self.run.counts["unconfirmed"] = len(intents)
        self.book.refusals = await asyncio.to_thread(self.store.load_refusals, activation.name)
        continuation = meta.continuation or {}
        full = self.options.full or activation.run_type is RunType.FULL_ONLY or bool(continuation.get("full"))
        watermark = str(continuation["watermark"]) if full and continuation.get("watermark") else None
        request = DiffRequest(
            columns=prepared.mapper.columns,
            schema=prepared.schema,
            mapping_version=prepared.version,
            intents=sorted(intents) if mirror else (),
            unconfirmed=sorted(intents),
            after=watermark,
            on_rows=self.progress.rows_read,
        )
        diff = await asyncio.to_thread(self.differ.open, activation.name, request)
        try:
            ids = await asyncio.to_thread(diff.scan_ids)
        except BaseException:
            diff.close()
            raise
        release_free_memory()  # the id scan's hash tables are gone; so is their memory
        if not mirror:
            ids.removed = []
        elif ids.removed and self.book.refusals and not self.options.full:
            ids.removed = self.book.hold_refused_removals(ids.removed, meta.owned_keys, activation.removal_policy)
        self.run.full = full
        self.run.source = self.source.stats()
        self.progress.planned({"rows": ids.rows})
        planner = Planner(
            activation,
            prepared.types,
            duplicates=ids.duplicates,
            # --full (or a full message) is the way to send refused payloads again anyway.
            refused=None if self.options.full else self.book.refusals,
            mapper=prepared.mapper,
        )
        return Scan(diff, ids, meta, planner, full, watermark, prepared.version, frozenset(intents))

    def _verdicts(self, scan: Scan, changed: int) -> list[GuardVerdict]:
        activation = self.activation
        counts = {"rows": scan.ids.rows, "removed": len(scan.ids.removed), "changed": changed}
        return evaluate_guards(
            counts,
            activation.guards,
            synced_before=scan.ids.synced,
            sync_mode=activation.sync_mode,
            allow=self.options.allow_guards,
        ) + self.audience.verdicts(self.options.allow_guards)

    def _guards_hold_for_any_change(self, scan: Scan) -> bool:
        """Whether no guard trips even if every moved row changed (a delta whose differ counted them).

        A moved row's payload may be the same (a cosmetic change), never more than changed:
        the moved count bounds the changed one, so guards that hold on it hold on the exact count.
        """
        moved = scan.ids.moved
        if scan.full or moved is None or moved == 0:
            return False
        return not any(v.tripped and not v.overridden for v in self._verdicts(scan, moved))

    def _check_guards(self, scan: Scan, moved: Moved, *, raise_on_trip: bool, changed: int | None = None) -> None:
        """Judge the guards on the moved rows' changed count (or ``changed``, a bound of it); raise if one tripped."""
        activation = self.activation
        verdicts = self._verdicts(scan, moved.tally.counts["changed"] if changed is None else changed)
        self.run.guards = [v.as_record() for v in verdicts]
        if scan.ids.rows == 0 and scan.ids.synced == 0 and not self.run.warnings:
            # The empty-segment guard protects synced profiles; here there are none, so an empty first
            # run is allowed (a new segment may be empty) but never silent.
            warning = (
                "the segment returned no rows and this activation has synced nothing yet: check source.query "
                "(or source.table) if profiles were expected"
            )
            self.run.warnings.append(warning)
            self.log.warning("empty segment on a first run", detail=warning)
        tripped = [v for v in verdicts if v.tripped and not v.overridden]
        if tripped and raise_on_trip:
            self._fill_counts(scan, moved, moved.tally)
            raise guard_refusal(activation.name, tripped, trigger=self.options.trigger)

    async def _claim(self, prepared: _Prepared, scan: Scan) -> None:
        """Own the keys this mapping writes (mirror clears exactly those), before any send."""
        owned = set(scan.meta.owned_keys) | set(prepared.mapper.owned_keys)
        if owned != scan.meta.owned_keys:
            scan.meta.owned_keys = owned
            await asyncio.to_thread(self.store.save_meta, self.keeper.lease, scan.meta)

    def _producer(self, scan: Scan) -> Producer:
        # A full pass that may hand over to a continuation (a run with a time budget) sends in id order,
        # for its watermark; a differ that sorts in memory sorts only then.
        may_continue = self.options.time_budget_seconds is not None or scan.diff.orders_for_free
        return Producer(
            scan, self.book, self._stages, self._stop, ordered=may_continue, map_workers=self.options.map_workers
        )

    async def _stream(self, producer: Producer, moved: Moved, tally: PlanCounts, *, map_moved: bool = False) -> Sender:
        """The pipeline: a worker thread reads and maps; the event loop sends as groups arrive.

        ``map_moved``: the moved rows are mapped by the stream (``Producer.groups``); until
        then only their count is known, which bounds the changed ones.
        """
        activation = self.activation
        scan = producer.scan
        ids = scan.ids
        changed = (ids.moved or 0) if map_moved else len(moved.sends)
        expected = changed + ids.new_ids + (ids.matched if scan.full else 0) + len(ids.removed)
        endpoint = choose_endpoint(
            activation.destination.endpoint, expected, activation.destination.mass_update_threshold
        )
        self.book.start_sending()
        journal = self._journal = Journal(
            self.fingerprints,
            self.store,
            lambda: self.keeper.lease,
            every_profiles=activation.journal.flush_every_profiles,
            every_seconds=activation.journal.flush_every_seconds,
            clock=self.clock.monotonic,
            now=self.clock.now,
            stale_intents=scan.stale_intents,
        )
        if self.client is None:
            raise RuntimeError("a run that sends needs a Batch client")
        async with self.client as client:
            sender = self._sender = Sender(
                client,
                endpoint,
                concurrency=activation.destination.concurrency,
                journal=journal,
                budget=self.keeper,
                mirror=activation.sync_mode is SyncMode.MIRROR,
                removal_attributes=removal_body(scan.meta.owned_keys),
                remembered=self.book.refusals,
                on_answer=self.progress.sent,
            )
            removals: asyncio.Task[None] | None = None
            try:
                clearing = bool(ids.removed) and activation.removal_policy is RemovalPolicy.CLEAR and not scan.full
                if clearing:
                    # Every guard was judged before the stream, and the ids that left a delta
                    # need no mapping: their requests leave now, while the mapping thread reads
                    # and maps the rows to send. Both share the sender's slots and Batch's pace,
                    # so sending takes as long, started earlier (docs/how-a-run-works.md). A
                    # full pass keeps them last: its watermark counts its groups in id order.
                    self.progress.sending(expected, endpoint.value)
                    removals = asyncio.create_task(self._clear(sender, ids.removed, endpoint))
                await self._pump(
                    producer, moved, tally, sender, endpoint, expected, map_moved=map_moved, announced=clearing
                )
                if removals is not None:
                    await removals
                elif ids.removed and not sender.incomplete and not sender.failed:
                    # A full pass's removals, after its last group; or, on_remove: keep, only forgotten.
                    await self._clear(sender, ids.removed, endpoint)
                await sender.drain()
                await self.audience.send(client)
            finally:
                if removals is not None and not removals.done():
                    removals.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await removals
                self.book.take_sends(sender.tally, final=True)
                # Noted even when sending stopped on a fatal error: they were answered.
                self._answers = self.book.batch_answers(sender.tally)
            if sender.started_at is not None:
                # How long after the run started its first request left (the pipeline streams).
                self.run.timings["first_request_seconds"] = round(sender.started_at - self._started_perf, 3)
            # From the first request to the last answer (0 when nothing was sent).
            self._stages.send = time.perf_counter() - sender.started_at if sender.started_at else 0.0
        self.run.endpoint = endpoint.value if sender.tally.requests else None
        return sender

    async def _clear(self, sender: Sender, removed: list[str], endpoint: Endpoint) -> None:
        """The removals of a mirror run (sync/removals.py), through the run's sender."""
        await send_removals(
            sender,
            removed,
            policy=self.activation.removal_policy,
            batch=endpoint.send_batch,
            noter=self._noter(),
            window=INTENT_WINDOW_PROFILES,
            checkpoint=self._checkpoint,
        )

    def _noter(self) -> IntentNoter:
        return IntentNoter(self.store, lambda: self.keeper.lease, mirror=self.activation.sync_mode is SyncMode.MIRROR)

    async def _pump(
        self,
        producer: Producer,
        moved: Moved,
        tally: PlanCounts,
        sender: Sender,
        endpoint: Endpoint,
        expected: int,
        *,
        map_moved: bool,
        announced: bool = False,
    ) -> None:
        """Feed the mapping thread's groups to the sender, under backpressure.

        ``announced``: sending was announced already (the removals went first).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SendGroup | BaseException | None] = asyncio.Queue(maxsize=QUEUED_GROUPS)
        noter = self._noter()

        def produce() -> None:
            try:
                groups = producer.groups(moved, tally, group_size=endpoint.send_batch, map_moved=map_moved)
                for group in noter.in_windows(groups, window=INTENT_WINDOW_PROFILES):
                    asyncio.run_coroutine_threadsafe(queue.put(group), loop).result()
                    if self._stop.is_set():
                        break
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()
            except BaseException as error:  # handed to the event loop, raised there
                asyncio.run_coroutine_threadsafe(queue.put(error), loop).result()

        thread = loop.run_in_executor(None, produce)
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
                await self._checkpoint()
        finally:
            self._stop.set()
            # Unblock the producer if it waits on a full queue, then wait for it to end.
            while not thread.done():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                await asyncio.sleep(0.01)
            self._fill_counts(producer.scan, moved, tally)

    async def _checkpoint(self, *, save: bool = True) -> None:
        """The run record follows the commits, so a killed run still shows how far it got.

        Saved at most every CHECKPOINT_RECORD_SECONDS: it is one document, and a mass-update
        run commits every second (Firestore sustains about one write a second per document).
        What resumes a run is the journal, not this copy.
        """
        journal, sender = self._journal, self._sender
        if journal is None or sender is None or not journal.flushes:
            return
        at = self.clock.now().isoformat()
        if not self.book.checkpoint(sender.tally, committed=journal.committed, watermark=sender.watermark.value, at=at):
            return
        now = self.clock.monotonic()
        recent = self._checkpoint_saved is not None and now - self._checkpoint_saved < CHECKPOINT_RECORD_SECONDS
        if not save or recent:
            return
        self._checkpoint_saved = now
        await asyncio.to_thread(self.store.save_run, self.record)

    async def _settle(self, scan: Scan, moved: Moved, sender: Sender) -> None:
        """Commit what was acknowledged, then refreshes; settle the intents no longer needed."""
        assert self._journal is not None
        journal = self._journal
        await journal.close()
        incomplete = self._incomplete(sender)
        if moved.refreshes and not incomplete and not scan.full:
            for start in range(0, len(moved.refreshes), 10_000):
                journal.add(moved.refreshes.slice(start, 10_000).journal())
                await journal.flush()
        await self._checkpoint(save=False)  # the record's last checkpoint: saved as the run ends
        lease = self.keeper.lease
        if self._answers:
            await asyncio.to_thread(self.store.record_refusals, lease, self._answers)
        if sender.tally.acknowledged_remembered:
            await asyncio.to_thread(self.store.clear_refusals, lease, sender.tally.acknowledged_remembered)
        await asyncio.to_thread(self.fingerprints.compact, lease, self.clock.now(), when_due=True)  # see fold_due

    def _finish(self, prepared: _Prepared, scan: Scan, sender: Sender) -> None:
        """The run's status, and the activation meta (continuation, mapping version, success)."""
        assert self._journal is not None
        meta = scan.meta
        tally = sender.tally
        self._stages.commit = self._journal.commit_seconds
        self._stages.batch_wait = tally.wire_seconds
        self._stages.rate_limit_wait = tally.wait_seconds
        self._stages.read = scan.diff.seconds["read"]
        self._stages.hash_and_diff = scan.diff.seconds["hash_and_diff"]
        timings = self.run.timings
        timings["send_seconds"] = round(self._stages.send, 3)
        timings["wire_seconds"] = round(self._stages.batch_wait, 3)
        timings["wait_seconds"] = round(self._stages.rate_limit_wait, 3)
        timings["commit_seconds"] = round(self._journal.commit_seconds, 3)
        self.run.journal = {"flushes": self._journal.flushes, "committed": self._journal.committed}
        if tally.failures:
            self.run.error = "; ".join(tally.failures)
        if self._incomplete(sender):
            meta.continuation = {
                "run_id": self.options.continuation_of or self.run_id,
                "full": scan.full,
                "watermark": sender.watermark.value if scan.full else None,
            }
            self.run.status = RunStatus.INCOMPLETE
            return
        meta.continuation = None
        meta.mapping_version = prepared.version
        if self.run.counts.get("failed") or self.audience.failed:
            self.run.status = RunStatus.PARTIAL
            return
        meta.last_success_run_id = self.run_id
        self.run.status = RunStatus.SUCCEEDED_WITH_REJECTIONS if self.book.rejected_total else RunStatus.SUCCEEDED

    # -- bookkeeping -------------------------------------------------------------------------
    def _fill_counts(self, scan: Scan, moved: Moved, tally: PlanCounts) -> None:
        self.book.fill_counts(
            scan.ids,
            full=scan.full,
            moved=moved.tally,
            planned=tally,
            version=scan.version,
            previous=scan.meta.mapping_version,
        )

    def _incomplete(self, sender: Sender) -> bool:
        """The pass did not finish within the time budget: a continuation goes on from the checkpoint.

        Either no request could start any more, or requests that started were cut by the
        budget's deadline (their rows failed for this run and are resent by the continuation).
        """
        return sender.incomplete or (sender.tally.failed > 0 and self.keeper.budget_exhausted())

    def _finish_early(self, status: RunStatus, error: BaseException | None) -> RunResult:
        self.run.status = status
        self.run.error = str(error) if error else None
        self.run.ended_at = self.clock.now().isoformat()
        if status is RunStatus.SKIPPED_LEASE_HELD:  # visible in history; config errors never got this far
            self.store.save_run(self.record)
        return RunResult(self.run)
