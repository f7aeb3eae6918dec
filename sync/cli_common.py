"""What every ``cepsync`` command shares: the consoles, opening the state, failing, printing records.

Its own module so the command modules (:mod:`sync.cli` for the sync commands,
:mod:`sync.cli_admin` for the ones that look at or change stored state) import it and not
each other. The rendering rule lives here, with the functions that follow it: everything
from data, config, state or the environment reaches the screen as rich ``Text``, never as
markup. Names with an underscore are private to the cli modules, not to this file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sync.config import Activation, AttributeType
from sync.config_file import load_activation
from sync.errors import ConfigError, SyncError
from sync.record import RunStatus, status_of_error
from sync.state_url import expand_state_url, sqlite_state_path, state_label

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from sync.state.base import StateStore

    # Made on first use (rich loads then, not with every command): see __getattr__ below.
    console: Console
    err_console: Console


@cache
def _consoles() -> tuple[Console, Console]:
    from rich.console import Console

    return Console(), Console(stderr=True)


def console_out() -> Console:
    """The rich console on stdout (made on first use)."""
    return _consoles()[0]


def console_err() -> Console:
    """The rich console on stderr (made on first use)."""
    return _consoles()[1]


def __getattr__(name: str) -> Console:
    """``console`` (stdout) and ``err_console`` (stderr), made when a command first prints with rich.

    rich's console and tables cost ~0.05 s of imports that `cepsync run` does not need before its
    first line (docs/how-a-run-works.md, "Start-up"), nor a command that fails early.
    """
    if name == "console":
        return console_out()
    if name == "err_console":
        return console_err()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


StateOption = Annotated[
    str,
    typer.Option(
        "--state",
        envvar="CEPSYNC_STATE",
        # Help text is rich markup: square brackets would be read as tags, so none here.
        help="State store URL: sqlite:///PATH or firestore://PROJECT/DATABASE?prefix=P (project, database and "
        "prefix may each be left out; the word firestore reads CEPSYNC_FIRESTORE_* like the function). "
        "Default: one file per user, $XDG_STATE_HOME/cepsync/state.db (~/.local/state/cepsync/state.db).",
        show_default=False,
    ),
]

ActivationArg = Annotated[Path, typer.Argument(help="Activation YAML file.", show_default=False)]

# Rendering rule: anything that comes from data, config, state or the environment is put
# on screen as rich Text (never a markup string), so "[b]", "[/oops]" or ":smile:" in a
# value is printed as it is, and no value can crash the output with a MarkupError.


def _styled(*parts: str | tuple[str, str]) -> Text:
    """Plain strings verbatim, (text, style) pairs styled; no markup or emoji parsing."""
    from rich.text import Text

    return Text.assemble(*parts)


def print_error(error: SyncError | Exception, *, err: Console | None = None) -> None:
    (err or console_err()).print(_styled(("error:", "bold red"), " ", str(error)))


def _fail(error: SyncError | Exception, *, json_output: bool = False, activation: str | None = None) -> typer.Exit:
    """Report an error (on stderr, or as one JSON object on stdout with --json) and exit with its code.

    The error's family gives the status a run record would carry, and the status the exit code.
    """
    status = status_of_error(error)
    if json_output:
        outcome = {"activation": activation, "status": status.value, "exit_code": status.exit_code, "error": str(error)}
        typer.echo(json.dumps(outcome, ensure_ascii=False))
    else:
        print_error(error)
    return typer.Exit(status.exit_code)


def _store(state: str, *, create: bool = True, read_only: bool = False) -> StateStore:
    """The state store ``--state`` names (ConfigError if it cannot be opened).

    ``read_only`` for the commands that only read (plan, history, report): never created,
    never written (see :func:`sync.runtime.open_store`).
    """
    from sync.runtime import open_store

    return open_store(expand_state_url(state, os.environ), create=create, read_only=read_only)


def _state_label(state: str) -> str:
    """The state ``--state`` names, for people: a SQLite state by its file (ConfigError if the URL is bad)."""
    return state_label(expand_state_url(state, os.environ))


def _sqlite_state_file(state: str) -> Path | None:
    """The file a ``sqlite:///`` state URL names (None for Firestore, memory or a bad URL)."""
    try:
        path = sqlite_state_path(expand_state_url(state, os.environ))
    except ConfigError:
        return None
    return None if path is None or path == ":memory:" else Path(path)


