"""``mapping.convention: batch_cloud_sync``: a table built for Batch Cloud Sync, synced without renaming.

The table is a real DuckDB file, the run goes through the real HTTP simulator, and the
types Batch stored are read back from it (``date``, ``url``, ``native``, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from sync.config import mapping_version
from sync.config_file import parse_activation
from sync.convention import expand_convention, resolve_mapping
from sync.dev.simulator import BatchSimulator
from sync.errors import ConfigError
from tests.support.engine_support import API_KEY, PROJECT_KEY, run_once

# What Batch's page shows for BigQuery (custom_id, last_updated_at, batch__, date__, url__,
# plain columns), and an array of strings.
CLOUD_SYNC_TABLE = """
CREATE OR REPLACE TABLE profiles AS SELECT * FROM (VALUES
  ('u1', 'ann@example.com', 'fr-FR', 'subscribed', TIMESTAMP '1990-05-17 00:00:00', TIMESTAMP '2025-01-02 10:00:00',
   'https://cdn.example.com/u1.png', 'premium', 'FR', 1234.5, true, ['vip', 'early'], TIMESTAMP '2025-01-03 08:00:00'),
  ('u2', NULL, 'de', NULL, NULL, NULL, NULL, 'free', 'DE', 0.0, false, NULL, TIMESTAMP '2025-01-03 08:00:00')
) t(custom_id, batch__email_address, batch__language, batch__email_marketing, date__birthday, date__last_purchase,
    url__avatar, plan, country, lifetime_value, is_vip, tags, last_updated_at)
