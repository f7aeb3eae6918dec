"""DuckDBSource on a real database file: the memory it may keep, and where it spills."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from pydantic import ValidationError

from sync.config import DuckDBSourceConfig
from sync.errors import ConfigError
from sync.sources.duckdb import DuckDBSource


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "segment.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE people AS SELECT 'id-' || i AS id, i AS points FROM range(5000) t(i)")
    return path


def setting(source: DuckDBSource, name: str) -> str:
    rows = source._connection.execute("SELECT current_setting(?)", [name]).fetchall()
    return str(rows[0][0])


def test_the_source_is_capped_at_its_memory_limit_and_spills_to_a_directory_of_its_own(database: Path) -> None:
    source = DuckDBSource(DuckDBSourceConfig(database=str(database), table="people"), activation="act")
    try:
        assert setting(source, "memory_limit") == "122.0 MiB"  # the default, 128 MB
        spill = Path(setting(source, "temp_directory"))
        assert spill.name.startswith("cepsync-source-")
        assert spill.is_dir()
        rows = sum(batch.num_rows for batch in source.read_batches(["id", "points"]))
        assert rows == 5000
    finally:
        source.close()
    assert not spill.exists()


def test_a_larger_memory_limit_is_taken_as_given(database: Path) -> None:
    source = DuckDBSource(
        DuckDBSourceConfig(database=str(database), table="people", memory_limit="1 GB"), activation="act"
    )
    try:
        assert setting(source, "memory_limit") == "953.6 MiB"
    finally:
        source.close()


@pytest.mark.parametrize("value", ["", "0MB", "128", "lots", "128 TB", "5KB", "-1GB", "1e3MB"])
def test_a_memory_limit_that_is_not_a_size_is_a_config_error(database: Path, value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DuckDBSourceConfig(database=str(database), table="people", memory_limit=value)
    assert "memory_limit" in str(caught.value)


def test_a_missing_database_names_the_activation_and_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        DuckDBSource(DuckDBSourceConfig(database=str(tmp_path / "nope.duckdb"), table="people"), activation="act")
    assert caught.value.field == "source.database"
    assert "activation 'act'" in str(caught.value)
