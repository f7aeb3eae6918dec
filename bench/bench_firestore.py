"""Firestore state beside SQLite state, at Batch's pace, in one run.

    .venv/bin/python bench/bench_firestore.py                   # 20k on /update (c4, c8), 1M on mass-update
    .venv/bin/python bench/bench_firestore.py --quick           # 5,000 on /update, no 1M case
    .venv/bin/python bench/bench_firestore.py --baseline none --rows-large 0    # this engine, 20k cases
    .venv/bin/python bench/bench_firestore.py --quick --baseline none --send changed_attributes

What runs (bench/README.md says how to read the figures):

1. Cases: the demo's mapping in ``mirror`` mode, a first sync then a delta (1 % of the rows
   changed, 0.5 % gone), with ``--rows-small`` profiles on ``endpoint: update`` at each
   ``--concurrency``, and with ``--rows-large`` profiles on ``endpoint: auto`` (mass-update
   for the full load).
2. Each case runs once per state backend: SQLite, and ``FirestoreStateStore`` on the official
   Firestore emulator, which this script starts (the tests' wrapper) and empties between
   cases; every case gets a fresh collection prefix.
3. bench_sync's machinery: its generated segment and delta, the simulator in its own process
   with Batch's rate limits on (a fresh one per case), each engine run in its own child
   process measuring its own wall time, CPU time and peak RSS.
4. ``--baseline COMMIT`` runs the same cases with that commit's engine from a checkout of it.
   The child is this bench's own ``engine_child.py`` with ``PYTHONPATH`` on that checkout,
   since an older commit has no Firestore bench.

A run that does not succeed is reported with its error and the bench goes on; it exits 1
if a run of this checkout's engine did not succeed. Figures are printed and written to
``bench/results/firestore-latest.json``.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
# The Firestore emulator wrapper of the tests (tests.support.firestore_emulator).
sys.path.insert(0, str(REPO_ROOT))

from bench_sync import (  # noqa: E402
    _exit_on_sigterm,
    _fmt,
    _get_json,
    _step,
    baseline_tree,
    bench_env,
    build_activation,
    change_rows,
    generate_segment,
    machine,
    median,
    publish,
    remove_rows,
    simulator_process,
)
from measured_run import run_child  # noqa: E402

from sync.batch.endpoint import Endpoint  # noqa: E402
from sync.function.settings import DEFAULT_LEASE_TTL_SECONDS  # noqa: E402
from tests.support.firestore_emulator import FirestoreEmulator  # noqa: E402

CHILD_SCRIPT = REPO_ROOT / "bench" / "engine_child.py"
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results" / "firestore-latest.json"
SMALL_ROWS = 20_000
LARGE_ROWS = 1_000_000
QUICK_ROWS = 5_000
# The engine before the journal rewrite: every journal append (mirror intents per request,
# fingerprints per flush) was one transaction rewriting the activation document, so 20k
# profiles on /update failed on contention (issue 17).
BASELINE_REF = "869c4e86bb2dad4dba9ac83b0b3f2a747a7098dc"
# A run that outlives this is killed and reported as failed; the bench goes on.
RUN_TIMEOUT_SECONDS = 1800.0
STATES = ("sqlite", "firestore")
SUCCEEDED = ("succeeded", "succeeded_with_rejections")
RUNS = ("full", "delta")

# Targets (issue 17): what the Firestore path must hold at Batch's pace.
FLOOR_FACTOR = 1.1  # 20k on /update: first sync within 10 % of Batch's floor
MAX_SUSTAINED_WRITES_PER_DOCUMENT = 1.0  # Firestore's guidance: ~1 sustained write/s per document
MASS_UPDATE_SECONDS = 110.0  # 1M on mass-update: first sync
RSS_FACTOR = 1.1  # Firestore's peak RSS within 10 % of SQLite's, same case and engine
# What an exhausted transaction retry says: the Firestore client's "Failed to commit
# transaction" (869c4e8), the emulator's "Transaction lock timeout", Firestore's "Too much
# contention", the store's own message once it names what contended.
_CONTENTION = re.compile(r"contention|contended|failed to commit transaction|lock timeout", re.IGNORECASE)


@dataclass(frozen=True)
class Case:
    """One activation shape: a segment size, an endpoint, a concurrency."""

    rows: int
    endpoint: str
    concurrency: int | None

    @property
    def name(self) -> str:
        size = f"{self.rows // 1_000_000}M" if self.rows % 1_000_000 == 0 else f"{self.rows / 1000:g}k"
        if self.endpoint == "update":
            return f"{size} update c{self.concurrency}"
        return f"{size} {self.endpoint}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name)


def cases_of(args: argparse.Namespace) -> list[Case]:
    cases = [Case(args.rows_small, "update", c) for c in args.concurrency] if args.rows_small else []
    if args.rows_large:
        cases.append(Case(args.rows_large, "auto", None))
    return cases


# --- one case on one state backend ------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What every case runs with: the options, the children's environment, scratch, the emulator."""

    args: argparse.Namespace
    env: dict[str, str]
    workdir: Path
    emulator: FirestoreEmulator | None


