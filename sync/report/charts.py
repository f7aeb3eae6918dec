"""Static SVG charts for the HTML report, drawn with pygal.

pygal writes SVG through an XML library, so every label and series name is escaped as XML
text. Its charts carry a small inline script for interactive tooltips; the report allows
no script at all (its Content-Security-Policy says so), so the script is removed here and
each point gets an SVG ``<title>``, which browsers show as a native tooltip instead.
"""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import pygal
from pygal.style import Style

from sync.report.summary import OUTCOME_CLASSES, StageTimes, Timeline, stage_names

# Importing pygal appends a legacy import hook to sys.meta_path (for its map plugins, unused
# here). It has no find_spec, so on Python 3.11 every later *failed* import in the process
# (an optional dependency probed with try/except) raises an ImportWarning through it; under
# warnings-as-errors that breaks unrelated code. The report needs no pygal plugin: drop it.
sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != "PluginImportFixer"]

# Outcome colours: green for success, red for failures, grey for runs that did nothing.
OUTCOME_COLOURS = {"success": "#2e7d32", "failure": "#c62828", "other": "#9e9e9e"}
OUTCOME_LABELS = {"success": "succeeded", "failure": "failed or stopped", "other": "no sync (skipped, planned…)"}
SERIES_COLOURS = ("#1565c0", "#ef6c00", "#6a1b9a", "#c62828", "#00838f", "#558b2f", "#5d4037", "#37474f")

WIDTH = 900
HEIGHT = 320


def _style(colours: Sequence[str]) -> Style:
    return Style(
        background="white",
        plot_background="white",
        colors=tuple(colours),
        font_family="system-ui, sans-serif",
        label_font_size=11,
        major_label_font_size=11,
        legend_font_size=12,
        title_font_size=14,
    )


# Room for x-axis labels: the plot's width, a label character's width at the label font
# size (11 px), and the spacing rotated labels need so that neighbours do not overlap.
_PLOT_WIDTH = WIDTH - 80
_CHAR_WIDTH = 6.5
_ROTATED_SPACING = 22.0
_ROTATION = 40


def x_axis_layout(labels: Sequence[str]) -> dict[str, object]:
    """Rotation and thinning of the x labels so that none overlaps another.

    Labels that fit side by side stay horizontal; longer ones are rotated; and when even
    rotated labels are closer than they are tall, only every n-th label is drawn (the
    points all stay, each with its own tooltip).
    """
    if not labels:
        return {"x_label_rotation": 0, "show_minor_x_labels": True, "x_labels_major_every": None}
    space = _PLOT_WIDTH / len(labels)
    widest = max(len(label) for label in labels) * _CHAR_WIDTH
    if widest + 8 <= space:
        return {"x_label_rotation": 0, "show_minor_x_labels": True, "x_labels_major_every": None}
    every = math.ceil(_ROTATED_SPACING / space)
    if every <= 1:
        return {"x_label_rotation": _ROTATION, "show_minor_x_labels": True, "x_labels_major_every": None}
    return {"x_label_rotation": _ROTATION, "show_minor_x_labels": False, "x_labels_major_every": every}


def _config(colours: Sequence[str], *, labels: Sequence[str], y_title: str) -> dict[str, object]:
    return {
        "js": [],
        "disable_xml_declaration": True,
        "width": WIDTH,
        "height": HEIGHT,
        "style": _style(colours),
        "legend_at_bottom": True,
        **x_axis_layout(labels),
        "y_title": y_title,
        "print_values": False,
        "truncate_label": -1,
        "margin": 10,
    }


