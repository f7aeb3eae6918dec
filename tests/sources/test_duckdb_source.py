"""DuckDBSource on a real database file: the memory it may keep, and where it spills."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from pydantic import ValidationError

from sync.config import DuckDBSourceConfig
from sync.errors import ConfigError, FatalError
from sync.sources.duckdb import DuckDBSource, plan_operators, read_memory_limit


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


def memory_limit_as_shown(limit: str) -> str:
    """How DuckDB shows ``limit`` once set (it rounds sizes to MiB with one decimal)."""
    with duckdb.connect() as con:
        con.execute(f"SET memory_limit = '{limit}'")
        return str(con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0])


def test_a_streamed_read_is_capped_by_its_columns_and_a_read_that_holds_rows_keeps_the_default(
    tmp_path: Path,
) -> None:
    # Two files: a process's connections to one file share its database, and its settings.
    paths = [tmp_path / "streamed.duckdb", tmp_path / "ranked.duckdb"]
    for path in paths:
        with duckdb.connect(str(path)) as con:
            con.execute(
                "CREATE TABLE people AS SELECT 'id-' || i AS id, i AS points, i % 7 AS tier FROM range(5000) t(i)"
            )
    streamed = DuckDBSource(
        DuckDBSourceConfig(database=str(paths[0]), query="SELECT * FROM people WHERE points % 2 = 0"), activation="act"
    )
    ranked = DuckDBSource(
        DuckDBSourceConfig(
            database=str(paths[1]),
            query="SELECT * FROM people QUALIFY row_number() OVER (PARTITION BY tier ORDER BY points DESC) <= 100",
        ),
        activation="act",
    )
    try:
        assert sum(batch.num_rows for batch in streamed.read_batches(["id"])) == 2500
        assert setting(streamed, "memory_limit") == memory_limit_as_shown("9MB")  # 8 MB + 0.75 MB, rounded up
        assert sum(batch.num_rows for batch in streamed.read_batches(["id", "points", "tier"])) == 2500
        assert setting(streamed, "memory_limit") == memory_limit_as_shown("11MB")  # 8 MB + 3 x 0.75 MB, rounded up
        assert setting(streamed, "threads") == "1"
        assert sum(batch.num_rows for batch in ranked.read_batches(["id", "points"])) == 700
        assert setting(ranked, "memory_limit") == memory_limit_as_shown("128MB")
        with duckdb.connect() as default:
            threads = default.execute("SELECT current_setting('threads')").fetchall()[0][0]
        assert setting(ranked, "threads") == str(threads)
    finally:
        streamed.close()
        ranked.close()


@pytest.mark.parametrize(
    ("sql", "streams"),
    [
        ("SELECT * FROM people", True),
        ("SELECT id FROM people WHERE points > 10 LIMIT 5", True),
        ("SELECT * FROM people UNION ALL SELECT * FROM people", True),
        ("SELECT * FROM people ORDER BY points", False),
        ("SELECT id, count(*) AS n FROM people GROUP BY id", False),
        ("SELECT DISTINCT id FROM people", False),
        ("SELECT a.id FROM people a JOIN people b USING (id)", False),
        ("SELECT * FROM no_such_table", False),  # not explained: the generous cap, and the query's own error
    ],
)
def test_only_a_plan_of_streaming_operators_gets_the_small_cap(database: Path, sql: str, streams: bool) -> None:
    with duckdb.connect(str(database), read_only=True) as con:
        limit = read_memory_limit(plan_operators(con, sql), 2)
    assert (limit == "10MB") is streams
    assert (limit == "128MB") is not streams


def test_a_set_memory_limit_holds_for_every_read(database: Path) -> None:
    source = DuckDBSource(
        DuckDBSourceConfig(database=str(database), table="people", memory_limit="300MB"), activation="act"
    )
    try:
        assert sum(batch.num_rows for batch in source.read_batches(["id"])) == 5000
        assert setting(source, "memory_limit") == memory_limit_as_shown("300MB")
    finally:
        source.close()


def test_a_read_that_outgrows_its_cap_names_the_activation_and_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "segment.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE people AS SELECT 'a fairly long id, number ' || i AS id FROM range(400000) t(i)")
    source = DuckDBSource(
        DuckDBSourceConfig(database=str(path), query="SELECT * FROM people ORDER BY id DESC", memory_limit="1MB"),
        activation="vip",
    )
    try:
        with pytest.raises(FatalError) as caught:
            sum(batch.num_rows for batch in source.read_batches(["id"]))
    finally:
        source.close()
    message = str(caught.value)
    assert "activation 'vip'" in message
    assert "source.memory_limit" in message
    assert "1MB" in message


# --- issue 19: one outsized value, a very wide table, names a join repeats ---------------------


def test_one_outsized_string_is_read_under_a_larger_cap_and_every_row_once(tmp_path: Path) -> None:
    path = tmp_path / "segment.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE people AS SELECT 'id-' || i AS id, "
            "CASE WHEN i = 2500 THEN repeat('x', 10000000) ELSE 'short' END AS note FROM range(5000) t(i)"
        )
    source = DuckDBSource(DuckDBSourceConfig(database=str(path), table="people", batch_rows=1000), activation="act")
    try:
        ids: list[str] = []
        longest = 0
        for batch in source.read_batches(["id", "note"]):
            ids.extend(batch.column("id").to_pylist())
            longest = max(longest, max(len(note) for note in batch.column("note").to_pylist()))
        # Every row exactly once, in order, the long one whole.
        assert ids == [f"id-{i}" for i in range(5000)]
        assert longest == 10_000_000
        # The cap grew for this read only: the next read starts from the small one again.
        assert sum(batch.num_rows for batch in source.read_batches(["id"])) == 5000
        assert setting(source, "memory_limit") == memory_limit_as_shown("9MB")
    finally:
        source.close()


def test_a_value_beyond_the_retry_ceiling_says_to_set_memory_limit(tmp_path: Path) -> None:
    path = tmp_path / "segment.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE people AS SELECT 'a' AS id, repeat('x', 300000000) AS note")
    source = DuckDBSource(DuckDBSourceConfig(database=str(path), table="people"), activation="vip")
    try:
        with pytest.raises(FatalError) as caught:
            sum(batch.num_rows for batch in source.read_batches(["id", "note"]))
    finally:
        source.close()
    message = str(caught.value)
    assert "activation 'vip'" in message
    assert "source.memory_limit is not set" in message
    assert "set source.memory_limit" in message


def test_a_table_ten_thousand_columns_wide_costs_what_its_mapped_columns_cost(tmp_path: Path) -> None:
    path = tmp_path / "wide.duckdb"
    columns = ", ".join(f"'value {i} ' || t.i AS c{i}" for i in range(10_000))
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE TABLE wide AS SELECT 'id-' || t.i AS id, t.i AS points, {columns} FROM range(3) t(i)")
    for spec in ({"table": "wide"}, {"query": "SELECT * FROM wide WHERE points >= 0"}):
        source = DuckDBSource(DuckDBSourceConfig(database=str(path), **spec), activation="act")
        try:
            schema = source.schema()
            assert len(schema) == 10_002
            assert schema.field("points").type == pa.int64()
            assert schema.field("c9999").type == pa.string()
            batches = list(source.read_batches(["id", "points", "c9999"]))
            assert [batch.schema.names for batch in batches] == [["id", "points", "c9999"]]
            assert batches[0].column("c9999").to_pylist() == ["value 9999 0", "value 9999 1", "value 9999 2"]
        finally:
            source.close()


def test_the_schema_keeps_the_names_a_join_repeats(tmp_path: Path) -> None:
    path = tmp_path / "segment.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE a AS SELECT 'u1' AS id, 'x@example.com' AS email")
        con.execute("CREATE TABLE b AS SELECT 'u1' AS id, 'y@example.com' AS email, 1.5::DECIMAL(38,9) AS score")
    query = "SELECT * FROM a JOIN b USING (id)"
    source = DuckDBSource(DuckDBSourceConfig(database=str(path), query=query), activation="act")
    try:
        schema = source.schema()
    finally:
        source.close()
    # Not 'email_1': the wrapping SELECT's renaming would hide the ambiguity.
    assert schema.names == ["id", "email", "email", "score"]
    assert schema.field("score").type == pa.decimal128(38, 9)