def run_case(
    setup: Setup, case: Case, engine: str, tree: Path, state: str, base: Path, rep: int
) -> dict[str, dict[str, Any]]:
    """A first sync then a delta of ``case`` with ``engine`` on ``state``; the two runs' figures."""
    args, env, emulator = setup.args, setup.env, setup.emulator
    scratch = setup.workdir / f"{engine}-{case.slug}-{state}-{rep}"
    scratch.mkdir(parents=True, exist_ok=True)
    database = scratch / "segment.duckdb"
    shutil.copy(base, database)
    prefix = f"bench-{engine}-{case.slug}-{rep}-{secrets.token_hex(3)}"
    if state == "firestore":
        assert emulator is not None
        emulator.reset()  # the previous case's documents: keep the emulator as small as a fresh one
        spec: dict[str, Any] = {
            "state": {"kind": "firestore", "host": emulator.host, "project": emulator.project, "prefix": prefix}
        }
    else:
        spec = {"state": {"kind": "sqlite", "path": str(scratch / "state.db")}}
    # The deployed function's lease (renewed every third of it): the Cloud path's writes.
    spec["lease_ttl_seconds"] = DEFAULT_LEASE_TTL_SECONDS
    results: dict[str, dict[str, Any]] = {}
    with simulator_process(env, scratch / "simulator.log") as base_url:
        spec["activation"] = build_activation(database, base_url, case.concurrency)
        spec["activation"]["destination"]["endpoint"] = case.endpoint
        if args.send != "whole_profile":  # an engine older than the option refuses the key
            spec["activation"]["send"] = args.send
        for run_name in RUNS:
            if run_name == "delta":
                change_rows(database, case.rows, args.changed_percent)
                remove_rows(database, case.rows, args.removed_percent)
            _step(f"{engine} · {case.name} · {state} · {run_name}" + (f" · #{rep + 1}" if args.repeat > 1 else ""))
            before = _get_json(f"{base_url}/_sim/stats")
            try:
                child = run_child(
                    spec, scratch, env, run_name, script=CHILD_SCRIPT, tree=tree, timeout=args.run_timeout
                )
                result = summarise_run(child, prefix)
            except RuntimeError as error:
                result = crashed_run(str(error), scratch / f"{run_name}.log")
            after = _get_json(f"{base_url}/_sim/stats")
            result["too_many_requests"] = after.get("too_many_requests", 0) - before.get("too_many_requests", 0)
            if result["status"] not in SUCCEEDED:
                _step(f"  {result['status']} after {_fmt(result['wall_seconds'])} s: {result['error']}")
            results[run_name] = result
    if not args.keep and all(result["status"] in SUCCEEDED for result in results.values()):
        shutil.rmtree(scratch, ignore_errors=True)
    elif not args.keep:
        database.unlink()  # the logs of a run that did not succeed stay, without the segment
    return results


