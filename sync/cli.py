"""The ``cepsync`` command line (typer + rich).

Exit codes: 0 success (rejected rows are reported, not failures), 1 unexpected failure,
2 config or usage error, 3 a guard aborted the run, 4 Batch refused the credentials,
5 another run holds the lease (nothing done), 6 some profiles failed after retries
(they are resent next run), 7 the time budget ran out (a continuation will finish),
130 interrupted by Ctrl-C or SIGTERM (what Batch acknowledged was committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sync.config import Activation, DiffMode, json_schema, load_activation
from sync.engine import Run, RunOptions, RunResult
from sync.errors import ConfigError, SyncError
from sync.logs import configure_logging
from sync.model import ActivationMeta
from sync.plan import GUARD_NAMES, check_guard_names
from sync.record import EXIT_CODES, RunStatus, status_of_error
from sync.report.history import history_csv, history_table, persistent_notes
from sync.runconfig import config_as_run
from sync.runlog import log_run_end
from sync.runtime import (
    StateNotFound,
    build_client,
    expand_state_url,
    open_differ,
    open_source_from_env,
    open_store,
    open_warehouse_fingerprints,
)
from sync.state.base import StateStore

app = typer.Typer(
    name="cepsync",
    help="Keep Batch CEP profiles in step with a warehouse segment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

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
RejectsOption = Annotated[
    Path | None,
    typer.Option(
        "--rejects",
        help="Write every rejected row and dropped attribute (JSON lines: row, custom_id, field, reason) here. "
        "Checked before the run; never the activation or the state file. If writing fails during the run "
        "(a full disk), the run is still recorded and the command says what was not written (exit 1 if "
        "the run itself succeeded).",
    ),
]
ActivationArg = Annotated[Path, typer.Argument(help="Activation YAML file.", show_default=False)]


# Rendering rule: anything that comes from data, config, state or the environment is put
# on screen as rich Text (never a markup string), so "[b]", "[/oops]" or ":smile:" in a
# value is printed as it is, and no value can crash the output with a MarkupError.


def _styled(*parts: str | tuple[str, str]) -> Text:
    """Plain strings verbatim, (text, style) pairs styled; no markup or emoji parsing."""
    return Text.assemble(*parts)


def print_error(error: SyncError | Exception, *, err: Console | None = None) -> None:
    (err or err_console).print(_styled(("error:", "bold red"), " ", str(error)))


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
    return open_store(expand_state_url(state, os.environ), create=create, read_only=read_only)


def _state_label(state: str) -> str:
    return expand_state_url(state, os.environ).removeprefix("sqlite:///")


def _sqlite_state_file(state: str) -> Path | None:
    """The file a ``sqlite:///`` state URL names (None for Firestore, memory or a bad URL)."""
    try:
        from sync.runtime import sqlite_state_path

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


