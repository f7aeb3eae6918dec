"""The ``cepsync`` commands that look at or change what is stored, rather than sync.

history, report, reset, switch-diff, dbt-exposures and adopt-fence read the state store, the
run records or the activation files, and never read a segment or send to Batch; they sit
apart from the run path of :mod:`sync.cli`, which adds them to its app with :func:`register`.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sync.cli_common import (
    ActivationArg,
    StateOption,
    _fail,
    _load,
    _sqlite_state_file,
    _state_label,
    _store,
    _styled,
    check_output_path,
    console_out,
    print_error,
    print_record,
)
from sync.config import Activation, DiffMode
from sync.errors import ConfigError, SyncError
from sync.model import ActivationMeta
from sync.runconfig import config_as_run

if TYPE_CHECKING:
    from sync.state.base import StateStore
    from sync.warehouse.store import WarehouseFingerprints


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
    # The report's tables load when `history` runs, not with every command.
    from sync.report.history import history_csv, history_table, persistent_notes

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
        console_out().print(history_table(name, records))
        for note in persistent_notes(records):
            console_out().print(_styled((note, "yellow")))


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
    console_out().print(_styled(f"wrote {target} ({len(records)} runs); open it in a browser, it needs no network"))


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
            in_bigquery = _fingerprints_in_bigquery(config, store)
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
    console_out().print(_styled(f"state of '{name}' forgotten; the next run is a full load"))


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
        in_bigquery = _fingerprints_in_bigquery(config, base)
    except SyncError as error:
        raise _fail(error) from None
    try:
        moved = carry_over(config, base, in_bigquery, to=to, owner=default_owner())
    except SyncError as error:
        raise _fail(error) from None
    finally:
        in_bigquery.close()
        base.close()
    console_out().print(_styled(f"{moved} fingerprints of '{config.name}' now in the {to.value} diff's store"))


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
    from sync.config_file import load_activations
    from sync.results.dbt import Manifest, render

    try:
        activations = load_activations(directory)
        text = render(activations.values(), Manifest.load(manifest) if manifest is not None else None)
    except SyncError as error:
        raise _fail(error) from None
    typer.echo(text, nl=False)


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
        store = _fingerprints_in_bigquery(config, base)
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
        console_out().print(
            _styled(f"'{config.name}': this state store now owns {where} (took over from token {took})")
        )
    else:
        console_out().print(_styled(f"'{config.name}': this state store already owns {where}; nothing to adopt"))


def register(app: typer.Typer) -> None:
    """Add these commands to ``app``; :mod:`sync.cli` calls it where `cepsync --help` lists them."""
    app.command()(history)
    app.command()(report)
    app.command()(reset)
    app.command("switch-diff")(switch_diff)
    app.command("dbt-exposures")(dbt_exposures)
    app.command("adopt-fence")(adopt_fence)


def _fingerprints_in_bigquery(config: Activation, base: StateStore) -> WarehouseFingerprints:
    """The activation's fingerprints in BigQuery (``diff.dataset``); ``base`` is closed if they cannot be opened."""
    from sync.runtime import open_warehouse_fingerprints

    try:
        return open_warehouse_fingerprints(config, base)
    except BaseException:
        base.close()
        raise
