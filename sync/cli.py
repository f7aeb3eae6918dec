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
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from sync import cli_admin
from sync.cli_common import (
    ActivationArg,
    StateOption,
    _fail,
    _load,
    _print_json,
    _sqlite_state_file,
    _state_label,
    _store,
    check_output_path,
    console,
    err_console,
    print_check,
    print_error,
    print_plan_sample,
    print_record,
    print_source_check,
)
from sync.config import Activation
from sync.config_file import json_schema
from sync.destination import read_key
from sync.engine import Progress as RunProgress
from sync.engine import Run, RunOptions, RunResult
from sync.errors import ConfigError, SyncError
from sync.logs import configure_logging
from sync.plan import GUARD_NAMES, check_guard_names
from sync.record import EXIT_CODES, RunStatus
from sync.runlog import log_run_end
from sync.runtime import StateNotFound, build_client, open_differ, open_source_from_env, open_store

app = typer.Typer(
    name="cepsync",
    help="Keep Batch CEP profiles in step with a warehouse segment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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


class _RejectsSink:
    """Writes one JSON line per rejected row; a write that fails is remembered, not raised.

    A failure (a full disk) happens while the run sends or when it ends: raising it from the
    engine's callback would fail a run that did its work, or lose the record of it, for a
    side file. The first error stops the writing and is reported after the run, saying
    how many lines were due and where the run's record is.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: TextIO = path.open("w", encoding="utf-8")
        self.error: OSError | None = None
        self.due = 0  # lines handed in, written or not
        self.run: tuple[object, object] = (None, None)  # (activation, run_id) of the lines

    def __call__(self, record: Mapping[str, object]) -> None:
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
        self._send: TaskID | None = None

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


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run; it committed what Batch had acknowledged."""

    def __init__(self, record: Mapping[str, object]) -> None:
        self.record = record
        super().__init__("interrupted")


def execute_run(
    activation: Activation,
    *,
    state: str,
    options: RunOptions,
    progress: RunProgress | None = None,
    rejects: Callable[[Mapping[str, object]], None] | None = None,
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
            from sync.convention import resolve_mapping
            from sync.mapping import ProfileMapper

            # A mapping convention expands against the segment's columns here (sync/convention.py).
            activation, types = resolve_mapping(activation, source.schema(), source=activation.origin)
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


# history, report, reset, switch-diff, dbt-exposures, adopt-fence: sync/cli_admin.py.
cli_admin.register(app)


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
    keep_every: Annotated[
        int,
        typer.Option(help="Keep the attributes of one custom id in N, only an update count for the others (benches)."),
    ] = 1,
) -> None:
    """Run the local Batch Profile API simulator (for demos and tests).

    Faults are set while it runs with POST /_sim/faults (latency, failed requests, dropped
    connections, per-item errors by kind: item_errors {"value", "server", "unknown", "none"});
    GET /_sim/faults shows them and GET /_sim/stats counts what happened.
    """
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
        serve(host, port, {project_key: api_key}, rate_limit=rate_limit, keep_every=keep_every)
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

__all__ = [
    "EXIT_CODES",
    "app",
    "execute_run",
    "print_check",
    "print_error",
    "print_plan_sample",
    "print_record",
    "print_source_check",
]