class _RejectsSink:
    """Writes one JSON line per rejected row; a write that fails is remembered, not raised.

    A failure (a full disk) happens while the run sends or when it ends: raising it from the
    engine's callback would fail a run that did its work, or lose the record of it, for a
    side file. The first error stops the writing and is reported after the run, saying
    how many lines were due and where the run's record is.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: Any = path.open("w", encoding="utf-8")
        self.error: OSError | None = None
        self.due = 0  # lines handed in, written or not
        self.run: tuple[Any, Any] = (None, None)  # (activation, run_id) of the lines

    def __call__(self, record: dict[str, Any]) -> None:
        self.due += 1
        self.run = (record.get("activation"), record.get("run_id"))
        if self.error is None:
            try:
                self._out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                return
            except OSError as error:
                self.error = error

    def close(self) -> None:
        try:
            self._out.close()
        except OSError as error:
            # What was still buffered is lost with the failed flush.
            self.error = self.error or error
        with contextlib.suppress(OSError):
            self._out.close()

    def failure(self, *, recorded: bool) -> str | None:
        """One line saying what was not written, or None. ``recorded``: a run (not a plan)."""
        if self.error is None:
            return None
        reason = self.error.strerror or str(self.error)
        lost = f"--rejects: writing {self.path} failed ({reason}): the file is incomplete, it holds fewer than the "
        lost += f"{self.due:,} lines due"
        if not recorded:
            return f"{lost}; the plan changed nothing"
        activation, run_id = self.run
        where = f"`cepsync history {activation} --run {run_id}`" if run_id else "`cepsync history`"
        return f"{lost}; the run itself is recorded, with a sample of its rejected rows: {where}"


@contextlib.contextmanager
def _rejects_file(
    path: Path | None, *, activation: Path | None = None, state: str = ""
) -> Iterator[_RejectsSink | None]:
    """A sink writing one JSON line per rejected row, or None when no file was asked for.

    The path is checked and the file opened on entry, before the run reads or sends
    anything, so a path that cannot be written is a config error up front, not a traceback
    after the run. A write that fails later is kept on the sink (see :class:`_RejectsSink`).
    """
    if path is None:
        yield None
        return
    check_output_path(
        path, "--rejects", keep={"activation file": activation, "state database": _sqlite_state_file(state)}
    )
    try:
        sink = _RejectsSink(path)
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}", field="--rejects") from None
    try:
        yield sink
    finally:
        sink.close()


def _report_rejects_failure(sink: _RejectsSink | None, exit_code: int, *, recorded: bool = True) -> int:
    """Say on stderr what --rejects did not write; the exit code then (1 if the run's was 0)."""
    message = sink.failure(recorded=recorded) if sink is not None else None
    if message is None:
        return exit_code
    print_error(ConfigError(message))
    return exit_code or 1


def _load(path: Path, *, json_output: bool = False) -> Activation:
    try:
        return load_activation(path)
    except ConfigError as error:
        raise _fail(error, json_output=json_output) from None


def _print_json(document: Any) -> None:
    """One JSON document on stdout, never wrapped or styled (it is for programs)."""
    typer.echo(json.dumps(document, ensure_ascii=False, default=str, indent=2))


# The engine stops launching batches this long before a time budget ends, to flush and hand over.
_BUDGET_MARGIN_SECONDS = RunOptions().budget_margin_seconds


# The longest lease a run may take: a run that dies holds its activation for the whole ttl
# (nothing renews it, nothing else may run), so a week is already far past any use.
_LEASE_TTL_MAX_SECONDS = 7 * 24 * 3600.0


def _finite(value: float | None, option: str) -> None:
    """``inf`` and ``nan`` parse as floats but are no number of seconds (click lets both through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value!r} is not a number of seconds; give a finite number", param_hint=option)


def _check_lease_ttl(value: float) -> float:
    _finite(value, "--lease-ttl")
    if not 1.0 <= value <= _LEASE_TTL_MAX_SECONDS:
        raise typer.BadParameter(
            f"{value:g} s is out of range: give 1 to {_LEASE_TTL_MAX_SECONDS:g} seconds (a week); a run renews "
            "its lease while it works, and a run that dies blocks the activation for the whole ttl",
            param_hint="--lease-ttl",
        )
    return value


def _check_time_budget(value: float | None) -> float | None:
    _finite(value, "--time-budget")
    if value is not None and value <= _BUDGET_MARGIN_SECONDS:
        raise typer.BadParameter(
            f"{value:g} s would never send a batch: a run stops launching batches {_BUDGET_MARGIN_SECONDS:g} s "
            f"before its budget ends, to commit and hand over; give more than {_BUDGET_MARGIN_SECONDS:g}"
        )
    return value


class _RichProgress:
    """Progress bars for reading and sending, drawn only on a terminal."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._read = progress.add_task("reading segment", total=None)
        self._send: Any = None

    def rows_read(self, rows: int) -> None:
        self._progress.advance(self._read, rows)

    def planned(self, counts: dict[str, int]) -> None:
        # The id scan counted the segment: the reading bar gets its total.
        self._progress.update(self._read, total=counts["rows"])

    def sending(self, total: int, endpoint: str) -> None:
        self._send = self._progress.add_task(f"sending to /profiles/{endpoint}", total=total)

    def sent(self, acknowledged: int, rejected: int, failed: int) -> None:
        if self._send is not None:
            self._progress.advance(self._send, acknowledged + rejected + failed)


def _progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal,
    )


def summary_table(record: dict[str, Any]) -> Table:
    """Counts per outcome. What was planned, then what happened to what was sent."""
    counts = record.get("counts", {})
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


def _facts_line(record: dict[str, Any]) -> str:
    """Where profiles went and how long things took, each time saying what it measures."""
    facts = []
    if record.get("endpoint") and record.get("counts", {}).get("sent"):
        facts.append(f"sent to /profiles/{record['endpoint']}")
    timings = record.get("timings", {})
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


