"""One self-contained HTML file about an activation's runs: ``cepsync report NAME``.

Everything is inline (styles and SVG charts); the page loads nothing and runs no script,
and its Content-Security-Policy forbids both, so it opens offline from a file or an e-mail
attachment. Every value taken from a run record or a config is escaped by Jinja2's
autoescaping; the only markup inserted as-is is the SVG pygal wrote (text escaped as XML).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import jinja2
import yaml
from markupsafe import Markup

from sync import __version__
from sync.report import charts
from sync.report.summary import (
    RECENT_RUNS,
    as_mapping,
    failures,
    last_success,
    mapping_changes,
    reason_groups,
    stage_names,
    stage_times,
    status_counts,
    timeline,
    unsent_plans,
)
from sync.results.queries import run_queries
from sync.runlog import duration_seconds, outcome, rejected_total

# Outcome rows of the latest run, in pipeline order (labels as in `cepsync run`).
COUNT_LABELS = (
    ("rows read", "rows"),
    ("new", "new"),
    ("changed", "changed"),
    ("unchanged", "unchanged"),
    ("of which not even mapped", "skipped_unmapped"),
    ("removed (mirror)", "removed"),
    ("rejected before sending", "rejected"),
    ("of which duplicate ids", "duplicates"),
    ("sent", "sent"),
    ("refused by Batch before, unchanged", "refused_unchanged"),
    ("persistent Batch error before, unchanged", "persistent_unchanged"),
    ("acknowledged by Batch", "acknowledged"),
    ("value refused by Batch (remembered)", "rejected_by_batch"),
    ("failed (resent next run)", "failed"),
    ("of which a per-item error, not about the value", "failed_by_item_error"),
    ("of which persistent (remembered)", "persistent"),
    ("per-item errors retried within the run", "item_errors_retried"),
)

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

TEMPLATE = "report.html.j2"


def _environment() -> jinja2.Environment:
    # Lenient undefined on purpose: records of older versions lack some keys, and show blanks.
    env = jinja2.Environment(loader=jinja2.PackageLoader("sync.report", "."), autoescape=True)
    env.filters["when"] = _when
    env.globals.update(
        seconds=lambda value: "" if value is None else f"{value:,.2f}",
        duration=duration_seconds,
        outcome=lambda status: outcome(str(status)),
        rejected=rejected_total,
        count=_count,
        trigger=_trigger,
    )
    return env


def _count(record: Mapping[str, object], key: str) -> object:
    """One count of a run as recorded (blank when absent)."""
    return as_mapping(record.get("counts")).get(key, "")


def _trigger(record: Mapping[str, object]) -> object:
    """What started a run: a trigger's kind (a record of an older version holds it as text)."""
    trigger = record.get("trigger")
    if isinstance(trigger, Mapping):
        return trigger.get("kind", "")
    return str(trigger or "")


def _when(value: object) -> str:
    """An ISO timestamp as ``2026-11-29 02:03:04 UTC``; anything else as text."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return "" if value is None else str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _width_text(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:g} day(s)" if hours >= 24 else f"{hours:g} hour(s)"


def render_report(
    name: str,
    records: Sequence[Mapping[str, object]],
    *,
    state_kind: str,
    config_file: Mapping[str, object] | None = None,
    config_file_name: str | None = None,
    now: datetime | None = None,
) -> str:
    """The report as one HTML document.

    Args:
        name: The activation name.
        records: Its run records, newest first (as ``StateStore.list_runs`` returns them).
        state_kind: ``sqlite`` or ``firestore``: where the records came from (no path, no URL).
        config_file: The activation file's config, shown when no run recorded its own.
        config_file_name: The file's name, to say where that config came from.
        now: The generation time (default: now).
    """
    env = _environment()
    template = env.get_template(TEMPLATE)
    generated = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    records = [dict(record) for record in records]
    context: dict[str, object] = {
        "csp": CSP,
        "version": __version__,
        "name": name,
        "generated": generated,
        "state_kind": state_kind,
        "runs_total": len(records),
    }
    if records:
        latest = records[0]
        line = timeline(records)
        stages = stage_times(records)
        totals = {kind: 0 for kind in ("success", "failure", "other")}
        for _, kind, n in status_counts(records):
            totals[kind] += n
        config, origin = _config_text(records, config_file, config_file_name)
        counts = as_mapping(latest.get("counts"))
        context.update(
            latest=latest,
            latest_outcome=outcome(str(latest.get("status"))),
            first=records[-1].get("started_at"),
            last=latest.get("started_at"),
            success=last_success(records),
            outcome_totals=totals,
            line=line,
            unsent=unsent_plans(line),
            width=_width_text(line.width.total_seconds()) if line.width else "",
            profiles_svg=Markup(charts.profiles_chart(line)),  # noqa: S704 - pygal's SVG, text escaped as XML
            duration_svg=Markup(charts.duration_chart(line)),  # noqa: S704 - pygal's SVG, text escaped as XML
            outcomes_svg=None if line.per_run else Markup(charts.outcomes_chart(line)),  # noqa: S704 - as above
            stages=stages,
            stages_svg=Markup(charts.stages_chart(stages)) if stages else None,  # noqa: S704 - as above
            stage_columns=stage_names(stages),
            statuses=status_counts(records),
            counts=[(label, counts[key]) for label, key in COUNT_LABELS if isinstance(counts.get(key), int)],
            ours=reason_groups(latest, batch=False),
            theirs=reason_groups(latest, batch=True),
            dropped=sorted(as_mapping(latest.get("dropped_attributes_by_reason")).items()),
            recent=records[:RECENT_RUNS],
            results_runs=[
                {"record": r, "queries": run_queries(r)}
                for r in records[:RECENT_RUNS]
                if r.get("results") or r.get("results_error")
            ],
            failed=failures(records),
            changes=mapping_changes(records),
            config=config,
            config_origin=origin,
        )
    return template.render(context)


def _config_text(
    records: Sequence[Mapping[str, object]], config_file: Mapping[str, object] | None, config_file_name: str | None
) -> tuple[str | None, str]:
    for record in records:
        recorded = record.get("config")
        if isinstance(recorded, Mapping):
            text = yaml.safe_dump(dict(recorded), sort_keys=False, allow_unicode=True)
            return text, f"As run {record.get('run_id')} used it"
    if config_file is not None:
        text = yaml.safe_dump(dict(config_file), sort_keys=False, allow_unicode=True)
        return text, f"From {config_file_name or 'the activation file'} as it is now (no run recorded its own)"
    return None, ""