"""


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=True)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def write_table(path: Path, sql: str = CLOUD_SYNC_TABLE) -> None:
    with duckdb.connect(str(path)) as connection:
        connection.execute(sql)


def activation_for(directory: Path, base_url: str, **overrides: Any) -> Any:
    config: dict[str, Any] = {
        "name": "cloud_sync",
        "source": {"type": "duckdb", "database": str(directory / "segment.duckdb"), "table": "profiles"},
        "destination": {
            "api_key_env": "BATCH_REST_API_KEY",
            "project_key_env": "BATCH_PROJECT_KEY",
            "base_url": base_url,
            "max_attempts": 4,
        },
        "mapping": {"convention": "batch_cloud_sync"},
    }
    config.update(overrides)
    return parse_activation(config, source="cloud_sync.yaml")


async def test_a_cloud_sync_table_syncs_with_its_natives_and_types(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    write_table(tmp_path / "segment.duckdb")
    activation = activation_for(tmp_path, url)
    result = await run_once(activation, tmp_path / "state.db")
    assert result.status == "succeeded", result.record.get("error")
    assert result.record["counts"]["acknowledged"] == 2
    records = simulator.profile_records(PROJECT_KEY)
    first = records["u1"]
    assert first["attributes"] == {
        "$email_address": "ann@example.com",
        "$language": "fr",
        "$email_marketing": "subscribed",
        "birthday": "1990-05-17T00:00:00Z",
        "last_purchase": "2025-01-02T10:00:00Z",
        "avatar": "https://cdn.example.com/u1.png",
        "plan": "premium",
        "country": "FR",
        "lifetime_value": 1234.5,
        "is_vip": True,
        "tags": ["vip", "early"],
    }
    assert first["types"] == {
        "$email_address": "native",
        "$language": "native",
        "$email_marketing": "native",
        "birthday": "date",
        "last_purchase": "date",
        "avatar": "url",
        "plan": "string",
        "country": "string",
        "lifetime_value": "float",
        "is_vip": "boolean",
        "tags": "array",
    }
    # Nulls are sent as null (on_null: clear), and the cursor column is never an attribute.
    assert records["u2"]["attributes"] == {
        "$language": "de",
        "plan": "free",
        "country": "DE",
        "lifetime_value": 0.0,
        "is_vip": False,
    }
    assert all("last_updated_at" not in record["attributes"] for record in records.values())
    resolved = result.record["config"]["resolved_mapping"]
    assert resolved["mapping"]["email"] == "batch__email_address"
    assert result.record["config"]["mapping"]["convention"] == "batch_cloud_sync"


async def test_last_updated_at_is_not_read_a_content_change_is_what_sends(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    database = tmp_path / "segment.duckdb"
    write_table(database)
    activation = activation_for(tmp_path, url)
    await run_once(activation, tmp_path / "state.db")
    received = simulator.stats()["profiles_received"]
    with duckdb.connect(str(database)) as connection:
        connection.execute("UPDATE profiles SET last_updated_at = TIMESTAMP '2030-01-01 00:00:00'")
    touched = await run_once(activation, tmp_path / "state.db")
    assert touched.record["counts"]["sent"] == 0
    assert touched.record["counts"]["skipped_unmapped"] == 2  # its raw hash did not even move
    # A real change with the cursor left as it was (Cloud Sync would miss it): sent.
    with duckdb.connect(str(database)) as connection:
        connection.execute("UPDATE profiles SET plan = 'gold' WHERE custom_id = 'u2'")
    changed = await run_once(activation, tmp_path / "state.db")
    assert changed.record["counts"]["changed"] == 1
    assert simulator.stats()["profiles_received"] == received + 1
    assert simulator.profiles(PROJECT_KEY)["u2"]["plan"] == "gold"


async def test_explicit_entries_win_over_the_convention(sim: tuple[BatchSimulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    write_table(tmp_path / "segment.duckdb")
    activation = activation_for(
        tmp_path,
        url,
        mapping={"convention": "batch_cloud_sync", "region": "country", "on_null": {"email": "keep"}},
        attributes=[
            {"column": "date__birthday", "name": "born", "on_null": "keep"},  # keeps type date
            {"column": "plan", "type": "string", "on_null": "keep"},
            {"column": "lifetime_value", "name": "ltv"},
        ],
    )
    result = await run_once(activation, tmp_path / "state.db")
    assert result.status == "succeeded", result.record.get("error")
    record = simulator.profile_records(PROJECT_KEY)["u1"]
    assert record["attributes"]["$region"] == "FR"  # mapping.region: the country column is a native now
    assert "country" not in record["attributes"]
    assert record["types"]["born"] == "date"
    assert record["attributes"]["ltv"] == 1234.5
    assert "lifetime_value" not in record["attributes"]
    assert "birthday" not in record["attributes"]
    # The file's attributes come first, then the convention's, in the table's order.
    resolved = result.record["config"]["resolved_mapping"]["attributes"]
    assert [a["column"] for a in resolved][:3] == ["date__birthday", "plan", "lifetime_value"]


def test_a_convention_expands_to_the_mapping_a_user_could_have_written() -> None:
    schema = pa.schema(
        [
            ("custom_id", pa.string()),
            ("batch__phone_number", pa.string()),
            ("date__signup", pa.timestamp("us")),
            ("url__site", pa.string()),
            ("plan", pa.string()),
            ("last_updated_at", pa.timestamp("us")),
        ]
    )
    base = {
        "name": "expanded",
        "source": {"type": "duckdb", "database": "x.duckdb", "table": "profiles"},
        "destination": {"api_key_env": "K", "project_key_env": "P"},
    }
    shorthand = parse_activation(
        {**base, "mapping": {"convention": "batch_cloud_sync", "default_phone_region": "FR"}}, source="x.yaml"
    )
    explicit = parse_activation(
        {
            **base,
            "mapping": {"custom_id": "custom_id", "phone": "batch__phone_number", "default_phone_region": "FR"},
            "attributes": [
                {"column": "date__signup", "name": "signup", "type": "date"},
                {"column": "url__site", "name": "site", "type": "url"},
                {"column": "plan", "name": "plan"},
            ],
        },
        source="x.yaml",
    )
    expanded, types = resolve_mapping(shorthand, schema, source="x.yaml")
    assert expanded.mapping.convention is None
    assert expanded.mapped_columns == ["custom_id", "batch__phone_number", "date__signup", "url__site", "plan"]
    assert types == {"date__signup": "date", "url__site": "url", "plan": "string"}
    # Moving from the shorthand to the explicit mapping it stands for is no mapping change.
    assert mapping_version(expanded) == mapping_version(explicit)
    # Expanding twice changes nothing; an activation without a convention is left as it is.
    assert expand_convention(expanded, schema, source="x.yaml")[0] is expanded
    assert expand_convention(explicit, schema, source="x.yaml")[0] is explicit


@pytest.mark.parametrize(
    ("columns", "field", "words"),
    [
        ("batch__nickname VARCHAR", "mapping.convention", "column 'batch__nickname' names no Batch native field"),
        ("date__ TIMESTAMP", "mapping.convention", "column 'date__' gives the Batch attribute name ''"),
        ('"Plan" VARCHAR', "mapping.convention", "column 'Plan' gives the Batch attribute name 'Plan'"),
        (
            "url__this_name_is_much_longer_than_thirty VARCHAR",
            "mapping.convention",
            "'this_name_is_much_longer_than_thirty', which must be 1-30 characters",
        ),
        ("date__plan TIMESTAMP, plan VARCHAR", "mapping.convention", "columns 'date__plan' and 'plan' both give"),
        ("date__signup INTEGER", "mapping.convention", "column 'date__signup' has Arrow type int32"),
        ("url__site BOOLEAN", "mapping.convention", "column 'url__site' has Arrow type bool"),
        ("batch__email_address INTEGER", "mapping.convention", "column 'batch__email_address' has Arrow type int32"),
        ("blob BLOB", "mapping.convention", "cannot infer a Batch type for column 'blob'"),
        (
            ", ".join(f"a{n} VARCHAR" for n in range(51)),
            "mapping.convention",
            "the convention maps 51 custom attributes; Batch accepts at most 50",
        ),
    ],
)
async def test_a_bad_column_is_a_config_error_before_anything_is_sent(
    sim: tuple[BatchSimulator, str], tmp_path: Path, columns: str, field: str, words: str
) -> None:
    simulator, url = sim
    write_table(tmp_path / "segment.duckdb", f"CREATE TABLE profiles (custom_id VARCHAR, {columns})")
    with duckdb.connect(str(tmp_path / "segment.duckdb")) as connection:
        connection.execute("INSERT INTO profiles (custom_id) VALUES ('u1')")
    result = await run_once(activation_for(tmp_path, url), tmp_path / "state.db")
    assert result.status == "config_error"
    error = result.record["error"]
    assert "activation 'cloud_sync'" in error
    assert f"field '{field}'" in error
    assert words in error
    assert simulator.stats()["profiles_received"] == 0


def test_mapping_on_null_under_a_convention_must_name_a_mapped_native() -> None:
    schema = pa.schema([("custom_id", pa.string()), ("batch__language", pa.string())])

    def activation(on_null: dict[str, str]) -> Any:
        return parse_activation(
            {
                "name": "natives",
                "source": {"type": "duckdb", "database": "x.duckdb", "table": "profiles"},
                "destination": {"api_key_env": "K", "project_key_env": "P"},
                "mapping": {"convention": "batch_cloud_sync", "on_null": on_null},
            },
            source="x.yaml",
        )

    with pytest.raises(ConfigError) as caught:
        expand_convention(activation({"language": "keep", "timezone": "keep"}), schema, source="x.yaml")
    assert caught.value.field == "mapping.on_null.timezone"
    assert "activation 'natives'" in str(caught.value)
    assert "neither mapping.timezone nor a column batch__timezone maps it" in str(caught.value)
    kept = expand_convention(activation({"language": "keep"}), schema, source="x.yaml")[0]
    assert kept.kept_null_keys() == ["$language"]


def test_the_custom_id_is_required_unless_a_convention_names_it() -> None:
    base = {
        "name": "ids",
        "source": {"type": "duckdb", "database": "x.duckdb", "table": "profiles"},
        "destination": {"api_key_env": "K", "project_key_env": "P"},
    }
    with pytest.raises(ConfigError) as caught:
        parse_activation({**base, "mapping": {"email": "email"}}, source="x.yaml")
    assert caught.value.field == "mapping.custom_id"
    assert (
        parse_activation({**base, "mapping": {"convention": "batch_cloud_sync"}}, source="x.yaml").mapping.custom_id
        == "custom_id"
    )
    named = parse_activation(
        {**base, "mapping": {"convention": "batch_cloud_sync", "custom_id": "user_id"}}, source="x.yaml"
    )
    assert named.mapping.custom_id == "user_id"
    with pytest.raises(ConfigError) as unknown:
        parse_activation({**base, "mapping": {"convention": "hightouch"}}, source="x.yaml")
    assert unknown.value.field == "mapping.convention"


def test_a_table_without_the_id_column_says_how_to_name_another() -> None:
    activation = parse_activation(
        {
            "name": "ids",
            "source": {"type": "duckdb", "database": "x.duckdb", "table": "profiles"},
            "destination": {"api_key_env": "K", "project_key_env": "P"},
            "mapping": {"convention": "batch_cloud_sync"},
        },
        source="x.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        resolve_mapping(activation, pa.schema([("user_id", pa.string()), ("plan", pa.string())]), source="x.yaml")
    assert caught.value.field == "mapping.custom_id"
    assert "no column 'custom_id' for the Custom ID" in str(caught.value)
    assert "give mapping.custom_id if yours has another name" in str(caught.value)


def test_validate_reads_a_cloud_sync_table_and_names_a_bad_column(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sync.cli import app
    from sync.dev.simulator import SimulatorThread
    from tests.support.engine_support import ENV

    write_table(tmp_path / "segment.duckdb")
    text = """
name: from_cloud_sync
source: {type: duckdb, database: segment.duckdb, table: profiles}
destination:
  api_key_env: BATCH_REST_API_KEY
  project_key_env: BATCH_PROJECT_KEY
  base_url: BASE
mapping:
  convention: batch_cloud_sync
"""
    runner = CliRunner()
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY})) as running:
        path = tmp_path / "from_cloud_sync.yaml"
        path.write_text(text.replace("BASE", running.base_url), encoding="utf-8")
        result = runner.invoke(app, ["validate", str(path)], env={**ENV, "COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "date__birthday=date" in result.output
        assert "url__avatar=url" in result.output
        with duckdb.connect(str(tmp_path / "segment.duckdb")) as connection:
            connection.execute("ALTER TABLE profiles ADD COLUMN batch__nickname VARCHAR")
        bad = runner.invoke(app, ["validate", str(path)], env={**ENV, "COLUMNS": "200"})
    assert bad.exit_code == 2
    flat = " ".join(bad.output.split())
    assert "mapping.convention" in flat
    assert "batch__nickname" in flat
