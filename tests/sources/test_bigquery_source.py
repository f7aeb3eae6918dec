"""BigQuerySource against the local BigQuery emulator, through the real google-cloud clients.

The REST client goes through a recording proxy (a real HTTP server) so the tests can see which
API calls were made (a dry run, no row reads before ``read_batches``, none at all for a refused
table name) and inject the BigQuery errors the emulator never produces (503, 403,
``bytesBilledLimitExceeded``). Storage Read traffic goes straight to the emulator's gRPC port.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from google.cloud import bigquery
from google.cloud.bigquery_storage import BigQueryReadClient
from pydantic import ValidationError

from sync.bigquery_clients import emulator_read_client
from sync.config import BigQuerySourceConfig
from sync.errors import ConfigError, FatalError, TransientError
from sync.sources.bigquery import (
    API_RETRY,
    BigQueryBytesLimitExceeded,
    BigQueryNotFound,
    BigQueryPermissionDenied,
    BigQueryQueryInvalid,
    BigQueryResultTooLarge,
    BigQuerySource,
    BigQueryUnavailable,
    arrow_schema,
)
from tests.support.bigquery_emulator import BigQueryEmulator, GrpcFaultProxy, RecordingProxy

pytestmark = [
    pytest.mark.emulator,
    # google-cloud-bigquery 3.x reads Storage API pages with page.to_arrow(), which
    # google-cloud-bigquery-storage 2.3x marks as pending deprecation. Not ours to fix; the
    # filter is process-wide, so it also covers the library's download threads.
    pytest.mark.filterwarnings("ignore:Retrieving Arrow record batches directly:PendingDeprecationWarning"),
]

ACTIVATION = "vip-users"
HOSTILE = "x' OR '1'='1"
BIG_ROWS = 25_000
# The emulator serves one Storage Read stream per 100,000 rows, each as a single Arrow page;
# this many rows makes it split the read into three streams.
HUGE_ROWS = 210_000
# 100,000 rows of four columns: one Storage Read message of about 6 MB from the emulator,
# more than gRPC's stock 4 MiB receive limit.
WIDE_ROWS = 100_000
WIDE_COLUMNS = ["id", "email", "first_name", "points"]
GRPC_DEFAULT_RECEIVE_LIMIT = 4 * 1024 * 1024
PEOPLE_SCHEMA = [
    bigquery.SchemaField("id", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("age", "INT64"),
    bigquery.SchemaField("score", "FLOAT64"),
    bigquery.SchemaField("active", "BOOL"),
    bigquery.SchemaField("born", "DATE"),
    bigquery.SchemaField("seen_at", "TIMESTAMP"),
    bigquery.SchemaField("tags", "STRING", mode="REPEATED"),
]
UTC = dt.UTC
PEOPLE: list[dict[str, Any]] = [
    {
        "id": "u1",
        "age": 34,
        "score": 12.5,
        "active": True,
        "born": dt.date(1990, 5, 17),
        "seen_at": dt.datetime(2024, 3, 1, 10, 0, tzinfo=UTC),
        "tags": ["vip", "fr"],
    },
    {"id": "u2", "age": None, "score": None, "active": None, "born": None, "seen_at": None, "tags": []},
    {
        "id": "u3",
        "age": 51,
        "score": -0.25,
        "active": False,
        "born": dt.date(1973, 1, 1),
        "seen_at": dt.datetime(2023, 12, 31, 23, 59, 59, 123456, tzinfo=UTC),
        "tags": ["de"],
    },
    {
        "id": HOSTILE,
        "age": 20,
        "score": 1.0,
        "active": True,
        "born": dt.date(2004, 2, 29),
        "seen_at": dt.datetime(2024, 2, 29, 12, 0, tzinfo=UTC),
        "tags": [],
    },
]
EXPECTED_PEOPLE_ARROW = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("age", pa.int64()),
        pa.field("score", pa.float64()),
        pa.field("active", pa.bool_()),
        pa.field("born", pa.date32()),
        pa.field("seen_at", pa.timestamp("us", tz="UTC")),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
    ]
)
FAST_RETRY = API_RETRY.with_timeout(3.0).with_delay(initial=0.01, maximum=0.05)


@pytest.fixture(scope="module")
def segment(bq_emulator: BigQueryEmulator) -> Iterator[str]:
    """A dataset with ``people`` (every column type, NULLs, arrays) and ``big`` (25k rows)."""
    client = bq_emulator.client()
    dataset = client.create_dataset(f"segment_{uuid.uuid4().hex[:10]}")
    people = bigquery.Table(f"{bq_emulator.project}.{dataset.dataset_id}.people", schema=PEOPLE_SCHEMA)
    client.create_table(people)
    rows = [
        {
            **row,
            "born": row["born"].isoformat() if row["born"] else None,
            "seen_at": row["seen_at"].isoformat() if row["seen_at"] else None,
        }
        for row in PEOPLE
    ]
    client.load_table_from_json(rows, people, job_config=bigquery.LoadJobConfig(schema=PEOPLE_SCHEMA)).result()
    client.query_and_wait(
        f"CREATE TABLE `{dataset.dataset_id}.big` AS "
        "SELECT CONCAT('user-', CAST(n AS STRING)) AS id, n AS rank, MOD(n, 7) = 0 AS lucky "
        f"FROM UNNEST(GENERATE_ARRAY(1, {BIG_ROWS})) AS n"
    )
    client.query_and_wait(
        f"CREATE TABLE `{dataset.dataset_id}.huge` AS SELECT n AS id FROM UNNEST(GENERATE_ARRAY(1, {HUGE_ROWS})) AS n"
    )
    client.query_and_wait(
        f"CREATE TABLE `{dataset.dataset_id}.wide` AS "
        "SELECT CONCAT('c', LPAD(CAST(n AS STRING), 6, '0')) AS id, "
        "CONCAT('person', CAST(n AS STRING), '@example.com') AS email, "
        f"CONCAT('Name', CAST(n AS STRING)) AS first_name, n AS points FROM UNNEST(GENERATE_ARRAY(1, {WIDE_ROWS})) AS n"
    )
    yield dataset.dataset_id
    client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)
    client.close()  # type: ignore[no-untyped-call]


def make_source(
    proxy: RecordingProxy,
    emulator: BigQueryEmulator,
    read_client: BigQueryReadClient | None,
    **config: Any,
) -> BigQuerySource:
    config.setdefault("project", emulator.project)
    return BigQuerySource(
        BigQuerySourceConfig(**config),
        activation=ACTIVATION,
        client=proxy.client(emulator.project),
        read_client=read_client,
        retry=FAST_RETRY,
        job_retry=FAST_RETRY,
    )


def read_all(source: BigQuerySource, columns: list[str]) -> tuple[pa.Table, int]:
    batches = list(source.read_batches(columns))
    schema = batches[0].schema if batches else None
    return pa.Table.from_batches(batches, schema=schema), len(batches)


def by_id(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.to_pylist(), key=lambda row: row["id"])


def row_reads(proxy: RecordingProxy) -> list[str]:
    """Requests that fetch rows: tabledata.list or getQueryResults with rows."""
    return [
        r.path
        for r in proxy.requests
        if r.path.split("?")[0].endswith("/data") or ("/queries/" in r.path and "maxResults=0" not in r.path)
    ]


def test_table_schema_comes_from_tables_get_without_reading_rows(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(bq_proxy, bq_emulator, bq_read_client, table=f"{segment}.people")
    assert source.schema().equals(EXPECTED_PEOPLE_ARROW)
    assert [(r.method, r.path.split("?")[0]) for r in bq_proxy.requests] == [
        ("GET", f"/bigquery/v2/projects/{bq_emulator.project}/datasets/{segment}/tables/people")
    ]
    assert source.stats()["rows"] == 0
    source.close()


def test_query_schema_comes_from_a_dry_run(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(
        bq_proxy,
        bq_emulator,
        bq_read_client,
        query=f"SELECT id, tags, age * 2 AS double_age, CAST(score AS NUMERIC) AS amount, "
        f"DATETIME(seen_at) AS seen_local FROM `{segment}.people` WHERE active = @active",
        parameters={"active": True},
    )
    assert source.schema() == pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("tags", pa.list_(pa.string()), nullable=False),
            pa.field("double_age", pa.int64()),
            pa.field("amount", pa.decimal128(38, 9)),
            pa.field("seen_local", pa.timestamp("us")),
        ]
    )
    inserts = [r.json() for r in bq_proxy.requests if r.method == "POST" and r.path.split("?")[0].endswith("/jobs")]
    assert len(inserts) == 1
    assert inserts[0]["configuration"]["dryRun"] is True
    assert row_reads(bq_proxy) == []
    assert source.stats()["job_id"] is None  # no job has run yet
    source.close()


def test_named_parameters_are_typed_and_a_hostile_value_is_only_data(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    query = f"SELECT id, age FROM `{segment}.people` WHERE id = @wanted"
    source = make_source(bq_proxy, bq_emulator, bq_read_client, query=query, parameters={"wanted": HOSTILE})
    table, _ = read_all(source, ["id", "age"])
    # The injection attempt matched only the row whose id *is* that string.
    assert table.to_pylist() == [{"id": HOSTILE, "age": 20}]
    job = next(r.json() for r in bq_proxy.requests if r.json() and "configuration" in (r.json() or {}))
    assert job["configuration"]["query"]["query"] == query
    assert job["configuration"]["query"]["queryParameters"] == [
        {"name": "wanted", "parameterType": {"type": "STRING"}, "parameterValue": {"value": HOSTILE}}
    ]
    source.close()


def test_bool_int_and_float_parameters(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(
        bq_proxy,
        bq_emulator,
        bq_read_client,
        query=f"SELECT id FROM `{segment}.people` WHERE active = @active AND age > @min_age AND score < @max_score",
        parameters={"active": True, "min_age": 21, "max_score": 100.5},
        maximum_bytes_billed=50_000_000,
    )
    table, _ = read_all(source, ["id"])
    assert table.column("id").to_pylist() == ["u1"]
    job = [r.json() for r in bq_proxy.requests if r.method == "POST" and r.path.split("?")[0].endswith("/jobs")][-1]
    query_config = job["configuration"]["query"]
    types = {p["name"]: p["parameterType"]["type"] for p in query_config["queryParameters"]}
    assert types == {"active": "BOOL", "min_age": "INT64", "max_score": "FLOAT64"}
    assert query_config["maximumBytesBilled"] == "50000000"
    assert job["configuration"]["labels"] == {"cepsync_activation": ACTIVATION}
    source.close()


def test_table_read_returns_every_row_and_only_the_asked_columns_in_order(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(bq_proxy, bq_emulator, bq_read_client, table=f"{segment}.people")
    columns = ["tags", "id", "age", "score", "active", "born", "seen_at"]
    table, _ = read_all(source, columns)
    assert table.schema.names == columns
    assert table.schema.equals(pa.schema([EXPECTED_PEOPLE_ARROW.field(c) for c in columns]))
    assert by_id(table) == sorted(PEOPLE, key=lambda row: row["id"])
    narrow_source = make_source(bq_proxy, bq_emulator, bq_read_client, table=f"{segment}.people")
    narrow, _ = read_all(narrow_source, ["id"])
    assert narrow.schema.names == ["id"]
    assert sorted(narrow.column("id").to_pylist()) == sorted(row["id"] for row in PEOPLE)
    source.close()
    narrow_source.close()


@pytest.mark.parametrize("segment_kind", ["table", "query"])
def test_storage_api_and_rest_paging_produce_identical_batches(
    segment_kind: str,
    bq_proxy: RecordingProxy,
    bq_emulator: BigQueryEmulator,
    bq_read_client: BigQueryReadClient,
    segment: str,
) -> None:
    spec: dict[str, Any] = (
        {"table": f"{segment}.people"}
        if segment_kind == "table"
        else {"query": f"SELECT *, CAST(score AS NUMERIC) AS amount FROM `{segment}.people`"}
    )
    columns = [field.name for field in PEOPLE_SCHEMA] + (["amount"] if segment_kind == "query" else [])
    storage = make_source(bq_proxy, bq_emulator, bq_read_client, use_storage_api=True, **spec)
    rest = make_source(bq_proxy, bq_emulator, bq_read_client, use_storage_api=False, **spec)
    storage_table, _ = read_all(storage, columns)
    rest_table, _ = read_all(rest, columns)
    assert storage.stats()["read_path"] == "storage_api"
    assert rest.stats()["read_path"] == "rest_paging"
    assert storage_table.num_rows == len(PEOPLE)
    assert storage_table.schema.equals(rest_table.schema, check_metadata=True)
    assert storage_table.sort_by("id").equals(rest_table.sort_by("id"))
    if segment_kind == "query":
        amounts = {row["id"]: row["amount"] for row in storage_table.to_pylist()}
        assert amounts["u3"] == Decimal("-0.25")
    storage.close()
    rest.close()


def test_stats_report_the_job_bytes_and_read_path(
    bq_proxy: RecordingProxy,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_read_client: BigQueryReadClient,
    segment: str,
) -> None:
    source = make_source(bq_proxy, bq_emulator, bq_read_client, query=f"SELECT id, age FROM `{segment}.people`")
    read_all(source, ["id"])
    stats = source.stats()
    job = bq_client.get_job(stats["job_id"])
    assert isinstance(job, bigquery.QueryJob)
    assert job.query == f"SELECT id, age FROM `{segment}.people`"
    assert stats["bytes_processed"] == job.total_bytes_processed
    assert stats["bytes_billed"] == job.total_bytes_billed
    assert isinstance(stats["bytes_processed"], int)
    assert stats["cache_hit"] is job.cache_hit
    assert stats["location"] == job.location
    assert stats["read_path"] == "storage_api"
    assert stats["rows"] == len(PEOPLE)
    assert stats["segment"] == "query"
    source.close()


def test_a_large_result_streams_in_several_batches_on_both_paths(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    expected = {f"user-{n}" for n in range(1, BIG_ROWS + 1)}
    for use_storage_api in (True, False):
        source = BigQuerySource(
            BigQuerySourceConfig(
                query=f"SELECT id, rank, lucky FROM `{segment}.big`",
                project=bq_emulator.project,
                use_storage_api=use_storage_api,
            ),
            activation=ACTIVATION,
            client=bq_proxy.client(bq_emulator.project),
            read_client=bq_read_client,
            batch_rows=10_000,
        )
        sizes: list[int] = []
        ids: set[str] = set()
        lucky = 0
        for batch in source.read_batches(["id", "lucky"]):
            sizes.append(batch.num_rows)
            ids.update(batch.column("id").to_pylist())
            lucky += sum(1 for value in batch.column("lucky").to_pylist() if value)
        assert len(sizes) > 1, (use_storage_api, sizes)
        assert sum(sizes) == BIG_ROWS
        assert ids == expected
        assert lucky == BIG_ROWS // 7
        assert source.stats()["rows"] == BIG_ROWS
        assert source.stats()["batches"] == len(sizes)
        source.close()


def test_the_storage_api_streams_a_multi_stream_read_page_by_page(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = BigQuerySource(
        BigQuerySourceConfig(table=f"{segment}.huge", project=bq_emulator.project),
        activation=ACTIVATION,
        client=bq_proxy.client(bq_emulator.project),
        read_client=bq_read_client,
        batch_rows=1_000_000,  # no slicing: every batch is a page the server sent
    )
    total = 0
    checksum = 0
    pages = 0
    for batch in source.read_batches(["id"]):
        pages += 1
        total += batch.num_rows
        checksum += pc.sum(batch.column("id")).as_py()
    assert pages >= 3
    assert total == HUGE_ROWS
    assert checksum == HUGE_ROWS * (HUGE_ROWS + 1) // 2
    assert source.stats()["read_path"] == "storage_api"
    source.close()


def test_a_100k_row_segment_reads_through_storage_read_on_the_channel_cepsync_builds(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, segment: str
) -> None:
    read_client, close_channel = emulator_read_client(bq_emulator.grpc_address)
    source = BigQuerySource(
        BigQuerySourceConfig(query=f"SELECT * FROM `{segment}.wide`", project=bq_emulator.project),
        activation=ACTIVATION,
        client=bq_proxy.client(bq_emulator.project),
        read_client=read_client,
        batch_rows=1_000_000,  # no slicing: every batch is a message the server sent
    )
    try:
        rows = 0
        checksum = 0
        largest = 0
        for batch in source.read_batches(WIDE_COLUMNS):
            rows += batch.num_rows
            checksum += pc.sum(batch.column("points")).as_py()
            largest = max(largest, batch.nbytes)
        assert rows == WIDE_ROWS
        assert checksum == WIDE_ROWS * (WIDE_ROWS + 1) // 2
        # At least one message was larger than a stock gRPC channel accepts.
        assert largest > GRPC_DEFAULT_RECEIVE_LIMIT
        assert source.stats()["read_path"] == "storage_api"
        assert row_reads(bq_proxy) == []  # no REST fallback
    finally:
        source.close()
        close_channel()


def test_a_message_over_the_channel_limit_is_fatal_not_transient(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, segment: str
) -> None:
    # What the emulator channel did before: gRPC's stock receive limit.
    capped = bq_emulator.read_client(options=[("grpc.max_receive_message_length", GRPC_DEFAULT_RECEIVE_LIMIT)])
    source = make_source(bq_proxy, bq_emulator, capped, table=f"{segment}.wide")
    with pytest.raises(BigQueryResultTooLarge) as caught:
        list(source.read_batches(WIDE_COLUMNS))
    assert isinstance(caught.value, FatalError)
    assert not isinstance(caught.value, TransientError)
    message = str(caught.value)
    assert message.startswith(f"activation '{ACTIVATION}': the result is too large to receive while reading")
    assert "Received message larger than max" in message
    source.close()


def test_a_query_result_over_bigquerys_response_limit_is_fatal(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, segment: str
) -> None:
    source = make_source(bq_proxy, bq_emulator, None, query=f"SELECT id FROM `{segment}.people`")
    source.schema()
    # BigQuery answers 403 responseTooLarge: not a permission problem, and no retry changes it.
    bq_proxy.inject(
        "GET",
        "/queries/",
        status=403,
        reason="responseTooLarge",
        message="Response too large to return. Consider specifying a destination table in your job configuration.",
        times=1,
    )
    with pytest.raises(BigQueryResultTooLarge, match="Response too large to return") as caught:
        list(source.read_batches(["id"]))
    assert not isinstance(caught.value, TransientError | BigQueryPermissionDenied)
    source.close()


@pytest.fixture
def grpc_proxy(bq_emulator: BigQueryEmulator) -> Iterator[GrpcFaultProxy]:
    proxy = GrpcFaultProxy(bq_emulator.grpc_address)
    yield proxy
    proxy.close()


@pytest.mark.parametrize(
    ("method", "code", "details", "expected", "fatal"),
    [
        (
            "CreateReadSession",
            grpc.StatusCode.PERMISSION_DENIED,
            "request failed: the user does not have 'bigquery.readsessions.create' permission",
            BigQueryPermissionDenied,
            True,
        ),
        (
            "ReadRows",
            grpc.StatusCode.PERMISSION_DENIED,
            "request failed: the user does not have 'bigquery.tables.getData' permission",
            BigQueryPermissionDenied,
            True,
        ),
        ("CreateReadSession", grpc.StatusCode.UNAUTHENTICATED, "invalid credentials", BigQueryPermissionDenied, True),
        ("CreateReadSession", grpc.StatusCode.NOT_FOUND, "Not found: Table p:ds.people", BigQueryNotFound, True),
        (
            "CreateReadSession",
            grpc.StatusCode.INVALID_ARGUMENT,
            "request failed: Invalid row restriction",
            BigQueryQueryInvalid,
            True,
        ),
        # A quota is the one RESOURCE_EXHAUSTED that waiting can cure: it stays transient
        # (and the function bounds how often it is retried).
        (
            "CreateReadSession",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Quota exceeded for quota metric 'Concurrent read sessions'",
            BigQueryUnavailable,
            False,
        ),
    ],
    ids=["session-permission", "read-permission", "unauthenticated", "not-found", "invalid-argument", "quota"],
)
def test_storage_read_errors_are_classified_by_whether_a_retry_can_help(
    method: str,
    code: grpc.StatusCode,
    details: str,
    expected: type[Exception],
    fatal: bool,
    bq_proxy: RecordingProxy,
    bq_emulator: BigQueryEmulator,
    grpc_proxy: GrpcFaultProxy,
    segment: str,
) -> None:
    read_client, close_channel = emulator_read_client(grpc_proxy.address)
    source = make_source(bq_proxy, bq_emulator, read_client, table=f"{segment}.people")
    grpc_proxy.inject(method, code, details)
    try:
        with pytest.raises(expected) as caught:
            list(source.read_batches(["id"]))
        assert isinstance(caught.value, FatalError) is fatal
        assert isinstance(caught.value, TransientError) is not fatal
        assert str(caught.value).startswith(f"activation '{ACTIVATION}': ")
        assert details in str(caught.value)
        assert method in grpc_proxy.calls
    finally:
        source.close()
        close_channel()
    # The proxy forwards everything else: the same source reads through it once the fault is spent.
    read_client, close_channel = emulator_read_client(grpc_proxy.address)
    again = make_source(bq_proxy, bq_emulator, read_client, table=f"{segment}.people")
    try:
        assert sorted(row["id"] for row in read_all(again, ["id"])[0].to_pylist()) == sorted(p["id"] for p in PEOPLE)
    finally:
        again.close()
        close_channel()


@pytest.mark.parametrize(
    ("table", "config_refuses"),
    [
        ("people; DROP TABLE people", True),
        ("ds.people` UNION ALL SELECT 1 --", True),
        ("ds.people WHERE 1=1", True),
        ("ds.'people'", True),
        ("a.b.c.d", True),
        # The shared config accepts a bare name (DuckDB's main schema); BigQuery needs a dataset.
        ("people", False),
    ],
)
def test_a_table_name_with_sql_is_refused_before_any_call(
    table: str, config_refuses: bool, bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator
) -> None:
    if config_refuses:
        with pytest.raises(ValidationError):
            BigQuerySourceConfig(table=table)
    # A config built without validation must still be refused by the source itself.
    config = BigQuerySourceConfig.model_construct(table=table, project=bq_emulator.project)
    with pytest.raises(ConfigError) as caught:
        BigQuerySource(config, activation=ACTIVATION, client=bq_proxy.client(bq_emulator.project))
    assert f"activation '{ACTIVATION}'" in str(caught.value)
    assert caught.value.field == "source.table"
    assert bq_proxy.requests == []


def test_bad_sql_is_a_fatal_error_naming_the_activation(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(bq_proxy, bq_emulator, bq_read_client, query=f"SELEC id FROM `{segment}.people`")
    with pytest.raises(BigQueryQueryInvalid) as caught:
        source.schema()
    assert isinstance(caught.value, FatalError)
    assert str(caught.value).startswith(f"activation '{ACTIVATION}': ")
    assert "SELEC" in str(caught.value)
    with pytest.raises(BigQueryQueryInvalid):
        list(source.read_batches(["id"]))
    source.close()


def test_a_missing_table_is_not_found(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    for spec in ({"table": f"{segment}.nobody"}, {"query": f"SELECT id FROM `{segment}.nobody`"}):
        source = make_source(bq_proxy, bq_emulator, bq_read_client, **spec)
        with pytest.raises(BigQueryNotFound, match=rf"^activation '{ACTIVATION}': .*nobody"):
            source.schema()
        source.close()


def test_a_missing_column_is_a_config_error_naming_activation_and_column(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    for spec in ({"table": f"{segment}.people"}, {"query": f"SELECT id, age FROM `{segment}.people`"}):
        source = make_source(bq_proxy, bq_emulator, bq_read_client, **spec)
        bq_proxy.reset()
        with pytest.raises(ConfigError) as caught:
            source.read_batches(["id", "Age", "email"])  # raises before the first batch is asked for
        message = str(caught.value)
        assert f"activation '{ACTIVATION}'" in message
        assert "'email'" in message
        assert "'Age' (the segment has 'age')" in message
        assert row_reads(bq_proxy) == []
        source.close()


def test_transient_503s_are_retried_then_succeed(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(bq_proxy, bq_emulator, bq_read_client, table=f"{segment}.people", use_storage_api=False)
    bq_proxy.inject("GET", "/tables/people", status=503, reason="backendError", message="try later", times=2)
    bq_proxy.inject("GET", "/tables/people/data", status=429, reason="rateLimitExceeded", message="slow", times=1)
    table, _ = read_all(source, ["id"])
    assert table.num_rows == len(PEOPLE)
    gets = [r.path.split("?")[0].rsplit("/", 1)[-1] for r in bq_proxy.requests if "/tables/people" in r.path]
    # tables.get refused twice then served; tabledata.list refused once then served.
    assert gets == ["people", "people", "people", "data", "data"]
    source.close()


def test_persistent_unavailability_ends_in_a_transient_error_after_bounded_retries(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, segment: str
) -> None:
    source = BigQuerySource(
        BigQuerySourceConfig(table=f"{segment}.people", project=bq_emulator.project),
        activation=ACTIVATION,
        client=bq_proxy.client(bq_emulator.project),
        retry=API_RETRY.with_timeout(1.0).with_delay(initial=0.01, maximum=0.05),
    )
    bq_proxy.inject("GET", "/tables/people", status=503, reason="backendError", message="down", times=10_000)
    with pytest.raises(BigQueryUnavailable) as caught:
        source.schema()
    assert isinstance(caught.value, TransientError)
    assert str(caught.value).startswith(f"activation '{ACTIVATION}': ")
    assert len(bq_proxy.requests) > 1
    source.close()


def test_bytes_limit_and_permission_errors_are_fatal_and_never_leak_secrets(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(
        bq_proxy,
        bq_emulator,
        bq_read_client,
        query=f"SELECT id FROM `{segment}.people`",
        maximum_bytes_billed=10,
    )
    source.schema()
    bq_proxy.inject(
        "POST",
        "/jobs",
        status=400,
        reason="bytesBilledLimitExceeded",
        message="Query exceeded limit for bytes billed: 10. 10485760 or higher required.",
        times=1,
    )
    with pytest.raises(BigQueryBytesLimitExceeded, match="maximum_bytes_billed=10"):
        list(source.read_batches(["id"]))

    secret = "AIzaSy-not-a-real-key-0123456789"
    denied = make_source(bq_proxy, bq_emulator, bq_read_client, table=f"{segment}.people")
    bq_proxy.inject(
        "GET",
        "/tables/people",
        status=403,
        reason="accessDenied",
        message=f"Access Denied: Table people: User does not have permission (https://x.test/?key={secret})",
        times=1,
    )
    with pytest.raises(BigQueryPermissionDenied) as caught:
        denied.schema()
    assert isinstance(caught.value, FatalError)
    assert str(caught.value).startswith(f"activation '{ACTIVATION}': permission denied")
    assert secret not in str(caught.value)
    assert "key=<redacted>" in str(caught.value)
    source.close()
    denied.close()


def test_closing_mid_read_stops_the_stream(
    bq_proxy: RecordingProxy, bq_emulator: BigQueryEmulator, bq_read_client: BigQueryReadClient, segment: str
) -> None:
    source = make_source(bq_proxy, bq_emulator, bq_read_client, table=f"{segment}.big")
    batches = source.read_batches(["id"])
    first = next(iter(batches))
    assert first.num_rows > 0
    source.close()
    assert list(batches) == []
    assert source.stats()["rows"] == first.num_rows


def test_without_application_default_credentials_the_error_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # A missing credential is the user's to fix: a config error (exit 2) naming what to set (issue 19, item 13).
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(
        ConfigError, match=rf"^activation '{ACTIVATION}', field 'source': BigQuery needs Google"
    ) as caught:
        BigQuerySource(BigQuerySourceConfig(table="ds.people", project="some-project"), activation=ACTIVATION)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(caught.value)
    assert "missing-key.json" in str(caught.value)


def test_arrow_schema_maps_every_supported_type() -> None:
    fields = [
        bigquery.SchemaField("s", "STRING"),
        bigquery.SchemaField("i", "INTEGER"),
        bigquery.SchemaField("f", "FLOAT"),
        bigquery.SchemaField("n", "NUMERIC"),
        bigquery.SchemaField("bn", "BIGNUMERIC"),
        bigquery.SchemaField("b", "BOOLEAN"),
        bigquery.SchemaField("d", "DATE"),
        bigquery.SchemaField("dt", "DATETIME"),
        bigquery.SchemaField("t", "TIME"),
        bigquery.SchemaField("ts", "TIMESTAMP", mode="REQUIRED"),
        bigquery.SchemaField("by", "BYTES"),
        bigquery.SchemaField("g", "GEOGRAPHY"),
        bigquery.SchemaField("j", "JSON"),
        bigquery.SchemaField("tags", "STRING", mode="REPEATED"),
        bigquery.SchemaField("r", "RECORD", fields=[bigquery.SchemaField("x", "INT64")]),
    ]
    assert arrow_schema(fields) == pa.schema(
        [
            pa.field("s", pa.string()),
            pa.field("i", pa.int64()),
            pa.field("f", pa.float64()),
            pa.field("n", pa.decimal128(38, 9)),
            pa.field("bn", pa.decimal256(76, 38)),
            pa.field("b", pa.bool_()),
            pa.field("d", pa.date32()),
            pa.field("dt", pa.timestamp("us")),
            pa.field("t", pa.time64("us")),
            pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("by", pa.binary()),
            pa.field("g", pa.string()),
            pa.field("j", pa.string()),
            pa.field("tags", pa.list_(pa.string()), nullable=False),
            pa.field("r", pa.struct([pa.field("x", pa.int64())])),
        ]
    )
    with pytest.raises(ValueError, match="INTERVAL"):
        arrow_schema([bigquery.SchemaField("span", "INTERVAL")])


# --- issue 19, item 4: NUMERIC and BIGNUMERIC keep their digits, or say why not --------------


@pytest.mark.parametrize("use_storage_api", [True, False])
def test_numeric_and_bignumeric_are_sent_exactly_or_refused(
    use_storage_api: bool,
    bq_proxy: RecordingProxy,
    bq_emulator: BigQueryEmulator,
    bq_read_client: BigQueryReadClient,
    segment: str,
) -> None:
    from sync.mapping import ProfileMapper, resolve_attribute_types
    from sync.model import Reason
    from tests.support.mapping_support import make_activation
    from tests.support.reference_mapping import map_batch

    query = (
        "SELECT 'wide' AS id, NUMERIC '12345678901234567890123456789.123456789' AS amount, "
        "BIGNUMERIC '19.99' AS big, NUMERIC '42' AS units "
        "UNION ALL SELECT 'money', NUMERIC '19.99', BIGNUMERIC '0.1', NUMERIC '7'"
    )
    source = make_source(bq_proxy, bq_emulator, bq_read_client, use_storage_api=use_storage_api, query=query)
    activation = make_activation(
        attributes=[{"column": "amount"}, {"column": "big"}, {"column": "units", "type": "integer"}]
    )
    types = resolve_attribute_types(activation, source.schema(), source="bq.yaml")
    mapper = ProfileMapper(activation, types)
    rows = {
        row.custom_id: row
        for batch in source.read_batches(["id", "amount", "big", "units"])
        for row in map_batch(mapper, batch)
    }
    source.close()
    assert rows["money"].attributes == {"amount": 19.99, "big": 0.1, "units": 7}
    assert rows["wide"].attributes is None
    assert [(issue.field, issue.reason) for issue in rows["wide"].issues] == [("amount", Reason.INEXACT_NUMBER)]
    assert "12345678901234567890123456789.123456789" in rows["wide"].issues[0].detail
