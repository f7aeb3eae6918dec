"""Demo data: a realistic customer table in DuckDB, and the changes a day brings.

Deterministic (seeded), so the demo prints the same counts on every machine. Used by
``cepsync demo``, the end-to-end tests and the benchmark.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import phonenumbers
import pyarrow as pa

FIRST_NAMES = ["Jane", "Louis", "Chloé", "Hugo", "Amélie", "Noah", "Léa", "Arthur", "Inès", "Jules", "Zoé", "Malo"]
CATEGORIES = ["bikes", "cinema", "books", "running", "cooking", "travel", "music", "garden", "gaming", "yoga"]
# Phone templates are filled with random digits until phonenumbers accepts the number,
# so the demo's valid rows are valid by the same rules the mapper applies.
LOCALES = [
    ("fr", "FR", "Europe/Paris", "06 {0:02d} {1:02d} {2:02d} {3:02d}"),  # national format (default region FR)
    ("en", "GB", "Europe/London", "+44 7911 {4:03d}{5:03d}"),
    ("de", "DE", "Europe/Berlin", "+49 151 {6:04d} {7:04d}"),
    ("es", "ES", "Europe/Madrid", "+34 6{0:02d} {4:03d} {5:03d}"),
    ("en", "US", "America/New_York", "+1 415 {5:03d} {6:04d}"),
]

SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("email", pa.string()),
        ("phone", pa.string()),
        ("language", pa.string()),
        ("country", pa.string()),
        ("timezone", pa.string()),
        ("newsletter_opt_in", pa.bool_()),
        ("sms_opt_in", pa.string()),
        ("first_name", pa.string()),
        ("loyalty_points", pa.int64()),
        ("lifetime_value", pa.float64()),
        ("last_order_at", pa.timestamp("us", tz="UTC")),
        ("birthdate", pa.date32()),
        ("favorite_categories", pa.list_(pa.string())),
        ("profile_url", pa.string()),
        ("is_active", pa.bool_()),
    ]
)


def _phone(rng: random.Random, template: str) -> str:
    for _ in range(100):
        number = template.format(
            *(rng.randint(10, 99) for _ in range(4)),
            *(rng.randint(200, 999) for _ in range(2)),
            *(rng.randint(1000, 9999) for _ in range(2)),
        )
        if phonenumbers.is_valid_number(phonenumbers.parse(number, "FR")):
            return number
    raise RuntimeError(f"no valid phone number from template {template!r}")  # pragma: no cover


def make_customer(index: int, rng: random.Random) -> dict[str, Any]:
    """One plausible, valid customer row."""
    language, country, zone, phone_template = LOCALES[index % len(LOCALES)]
    first = FIRST_NAMES[index % len(FIRST_NAMES)]
    customer_id = f"cust-{index:07d}"
    return {
        "customer_id": customer_id,
        "email": f"{first.lower().replace('é', 'e')}.{index}@example.com",
        "phone": _phone(rng, phone_template),
        "language": language if index % 7 else language.upper(),
        "country": country,
        "timezone": zone,
        "newsletter_opt_in": index % 3 != 0,
        "sms_opt_in": ["yes", "no", "subscribed", None][index % 4],
        "first_name": first,
        "loyalty_points": rng.randint(0, 50_000),
        "lifetime_value": round(rng.uniform(0, 5_000), 2),
        "last_order_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randint(0, 400_000)),
        "birthdate": date(1950, 1, 1) + timedelta(days=rng.randint(0, 20_000)),
        "favorite_categories": rng.sample(CATEGORIES, rng.randint(0, 3)) or None,
        "profile_url": f"https://shop.example.com/u/{customer_id}",
        "is_active": True,
    }


def invalid_ids(rows: int) -> set[str]:
    """The custom_ids of the rows `invalid_rows(rows)` makes (never valid, so never in Batch)."""
    return {row["customer_id"] for row in invalid_rows(rows) if row["customer_id"]}


def invalid_rows(start: int) -> list[dict[str, Any]]:
    """Rows a real warehouse produces now and then; each must be rejected with a reason."""
    rng = random.Random(start)
    rows = []
    bad: list[dict[str, Any]] = [
        {"email": "not-an-email"},
        {"phone": "12"},
        {"timezone": "Mars/Olympus"},
        {"first_name": "x" * 301},
        {"profile_url": "shop.example.com/no-scheme"},
        {"customer_id": None},
        {"language": "klingon"},
    ]
    for offset, patch in enumerate(bad):
        row = make_customer(start + offset, rng)
        row.update(patch)
        rows.append(row)
    # One custom_id twice: both copies are rejected (nobody can tell which one is right).
    twin = make_customer(start + len(bad), rng)
    rows += [twin, {**twin, "loyalty_points": 1}]
    return rows


def write_customers(path: Path, rows: list[dict[str, Any]]) -> None:
    """(Re)create the ``customers`` table in a DuckDB file."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as connection:
        connection.register("incoming", table)
        connection.execute("CREATE OR REPLACE TABLE customers AS SELECT * FROM incoming")
        connection.unregister("incoming")


def generate_segment(rows: int, *, seed: int = 7, with_invalid: bool = True) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    customers = [make_customer(index, rng) for index in range(rows)]
    if with_invalid:
        customers += invalid_rows(rows)
    return customers


def next_day(
    customers: list[dict[str, Any]], *, seed: int = 8, change: float = 0.05, leave: float = 0.02, join: float = 0.01
) -> list[dict[str, Any]]:
    """A day later: some customers changed, some left the segment, some joined."""
    rng = random.Random(seed)
    valid = [c for c in customers if c["customer_id"] and c["customer_id"].startswith("cust-")]
    count = len(valid)
    result = []
    for customer in customers:
        customer = dict(customer)
        roll = rng.random()
        if roll < leave:
            customer["is_active"] = False
        elif roll < leave + change:
            customer["loyalty_points"] += rng.randint(1, 500)
            customer["last_order_at"] += timedelta(days=1)
        elif roll < leave + change + 0.01:
            customer["language"] = customer["language"].upper()  # cosmetic: same payload, nothing sent
        result.append(customer)
    top = max(int(c["customer_id"].split("-")[1]) for c in valid) + 100 if valid else 0
    result += [make_customer(top + index, rng) for index in range(max(1, int(count * join)))]
    return result