def check_output_path(path: Path, option: str, *, keep: dict[str, Path | None]) -> None:
    """Refuse, before anything runs, an output path that cannot be written or must not be.

    Checked: a directory, a missing or non-directory parent, a file that cannot be opened for
    writing (``/proc/version``, a read-only file or directory), and any file of ``keep`` (the
    activation, the state database) under another name: the same file resolved, through
    symlinks and hard links alike. Nothing is truncated here; a file that did not exist is
    removed again.

    Raises:
        ConfigError: naming ``option`` and the path.
    """
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; name a file in it", field=option)
    parent = path.parent
    if not parent.exists():
        raise ConfigError(f"directory {parent} is missing; create it first", field=option)
    if not parent.is_dir():
        raise ConfigError(f"{path} goes through {parent}, which is not a directory", field=option)
    existed = path.exists()
    for what, kept in keep.items():
        if kept is not None and existed and kept.exists() and os.path.samefile(path, kept):
            raise ConfigError(
                f"{path} is the {what} ({kept}); writing there would overwrite it: name another file", field=option
            )
    try:
        # Append mode opens without truncating: a probe, not a write.
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}", field=option) from None
    if not existed:
        path.unlink(missing_ok=True)


def _load(path: Path, *, json_output: bool = False) -> Activation:
    try:
        return load_activation(path)
    except ConfigError as error:
        raise _fail(error, json_output=json_output) from None


def _print_json(document: object) -> None:
    """One JSON document on stdout, never wrapped or styled (it is for programs)."""
    typer.echo(json.dumps(document, ensure_ascii=False, default=str, indent=2))


# A record printed here is a JSON document: the one a run just made, or one read back from the
# state store. Its parts are looked at as what they are, and a part that is missing or not of
# its shape is shown as empty.


def _mapping(value: object) -> Mapping[str, object]:
    """``value`` if it is a mapping (a record's counts, timings, one guard), else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _sequence(value: object) -> Sequence[object]:
    """``value`` if it is a list (a record's warnings, guards, samples), else an empty one."""
    return value if isinstance(value, list | tuple) else ()


def summary_table(record: Mapping[str, object]) -> Table:
    """Counts per outcome. What was planned, then what happened to what was sent."""
    from rich.table import Table
    from rich.text import Text

    counts = _mapping(record.get("counts"))
    table = Table()
    table.add_column("outcome")
    table.add_column("profiles", justify="right")
    unchanged = "unchanged (sent anyway: --full)" if record.get("full") else "unchanged"
    rows = [
        ("rows read", "rows"),
        ("new", "new"),
        ("changed", "changed"),
        ("  sends of an earlier run never acknowledged (checked again)", "unconfirmed"),
        (unchanged, "unchanged"),
        ("  of which not even mapped", "skipped_unmapped"),
        ("removed (mirror)", "removed"),
        ("rejected before sending", "rejected"),
        ("  of which duplicate ids", "duplicates"),
        ("refused by Batch before, unchanged (not resent)", "refused_unchanged"),
        ("persistent Batch error before, unchanged (not resent)", "persistent_unchanged"),
        # A profile sent is attempted once, then ends in exactly one of the three below.
        ("attempted (sent to Batch)", "sent"),
        ("acknowledged by Batch", "acknowledged"),
        ("value refused by Batch (remembered)", "rejected_by_batch"),
        ("failed (resent next run)", "failed"),
        ("  of which a per-item error, not about the value", "failed_by_item_error"),
        ("  of which persistent: remembered, not resent unchanged", "persistent"),
        ("per-item errors retried within the run", "item_errors_retried"),
    ]
    for label, key in rows:
        if key in counts and (counts[key] or key not in _ROWS_SHOWN_WHEN_NOT_ZERO):
            table.add_row(Text(label), Text(f"{counts[key]:,}"))
    return table


# Rows about Batch's per-item errors: rare, so shown only when something happened.
_ROWS_SHOWN_WHEN_NOT_ZERO = frozenset(
    {"persistent_unchanged", "failed_by_item_error", "persistent", "item_errors_retried", "unconfirmed"}
)


def _facts_line(record: Mapping[str, object]) -> str:
    """Where profiles went and how long things took, each time saying what it measures."""
    facts = []
    if record.get("endpoint") and _mapping(record.get("counts")).get("sent"):
        facts.append(f"sent to /profiles/{record['endpoint']}")
    timings = _mapping(record.get("timings"))
    if "total_seconds" in timings:
        facts.append(f"run took {timings['total_seconds']:.2f} s")
    if "read_and_plan_seconds" in timings:
        facts.append(f"reading and planning {timings['read_and_plan_seconds']:.2f} s")
    # Requests run concurrently, so these sums can exceed the run's own duration.
    if timings.get("wire_seconds"):
        facts.append(f"{timings['wire_seconds']:.2f} s in requests to Batch (summed over concurrent requests)")
    if timings.get("wait_seconds"):
        facts.append(f"{timings['wait_seconds']:.2f} s waiting for rate limits and retries (summed)")
    return " · ".join(facts)


def _state_line(record: Mapping[str, object]) -> str:
    """What the run asked of its state store: ``state: firestore · 12 reads, 40 writes, …``."""
    ops = record.get("state_ops")
    if not isinstance(ops, dict):
        return ""
    counts = [f"{value:,} {key.replace('_', ' ')}" for key, value in ops.items() if isinstance(value, int)]
    return f"state ({ops.get('backend', '?')}): " + ", ".join(counts)


def _by_reason(counts: Mapping[str, object]) -> str:
    return ", ".join(f"{reason} ×{counts[reason]}" for reason in sorted(counts))


# Statuses printed in green: the run (or plan) did what it was asked.
_GREEN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.SUCCEEDED_WITH_REJECTIONS, RunStatus.PLANNED})


