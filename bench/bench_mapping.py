"""Mapping benchmark: the row-at-a-time reference (to_pylist + one dict per row) against columns.

Generates the benchmark's ``customers`` table in an in-memory DuckDB (the SQL of
bench_sync.py), maps it with the demo's activation both ways, checks the two give equal
results, and prints µs per row (median of the repetitions) and the ratio. Then times each
validator per call on the table's own emails and phones: email-validator against the
mapper's email path, phonenumbers against rphonenumbers.

    .venv/bin/python bench/bench_mapping.py [--rows 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import duckdb
import phonenumbers
import pyarrow as pa
import rphonenumbers
import yaml
from email_validator import EmailNotValidError, validate_email

from sync.config_file import parse_activation
from sync.dev.demo_runner import ACTIVATION_TEMPLATE
from sync.encode import encode_batch
from sync.mapping import ProfileMapper, resolve_attribute_types

# The converters themselves, to time one validator call without a row around it.
from sync.convert import convert_email, phone_converter  # isort: skip

# bench_sync.py is a sibling script, not a package module: its generator SQL is reused as is.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sync import _GENERATE_SQL  # isort: skip

# The row-at-a-time reference mapping lives with the tests it serves (tests/support/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.reference_mapping import MappedRow, encode_rows, map_batch, map_row  # isort: skip


def customers(rows: int) -> pa.Table:
    with duckdb.connect() as connection:
        connection.execute("SET TimeZone = 'UTC'")
        connection.execute(_GENERATE_SQL, {"rows": rows})
        return connection.sql("SELECT * FROM customers ORDER BY customer_id").to_arrow_table()


def demo_mapper(schema: pa.Schema) -> ProfileMapper:
    config = yaml.safe_load(ACTIVATION_TEMPLATE.format(base_url="http://127.0.0.1:1"))
    activation = parse_activation(config, source="bench")
    return ProfileMapper(activation, resolve_attribute_types(activation, schema, source="bench"))


def timed(work: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds over ``repeat`` runs, and the last result."""
    seconds = []
    result = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = work()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def per_call(function: Callable[[Any], Any], values: Iterable[Any]) -> float:
    items = list(values)
    started = time.perf_counter()
    for item in items:
        function(item)
    return (time.perf_counter() - started) / len(items) * 1e6


def email_validator_call(text: str) -> Any:
    try:
        return validate_email(text, check_deliverability=False).ascii_email
    except EmailNotValidError:
        return None


def phone_call(library: Any) -> Callable[[str], Any]:
    e164 = library.PhoneNumberFormat.E164

    def call(text: str) -> Any:
        try:
            number = library.parse(text, "FR")
        except library.NumberParseException:
            return None
        return library.format_number(number, e164) if library.is_valid_number(number) else None

    return call


def compare(
    reference: tuple[str, Callable[[], Any]], columnar: tuple[str, Callable[[], Any]], rows: int, repeat: int
) -> None:
    """Time both (median of ``repeat``), check they agree, and print µs/row and the ratio."""
    (reference_name, reference_run), (columnar_name, columnar_run) = reference, columnar
    reference_seconds, expected = timed(reference_run, repeat)
    columnar_seconds, actual = timed(columnar_run, repeat)
    if expected != actual:
        raise SystemExit(f"{columnar_name} and {reference_name} disagree")
    del expected, actual
    print(f"{reference_name:<31}: {reference_seconds / rows * 1e6:6.2f} µs/row")
    print(f"{columnar_name:<31}: {columnar_seconds / rows * 1e6:6.2f} µs/row")
    print(f"{'ratio':<31}: {reference_seconds / columnar_seconds:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=65_536)
    parser.add_argument("--sample", type=int, default=20_000, help="values per validator timing")
    args = parser.parse_args()

    table = customers(args.rows)
    batches = table.to_batches(max_chunksize=args.batch_rows)
    mapper = demo_mapper(table.schema)
    rows = table.num_rows
    print(f"$ {' '.join(sys.argv)}")
    print(f"{rows} rows, {len(batches)} batches, {len(mapper.columns)} mapped columns, median of {args.repeat}")

    def by_row() -> list[MappedRow]:
        return [map_row(mapper, row) for batch in batches for row in batch.to_pylist()]

    def by_batch() -> list[MappedRow]:
        return [mapped for batch in batches for mapped in map_batch(mapper, batch)]

    compare(("map_row   (to_pylist + map_row)", by_row), ("map_batch", by_batch), rows, args.repeat)

    # What the engine runs: converters in columns, payloads encoded to JSON in columns and
    # fingerprinted; against the same from map_row's dicts (canonical_payload per row).
    def encoded_by_row() -> list[list[str | None]]:
        return [
            encode_rows([map_row(mapper, row) for row in batch.to_pylist()], mapper.payload_keys).bodies.to_pylist()
            for batch in batches
        ]

    def encoded_by_batch() -> list[list[str | None]]:
        return [encode_batch(mapper.convert_batch(batch)).bodies.to_pylist() for batch in batches]

    compare(
        ("map_row + canonical JSON + hash", encoded_by_row),
        ("convert_batch + encode_batch", encoded_by_batch),
        rows,
        args.repeat,
    )

    sample = table.slice(0, args.sample)
    emails = [value.strip() for value in sample.column("email").to_pylist() if value]
    phones = [value.strip() for value in sample.column("phone").to_pylist() if value]
    print(f"per call, on {len(emails)} emails and {len(phones)} phones of the table:")
    print(f"  email-validator            : {per_call(email_validator_call, emails):6.2f} µs/call")
    print(f"  mapper's email path        : {per_call(convert_email, emails):6.2f} µs/call")
    print(f"  phonenumbers               : {per_call(phone_call(phonenumbers), phones):6.2f} µs/call")
    print(f"  rphonenumbers              : {per_call(phone_call(rphonenumbers), phones):6.2f} µs/call")
    print(f"  mapper's phone path        : {per_call(phone_converter('FR'), phones):6.2f} µs/call")


if __name__ == "__main__":
    main()