def summarise_run(child: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The figures of one engine run, from its record and the child's counters."""
    record = child["record"]
    counts = record.get("counts", {})
    stats = child.get("state_store") or {}
    ops = stats.get("ops") or {}
    hot, hot_source = stats.get("document_writes"), "store"
    if hot is None and stats.get("observed_document_writes") is not None:
        hot, hot_source = stats["observed_document_writes"], "client"
    if hot and hot.get("hottest"):
        hot = {**hot, "hottest": str(hot["hottest"]).replace(prefix, "P")}
    return {
        "status": record["status"],
        "error": record.get("error"),
        "endpoint": record.get("endpoint"),
        "wall_seconds": child["wall_seconds"],
        "cpu_seconds": child["cpu_seconds"],
        "peak_rss_mb": child["peak_rss_bytes"] / 1e6,
        "acknowledged": counts.get("acknowledged", 0),
        "sent": counts.get("sent", 0),
        "reads": ops.get("reads"),
        "writes": ops.get("writes"),
        "deletes": ops.get("deletes"),
        "transactions": ops.get("transactions"),
        "contention_retries": ops.get("contention_retries"),
        "documents_written": hot.get("documents") if hot else None,
        "hottest_document": hot.get("hottest") if hot else None,
        "hottest_writes": hot.get("hottest_writes") if hot else None,
        "peak_writes_1s": hot.get("peak_writes_1s") if hot else None,
        "peak_writes_per_second_10s": hot.get("peak_writes_per_second_10s") if hot else None,
        "document_writes_source": hot_source if hot else None,
        "state_store": stats,
        "timings": record.get("timings"),
        "counts": counts,
    }


def crashed_run(error: str, log_path: Path) -> dict[str, Any]:
    """A run whose child died or was killed: no record, only its error and the end of its log."""
    tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
    return {
        "status": "crashed",
        "error": " · ".join([error, *tail]),
        "wall_seconds": None,
        "cpu_seconds": None,
        "peak_rss_mb": None,
        "acknowledged": None,
    }


# --- figures ----------------------------------------------------------------------------------

NUMERIC = (
    "wall_seconds",
    "cpu_seconds",
    "peak_rss_mb",
    "acknowledged",
    "too_many_requests",
    "reads",
    "writes",
    "deletes",
    "transactions",
    "contention_retries",
    "documents_written",
    "hottest_writes",
    "peak_writes_1s",
    "peak_writes_per_second_10s",
)


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions; the status if all agree, else how many did not succeed."""
    statuses = [r["status"] for r in results]
    failed = [s for s in statuses if s not in SUCCEEDED]
    status = statuses[0] if len(set(statuses)) == 1 else f"{len(failed)}/{len(statuses)} failed"
    figures: dict[str, Any] = {"status": status, "failed": bool(failed)}
    for key in NUMERIC:
        values = [r[key] for r in results if r.get(key) is not None]
        figures[key] = median(values) if values else None
    figures["errors"] = sorted({r["error"] for r in results if r.get("error") and r["status"] not in SUCCEEDED})
    hottest = [r.get("hottest_document") for r in results if r.get("hottest_document")]
    figures["hottest_document"] = hottest[0] if hottest else None
    endpoints = sorted({r["endpoint"] for r in results if r.get("endpoint")})
    figures["endpoint"] = "/".join(endpoints) or None
    sources = {r.get("document_writes_source") for r in results} - {None}
    figures["document_writes_source"] = sources.pop() if len(sources) == 1 else None
    return figures


def update_floor(rows: int) -> dict[str, Any]:
    """Batch's floor for a first sync of ``rows`` profiles on /update: the burst, then the rate."""
    endpoint = Endpoint.UPDATE
    seconds = max(rows - endpoint.burst, 0) / endpoint.rate_per_second
    return {
        "rows": rows,
        "burst": endpoint.burst,
        "rate_per_second": endpoint.rate_per_second,
        "seconds": seconds,
        "target_seconds": FLOOR_FACTOR * seconds,
        "how": f"({rows:,} - {endpoint.burst:,} burst) / {endpoint.rate_per_second:g} profiles/s "
        f"= {seconds:.1f} s; target {FLOOR_FACTOR:g} x = {FLOOR_FACTOR * seconds:.1f} s",
    }


Verdict = tuple[str, str, bool | None]  # target, value, met (None: not measured)


def judge(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target against each engine, case and state it applies to: its value and met / not met."""
    rows: list[dict[str, Any]] = []
    for engine, by_case in report["runs"].items():
        for case_name, by_state in by_case.items():
            case = report["cases"][case_name]
            for state, runs in by_state.items():
                if "full" not in runs:
                    continue
                verdicts = [_first_sync(case, runs["full"])]
                if state == "firestore":
                    both = [runs[name] for name in RUNS if name in runs]
                    verdicts += [_contention(both), _sustained_writes(both)]
                    if case["endpoint"] != "update" and "sqlite" in by_state:
                        verdicts.append(_rss_beside_sqlite(runs, by_state["sqlite"]))
                for target, value, met in verdicts:
                    verdict = "n/a" if met is None else "met" if met else "not met"
                    rows.append(
                        {"engine": engine, "case": case_name, "state": state}
                        | {"target": target, "value": value, "verdict": verdict}
                    )
    return rows


def _first_sync(case: dict[str, Any], full: dict[str, Any]) -> Verdict:
    """On /update: within 10 % of Batch's floor. On mass-update: at most 110 s."""
    if case["endpoint"] == "update":
        limit = update_floor(case["rows"])["target_seconds"]
        target = f"first sync <= {FLOOR_FACTOR:g} x floor ({limit:.1f} s)"
    else:
        limit, target = MASS_UPDATE_SECONDS, f"first sync <= {MASS_UPDATE_SECONDS:g} s"
    wall = full["wall_seconds"]
    text = "n/a" if wall is None else f"{wall:.1f} s"
    if full["failed"]:
        text += f" ({full['status']})"
    return target, text, None if wall is None else wall <= limit and not full["failed"]


def _contention(runs: list[dict[str, Any]]) -> Verdict:
    """No run failed on exhausted contention (the retries, when the store counts them, beside)."""
    exhausted = [r for r in runs if r["failed"] and any(_CONTENTION.search(e) for e in r["errors"])]
    retries = " / ".join(_n(r["contention_retries"]) for r in runs)
    return "0 exhausted contention (full, delta)", f"failed on it: {len(exhausted)} · retries: {retries}", not exhausted


def _sustained_writes(runs: list[dict[str, Any]]) -> Verdict:
    """The hottest document's 10-second write rate, in every run, at most one per second."""
    rates = [r["peak_writes_per_second_10s"] for r in runs]
    known = [v for v in rates if v is not None]
    return (
        f"<= {MAX_SUSTAINED_WRITES_PER_DOCUMENT:g} write/s per document, 10 s (full, delta)",
        " / ".join(_n(v, ".2f") for v in rates),
        max(known) <= MAX_SUSTAINED_WRITES_PER_DOCUMENT if known else None,
    )


def _rss_beside_sqlite(runs: dict[str, Any], sqlite: dict[str, Any]) -> Verdict:
    """Firestore's peak RSS over SQLite's, run for run, within 10 %."""
    ratios = [
        runs[name]["peak_rss_mb"] / sqlite[name]["peak_rss_mb"]
        if name in sqlite and runs[name]["peak_rss_mb"] and sqlite[name]["peak_rss_mb"]
        else None
        for name in RUNS
        if name in runs
    ]
    known = [v for v in ratios if v is not None]
    return (
        f"peak RSS <= {RSS_FACTOR:g} x SQLite's (full, delta)",
        " / ".join("n/a" if v is None else f"{v:.2f}x" for v in ratios),
        max(known) <= RSS_FACTOR if known else None,
    )


def _table(columns: list[tuple[str, str]], rows: list[list[str]]) -> list[str]:
    """A header, a rule and the rows; each column is ``(title, format spec)``, e.g. ``">8"``."""

    def line(cells: list[str]) -> str:
        return " ".join(f"{cell:{spec}}" for cell, (_, spec) in zip(cells, columns, strict=True)).rstrip()

    header = line([title for title, _ in columns])
    return [header, "-" * len(header), *(line(row) for row in rows)]


def _n(value: Any, spec: str = ".0f") -> str:
    return "n/a" if value is None else _fmt(value, spec)


_LABELS = [("engine", "<9"), ("case", "<16"), ("run", "<6"), ("state", "<10")]


def render(report: dict[str, Any]) -> str:
    lines = [
        f"cepsync Firestore benchmark · {', '.join(report['cases'])} · {report['repeat']} repetition(s)"
        + (" (medians)" if report["repeat"] > 1 else "")
        + f" · {report['machine']['cpu_count']} CPUs · Python {report['machine']['python']}",
        f"command: {report['command']}",
        f"engines: current = this checkout; baseline = {report.get('baseline') or 'not run'}",
        "state: sqlite = a SQLite file; firestore = FirestoreStateStore on the Firestore emulator, "
        "a fresh collection prefix (P) per case",
        "",
    ]
    keyed = [
        ([engine, case, run_name, state], figures)
        for engine, by_case in report["runs"].items()
        for case, by_state in by_case.items()
        for state, runs in by_state.items()
        for run_name, figures in runs.items()
    ]
    lines += _table(
        [
            *_LABELS,
            ("status", ">25"),
            ("endpoint", ">11"),
            ("wall s", ">7"),
            ("CPU s", ">6"),
            ("RSS MB", ">6"),
            ("acknowledged", ">12"),
            ("429s", ">4"),
        ],
        [
            [
                *labels,
                f["status"],
                f.get("endpoint") or "-",
                _n(f["wall_seconds"], ".1f"),
                _n(f["cpu_seconds"], ".1f"),
                _n(f["peak_rss_mb"]),
                _n(f["acknowledged"], ",.0f"),
                _n(f.get("too_many_requests")),
            ]
            for labels, f in keyed
        ],
    )
    lines += ["", "Firestore operations of each run, and the document written most:"]
    lines += _table(
        [
            *_LABELS,
            ("reads", ">7"),
            ("writes", ">7"),
            ("deletes", ">7"),
            ("txns", ">6"),
            ("retries", ">7"),
            ("docs", ">5"),
            ("hot writes", ">10"),
            ("hot 1 s", ">7"),
            ("hot/s 10 s", ">11"),
            ("hottest document", "<"),
        ],
        [
            [
                *labels,
                _n(f.get("reads"), ",.0f"),
                _n(f.get("writes"), ",.0f"),
                _n(f.get("deletes"), ",.0f"),
                _n(f.get("transactions"), ",.0f"),
                _n(f.get("contention_retries"), ",.0f"),
                _n(f.get("documents_written"), ",.0f"),
                _n(f.get("hottest_writes"), ",.0f"),
                _n(f.get("peak_writes_1s")),
                _n(f.get("peak_writes_per_second_10s"), ".2f")
                + ("*" if f.get("document_writes_source") == "client" else " "),
                f.get("hottest_document") or "",
            ]
            for labels, f in keyed
        ],
    )
    if any(f.get("document_writes_source") == "client" for _, f in keyed):
        lines.append("* counted by the bench at the client's commit RPCs: this engine's store has no document_writes()")
    errors = [(" · ".join(labels), error) for labels, f in keyed for error in f["errors"]]
    if errors:
        lines += ["", "Runs that did not succeed:", *(f"  {where}: {error}" for where, error in errors)]
    floors = sorted({case["rows"] for case in report["cases"].values() if case["endpoint"] == "update"})
    lines += ["", "Targets:"]
    lines += [f"  Batch's floor on /update, {rows:,} profiles: {update_floor(rows)['how']}" for rows in floors]
    lines += _table(
        [("engine", "<9"), ("case", "<16"), ("state", "<10"), ("target", "<50"), ("value", ">32"), ("met?", "<7")],
        [[t["engine"], t["case"], t["state"], t["target"], t["value"], t["verdict"]] for t in report["targets"]],
    )
    return "\n".join(lines)


# --- orchestration ----------------------------------------------------------------------------


def _concurrency(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 4,8")
    return values


def _states(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - set(STATES):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(STATES)}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows-small", type=int, default=SMALL_ROWS, help="profiles of the /update cases (0 skips)")
    parser.add_argument("--rows-large", type=int, default=LARGE_ROWS, help="profiles of the mass-update case (0 skips)")
    parser.add_argument("--concurrency", type=_concurrency, default=[4, 8], help="of the /update cases (default 4,8)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions of every case (medians; default 1)")
    parser.add_argument("--states", type=_states, default=list(STATES), help="default sqlite,firestore")
    parser.add_argument(
        "--baseline",
        default=BASELINE_REF,
        help=f"git commit of the engine to run the same cases with (default {BASELINE_REF[:7]}, the journal "
        "that rewrote the activation document); 'none' to skip",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ROWS:,} profiles on /update, no mass-update case, once"
    )
    parser.add_argument("--changed-percent", type=float, default=1.0, help="rows changed before the delta run")
    parser.add_argument("--removed-percent", type=float, default=0.5, help="rows that leave before the delta run")
    parser.add_argument(
        "--run-timeout", type=float, default=RUN_TIMEOUT_SECONDS, help="seconds before a run is killed as failed"
    )
    parser.add_argument(
        "--send",
        choices=("whole_profile", "changed_attributes"),
        default="whole_profile",
        help="the activation's send (changed_attributes keeps attribute sets in the state; use --baseline none)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_RESULTS, help="where to write the JSON figures")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (segments, logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows_small, args.rows_large, args.repeat = QUICK_ROWS, 0, 1
    if args.rows_small < 0 or args.rows_large < 0 or args.repeat < 1:
        parser.error("--rows-small and --rows-large must be at least 0, --repeat at least 1")
    if not args.rows_small and not args.rows_large:
        parser.error("nothing to run: --rows-small and --rows-large are both 0")
    if not 0 <= args.changed_percent <= 100 or not 0 <= args.removed_percent <= 100:
        parser.error("--changed-percent and --removed-percent must be between 0 and 100")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    command = shlex.join([Path(sys.executable).name, "bench/bench_firestore.py", *argv])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cepsync-bench-fs-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    cases = cases_of(args)
    report: dict[str, Any] = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(),
        "repeat": args.repeat,
        "baseline": None if args.baseline == "none" else args.baseline,
        "states": args.states,
        "send": args.send,
        "cases": {c.name: {"rows": c.rows, "endpoint": c.endpoint, "concurrency": c.concurrency} for c in cases},
        "floors": {str(c.rows): update_floor(c.rows) for c in cases if c.endpoint == "update"},
        "machine": machine(),
        "runs": {},
    }
    raw: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    segments: dict[int, Path] = {}
    try:
        with ExitStack() as services:
            emulator = None
            if "firestore" in args.states:
                _step("starting the Firestore emulator")
                emulator = FirestoreEmulator()
                services.callback(emulator.stop)
                emulator.start()
            engines: list[tuple[str, Path]] = [("current", REPO_ROOT)]
            if report["baseline"]:
                engines.insert(0, ("baseline", services.enter_context(baseline_tree(args.baseline, workdir))))
            setup = Setup(args, env, workdir, emulator)
            for case in cases:
                if case.rows not in segments:
                    segments[case.rows] = workdir / f"segment-{case.rows}.duckdb"
                    _step(f"generating {case.rows:,} customers")
                    report.setdefault("segments", {})[str(case.rows)] = generate_segment(segments[case.rows], case.rows)
                for rep in range(args.repeat):
                    # Alternate which engine goes first, so drift on a shared machine hits both.
                    for name, tree in engines if rep % 2 == 0 else list(reversed(engines)):
                        for state in args.states:
                            runs = run_case(setup, case, name, tree, state, segments[case.rows], rep)
                            for run_name, result in runs.items():
                                raw.setdefault((name, case.name, state, run_name), []).append(result)
    except BaseException:
        print(f"benchmark failed; scratch kept in {workdir}", file=sys.stderr)
        raise
    failed_anywhere = any(r["status"] not in SUCCEEDED for results in raw.values() for r in results)
    if failed_anywhere and not args.keep:
        for segment in segments.values():
            segment.unlink(missing_ok=True)
        print(f"logs of the runs that did not succeed are kept in {workdir}", file=sys.stderr)
    elif not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    for (engine, case_name, state, run_name), results in sorted(raw.items(), key=lambda item: _order(item[0], report)):
        slot = report["runs"].setdefault(engine, {}).setdefault(case_name, {}).setdefault(state, {})
        slot[run_name] = {**aggregate(results), "results": results}
    report["targets"] = judge(report)
    publish(report, args.output, render)
    failed = [
        f"{case} · {state} · {run_name}"
        for (engine, case, state, run_name), results in raw.items()
        if engine == "current" and any(r["status"] not in SUCCEEDED for r in results)
    ]
    if failed:
        print(f"runs of this engine that did not succeed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _order(key: tuple[str, str, str, str], report: dict[str, Any]) -> tuple[int, int, int, int]:
    """Baseline before current, cases and states in the order they ran, full before delta."""
    engine, case, state, run_name = key
    return (
        0 if engine == "baseline" else 1,
        list(report["cases"]).index(case),
        report["states"].index(state),
        RUNS.index(run_name),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
