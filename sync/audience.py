"""The audience step of a run: the segment's membership kept in a Batch audience (docs/audiences.md).

An activation with ``audience: NAME`` (mirror mode) keeps the set of valid Custom IDs of its
segment in a Batch audience of that name: joiners are added, leavers removed, and the
leavers' attributes are kept (nothing is nulled; their fingerprints are forgotten, so a
return sends their profile again). The engine calls this room at three points:

* :meth:`AudienceRun.scan`, before the guards: one read of the Custom ID column, diffed in an
  in-memory DuckDB (capped, spilling) against the acknowledged members, gives the exact
  joiners and leavers. Read-only (``cepsync plan`` shows them too).
* :meth:`AudienceRun.verdicts`: ``empty_segment`` and ``removed_percent`` judge the
  membership changes as they judge removals (``changed_percent`` does not: joining is not a
  change to a synced profile, as a new profile is not).
* :meth:`AudienceRun.send`, after the profiles were sent (a joiner's profile exists first):
  the audience is created if Batch does not have it, the changes go out in calls of at most
  10,000 ids, and each call's ids are noted before it leaves and committed once Batch took
  it (a crash, or a call that failed, leaves them *unconfirmed*: the next run sends each of
  them again, as its membership is then). The indexing tokens are followed until Batch says
  ``APPLIED`` (or a bounded wait ends) and kept in the run record (``audience``).

Which rows are members: every row whose Custom ID is valid, the same test the mapper applies
(non-empty, not blank, at most 1,024 characters, not a placeholder the SDKs refuse, an
integral number). A row rejected for a bad attribute *value*, or whose id is duplicated, is
still a person in the segment: a member. A row whose id is invalid cannot be one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from sync.batch.audiences import FINAL_STATES, MAX_IDS_PER_CALL, AudienceCallFailed, AudienceClient
from sync.batch.client import BatchClient
from sync.config import Activation, SyncMode
from sync.convert import BLOCKED_CUSTOM_IDS, MAX_CUSTOM_ID_LENGTH
from sync.errors import BatchContractError, ConfigError
from sync.logs import get_logger
from sync.model import Lease
from sync.plan import GuardVerdict, evaluate_guards
from sync.record import RunRecord
from sync.scratch import scratch_directory
from sync.sources.base import Source
from sync.state.base import StateStore

log = get_logger("cepsync.audience")

# What Python's str.isspace() calls whitespace (a blank id is refused by the mapper), as code
# points: RE2's \s is ASCII only. tests/test_audience.py checks the list against Python's own.
WHITESPACE: Final = (
    *range(0x09, 0x0E),
    *range(0x1C, 0x21),
    0x85,
    0xA0,
    0x1680,
    *range(0x2000, 0x200B),
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
)
# The membership diff's DuckDB database: capped, spilling past it (like the differ's).
MEMORY_LIMIT: Final = "128MB"
# How long a run follows its indexing tokens before it ends without them (seconds), and
# the pause between two looks at one token (growing from the first to the second).
INDEX_WAIT_SECONDS: Final = 60.0
POLL_SECONDS: Final = (0.1, 2.0)
# Tokens kept in the run record (a million members are 100 calls; more are counted only).
RECORDED_TOKENS: Final = 200


class Keeper(Protocol):
    """What the audience step asks of the lease and the time budget (``sync.lease.LeaseKeeper``)."""

    @property
    def lease(self) -> Lease: ...

    def deadline(self) -> float: ...

    def budget_exhausted(self) -> bool: ...


def valid_id_sql(key: str) -> str:
    """SQL true exactly when the key ``key`` (a VARCHAR, NULL for an unusable id) is a valid Custom ID."""
    blank = "".join(f"\\x{{{code:x}}}" for code in WHITESPACE)
    blocked = ", ".join(f"'{word}'" for word in sorted(BLOCKED_CUSTOM_IDS))
    return (
        f"({key} IS NOT NULL AND length({key}) BETWEEN 1 AND {MAX_CUSTOM_ID_LENGTH} "
        f"AND NOT regexp_full_match({key}, '[{blank}]*') AND lower({key}) NOT IN ({blocked}))"
    )


@dataclass
class Membership:
    """The membership diff of one run (columns; ids sorted)."""

    audience_before: str | None
    members: int  # acknowledged members before the run
    segment: int  # distinct valid ids of the segment
    invalid_rows: int  # rows whose id cannot be a member
    joiners: pa.Array  # to add: new members, and unconfirmed ids in the segment
    leavers: pa.Array  # to remove: members gone, and unconfirmed ids not in the segment
    joined: int
    left: int
    member_ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    unconfirmed: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))


class AudienceRun:
    """The audience step of one run (see the module docstring); every step does nothing without ``audience:``."""

    def __init__(self, activation: Activation, store: StateStore, record: RunRecord, keeper: Keeper) -> None:
        self.activation = activation
        self.active = activation.audience is not None
        self.name = activation.audience or ""
        self.store = store
        self.record = record
        self.keeper = keeper
        self.membership: Membership | None = None
        self.failed = False
        # What the send did, for the run record.
        self._created = False
        self._added = self._removed = self._failed_ids = 0
        self._error: str | None = None
        self._warnings: list[str] = []
        self._tokens: list[dict[str, object]] = []
        self._extra: dict[str, object] = {}
        self._log = log.bind(activation=activation.name, audience=self.name)

    # -- scan ------------------------------------------------------------------------------------

    async def scan(self, source: Source, schema: pa.Schema) -> Membership | None:
        """Diff the segment's valid ids with the acknowledged members (read-only)."""
        if not self.active:
            return None
        stored = await asyncio.to_thread(self.store.load_members, self.activation.name)
        same = stored.audience in (None, self.name)
        members = stored.ids if same else pa.array([], pa.string())
        unconfirmed = stored.unconfirmed if same else pa.array([], pa.string())
        column = self.activation.mapping.custom_id
        membership = await asyncio.to_thread(
            self._diff, source, column, schema.field(column).type, members, unconfirmed
        )
        membership.audience_before = stored.audience
        self.membership = membership
        self.record.audience = self._summary()
        return membership

    def _diff(
        self, source: Source, column: str, arrow_type: pa.DataType, members: pa.Array, unconfirmed: pa.Array
    ) -> Membership:
        import duckdb

        from sync.duckdb_sql import bound_memory
        from sync.raw_hash import key_sql

        with scratch_directory("audience") as spill, duckdb.connect(":memory:") as con:
            bound_memory(con, memory_limit=MEMORY_LIMIT, spill_directory=spill)
            con.execute("CREATE TABLE seen (k VARCHAR, ok BOOLEAN)")
            key = key_sql(column, arrow_type)
            for batch in source.read_batches([column]):
                con.register("batch", pa.Table.from_batches([batch]))
                # The key and the check come from our own constants and a quoted identifier.
                con.execute(f"INSERT INTO seen SELECT k, {valid_id_sql('k')} FROM (SELECT {key} AS k FROM batch)")  # noqa: S608
                con.unregister("batch")
            rows = con.execute("SELECT count(*) FILTER (WHERE NOT ok) FROM seen").fetchall()
            invalid = int(rows[0][0] or 0)
            con.execute("CREATE TABLE segment AS SELECT DISTINCT k FROM seen WHERE ok")
            con.execute("DROP TABLE seen")
            con.register("members", pa.table({"k": members}))
            con.register("unconfirmed", pa.table({"k": unconfirmed}))

            def ids(sql: str) -> pa.Array:
                column: pa.Array = con.sql(sql).to_arrow_table().column("k").combine_chunks().cast(pa.string())
                return column

            def count(sql: str) -> int:
                return int(con.execute(sql).fetchall()[0][0] or 0)

            joined = count("SELECT count(*) FROM segment ANTI JOIN members USING (k)")
            left = count("SELECT count(*) FROM members ANTI JOIN segment USING (k)")
            return Membership(
                audience_before=None,
                members=len(members),
                segment=count("SELECT count(*) FROM segment"),
                invalid_rows=invalid,
                joiners=ids(
                    "SELECT k FROM (SELECT k FROM segment ANTI JOIN members USING (k) "
                    "UNION SELECT k FROM unconfirmed SEMI JOIN segment USING (k)) ORDER BY k"
                ),
                leavers=ids(
                    "SELECT k FROM (SELECT k FROM members ANTI JOIN segment USING (k) "
                    "UNION SELECT k FROM unconfirmed ANTI JOIN segment USING (k)) ORDER BY k"
                ),
                joined=joined,
                left=left,
                member_ids=members,
                unconfirmed=unconfirmed,
            )

    # -- guards ----------------------------------------------------------------------------------

    def verdicts(self, allow: tuple[str, ...] | list[str]) -> list[GuardVerdict]:
        """``empty_segment`` and ``removed_percent`` on the membership changes (``--allow NAME`` overrides both)."""
        membership = self.membership
        if membership is None:
            return []
        counts = {"rows": membership.segment, "removed": membership.left, "changed": 0}
        verdicts = evaluate_guards(
            counts,
            self.activation.guards,
            synced_before=membership.members,
            sync_mode=SyncMode.MIRROR,
            allow=allow,
        )
        return [
            GuardVerdict(v.name, v.tripped, v.overridden, f"audience {self.name!r}: {_as_members(v.detail)}")
            for v in verdicts
            if v.name != "changed_percent"
        ]

    # -- send ------------------------------------------------------------------------------------

    async def send(self, client: BatchClient) -> None:
        """Create the audience if needed, send the changes, follow the tokens.

        What becomes of a leaver's profile is the removal policy's (``sync.removals``): with an
        audience, by default, its attributes are kept and its fingerprint forgotten.
        """
        membership = self.membership
        if membership is None:
            return
        store, lease = self.store, self.keeper.lease
        await asyncio.to_thread(store.compact_members, lease)
        if await asyncio.to_thread(store.start_members, lease, self.name):
            self._warnings.append(f"the state held audience {membership.audience_before!r}: forgotten")
        # The session first (its making, the run's first call's, must not eat a call's deadline).
        client.transport.ready()
        api = AudienceClient(client.transport, self.name)
        try:
            await self._ensure(api, membership)
            await self._calls(api, membership)
            await self._follow(api)
        except AudienceCallFailed as error:
            # Batch did not take a view or a create in time: nothing of the audience moved (partial).
            self.failed = True
            self._error = str(error)
        finally:
            stats = api.stats
            self._extra = {
                "calls": stats.calls,
                "attempts": stats.attempts,
                "rate_limited": stats.rate_limited,
                "wait_seconds": round(stats.wait_seconds, 3),
            }
            self.record.audience = self._summary()

    async def _ensure(self, api: AudienceClient, membership: Membership) -> None:
        """The audience exists in Batch (created if not); a new one starts from an empty member state."""
        view = await api.view(deadline=self.keeper.deadline())
        if view is not None:
            if view.type is not None and "custom" not in view.type.lower():
                raise ConfigError(
                    f"Batch audience {self.name!r} holds {view.type!r} ids, not Custom IDs: name another audience",
                    source=f"activation '{self.activation.name}'",
                    field="audience",
                )
            if view.indexing_state == "APPLIED" and view.nb_ids not in (None, membership.members):
                self._warnings.append(
                    f"Batch holds {view.nb_ids} ids in the audience, the state {membership.members}: it was "
                    "changed outside cepsync; `cepsync reset` makes the next run rebuild it"
                )
            return
        try:
            token = await api.create(f"cepsync: {self.activation.name}", deadline=self.keeper.deadline())
        except ConfigError:
            # Refused because an earlier attempt of this same call created it (its answer was lost)?
            if await api.view(deadline=self.keeper.deadline()) is None:
                raise
            token = None
        self._created = True
        self._tokens.append({"call": "create", "ids": 0, "token": token, "state": None})
        if membership.members or len(membership.unconfirmed):
            # Deleted in Batch since the last run: what the state says of its members is void,
            # and every id of the segment joins the new audience.
            await asyncio.to_thread(self.store.forget_members, self.keeper.lease)
            members = membership.member_ids
            staying = members.filter(pc.invert(pc.is_in(members, value_set=membership.leavers)))
            everyone = pc.unique(pa.concat_arrays([membership.joiners, staying]))
            membership.joiners = everyone.take(pc.sort_indices(everyone))
            membership.leavers = pa.array([], pa.string())
            membership.unconfirmed = pa.array([], pa.string())
            self._warnings.append("the audience was missing in Batch: created, and filled with the segment")

    async def _calls(self, api: AudienceClient, membership: Membership) -> None:
        store = self.store
        unconfirmed = membership.unconfirmed
        for adds, removes in _calls(membership.joiners, membership.leavers):
            if self.keeper.budget_exhausted():
                self.failed = True
                self._error = "time budget spent: the rest of the audience changes are left to the next run"
                return
            ids = pa.concat_arrays([adds, removes])
            lease = self.keeper.lease
            note = await asyncio.to_thread(store.record_member_intents, lease, ids)
            try:
                token = await api.update(adds.to_pylist(), removes.to_pylist(), deadline=self.keeper.deadline())
            except AudienceCallFailed as error:
                # The call's ids stay noted: the next run sends each as its membership is then.
                self.failed = True
                self._failed_ids = len(ids)
                self._error = str(error)
                self._log.warning("audience call failed", error=str(error), ids=len(ids))
                return
            await asyncio.to_thread(store.commit_members, lease, adds, removes)
            await asyncio.to_thread(store.retire_member_intents, lease, note)
            if len(unconfirmed):
                older = ids.filter(pc.is_in(ids, value_set=unconfirmed))
                if len(older):
                    await asyncio.to_thread(store.clear_member_intents, lease, older)
            self._added += len(adds)
            self._removed += len(removes)
            self._tokens.append({"call": "update", "ids": len(ids), "token": token, "state": None})
        await asyncio.to_thread(store.compact_members, self.keeper.lease)

    async def _follow(self, api: AudienceClient) -> None:
        """Ask Batch for each token's indexing state until it is final, or the wait ends."""
        started = time.monotonic()
        ends = min(started + INDEX_WAIT_SECONDS, self.keeper.deadline())
        pause = POLL_SECONDS[0]
        for entry in self._tokens:
            token = entry["token"]
            if not isinstance(token, str):
                entry["state"] = "NO_TOKEN"
                continue
            while True:
                try:
                    view = await api.view(token, deadline=ends)
                except (AudienceCallFailed, BatchContractError) as error:
                    entry["state"] = "UNKNOWN"
                    self._warnings.append(f"indexing state of {token} unknown: {error}")
                    break
                entry["state"] = view.indexing_state if view is not None else "AUDIENCE_GONE"
                if entry["state"] in FINAL_STATES or view is None or time.monotonic() + pause >= ends:
                    break
                await asyncio.sleep(pause)
                pause = min(pause * 2, POLL_SECONDS[1])
        pending = sum(1 for entry in self._tokens if entry["state"] not in (*FINAL_STATES, "NO_TOKEN"))
        self._extra["indexing_seconds"] = round(time.monotonic() - started, 3)
        if pending:
            self._warnings.append(
                f"{pending} audience update(s) not indexed by Batch yet; Batch applies them later "
                "(a campaign sent before then may miss them)"
            )

    def _summary(self) -> dict[str, object]:
        """The run record's ``audience`` (docs/run-record.md)."""
        membership = self.membership
        assert membership is not None
        tokens = self._tokens
        return {
            "name": self.name,
            "members_before": membership.members,
            "segment_members": membership.segment,
            "invalid_id_rows": membership.invalid_rows,
            "joined": membership.joined,
            "left": membership.left,
            "resent": len(membership.unconfirmed),
            "created": self._created,
            "added": self._added,
            "removed": self._removed,
            "failed": self._failed_ids,
            "members_after": membership.members + self._added - self._removed,
            "error": self._error,
            "warnings": list(self._warnings),
            "tokens": tokens[:RECORDED_TOKENS],
            "tokens_total": len(tokens),
            "indexed": all(entry["state"] in (*FINAL_STATES, "NO_TOKEN") for entry in tokens),
            **self._extra,
        }


def _as_members(detail: str) -> str:
    return detail.replace("synced profiles would be cleared", "members would leave").replace(
        "profiles are synced", "ids are members"
    )


def _calls(joiners: pa.Array, leavers: pa.Array) -> Iterator[tuple[pa.Array, pa.Array]]:
    """(adds, removes) of each call, at most :data:`MAX_IDS_PER_CALL` ids in all, adds first."""
    empty = pa.array([], pa.string())
    for start in range(0, len(joiners), MAX_IDS_PER_CALL):
        adds = joiners.slice(start, MAX_IDS_PER_CALL)
        room = MAX_IDS_PER_CALL - len(adds)
        if start + MAX_IDS_PER_CALL >= len(joiners) and room and len(leavers):
            yield adds, leavers.slice(0, room)
            leavers = leavers.slice(room)
        else:
            yield adds, empty
    for start in range(0, len(leavers), MAX_IDS_PER_CALL):
        yield empty, leavers.slice(start, MAX_IDS_PER_CALL)