def _state_line(record: dict[str, Any]) -> str:
    """What the run asked of its state store: ``state: firestore · 12 reads, 40 writes, …``."""
    ops = record.get("state_ops")
    if not isinstance(ops, dict):
        return ""
    counts = [f"{value:,} {key.replace('_', ' ')}" for key, value in ops.items() if isinstance(value, int)]
    return f"state ({ops.get('backend', '?')}): " + ", ".join(counts)


def _by_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} ×{count}" for reason, count in sorted(counts.items()))


# Statuses printed in green: the run (or plan) did what it was asked.
_GREEN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.SUCCEEDED_WITH_REJECTIONS, RunStatus.PLANNED})


def print_record(
    record: dict[str, Any], *, samples: int = 10, out: Console | None = None, err: Console | None = None
) -> None:
    """A run or plan record for people: status, counts, timings, rejections, guards, error."""
    out = out or console
    err = err or err_console
    status = str(record["status"])
    style = "green" if RunStatus.of(status) in _GREEN_STATUSES else "red"
    out.print(_styled((str(record["activation"]), "bold"), f" · run {record['run_id']} · ", (status, style)))
    if record.get("counts"):
        out.print(summary_table(record))
    mapping = record.get("mapping_version") or {}
    if mapping.get("explanation"):
        out.print(_styled(("mapping changed:", "yellow"), " ", str(mapping["explanation"])))
    for warning in record.get("warnings") or ():
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
        out.print(Text(f"rejected by reason: {_by_reason(record['rejected_by_reason'])}"))
    if record.get("dropped_attributes_by_reason"):
        dropped = _by_reason(record["dropped_attributes_by_reason"])
        out.print(Text(f"attributes dropped (rows sent without them): {dropped}"))
    shown = record.get("rejected_samples", [])[:samples]
    if shown:
        table = Table(title="rejected rows (sample)", title_justify="left")
        for column in ("row", "custom_id", "field", "reason", "detail"):
            table.add_column(column, overflow="fold")
        for sample in shown:
            for issue in sample["issues"]:
                table.add_row(
                    Text(str(sample["row"] if sample["row"] is not None else "-")),
                    Text(str(sample["custom_id"])),
                    Text(str(issue["field"])),
                    Text(str(issue["reason"])),
                    Text(str(issue["detail"])),
                )
        out.print(table)
    for guard in record.get("guards", []):
        if guard["tripped"]:
            state = "overridden" if guard["overridden"] else "TRIPPED"
            out.print(Text(f"guard {guard['guard']}: {state} — {guard['detail']}"))
    if record.get("error"):
        err.print(Text(str(record["error"]), style="red"))


def print_plan_sample(changes: list[dict[str, Any]], removals: list[str], *, out: Console | None = None) -> None:
    """The sample of planned sends and removals under `cepsync plan`."""
    out = out or console
    for change in changes:
        attributes = json.dumps(change["attributes"], ensure_ascii=False, default=str)
        out.print(_styled((str(change["kind"]), "bold"), f" {change['custom_id']}: {attributes}"))
    for removal in removals:
        out.print(_styled(("remove", "bold"), f" {removal}"))


def print_check(out: Console, message: str) -> None:
    """One passed check of `cepsync validate`."""
    out.print(_styled(("✓", "green"), " ", message))


def print_source_check(out: Console, columns: int, types: dict[str, Any]) -> None:
    kinds = ", ".join(f"{column}={getattr(kind, 'value', kind)}" for column, kind in types.items())
    described = f"types {kinds}" if kinds else "no custom attributes"
    print_check(out, f"source: {columns} mapped columns found, {described}")


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run; it committed what Batch had acknowledged."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        super().__init__("interrupted")


