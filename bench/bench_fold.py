"""What compacting a large journal into the SQLite state costs: seconds and peak memory, against a baseline.

    .venv/bin/python bench/bench_fold.py                                       # 2M stored, a 350,000-entry journal
    .venv/bin/python bench/bench_fold.py --rows 10000000 --baseline 8f48a96 --repeat 2 --keep /tmp/fold10m

A run folds its journal into the stored fingerprints once the fold is due
(``docs/how-state-is-kept.md``, "When the journal is folded"). A journal of at most one
stored chunk (250,000 entries) is folded a chunk at a time, and a larger one that only adds
new ids (a first sync) is appended; anything else (a large delta, a ``--full`` run that
changed most profiles, the last leg of a first sync followed by a delta) takes the general
fold, which this bench measures.

1. Once, with this checkout: a SQLite state of ``--rows`` fingerprints (ids
   ``user-NNNNNNNN``, ``--attributes`` attribute hashes each, committed and compacted as a
   first sync does), then a journal of ``--journal`` entries committed in blobs of 10,000,
   as a run's flushes are: updates of stored ids (60 %), deletions (20 %), new ids (15 %),
   and entries repeating an id the journal already holds (5 %).
2. For each checkout in turn, ``--repeat`` times (which goes first alternates): a fresh
   copy of that file, and a child process of its own that opens it and calls the store's
   ``compact(..., when_due=True)``, as a run's end does. The child resets its peak-memory
   mark (``/proc/self/clear_refs``) just before the call, so the peak printed is the
   compaction's own, on top of what the process held before it (printed too). After the
   timing it loads the state back and sums it, so that both checkouts' results can be
   compared (the bench exits 1 if they differ).

``--keep DIR`` builds the state in ``DIR`` and reuses it next time (a 10M state takes a few
minutes to build). Medians over the repetitions, the baseline beside this checkout, and their ratio. It
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_attribute_state import _extract

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIVATION = "bench"
BASE_COMMIT_ROWS = 100_000
JOURNAL_BLOB_ROWS = 10_000
FIGURES = ("compact_s", "peak_mb", "rss_before_mb")


def _fingerprints(ids: list[str], attributes: int, rnd: random.Random, *, put: bool = True) -> Any:
    import pyarrow as pa

    count = len(ids)
    sets = [
        b"".join(value.to_bytes(4, "little") for value in sorted(rnd.getrandbits(32) for _ in range(attributes)))
        for _ in range(count)
    ]
    return pa.table(
        {
            "custom_id": pa.array(ids, pa.string()),
            "raw": pa.array([rnd.getrandbits(64) if put else 0 for _ in range(count)], pa.uint64()),
            "payload": pa.array([rnd.getrandbits(64) if put else 0 for _ in range(count)], pa.uint64()),
            "attributes": pa.array(sets if put else [None] * count, pa.binary()),
            "put": pa.array([put] * count, pa.bool_()),
        }
    )


def _build(path: Path, rows: int, journal: int, attributes: int) -> dict[str, int]:
    """The stored state and the journal waiting to be folded (this checkout's store)."""
    import pyarrow as pa

    from sync.state.sqlite import SQLiteStateStore

    rnd = random.Random(20261208)
    now = datetime.now(UTC)
    kinds = {"updated": 0, "deleted": 0, "new": 0, "repeated": 0}
    with SQLiteStateStore(path) as store:
        lease = store.acquire_lease(ACTIVATION, "bench", 3600.0, now)
        for start in range(0, rows, BASE_COMMIT_ROWS):
            ids = [f"user-{n:08d}" for n in range(start, min(rows, start + BASE_COMMIT_ROWS))]
            store.commit(lease, _fingerprints(ids, attributes, rnd), now)
        store.compact(lease, now)
        touched = rnd.sample(range(rows), min(rows, int(journal * 0.8)))
        split = int(len(touched) * 0.75)
        entries: list[tuple[str, bool]] = [(f"user-{n:08d}", True) for n in touched[:split]]
        entries += [(f"user-{n:08d}", False) for n in touched[split:]]
        entries += [(f"user-{n:08d}", True) for n in range(rows, rows + int(journal * 0.15))]
        rnd.shuffle(entries)
        repeats = [rnd.choice(entries) for _ in range(journal - len(entries))]
        entries += repeats
        kinds.update(updated=split, deleted=len(touched) - split, new=int(journal * 0.15), repeated=len(repeats))
        for start in range(0, len(entries), JOURNAL_BLOB_ROWS):
            blob = entries[start : start + JOURNAL_BLOB_ROWS]
            tables = [
                _fingerprints([custom_id for custom_id, put in blob if put is wanted], attributes, rnd, put=wanted)
                for wanted in (True, False)
            ]
            store.commit(lease, pa.concat_tables(tables), now)
        store.release_lease(lease)
    return kinds


def _child(path: str) -> dict[str, Any]:
    """Compact the journal with whichever ``sync`` is importable; the figures as JSON."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        from sync.memory import tune_allocators
    except ImportError:  # a baseline from before it
        pass
    else:
        tune_allocators()  # as a run does
    from sync.state.sqlite import SQLiteStateStore

    def status(field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    now = datetime.now(UTC)
    with SQLiteStateStore(path) as store:
        lease = store.acquire_lease(ACTIVATION, "bench-fold", 3600.0, now)
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident set
        started = time.perf_counter()
        store.compact(lease, now, when_due=True)
        seconds = time.perf_counter() - started
        peak = status("VmHWM")
        journal = store._conn.execute("SELECT COUNT(*) FROM fingerprint_journal").fetchone()[0]
        table = store.load_fingerprint_table(ACTIVATION)
        digest = [
            table.num_rows,
            pc.sum(pc.shift_right(table.column("raw"), pa.scalar(32, pa.uint64()))).as_py(),
            pc.sum(pc.shift_right(table.column("payload"), pa.scalar(32, pa.uint64()))).as_py(),
            pc.sum(pc.binary_length(table.column("attributes"))).as_py(),
        ]
        store.release_lease(lease)
    return {
        "compact_s": seconds,
        "rss_before_mb": before / 1e6,
        "peak_mb": peak / 1e6,
        "journal_left": journal,
        "digest": digest,
    }


def _run_child(code_root: Path, path: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code_root), str(REPO_ROOT / "bench")])
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)  # noqa: S603
    if done.returncode != 0:
        raise SystemExit(f"bench child failed:\n{done.stderr}")
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def _built_state(args: argparse.Namespace, workdir: Path) -> Path:
    """The state file to copy for each child: built in ``workdir``, or kept in ``--keep`` and reused."""
    shape = {"rows": args.rows, "journal": args.journal, "attributes": args.attributes}
    built = (args.keep or workdir) / "built.db"
    described = built.with_suffix(".json")
    if args.keep and built.exists() and described.exists():
        kept = json.loads(described.read_text())
        if kept["shape"] == shape:
            print(f"state: reused from {built}")
            _describe(args, kept["kinds"], None)
            return built
        built.unlink()
    built.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    kinds = _build(built, args.rows, args.journal, args.attributes)
    described.write_text(json.dumps({"shape": shape, "kinds": kinds}))
    _describe(args, kinds, time.perf_counter() - started)
    return built


def _describe(args: argparse.Namespace, kinds: dict[str, int], seconds: float | None) -> None:
    print(
        f"state: {args.rows:,} fingerprints, {args.attributes} attribute hashes each; journal of "
        f"{args.journal:,} entries in blobs of {JOURNAL_BLOB_ROWS:,} ({kinds['updated']:,} updated, "
        f"{kinds['deleted']:,} deleted, {kinds['new']:,} new, {kinds['repeated']:,} repeated)"
        + ("" if seconds is None else f"; built in {seconds:.0f} s")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="stored fingerprints (default 2,000,000)")
    parser.add_argument("--journal", type=int, default=350_000, help="journal entries to fold (default 350,000)")
    parser.add_argument("--attributes", type=int, default=7, help="attribute hashes a profile (default 7)")
    parser.add_argument("--baseline", default="8f48a96", help="commit to compare against ('none': this checkout only)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per checkout (default 3)")
    parser.add_argument("--keep", type=Path, help="build the state in this directory, or reuse the one built there")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args._child)))
        return 0

    with tempfile.TemporaryDirectory(prefix="cepsync-bench-fold-") as work:
        workdir = Path(work)
        built = _built_state(args, workdir)
        checkouts: dict[str, Path] = {"this": REPO_ROOT}
        if args.baseline != "none":
            checkouts = {args.baseline: _extract(args.baseline, workdir / "baseline"), "this": REPO_ROOT}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
        order = list(checkouts)
        for repetition in range(args.repeat):
            for name in order if repetition % 2 == 0 else reversed(order):
                copy = workdir / "run.db"
                shutil.copyfile(built, copy)
                figures = _run_child(checkouts[name], copy)
                copy.unlink()
                results[name].append(figures)
                print(
                    f"  {name:<10} compact {figures['compact_s']:7.2f} s   peak {figures['peak_mb']:7.0f} MB"
                    f"   (resident before {figures['rss_before_mb']:5.0f} MB)   journal left {figures['journal_left']}"
                )
    digests = {json.dumps(figures["digest"]) for runs in results.values() for figures in runs}
    print(f"\nmedians of {args.repeat} ({'baseline / this' if len(order) > 1 else 'this checkout'}):")
    print(f"{'':<10} {'compact s':>10} {'peak MB':>9} {'before MB':>10}")
    medians: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        medians[name] = {
            key: statistics.median(run[key] for run in runs) for key in ("compact_s", "peak_mb", "rss_before_mb")
        }
        print(
            f"{name:<10} {medians[name]['compact_s']:>10.2f} {medians[name]['peak_mb']:>9.0f} "
            f"{medians[name]['rss_before_mb']:>10.0f}"
        )
    if len(order) > 1:
        base, this = medians[order[0]], medians["this"]
        print(
            f"{'ratio':<10} {base['compact_s'] / this['compact_s']:>9.2f}x {base['peak_mb'] / this['peak_mb']:>8.2f}x"
        )
    if len(digests) != 1:
        print(f"the checkouts folded different states: {sorted(digests)}")
        return 1
    digest = next(iter(digests))
    print(f"every run folded the same state: {digest} (rows, sums of raw's and payload's high words, attribute bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