def _svg(chart: pygal.graph.graph.Graph, css_class: str) -> str:
    """The chart as an inline ``<svg>`` element: no script, a title per point."""
    root = chart.render_tree()
    for parent in root.iter():
        for child in list(parent):
            if child.tag == "script":
                parent.remove(child)
        descriptions = [child for child in parent if child.tag == "desc"]
        values = [d.text for d in descriptions if "value" in (d.get("class") or "").split()]
        if values:
            labels = [d.text for d in descriptions if (d.get("class") or "") == "x_label"]
            title = ET.Element("title")
            title.text = f"{labels[0]}: {values[0]}" if labels and labels[0] else str(values[0])
            parent.insert(0, title)
    root.set("class", f"{root.get('class', '')} {css_class}".strip())
    root.set("role", "img")
    return ET.tostring(root, encoding="unicode")


def _nonzero(value: float | None) -> float | None:
    """pygal draws a zero-height bar for 0; None draws nothing, which is what a reader expects."""
    return value if value else None


def profiles_chart(line: Timeline) -> str:
    """Profiles sent, changed, removed and rejected per run (or per time window)."""
    labels = [bucket.label for bucket in line.buckets]
    chart = pygal.Line(**_config(SERIES_COLOURS, labels=labels, y_title="profiles"))
    chart.title = "Profiles per run" if line.per_run else "Profiles per time window (summed)"
    chart.x_labels = labels
    chart.add("sent to Batch", [bucket.sent for bucket in line.buckets])
    chart.add("acknowledged by Batch", [bucket.acknowledged for bucket in line.buckets])
    # Planned counts, from runs that sent (see summary.Bucket): a guard-aborted plan adds 0.
    chart.add("changed (planned, runs that sent)", [bucket.changed for bucket in line.buckets])
    chart.add("removed (planned, runs that sent)", [bucket.removed for bucket in line.buckets])
    chart.add("rejected", [bucket.rejected for bucket in line.buckets])
    return _svg(chart, "chart-profiles")


def duration_chart(line: Timeline) -> str:
    """Per run: its duration, coloured by outcome. Per window: median and longest duration."""
    labels = [bucket.label for bucket in line.buckets]
    if line.per_run:
        colours = [OUTCOME_COLOURS[name] for name in OUTCOME_CLASSES]
        chart = pygal.StackedBar(**_config(colours, labels=labels, y_title="seconds"))
        chart.title = "Duration per run, by outcome"
        chart.x_labels = labels
        for name in OUTCOME_CLASSES:
            chart.add(
                OUTCOME_LABELS[name],
                [bucket.median_duration if bucket.outcomes[name] else None for bucket in line.buckets],
            )
        return _svg(chart, "chart-duration")
    chart = pygal.Line(**_config(SERIES_COLOURS, labels=labels, y_title="seconds"))
    chart.title = "Run duration per time window"
    chart.x_labels = labels
    chart.add("median", [bucket.median_duration for bucket in line.buckets])
    chart.add("longest", [bucket.max_duration for bucket in line.buckets])
    return _svg(chart, "chart-duration")


def outcomes_chart(line: Timeline) -> str:
    """Runs per time window, stacked by outcome (failures in red)."""
    labels = [bucket.label for bucket in line.buckets]
    colours = [OUTCOME_COLOURS[name] for name in OUTCOME_CLASSES]
    chart = pygal.StackedBar(**_config(colours, labels=labels, y_title="runs"))
    chart.title = "Runs per time window, by outcome"
    chart.x_labels = labels
    for name in OUTCOME_CLASSES:
        chart.add(OUTCOME_LABELS[name], [_nonzero(bucket.outcomes[name]) for bucket in line.buckets])
    return _svg(chart, "chart-outcomes")


def stages_chart(times: Sequence[StageTimes]) -> str:
    """Seconds per stage of the latest runs, one group of bars per run."""
    labels = [item.run_id for item in times]
    chart = pygal.Bar(**_config(SERIES_COLOURS, labels=labels, y_title="seconds"))
    chart.title = "Time per stage, latest runs"
    chart.x_labels = labels
    for name in stage_names(times):
        chart.add(name, [item.seconds.get(name) for item in times])
    return _svg(chart, "chart-stages")
