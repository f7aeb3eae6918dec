"""What attribute sets (``send: changed_attributes``) add to the stored state, in SQLite and Firestore.

    .venv/bin/python bench/bench_attribute_state.py                          # 1,000,000 profiles, both stores
    .venv/bin/python bench/bench_attribute_state.py --rows 200000 --attributes 10,50
    .venv/bin/python bench/bench_attribute_state.py --states sqlite --baseline none

Each variant commits ``--rows`` acknowledged fingerprints (journal tables of 100,000, as a
first sync's flushes do), compacts them, then loads them back as a run does, in a child
process of its own (so its peak memory is its own), through the store's own methods:

* ``before``: the engine of ``--baseline`` (default e932737, the last commit without attribute
  sets: ``custom_id, raw, payload``), its ``sync/`` taken from git into a temporary directory;
* ``off``: this engine, an activation without ``send: changed_attributes`` (the column is
  there, every set null);
* ``on-N``: this engine, N attributes a profile (one 32-bit hash each: random, as hashes are,
  so incompressible, sorted as the sets are).

Ids are ``user-NNNNNNNN`` (13 bytes). Printed per variant and per store: the bytes the
fingerprints take (SQLite: the base blobs, and the file; Firestore: the shard documents'
blobs, and how many there are, which is what a run reads), the seconds to commit them, to
compact them and to load them back in the same child, the seconds a second child takes to
load them (``fresh load s``: what a run's first load costs, its memory untouched; the
allocators tuned as a run tunes them), the loaded Arrow table's bytes, and the first child's
peak RSS. Firestore runs on the official emulator, which this script starts (the tests' wrapper).

Then what computing the sets costs the mapping stage: ``--hash-rows`` rows of the benchmark's
``customers`` table (bench_sync.py's generator, the demo's mapping) encoded as every run does,
and encoded keeping the slots and hashing them (``sync.attributes.attribute_columns``), CPU
seconds per row, median of three. It asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# The last commit without attribute sets in the state.
BASELINE_REF = "e932737"
COMMIT_ROWS = 100_000
ACTIVATION = "bench"


def _journal(start: int, stop: int, attributes: int | None, rnd: random.Random) -> Any:
    import pyarrow as pa

    count = stop - start
    columns: dict[str, Any] = {
        "custom_id": pa.array([f"user-{n:08d}" for n in range(start, stop)], pa.string()),
        "raw": pa.array([rnd.getrandbits(64) for _ in range(count)], pa.uint64()),
        "payload": pa.array([rnd.getrandbits(64) for _ in range(count)], pa.uint64()),
    }
    if attributes is not None:
        sets = [
            b"".join(value.to_bytes(4, "little") for value in sorted(rnd.getrandbits(32) for _ in range(attributes)))
            if attributes
            else None
            for _ in range(count)
        ]
        columns["attributes"] = pa.array(sets, pa.binary())
    columns["put"] = pa.array([True] * count, pa.bool_())
    return pa.table(columns)


def _child(state: str, rows: int, attributes: int | None, where: str, *, load_only: bool = False) -> dict[str, Any]:
    """Commit, compact and load ``rows`` fingerprints with whichever ``sync`` is importable.

    ``load_only``: open the state another child wrote and load it, as a run's fresh process does.
    """
    rnd = random.Random(20261207)
    if state == "sqlite":
        from sync.state.sqlite import SQLiteStateStore

        store: Any = SQLiteStateStore(where)
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import firestore

        from sync.state.firestore import FirestoreStateStore

        host, project, prefix = where.split("|")
        os.environ["FIRESTORE_EMULATOR_HOST"] = host
        client = firestore.Client(project=project, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        store = FirestoreStateStore(client, prefix=prefix)
    figures: dict[str, Any] = {}
    if load_only:
        try:
            from sync.memory import tune_allocators
        except ImportError:  # a baseline from before it
            pass
        else:
            tune_allocators()  # as a run does before it loads its state
        started = time.perf_counter()
        table = store.load_fingerprint_table(ACTIVATION)
        figures["load_s"] = time.perf_counter() - started
        assert table.num_rows == rows, (table.num_rows, rows)
        store.close()
        return figures
    now = datetime.now(UTC)
    lease = store.acquire_lease(ACTIVATION, "bench", 3600.0, now)
    started = time.perf_counter()
    for start in range(0, rows, COMMIT_ROWS):
        store.commit(lease, _journal(start, min(rows, start + COMMIT_ROWS), attributes, rnd), now)
    figures["commit_s"] = time.perf_counter() - started
    started = time.perf_counter()
    store.compact(lease, now)
    figures["compact_s"] = time.perf_counter() - started
    started = time.perf_counter()
    table = store.load_fingerprint_table(ACTIVATION)
    figures["load_s"] = time.perf_counter() - started
    assert table.num_rows == rows, (table.num_rows, rows)
    figures["table_bytes"] = table.nbytes
    if state == "sqlite":
        connection = store._conn  # the bench reads the blobs sizes
        row = connection.execute(
            "SELECT COUNT(*), SUM(length(blob)) FROM fingerprint_base WHERE activation = ?", (ACTIVATION,)
        ).fetchone()
        figures["documents"], figures["state_bytes"] = int(row[0]), int(row[1])
        store.close()
        figures["file_bytes"] = os.path.getsize(where)
    else:
        shards = client.collection(f"{prefix}_activations").document(ACTIVATION).collection("fp_shards")
        sizes = [len(document.get("blob")) for document in shards.stream()]
        figures["documents"], figures["state_bytes"] = len(sizes), sum(sizes)
        figures["largest_document_bytes"] = max(sizes)
        store.close()
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def _extract(ref: str, into: Path) -> Path:
    """``sync/`` of ``ref`` under ``into``, from git (no worktree is registered)."""
    archive = subprocess.run(  # noqa: S603 - git, fixed arguments
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", ref, "sync"],  # noqa: S607 - git from PATH
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_child(code_root: Path, state: str, rows: int, attributes: int | None, where: str) -> dict[str, Any]:
    """The writing child's figures, and ``fresh_load_s``: the same state loaded by a child of its own."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code_root), str(REPO_ROOT)])
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", state, "--_where", where]
    command += ["--rows", str(rows), "--_attributes", "none" if attributes is None else str(attributes)]
    results: list[dict[str, Any]] = []
    for extra in ([], ["--_load-only"]):
        done = subprocess.run(command + extra, capture_output=True, text=True, env=env, check=False)  # noqa: S603
        if done.returncode != 0:
            raise SystemExit(f"bench child ({state}) failed:\n{done.stderr}")
        results.append(json.loads(done.stdout.splitlines()[-1]))
    written, fresh = results
    written["fresh_load_s"] = fresh["load_s"]
    return written


