"""What a report shows, computed from run records: pure functions, no I/O, no HTML.

Thousands of runs must stay readable, so runs are grouped into at most
:data:`MAX_BUCKETS` time buckets (one run per bucket while they fit); tables list only
the latest runs and the latest notable events.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sync.model import Reason
from sync.runlog import KNOWN_STAGES, duration_seconds, outcome, rejected_total, stage_seconds

MAX_BUCKETS = 60
RECENT_RUNS = 20
STAGE_RUNS = 10
SAMPLES_PER_REASON = 5
NOTABLE_EVENTS = 10

# Labels of stage timings; records older than per-stage timings show their coarse timings.
STAGE_LABELS = {
    "read": "read",
    "hash_and_diff": "hash + diff",
    "map": "map",
    "send": "send",
    "batch_wait": "waiting on Batch",
    "rate_limit_wait": "rate-limit wait",
    "commit": "commit",
}
LEGACY_STAGES = {"read_and_plan_seconds": "read + plan", "send_seconds": "send", "wire_seconds": "waiting on Batch"}

# Bucket widths tried in order, from one hour to four weeks.
_WIDTHS = [timedelta(hours=h) for h in (1, 2, 3, 6, 12, 24, 48, 168, 336, 672)]

OUTCOME_CLASSES = ("success", "failure", "other")


def run_started(record: Mapping[str, object]) -> datetime | None:
    try:
        started = datetime.fromisoformat(str(record["started_at"]))
    except (KeyError, TypeError, ValueError):
        return None
    return started if started.tzinfo else started.replace(tzinfo=UTC)


# Records are JSON read back from the state store, written by this version or an older one: a
# part is looked at as what it is, and a part missing or not of its shape reads as empty.


def as_mapping(value: object) -> Mapping[str, object]:
    """``value`` if it is a mapping (a record's counts, timings, one sample), else an empty one."""
    return value if isinstance(value, Mapping) else {}


def as_sequence(value: object) -> Sequence[object]:
    """``value`` if it is a list (a record's samples, an issue list), else an empty one."""
    return value if isinstance(value, list | tuple) else ()


def _count(counts: Mapping[str, object], key: str) -> int:
    value = counts.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class Bucket:
    """One point on the time axis: a single run, or every run in a time window.

    ``sent`` and ``acknowledged`` are what reached Batch. ``changed`` and ``removed`` are what
    runs planned, counted only for runs that sent something: a run that a guard aborted, or
    that stopped before sending, adds 0 (its plan never reached Batch; summing it showed a
    window with 10,600 "changed" where 200 were sent). ``unsent_plans`` counts such runs
    whose plan had changes or removals, so the report can say what was left out.
    """

    label: str
    start: datetime
    runs: int = 0
    sent: int = 0
    acknowledged: int = 0
    changed: int = 0
    removed: int = 0
    rejected: int = 0
    unsent_plans: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)

    def add(self, record: Mapping[str, object]) -> None:
        counts = as_mapping(record.get("counts"))
        self.runs += 1
        sent = _count(counts, "sent")
        self.sent += sent
        self.acknowledged += _count(counts, "acknowledged")
        if sent:
            self.changed += _count(counts, "changed")
            self.removed += _count(counts, "removed")
        elif _count(counts, "changed") or _count(counts, "removed"):
            self.unsent_plans += 1
        self.rejected += rejected_total(counts)
        self.outcomes[outcome(str(record.get("status")))] += 1
        duration = duration_seconds(record)
        if duration is not None:
            self.durations.append(duration)

    @property
    def median_duration(self) -> float | None:
        return round(statistics.median(self.durations), 3) if self.durations else None

    @property
    def max_duration(self) -> float | None:
        return max(self.durations) if self.durations else None


@dataclass
class Timeline:
    buckets: list[Bucket]
    per_run: bool
    width: timedelta | None


def timeline(records: Sequence[Mapping[str, object]], max_buckets: int = MAX_BUCKETS) -> Timeline:
    """Runs oldest first: one bucket per run while they fit, else equal time windows."""
    dated = sorted(
        ((started, record) for record in records if (started := run_started(record)) is not None),
        key=lambda pair: pair[0],
    )
    if len(dated) <= max_buckets:
        labels = _unique_labels([started for started, _ in dated])
        buckets = []
        for label, (started, record) in zip(labels, dated, strict=True):
            bucket = Bucket(label, started)
            bucket.add(record)
            buckets.append(bucket)
        return Timeline(buckets, per_run=True, width=None)
    first, last = dated[0][0], dated[-1][0]
    width = next((w for w in _WIDTHS if (last - first) / w < max_buckets), _WIDTHS[-1])
    origin = first.replace(minute=0, second=0, microsecond=0)
    if width >= timedelta(days=1):
        origin = origin.replace(hour=0)
    by_index: dict[int, Bucket] = {}
    for started, record in dated:
        index = int((started - origin) / width)
        if index not in by_index:
            start = origin + index * width
            label = start.strftime("%m-%d") if width >= timedelta(days=1) else start.strftime("%m-%d %H:%M")
            by_index[index] = Bucket(label, start)
        by_index[index].add(record)
    return Timeline([by_index[i] for i in sorted(by_index)], per_run=False, width=width)


