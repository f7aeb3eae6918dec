"""What `cepsync run` (and `cepsync demo`) do once the command has said what it is about to do.

:mod:`sync.cli` parses the arguments, reads and checks the activation, and prints the run's
first line (docs/how-a-run-works.md, "Start-up") with nothing heavy loaded; this module is imported
after that line: it loads the engine, the source, the state store and the Batch client, runs,
and prints the record. Progress bars (rich.progress) load only when stderr is a terminal,
the only place they are drawn, and never with ``--json`` (stderr holds nothing then).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from sync.cli_common import _print_json, _store, console_err, print_record
from sync.config import Activation
from sync.engine import Progress as RunProgress
from sync.engine import Run, RunOptions, RunResult
from sync.logs import configure_logging
from sync.record import RunStatus
from sync.runlog import log_run_end
from sync.runtime import build_client, open_differ, open_source_from_env

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["RichProgress", "RunInterrupted", "execute_run", "progress_bars", "rich_progress", "run_and_print"]


class RichProgress:
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


def progress_bars() -> Progress:
    """rich's progress bars on stderr, disabled (drawing nothing) when stderr is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = console_err()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,
    )


@contextlib.contextmanager
def rich_progress(*, enabled: bool = True) -> Iterator[RichProgress | None]:
    """Bars for a run when ``enabled`` and stderr is a terminal; None (and rich.progress never loaded) otherwise.

    Not ``enabled`` (``--json``: stderr holds nothing), rich is not even loaded to ask about the terminal.
    """
    if not enabled or not console_err().is_terminal:
        yield None
        return
    with progress_bars() as bars:
        yield RichProgress(bars)


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


def run_and_print(
    activation: Activation,
    *,
    state: str,
    options: RunOptions,
    json_output: bool,
    rejects: Callable[[Mapping[str, object]], None] | None,
) -> int:
    """Run once, log the run's end, print its record (or its JSON); the run's exit code.

    Raises:
        SyncError: the edges could not be built (a source or state that cannot be opened,
            missing Batch keys): nothing ran, nothing was recorded.
    """
    configure_logging(level="warning")
    try:
        with rich_progress(enabled=not json_output) as progress:
            result = execute_run(activation, state=state, options=options, progress=progress, rejects=rejects)
    except RunInterrupted as interrupted:
        record: Mapping[str, object] = interrupted.record
        code = RunStatus.INTERRUPTED.exit_code
    else:
        record, code = result.record, result.exit_code
    log_run_end(record)
    if json_output:
        _print_json(record)
    else:
        print_record(record)
    return code