def execute_run(
    activation: Activation,
    *,
    state: str,
    options: RunOptions,
    progress: Any = None,
    rejects: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Build the edges and run once (used by `run` and `demo`)."""
    client = build_client(activation)
    source = open_source_from_env(activation, os.environ)
    try:
        store = _store(state)
    except BaseException:
        source.close()
        raise
    try:
        differ = open_differ(activation, store, source)
    except BaseException:
        source.close()
        store.close()
        raise
    run = Run(
        activation,
        source=source,
        store=store,
        client=client,
        differ=differ,
        options=options,
        progress=progress,
        rejects=rejects,
    )

    async def main() -> RunResult:
        # SIGTERM behaves like Ctrl-C: the run commits what Batch acknowledged, then stops.
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError):  # no signal handlers on some platforms
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run.execute()

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise RunInterrupted(run.record) from None
    finally:
        differ.close()
        source.close()
        store.close()


@app.command()
def run(
    activation_file: ActivationArg,
    state: StateOption = "",
    full: Annotated[
        bool, typer.Option("--full", help="Send every valid row, whatever the stored fingerprints.")
    ] = False,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help=f"Override a guard for this run only: {', '.join(GUARD_NAMES)}."),
    ] = None,
    lease_ttl: Annotated[
        float,
        typer.Option(
            callback=_check_lease_ttl,
            help=f"Lease time-to-live in seconds, 1 to {_LEASE_TTL_MAX_SECONDS:g} (renewed while running).",
        ),
    ] = 300.0,
    time_budget: Annotated[
        float | None,
        typer.Option(
            callback=_check_time_budget,
            help=f"Stop sending after this many seconds and checkpoint (exit 7); more than {_BUDGET_MARGIN_SECONDS:g}.",
        ),
    ] = None,
    map_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Worker processes that map rows (default: the cores this machine spares, for large runs; 0: none).",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the run record, or the error, as one JSON object.")
    ] = False,
    rejects: RejectsOption = None,
) -> None:
    """Sync one activation now."""
    configure_logging(level="warning")
    activation = _load(activation_file, json_output=json_output)
    options = RunOptions(
        trigger="cli",
        full=full,
        allow_guards=tuple(allow or ()),
        lease_ttl_seconds=lease_ttl,
        time_budget_seconds=time_budget,
        map_workers=map_workers,
    )
    sink: _RejectsSink | None = None
    try:
        check_guard_names(allow or (), field="--allow")
        with (
            _rejects_file(rejects, activation=activation_file, state=state) as sink,
            _progress_bars() as bars,
        ):
            result = execute_run(activation, state=state, options=options, progress=_RichProgress(bars), rejects=sink)
    except SyncError as error:
        raise _fail(error, json_output=json_output, activation=activation.name) from None
    except RunInterrupted as interrupted:
        log_run_end(interrupted.record)
        if json_output:
            _print_json(interrupted.record)
        else:
            print_record(interrupted.record)
        raise typer.Exit(_report_rejects_failure(sink, RunStatus.INTERRUPTED.exit_code)) from None
    log_run_end(result.record)
    if json_output:
        _print_json(result.record)
    else:
        print_record(result.record)
    # A --rejects file that could not be written is said after the run, which stays recorded.
    raise typer.Exit(_report_rejects_failure(sink, result.exit_code))


@app.command()
def plan(
    activation_file: ActivationArg,
    state: StateOption = "",
    full: Annotated[bool, typer.Option("--full", help="Plan as if every valid row were to be sent.")] = False,
    sample: Annotated[int, typer.Option(min=0, help="How many planned changes to show.")] = 5,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the plan record, or the error, as one JSON object.")
    ] = False,
    rejects: RejectsOption = None,
) -> None:
    """Dry run: what the next run would send. Nothing is sent, no state changes."""
    configure_logging(level="warning")
    activation = _load(activation_file, json_output=json_output)
    with contextlib.ExitStack() as stack:
        try:
            sink = stack.enter_context(_rejects_file(rejects, activation=activation_file, state=state))
            source = open_source_from_env(activation, os.environ)
            stack.callback(source.close)
            try:
                # A plan changes no state, so it creates none either: without stored state it
                # plans against an empty one (a first run: every valid row is new).
                store = _store(state, read_only=True)
            except StateNotFound:
                if not json_output:
                    err_console.print(
                        Text(f"no state yet at {_state_label(state)}: planning a first run (every valid row is new)"),
                        style="dim",
                    )
                store = open_store("sqlite:///:memory:")
            stack.callback(store.close)
            differ = open_differ(activation, store, source)
            stack.callback(differ.close)
            options = RunOptions(trigger="plan", full=full)
            run_ = Run(
                activation, source=source, store=store, client=None, differ=differ, options=options, rejects=sink
            )
            preview = asyncio.run(run_.plan_only(sample=sample))
        except SyncError as error:
            raise _fail(error, json_output=json_output, activation=activation.name) from None
    record, changes, removals = preview.record, preview.sample_changes, preview.sample_removals
    if json_output:
        _print_json({**record, "sample_changes": changes, "sample_removals": removals})
    else:
        print_record(record)
        print_plan_sample(changes, removals)
    raise typer.Exit(_report_rejects_failure(sink, 0, recorded=False))


@app.command()
def validate(
    activation_file: ActivationArg,
    check_credentials: Annotated[
        bool, typer.Option(help="Ask Batch whether the REST API key and project key are valid.")
    ] = True,
) -> None:
    """Check the config, the segment query (schema only) and the Batch credentials."""
    configure_logging(level="warning")
    activation = _load(activation_file)
    print_check(console, f"config: activation '{activation.name}' is valid")
    try:
        source = open_source_from_env(activation, os.environ)
        try:
            from sync.mapping import ProfileMapper, resolve_attribute_types

            types = resolve_attribute_types(activation, source.schema(), source=activation.origin)
            mapper = ProfileMapper(activation, types)
        finally:
            source.close()
        print_source_check(console, len(mapper.columns), types)
        if check_credentials:
            client = build_client(activation)

            async def check() -> None:
                async with client:
                    await client.check_credentials()

            asyncio.run(check())
            print_check(console, f"Batch accepted the credentials at {activation.destination.base_url}")
    except SyncError as error:
        raise _fail(error) from None


class HistoryFormat(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _activation_name(activation: str) -> tuple[str, Activation | None]:
    """An activation argument is a name or a YAML file; a file also gives its config."""
    if activation.endswith((".yaml", ".yml")):
        loaded = _load(Path(activation))
        return loaded.name, loaded
    return activation, None


@app.command()
def history(
    activation: Annotated[str, typer.Argument(help="Activation name or YAML file.")],
    state: StateOption = "",
    limit: Annotated[int, typer.Option(min=1, help="How many runs.")] = 10,
    run_id: Annotated[str | None, typer.Option("--run", help="Show one run record in full.")] = None,
    output_format: Annotated[
        HistoryFormat, typer.Option("--format", help="table (80 columns), json (full records) or csv.")
    ] = HistoryFormat.table,
    json_output: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
) -> None:
    """Recent runs of an activation, newest first."""
    name, _ = _activation_name(activation)
    if json_output:
        output_format = HistoryFormat.json
    try:
        store = _store(state, read_only=True)
    except SyncError as error:
        raise _fail(error) from None
    try:
        if run_id:
            record = store.get_run(run_id)
            if record is None:
                raise _fail(ConfigError(f"no run {run_id!r}", field="--run"))
            if record.get("activation") != name:
                raise _fail(
                    ConfigError(
                        f"run {run_id!r} is a run of activation '{record.get('activation')}', not of '{name}'; "
                        f"ask `cepsync history {record.get('activation')} --run {run_id}`",
                        field="--run",
                    )
                )
            if output_format is HistoryFormat.json:
                typer.echo(json.dumps(record, default=str, indent=2))
            elif output_format is HistoryFormat.csv:
                typer.echo(history_csv([record]), nl=False)
            else:
                print_record(record, samples=50)
            return
        records = store.list_runs(name, limit)
    finally:
        store.close()
    if not records:
        raise _fail(ConfigError(f"no runs of activation '{name}' recorded in {_state_label(state)}", field="NAME"))
    if output_format is HistoryFormat.json:
        typer.echo(json.dumps(records, default=str, indent=2))
    elif output_format is HistoryFormat.csv:
        typer.echo(history_csv(records), nl=False)
    else:
        console.print(history_table(name, records))
        for note in persistent_notes(records):
            console.print(Text(note, style="yellow"))


@app.command()
def report(
    activation: Annotated[str, typer.Argument(help="Activation name or YAML file.")],
    state: StateOption = "",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file to write (default: NAME-report.html).")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many of the latest runs to cover.", min=1)] = 2000,
) -> None:
    """Write one self-contained HTML report of an activation's runs (opens offline).

    Charts of runs over time and time per stage, the latest run's outcomes, rejected rows by
    reason with samples, guard verdicts, mapping changes and the config as it ran.
    """
    from sync.report.html import render_report

    name, loaded = _activation_name(activation)
    target = out or Path(f"{name}-report.html")
    try:
        # Checked before the state is read, so a bad path is said at once, not after the charts.
        activation_path = Path(activation) if loaded is not None else None
        check_output_path(
            target, "--out", keep={"activation file": activation_path, "state database": _sqlite_state_file(state)}
        )
        store = _store(state, read_only=True)
    except SyncError as error:
        raise _fail(error) from None
    try:
        records = store.list_runs(name, limit)
    except SyncError as error:
        raise _fail(error) from None
    finally:
        store.close()
    if not records:
        raise _fail(ConfigError(f"no runs of activation '{name}' recorded in {_state_label(state)}", field="NAME"))
    config_file = None
    if loaded is not None:
        config_file = config_as_run(loaded)
    page = render_report(
        name,
        records,
        state_kind=state.split(":", 1)[0],
        config_file=config_file,
        config_file_name=Path(activation).name if loaded is not None else None,
    )
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as error:  # checked up front: a full disk, or a file that changed since (exit 1)
        print_error(
            ConfigError(
                f"writing {target} failed ({error.strerror or error}); the report is missing or incomplete",
                field="--out",
            )
        )
        raise typer.Exit(1) from None
    console.print(Text(f"wrote {target} ({len(records)} runs); open it in a browser, it needs no network"))


@app.command()
def reset(
    activation: Annotated[str, typer.Argument(help="Activation name or YAML file.")],
    state: StateOption = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Forget what was synced (fingerprints, intents, meta): the next run is a full load.

    Run history is kept. Mirror mode will no longer know which profiles it synced before,
    so it cannot clear profiles that left the segment before the next run.
    """
    config = _load(Path(activation)) if activation.endswith((".yaml", ".yml")) else None
    name = config.name if config is not None else activation
    try:
        # Looked at read-only first: a state that holds nothing for this name (or a file that
        # is empty or missing) is said so, and never created or written.
        reader = _store(state, create=False, read_only=True)
        try:
            # Said before asking for confirmation: a typo in the name is not a reset to confirm.
            if not reader.list_runs(name, 1) and reader.load_meta(name) == ActivationMeta():
                raise ConfigError(
                    f"nothing to forget: no state for activation '{name}' in {_state_label(state)}", field="NAME"
                )
        finally:
            reader.close()
        store = _store(state, create=False)
        in_bigquery = None
        if config is not None and config.diff.mode is DiffMode.WAREHOUSE:  # its fingerprints are in BigQuery
            try:
                in_bigquery = open_warehouse_fingerprints(config, store)
            except BaseException:
                store.close()
                raise
    except SyncError as error:
        raise _fail(error) from None
    try:
        if not yes and not typer.confirm(f"Forget the sync state of '{name}'? The next run sends every profile."):
            raise typer.Exit(1)
        store.reset(name)
        if in_bigquery is not None:
            in_bigquery.forget(name)
    except SyncError as error:
        raise _fail(error) from None
    finally:
        if in_bigquery is not None:
            in_bigquery.close()
        store.close()
    console.print(Text(f"state of '{name}' forgotten; the next run is a full load"))


@app.command("switch-diff")
def switch_diff(
    activation: ActivationArg,
    to: Annotated[DiffMode, typer.Option("--to", help="The diff mode the activation moves to.")],
    state: StateOption = "",
) -> None:
    """Carry the acknowledged fingerprints between diff modes (function <-> warehouse): nothing is re-sent.

    Give the activation YAML that names diff.dataset (mode warehouse); run it while no sync
    runs (it takes the lease), then deploy the YAML with the new mode.
    """
    from sync.runs import default_owner
    from sync.warehouse.switch import switch_diff as carry_over

    config = _load(activation)
    try:
        if config.diff.mode is not DiffMode.WAREHOUSE:
            raise ConfigError(
                "give the activation YAML with diff.mode 'warehouse' (it names the dataset)", field="diff"
            )
        base = _store(state)
        try:
            in_bigquery = open_warehouse_fingerprints(config, base)
        except BaseException:
            base.close()
            raise
    except SyncError as error:
        raise _fail(error) from None
    try:
        moved = carry_over(config, base, in_bigquery, to=to, owner=default_owner())
    except SyncError as error:
        raise _fail(error) from None
    finally:
        in_bigquery.close()
        base.close()
    console.print(Text(f"{moved} fingerprints of '{config.name}' now in the {to.value} diff's store"))


@app.command("dbt-exposures")
def dbt_exposures(
    directory: Annotated[Path, typer.Argument(help="Directory of activation YAML files.", show_default=False)],
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest",
            help="dbt's target/manifest.json: match the tables the segments read to its models and sources.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print a dbt exposures YAML: one exposure per activation, for dbt's lineage (docs/results.md)."""
    from sync.config import load_activations
    from sync.results.dbt import Manifest, render

    try:
        activations = load_activations(directory)
        text = render(activations.values(), Manifest.load(manifest) if manifest is not None else None)
    except SyncError as error:
        raise _fail(error) from None
    typer.echo(text, nl=False)


@app.command("adopt-fence")
def adopt_fence(
    activation: ActivationArg,
    state: StateOption = "",
    force: Annotated[
        bool, typer.Option("--force", help="Adopt even if the old state store's runs were active in the last 15 min.")
    ] = False,
) -> None:
    """Let a new state store take over a warehouse-diff dataset whose fence holds another store's tokens.

    For a new machine or another Firestore database against an existing diff.dataset: run it
    once, after the runs of the old state store have stopped (docs/warehouse-diff.md).
    """
    from datetime import UTC, datetime

    from sync.runs import default_owner

    config = _load(activation)
    try:
        if config.diff.mode is not DiffMode.WAREHOUSE:
            raise ConfigError("only an activation with diff.mode 'warehouse' has a fence to adopt", field="diff")
        base = _store(state)
        try:
            store = open_warehouse_fingerprints(config, base)
        except BaseException:
            base.close()
            raise
    except SyncError as error:
        raise _fail(error) from None
    try:
        now = datetime.now(UTC)
        lease = base.acquire_lease(config.name, default_owner(), 600.0, now)
        try:
            took = store.adopt_fence(lease, now, min_idle_seconds=0.0 if force else None)
        finally:
            base.release_lease(lease)
    except SyncError as error:
        raise _fail(error) from None
    finally:
        store.close()
        base.close()
    where = f"{store.dataset.dataset_id}.cepsync_fence"
    if took:
        console.print(Text(f"'{config.name}': this state store now owns {where} (took over from token {took})"))
    else:
        console.print(Text(f"'{config.name}': this state store already owns {where}; nothing to adopt"))


@app.command()
def schema() -> None:
    """Print the JSON Schema of activation files."""
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def simulator(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8787,
    api_key_env: Annotated[str, typer.Option(help="Env var holding the accepted REST API key.")] = "BATCH_REST_API_KEY",
    project_key_env: Annotated[
        str, typer.Option(help="Env var holding the accepted project key.")
    ] = "BATCH_PROJECT_KEY",
    rate_limit: Annotated[bool, typer.Option(help="Enforce Batch's rate limits (429).")] = True,
) -> None:
    """Run the local Batch Profile API simulator (for demos and tests).

    Faults are set while it runs with POST /_sim/faults (latency, failed requests, dropped
    connections, per-item errors by kind: item_errors {"value", "server", "unknown", "none"});
    GET /_sim/faults shows them and GET /_sim/stats counts what happened.
    """
    from sync.config import read_key
    from sync.dev.simulator import serve

    if not os.environ.get(api_key_env) or not os.environ.get(project_key_env):
        raise _fail(ConfigError(f"set {api_key_env} and {project_key_env}: the simulator accepts only those keys"))
    try:
        # Read as a run reads them (whitespace around them removed), or a key stored with a
        # trailing newline would be refused by the simulator with the client's stripped copy.
        api_key = read_key(os.environ, api_key_env, activation="simulator", field="--api-key-env")
        project_key = read_key(os.environ, project_key_env, activation="simulator", field="--project-key-env")
    except ConfigError as error:
        raise _fail(error) from None
    configure_logging(level="info")
    try:
        serve(host, port, {project_key: api_key}, rate_limit=rate_limit)
    except SyncError as error:  # the address cannot be listened on
        raise _fail(error) from None


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the demo database and state.")] = Path(
        ".cepsync/demo"
    ),
    rows: Annotated[int, typer.Option(min=0, help="Customers in the demo segment.")] = 2_000,
) -> None:
    """A real sync on the embedded default: DuckDB → local Batch simulator, full then delta (mirror)."""
    from sync.dev.demo_runner import run_demo

    configure_logging(level="warning")
    # Start afresh, removing only what a previous demo wrote (never the folder itself).
    for name in (
        "segment.duckdb",
        "segment.duckdb.wal",
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "vip_customers.yaml",
    ):
        (directory / name).unlink(missing_ok=True)
    code = run_demo(
        directory,
        rows=rows,
        console=console,
        progress_factory=_progress_bars,
        progress_adapter=_RichProgress,
        execute_run=execute_run,
        print_record=print_record,
    )
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

__all__ = ["EXIT_CODES", "app", "execute_run", "print_record"]