def _unique_labels(moments: Sequence[datetime]) -> list[str]:
    """One x-axis label per run, no two alike: minutes, seconds if needed, then a run number.

    Runs in the same minute (a continuation, a retry) all read "07-01 10:00" before, and
    the axis repeated its labels.
    """
    for pattern in ("%m-%d %H:%M", "%m-%d %H:%M:%S"):
        labels = [moment.strftime(pattern) for moment in moments]
        if len(set(labels)) == len(labels):
            return labels
    seen: Counter[str] = Counter()
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return unique


def unsent_plans(line: Timeline) -> int:
    """Runs whose planned changes or removals never reached Batch (left out of the sums)."""
    return sum(bucket.unsent_plans for bucket in line.buckets)


@dataclass(frozen=True)
class StageTimes:
    run_id: str
    seconds: dict[str, float]


def stage_times(records: Sequence[Mapping[str, object]], limit: int = STAGE_RUNS) -> list[StageTimes]:
    """Seconds per stage of the latest runs that timed any, oldest of them first.

    Per-stage timings (``timings.stages``) when the record has them; older records show
    their coarse timings (read + plan, send, waiting on Batch).
    """
    found: list[StageTimes] = []
    for record in records:
        stages = stage_seconds(record)
        if stages:
            seconds = {STAGE_LABELS.get(name, name): value for name, value in stages.items()}
        else:
            timings = as_mapping(record.get("timings"))
            seconds = {}
            for key, label in LEGACY_STAGES.items():
                value = timings.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    seconds[label] = round(float(value), 3)
        if seconds:
            found.append(StageTimes(str(record.get("run_id")), seconds))
        if len(found) == limit:
            break
    return list(reversed(found))


def stage_names(times: Iterable[StageTimes]) -> list[str]:
    """Every stage label present, known stages in pipeline order first."""
    known = ["read + plan"] + [STAGE_LABELS[name] for name in KNOWN_STAGES]
    present: list[str] = []
    for item in times:
        for name in item.seconds:
            if name not in present:
                present.append(name)
    order = {name: index for index, name in enumerate(dict.fromkeys(known))}
    return sorted(present, key=lambda name: (order.get(name, len(order)), name))


@dataclass(frozen=True)
class ReasonGroup:
    reason: str
    count: int
    share: float
    # row, custom_id, field and detail as the record holds them: shown, never computed with.
    samples: list[dict[str, object]]


def reason_groups(record: Mapping[str, object], *, batch: bool) -> list[ReasonGroup]:
    """Rejected rows of one run by reason code, most frequent first, with a few samples each.

    ``batch`` selects Batch's own answers (refusals of the value, per-item errors not about
    it, persistent ones: :attr:`sync.model.Reason.from_batch`) or our own checks.
    """
    by_reason = as_mapping(record.get("rejected_by_reason"))
    rows = _count(as_mapping(record.get("counts")), "rows")
    chosen = {
        str(reason): int(count)
        for reason, count in by_reason.items()
        if _from_batch(str(reason)) == batch and isinstance(count, int)
    }
    samples: dict[str, list[dict[str, object]]] = {reason: [] for reason in chosen}
    for sample in map(as_mapping, as_sequence(record.get("rejected_samples"))):
        for issue in map(as_mapping, as_sequence(sample.get("issues"))):
            bucket = samples.get(str(issue.get("reason")))
            if bucket is not None and len(bucket) < SAMPLES_PER_REASON:
                bucket.append(
                    {
                        "row": sample.get("row"),
                        "custom_id": sample.get("custom_id"),
                        "field": issue.get("field"),
                        "detail": issue.get("detail"),
                    }
                )
    ordered = sorted(chosen.items(), key=lambda item: (-item[1], item[0]))
    return [ReasonGroup(reason, count, count / rows if rows else 0.0, samples[reason]) for reason, count in ordered]


def _from_batch(reason: str) -> bool:
    try:
        return Reason(reason).from_batch
    except ValueError:  # a reason code of another version of cepsync: one of our own checks
        return False


def status_counts(records: Iterable[Mapping[str, object]]) -> list[tuple[str, str, int]]:
    """(status, outcome, runs) over the window, most frequent first."""
    counts = Counter(str(record.get("status")) for record in records)
    return [(status, outcome(status), n) for status, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def mapping_changes(records: Iterable[Mapping[str, object]], limit: int = NOTABLE_EVENTS) -> list[Mapping[str, object]]:
    """The latest runs that ran with a changed mapping version, newest first."""
    return [r for r in records if as_mapping(r.get("mapping_version")).get("changed")][:limit]


def failures(records: Iterable[Mapping[str, object]], limit: int = NOTABLE_EVENTS) -> list[Mapping[str, object]]:
    """The latest runs that failed or were stopped, newest first."""
    return [r for r in records if outcome(str(r.get("status"))) == "failure"][:limit]


def last_success(records: Iterable[Mapping[str, object]]) -> Mapping[str, object] | None:
    return next((r for r in records if outcome(str(r.get("status"))) == "success"), None)