def print_record(
    record: Mapping[str, object], *, samples: int = 10, out: Console | None = None, err: Console | None = None
) -> None:
    """A run or plan record for people: status, counts, timings, rejections, guards, error."""
    from rich.table import Table
    from rich.text import Text

    out = out or console_out()
    err = err or console_err()
    status = str(record["status"])
    style = "green" if RunStatus.of(status) in _GREEN_STATUSES else "red"
    out.print(_styled((str(record["activation"]), "bold"), f" · run {record['run_id']} · ", (status, style)))
    if record.get("counts"):
        out.print(summary_table(record))
    mapping = _mapping(record.get("mapping_version"))
    if mapping.get("explanation"):
        out.print(_styled(("mapping changed:", "yellow"), " ", str(mapping["explanation"])))
    for warning in _sequence(record.get("warnings")):
        out.print(_styled(("warning:", "yellow"), " ", str(warning)))
    if record.get("results_error"):  # the sync is committed; only the results tables are missing
        out.print(_styled(("results:", "yellow"), " ", str(record["results_error"])))
    facts = _facts_line(record)
    if facts:
        out.print(Text(facts, style="dim"))
    state_line = _state_line(record)
    if state_line:
        out.print(Text(state_line, style="dim"))
    if record.get("rejected_by_reason"):
        out.print(Text(f"rejected by reason: {_by_reason(_mapping(record['rejected_by_reason']))}"))
    if record.get("dropped_attributes_by_reason"):
        dropped = _by_reason(_mapping(record["dropped_attributes_by_reason"]))
        out.print(Text(f"attributes dropped (rows sent without them): {dropped}"))
    shown = [_mapping(sample) for sample in _sequence(record.get("rejected_samples"))[:samples]]
    if shown:
        table = Table(title="rejected rows (sample)", title_justify="left")
        for column in ("row", "custom_id", "field", "reason", "detail"):
            table.add_column(column, overflow="fold")
        for sample in shown:
            for issue in map(_mapping, _sequence(sample["issues"])):
                table.add_row(
                    Text(str(sample["row"] if sample["row"] is not None else "-")),
                    Text(str(sample["custom_id"])),
                    Text(str(issue["field"])),
                    Text(str(issue["reason"])),
                    Text(str(issue["detail"])),
                )
        out.print(table)
    for guard in map(_mapping, _sequence(record.get("guards"))):
        if guard["tripped"]:
            state = "overridden" if guard["overridden"] else "TRIPPED"
            out.print(Text(f"guard {guard['guard']}: {state} — {guard['detail']}"))
    if record.get("error"):
        err.print(Text(str(record["error"]), style="red"))


def print_plan_sample(
    changes: Sequence[Mapping[str, object]], removals: Sequence[str], *, out: Console | None = None
) -> None:
    """The sample of planned sends and removals under `cepsync plan`."""
    out = out or console_out()
    for change in changes:
        attributes = json.dumps(change["attributes"], ensure_ascii=False, default=str)
        out.print(_styled((str(change["kind"]), "bold"), f" {change['custom_id']}: {attributes}"))
    for removal in removals:
        out.print(_styled(("remove", "bold"), f" {removal}"))


def print_check(out: Console, message: str) -> None:
    """One passed check of `cepsync validate`."""
    out.print(_styled(("✓", "green"), " ", message))


def print_source_check(out: Console, columns: int, types: Mapping[str, AttributeType]) -> None:
    kinds = ", ".join(f"{column}={kind.value}" for column, kind in types.items())
    described = f"types {kinds}" if kinds else "no custom attributes"
    print_check(out, f"source: {columns} mapped columns found, {described}")
