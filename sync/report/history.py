"""``cepsync history`` output: an 80-column table, CSV and JSON, from run records.

The table keeps the run id whole (it is what ``--run ID`` takes) and fits 80 columns by
abbreviating the rest: counts as 999, 12k, 1.2M; durations as 4.2s, 12m; statuses by
the short names of :data:`SHORT_STATUS`. CSV and JSON keep every value as recorded.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence

from rich.table import Table
from rich.text import Text

from sync.model import Reason
from sync.report.summary import as_mapping, as_sequence
from sync.runlog import ITEM_ERROR_COUNTS, PROFILE_COUNTS, count_of, duration_seconds, outcome, rejected_total

SHORT_STATUS = {
    "succeeded": "ok",
    "succeeded_with_rejections": "ok, rejects",
    "planned": "planned",
    "duplicate_trigger": "duplicate",
    "failed": "FAILED",
    "failed_permanently": "gave up",
    "config_error": "config error",
    "aborted_by_guard": "guard stop",
    "auth_error": "auth error",
    "skipped_lease_held": "lease held",
    "partial": "partial",
    "incomplete": "incomplete",
    "interrupted": "interrupted",
    "abandoned": "abandoned",
    "running": "running",
}
# 23 (run id) + 12 + 6 counts x 4 + 5 (time) + 8 gaps of 2 = 80 columns.
STATUS_WIDTH = 12
NUMBER_COLUMNS = (("new", "new"), ("chg", "changed"), ("rem", "removed"), ("ack", "acknowledged"), ("fail", "failed"))

# What a run asked of its state store (``state_ops``), as the CSV's last columns.
STATE_OPS_COLUMNS = ("reads", "writes", "deletes", "transactions", "contention_retries")
CSV_COLUMNS = (
    "run_id",
    "activation",
    "started_at",
    "ended_at",
    "status",
    "trigger",
    "duration_seconds",
    *PROFILE_COUNTS,
    *ITEM_ERROR_COUNTS,
    "error",
    "state_backend",
    *(f"state_{key}" for key in STATE_OPS_COLUMNS),
)
# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def abbreviate(value: object) -> str:
    """A count in at most 4 characters: 999, 1.2k, 12k, 999k, 1.2M, 12M, 1.2G."""
    if not isinstance(value, int) or isinstance(value, bool):
        return ""
    sign = "-" if value < 0 else ""
    number = abs(value)
    if number < 1000:
        return f"{sign}{number}"
    for unit, size in (("k", 10**3), ("M", 10**6), ("G", 10**9)):
        scaled = number / size
        if scaled < 9.95:
            return f"{sign}{scaled:.1f}{unit}"
        if scaled < 999.5 or unit == "G":
            return f"{sign}{scaled:.0f}{unit}"
    return f"{sign}{number}"  # pragma: no cover - the G unit takes every larger number


def short_duration(seconds: float | None) -> str:
    """A duration in at most 5 characters: 0.4s, 42s, 4.2m, 42m, 1.5h, 30h."""
    if seconds is None:
        return ""
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    if seconds < 99.5:
        return f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 9.95:
        return f"{minutes:.1f}m"
    if minutes < 99.5:
        return f"{minutes:.0f}m"
    hours = minutes / 60
    return f"{hours:.1f}h" if hours < 9.95 else f"{hours:.0f}h"


def short_status(status: str) -> str:
    text = SHORT_STATUS.get(status, status)
    return text if len(text) <= STATUS_WIDTH else text[: STATUS_WIDTH - 1] + "…"


def state_caption(records: Sequence[Mapping[str, object]]) -> str:
    """What these runs asked of their state store, summed (``state_ops``), or "" if none counted."""
    totals = dict.fromkeys(STATE_OPS_COLUMNS, 0)
    backends: set[str] = set()
    for record in records:
        ops = record.get("state_ops")
        if not isinstance(ops, Mapping):
            continue
        backends.add(str(ops.get("backend", "?")))
        for key in STATE_OPS_COLUMNS:
            value = ops.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                totals[key] += value
    if not backends or not any(totals.values()):
        return ""
    spent = ", ".join(f"{abbreviate(value)} {key.replace('_', ' ')}" for key, value in totals.items())
    return f"state ({', '.join(sorted(backends))}) over these runs: {spent}"


def history_table(name: str, records: Sequence[Mapping[str, object]]) -> Table:
    """Recent runs, newest first, in 80 columns. Every cell is plain text, never markup."""
    caption = "counts: k thousand, M million · rej includes rows Batch refused"
    state = state_caption(records)
    if state:
        caption += "\n" + state
    table = Table(
        title=Text(f"runs of {name}"),
        title_justify="left",
        box=None,
        padding=(0, 1),
        pad_edge=False,
        caption=Text(caption),
        caption_justify="left",
    )
    table.add_column("run", no_wrap=True, min_width=23)
    table.add_column("status", no_wrap=True, max_width=STATUS_WIDTH)
    for header, _ in NUMBER_COLUMNS[:3]:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("rej", justify="right", no_wrap=True)
    for header, _ in NUMBER_COLUMNS[3:]:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    styles = {"success": "green", "failure": "bold red", "other": "dim"}
    for record in records:
        counts = as_mapping(record.get("counts"))
        status = str(record.get("status", ""))
        numbers = [abbreviate(counts.get(key)) for _, key in NUMBER_COLUMNS]
        rejected = abbreviate(rejected_total(counts)) if counts else ""
        table.add_row(
            Text(str(record.get("run_id", ""))),
            Text(short_status(status), style=styles[outcome(status)]),
            *(Text(n) for n in numbers[:3]),
            Text(rejected),
            *(Text(n) for n in numbers[3:]),
            Text(short_duration(duration_seconds(record))),
        )
    return table


def persistent_notes(records: Sequence[Mapping[str, object]]) -> list[str]:
    """One line per listed run that met persistent Batch errors, with Batch's reason (plain text).

    A persistent error is a per-item error not about the value that came back for the same
    payload several runs in a row: that payload is no longer sent while it stays the same,
    so the table alone (a count among the rejections) would hide why.
    """
    notes = []
    for record in records:
        counts = as_mapping(record.get("counts"))
        new, kept = count_of(counts, "persistent"), count_of(counts, "persistent_unchanged")
        if not new and not kept:
            continue
        parts = [f"{n} {what}" for n, what in ((new, "became persistent"), (kept, "still persistent, not resent")) if n]
        note = f"{record.get('run_id', '')}: persistent Batch errors: {', '.join(parts)}"
        example = _persistent_sample(record)
        if example:
            note += f"; e.g. {example}"
        notes.append(note)
    return notes


def _persistent_sample(record: Mapping[str, object]) -> str:
    for sample in map(as_mapping, as_sequence(record.get("rejected_samples"))):
        for issue in map(as_mapping, as_sequence(sample.get("issues"))):
            if issue.get("reason") == Reason.BATCH_PERSISTENT_ERROR.value:
                return f"{sample.get('custom_id')}: {issue.get('detail')}"
    return ""


def _csv_cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def history_csv(records: Sequence[Mapping[str, object]]) -> str:
    """One CSV row per run with its counts and error (text cells safe to open in a spreadsheet)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        counts = as_mapping(record.get("counts"))
        trigger = record.get("trigger")
        row: dict[str, object] = {
            "run_id": record.get("run_id"),
            "activation": record.get("activation"),
            "started_at": record.get("started_at"),
            "ended_at": record.get("ended_at"),
            "status": record.get("status"),
            "trigger": trigger.get("kind") if isinstance(trigger, Mapping) else trigger,
            "duration_seconds": duration_seconds(record),
            "error": record.get("error"),
        }
        ops = as_mapping(record.get("state_ops"))
        row["state_backend"] = ops.get("backend")
        for key in STATE_OPS_COLUMNS:
            row[f"state_{key}"] = ops.get(key)
        for key in CSV_COLUMNS:
            if key not in row:
                row[key] = counts.get(key)
        writer.writerow(["" if row[key] is None else _csv_cell(row[key]) for key in CSV_COLUMNS])
    return out.getvalue()