def _hashing(rows: int) -> None:
    """CPU per row of encoding, without and with the attribute sets (the demo's mapping)."""
    import statistics

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from bench_mapping import customers, demo_mapper

    from sync.attributes import attribute_columns
    from sync.encode import encode_batch

    table = customers(rows)
    mapper = demo_mapper(table.schema)
    converted = [mapper.convert_batch(batch) for batch in table.to_batches(max_chunksize=2_048)]

    def plain() -> None:
        for batch in converted:
            encode_batch(batch)

    def with_sets() -> None:
        for batch in converted:
            attribute_columns(encode_batch(batch, keep_slots=True))

    print(f"\nmapping stage, {rows:,} rows of {len(converted[0].fields)} fields (CPU, median of 3):")
    for name, work in (("encode", plain), ("encode + attribute sets", with_sets)):
        runs = []
        for _ in range(3):
            started = time.process_time()
            work()
            runs.append(time.process_time() - started)
        print(f"  {name:<24} {statistics.median(runs) / rows * 1e6:6.2f} µs a row")


def _print(rows: int, results: dict[str, dict[str, dict[str, Any]]]) -> None:
    per_million = 1_000_000 / rows
    for state, variants in results.items():
        print(f"\n{state}: {rows:,} profiles (sizes also per 1M profiles)")
        head = f"{'variant':<10} {'state MB':>9} {'/1M MB':>8} {'B/profile':>10} {'docs':>6} {'commit s':>9} "
        head += f"{'compact s':>10} {'load s':>7} {'fresh load s':>13}"
        print(head + f"{'table MB':>9} {'peak RSS MB':>12}")
        for name, figures in variants.items():
            print(
                f"{name:<10} {figures['state_bytes'] / 1e6:>9.1f} {figures['state_bytes'] * per_million / 1e6:>8.1f} "
                f"{figures['state_bytes'] / rows:>10.1f} {figures['documents']:>6} {figures['commit_s']:>9.2f} "
                f"{figures['compact_s']:>10.2f} {figures['load_s']:>7.2f} {figures['fresh_load_s']:>13.3f}"
                f"{figures['table_bytes'] / 1e6:>9.1f} {figures['peak_rss_mb']:>12.0f}"
            )
            if "largest_document_bytes" in figures:
                print(f"{'':<10} largest shard document: {figures['largest_document_bytes']:,} bytes (limit 1,048,576)")
            if "file_bytes" in figures:
                print(f"{'':<10} whole SQLite file: {figures['file_bytes'] / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--attributes", default="20", help="attributes a profile, comma-separated (default 20)")
    parser.add_argument("--states", default="sqlite,firestore", help="sqlite, firestore, or both")
    parser.add_argument("--baseline", default=BASELINE_REF, help="git commit before attribute sets, or 'none'")
    parser.add_argument("--hash-rows", type=int, default=200_000, help="rows of the hashing figures (0 skips)")
    parser.add_argument("--_child", choices=("sqlite", "firestore"), help=argparse.SUPPRESS)
    parser.add_argument("--_where", help=argparse.SUPPRESS)
    parser.add_argument("--_attributes", help=argparse.SUPPRESS)
    parser.add_argument("--_load-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        attributes = None if args._attributes == "none" else int(args._attributes)
        print(json.dumps(_child(args._child, args.rows, attributes, args._where, load_only=args._load_only)))
        return 0
    states = [state for state in args.states.split(",") if state]
    if not states and args.hash_rows:
        _hashing(args.hash_rows)
        return 0
    counts = [int(value) for value in args.attributes.split(",") if value]
    variants: list[tuple[str, Path | None, int | None]] = [("off", None, 0)]
    variants += [(f"on-{count}", None, count) for count in counts]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="cepsync-bench-attrs-") as scratch:
        workdir = Path(scratch)
        if args.baseline != "none":
            variants.insert(0, ("before", _extract(args.baseline, workdir / "baseline"), None))
        emulator = None
        if "firestore" in states:
            from tests.support.firestore_emulator import FirestoreEmulator

            emulator = FirestoreEmulator()
            emulator.start()
        try:
            for state in states:
                for name, tree, attributes in variants:
                    if state == "sqlite":
                        where = str(workdir / f"{name}.db")
                    else:
                        assert emulator is not None
                        emulator.reset()
                        where = f"{emulator.host}|{emulator.project}|bench{name.replace('-', '')}"
                    print(f"{state} · {name} …", file=sys.stderr, flush=True)
                    figures = _run_child(tree or REPO_ROOT, state, args.rows, attributes, where)
                    results.setdefault(state, {})[name] = figures
        finally:
            if emulator is not None:
                emulator.stop()
    _print(args.rows, results)
    if args.hash_rows:
        _hashing(args.hash_rows)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
