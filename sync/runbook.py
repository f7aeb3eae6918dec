"""The run book: one run's counts, samples and rejects, with one owner.

Two threads report what a run comes to: the pipeline thread (rows the planner rejected,
rows a continued pass skipped) and the event loop (what Batch answered, read from the
sender's :class:`sync.send.SendTally` once sending is done, and at each checkpoint).
Everything they write to the run record's counts and samples goes through a
:class:`RunBook`, under its lock, so no count is written from two threads at once and the
rules (sample sizes, which rejections are listed for ``--rejects``, how Batch's per-item
failures are counted over runs) are written once (``docs/run-record.md``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Final

from sync.config import RemovalPolicy
from sync.differ import IdScan
from sync.fingerprint import payload_fingerprint_of
from sync.model import NO_ATTRIBUTE, PERSISTENT_AFTER_RUNS, Reason, Refusal, RowIssue
from sync.plan import REJECTED_SAMPLE_SIZE, BatchPlan, PlanCounts, RejectedRow, remembered_issue
from sync.record import RunRecord
from sync.send import SendTally, removal_body

__all__ = ["BATCH_REJECTED_SAMPLE_SIZE", "REMEMBERED_COUNTS", "SEND_COUNTS", "RejectSink", "RunBook"]

# Batch refusals kept verbatim in the run record (after the planning sample).
BATCH_REJECTED_SAMPLE_SIZE: Final = 100
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

# Where every rejected row goes as a record (``cepsync run --rejects``, the results tables).
RejectSink = Callable[[dict[str, object]], None]


class RunBook:
    """Counts, samples and rejects of one run (see the module docstring).

    Args:
        record: The run record the book writes counts and samples into.
        rejects: Every rejected row as a record, or None (the record keeps a sample only).
    """

    def __init__(self, record: RunRecord, *, rejects: RejectSink | None) -> None:
        self.record = record
        self.rejects = rejects
        self._lock = threading.Lock()
        # What Batch did not apply in earlier runs (by custom_id): set when the state is read.
        self.refusals: Mapping[str, Refusal] = {}
        # Rows Batch refused this run, by reason (kept through the planning's recount).
        self._refused: dict[str, int] = {}
        # Removals held back because Batch refused that very clearing payload before.
        self._held_removals: dict[str, int] = {}
        # Sending is over: the send counts are final (a later checkpoint keeps them so).
        self._sent_all = False

    # -- counts ------------------------------------------------------------------------------
    def count(self, name: str, value: int) -> None:
        """Set one count (from either thread)."""
        with self._lock:
            self.record.counts[name] = value

    def note_timing(self, name: str, value: float) -> None:
        """Set one entry of the record's timings (from either thread)."""
        with self._lock:
            self.record.timings[name] = value

    def start_sending(self) -> None:
        with self._lock:
            self.record.counts.update(dict.fromkeys(SEND_COUNTS, 0))

    def take_sends(self, tally: SendTally, *, final: bool) -> None:
        """The send counts, from what the sender's requests came to so far.

        ``sent`` is every profile a request carried; once sending is over (``final``), one
        Batch did not answer for (a request stopped by a 401 or an unreachable host) is
        ``failed`` like a transient failure.
        """
        final = self._sent_all = final or self._sent_all
        answered = tally.acknowledged + tally.rejected
        with self._lock:
            counts = self.record.counts
            counts["acknowledged"] = tally.acknowledged
            counts["rejected_by_batch"] = tally.rejected
            counts["item_errors_retried"] = tally.item_retries
            counts["failed_by_item_error"] = len(tally.item_failures)
            counts["failed"] = max(tally.failed, tally.attempted - answered) if final else tally.failed
            counts["sent"] = tally.attempted if final else answered + tally.failed
            if tally.forgotten:  # on_remove: keep: removed ids dropped from the state, nothing sent
                counts["forgotten"] = tally.forgotten

    def checkpoint(self, tally: SendTally, *, committed: int, watermark: str | None, at: str) -> bool:
        """Note how far the run got in the record's ``checkpoint``; False when nothing moved since."""
        previous = self.record.checkpoint or {}
        if previous.get("committed") == committed and previous.get("watermark") == watermark:
            return False
        self.take_sends(tally, final=False)
        self.record.checkpoint = {
            "at": at,
            "acknowledged": self.record.counts.get("acknowledged", 0),
            "committed": committed,
            "watermark": watermark,
        }
        return True

    def fill_counts(
        self, ids: IdScan, *, full: bool, moved: PlanCounts, planned: PlanCounts, version: str, previous: str | None
    ) -> None:
        """The record's counts: the id scan's, the moved rows', and what the stream planned."""
        run = self.record
        mapping: dict[str, object] = {
            "current": version,
            "previous": previous,
            "changed": previous is not None and previous != version,
        }
        summary = planned.summary()
        skipped = 0 if full else max(0, ids.matched - moved.counts["rows_mapped"])
        summary["rows"] = ids.rows
        summary["skipped_unmapped"] = skipped
        summary["unchanged"] += skipped
        summary["removed"] = len(ids.removed)
        with self._lock:
            for name, held in self._held_removals.items():
                summary[name] = summary.get(name, 0) + held
            run.counts.update(summary)
            run.rejected_by_reason = dict(planned.rejected_by_reason)
            run.dropped_attributes_by_reason = dict(planned.dropped_by_reason)
            for key, value in self._refused.items():
                run.rejected_by_reason[key] = run.rejected_by_reason.get(key, 0) + value
            if mapping["changed"]:
                # send: changed_attributes (the config as it ran says so) sends only what moved.
                what = (
                    "with only the new or changed attributes"
                    if run.config.get("send") == "changed_attributes"
                    else "whole"
                )
                mapping["explanation"] = (
                    f"the mapping changed since the last successful run ({previous} → {version}): every row "
                    f"was mapped again; {run.counts['changed']} profiles whose payload differs are resent "
                    f"({what}), the others are unchanged"
                )
            run.mapping_version = mapping

    @property
    def rejected_total(self) -> int:
        """Rows not applied for a reason of their own: planning rejections, Batch's, remembered ones."""
        counts = self.record.counts
        return sum(counts.get(key, 0) for key in ("rejected", "rejected_by_batch", *REMEMBERED_COUNTS))

    # -- rejections --------------------------------------------------------------------------
    def keep_rejected(self, planned: BatchPlan) -> None:
        """A planned batch's rejected rows and dropped attributes: sampled, and listed if asked."""
        if not planned.rejected and not (self.rejects is not None and planned.dropped):
            return
        with self._lock:
            if self.rejects is not None:
                for dropped in planned.dropped:
                    self._list(dropped.as_record())
            rows = sorted(planned.rejected, key=lambda rejected: rejected.row_number or 0)
            samples = self.record.rejected_samples
            for rejected in rows:
                if self.rejects is not None:
                    self._list(rejected.as_record())
                if len(samples) < REJECTED_SAMPLE_SIZE:
                    samples.append(rejected.as_record())
            samples.sort(key=_row_of)

    def hold_refused_removals(
        self, removed: list[str], owned_keys: frozenset[str] | set[str], policy: RemovalPolicy = RemovalPolicy.CLEAR
    ) -> list[str]:
        """``removed`` without the ids whose clearing payload Batch refused before (listed, counted).

        A refused removal is remembered like a refused upsert (``Sender._remember``): by
        the removal payload's fingerprint, so a change of the owned keys sends it again, and
        ``--full`` does too. Under ``on_remove: keep`` nothing is sent, so nothing is held.
        """
        if policy is RemovalPolicy.KEEP:
            return removed
        payload = payload_fingerprint_of(removal_body(owned_keys))
        kept: list[str] = []
        for custom_id in removed:
            prior = self.refusals.get(custom_id)
            if prior is None or not prior.remembered or prior.payload != payload:
                kept.append(custom_id)
                continue
            name = "persistent_unchanged" if prior.persistent else "refused_unchanged"
            self._held_removals[name] = self._held_removals.get(name, 0) + 1
            self._note_batch_issue(custom_id, remembered_issue(prior), listed=True)
        return kept

    def batch_answers(self, tally: SendTally) -> list[Refusal]:
        """Batch's per-item answers of the run, noted; the state entries they come to.

        A value refusal is counted, sampled and listed (``--rejects``). A per-item failure
        not about the value is counted after the id's entry before the run (``persistent``
        once it reaches the bound) and sampled with Batch's reason; a persistent one is
        listed like a refusal, since it is not sent again while its payload stays the same.
        """
        for refusal in tally.refusals:
            issue = RowIssue(refusal.field or NO_ATTRIBUTE, Reason.BATCH_REJECTED, f"Batch: {refusal.reason}")
            self._note_batch_issue(refusal.custom_id, issue, listed=True)
        entries = [failure.following(self.refusals.get(failure.custom_id)) for failure in tally.item_failures]
        for entry in entries:
            if entry.persistent:
                with self._lock:
                    self.record.counts["persistent"] = self.record.counts.get("persistent", 0) + 1
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
        return [*tally.refusals, *entries]

    def _note_batch_issue(self, custom_id: str, issue: RowIssue, *, listed: bool) -> None:
        """Count and sample one of Batch's per-item answers; ``listed``: a ``--rejects`` line too."""
        reason = issue.reason.value
        row = RejectedRow(None, custom_id, (issue,))
        with self._lock:
            # _refused survives the planning's recount of rejected_by_reason (fill_counts).
            self._refused[reason] = self._refused.get(reason, 0) + 1
            self.record.rejected_by_reason[reason] = self.record.rejected_by_reason.get(reason, 0) + 1
            if listed and self.rejects is not None:
                self._list(row.as_record())
            if len(self.record.rejected_samples) < BATCH_REJECTED_SAMPLE_SIZE:
                self.record.rejected_samples.append(row.as_record())

    def _list(self, record: Mapping[str, object]) -> None:
        assert self.rejects is not None
        self.rejects({"run_id": self.record.run_id, "activation": self.record.activation, **record})


def _row_of(sample: Mapping[str, object]) -> int:
    """A sample's row number (0 for a row Batch refused: it has none of its own)."""
    row = sample.get("row")
    return row if isinstance(row, int) else 0
