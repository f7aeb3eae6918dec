"""One redactor (sync/redact.py) behind the three paths text leaves by: logs, Batch errors, BigQuery errors."""

from __future__ import annotations

import io
import json
from typing import Any, cast

import pytest
import structlog
from aiohttp import web
from google.api_core import exceptions as api_exceptions

from sync.batch.client import BatchClient, Endpoint, ProfileUpdate
from sync.batch.ratelimit import RateLimiterRegistry
from sync.config import Credentials, DestinationConfig
from sync.errors import BatchContractError
from sync.logs import configure_logging, scrubber
from sync.redact import MASK, MIN_SECRET_LENGTH, Redactor, redact
from sync.sources.bigquery import BigQueryPermissionDenied
from sync.warehouse.bq import Warehouse

API_KEY = "redact-test-rest-key-7c1f0e9d2b"
PROJECT_KEY = "redact_test_project_4f8a2c6e1d"
URL_KEY = "AIzaSy-redact-test-0123456789"
# What a server or a library might quote back: both Batch keys and a URL with an API key.
RAW = f"denied for {API_KEY} on {PROJECT_KEY} (https://x.test/v1?alt=json&key={URL_KEY}&pretty=1)"
EXPECTED = f"denied for {MASK} on {MASK} (https://x.test/v1?alt=json&key={MASK}&pretty=1)"


def test_known_secrets_and_url_credentials_are_masked() -> None:
    redactor = Redactor([API_KEY, PROJECT_KEY])
    assert redactor.text(RAW) == EXPECTED
    assert redactor.text("nothing secret here") == "nothing secret here"
    assert redactor.text("sig=abc&token=def&sort=asc") == f"sig={MASK}&token={MASK}&sort=asc"


def test_short_values_are_not_registered_and_a_longer_secret_is_masked_whole() -> None:
    short = "a" * (MIN_SECRET_LENGTH - 1)
    redactor = Redactor([short, "secret-abc", "secret-abc-and-more"])
    assert redactor.text(f"{short} secret-abc-and-more secret-abc") == f"{short} {MASK} {MASK}"


def test_nested_values_are_redacted_and_other_types_kept() -> None:
    redactor = Redactor([API_KEY])
    value = {"a": [API_KEY, (1, f"x{API_KEY}")], "b": 3, "c": None}
    assert redactor.value(value) == {"a": [MASK, (1, f"x{MASK}")], "b": 3, "c": None}


# --- the three paths redact the same way ----------------------------------------------------------


@pytest.fixture
def registered() -> None:
    """The Batch keys registered process-wide, as sync.runtime.build_client does."""
    scrubber.add([API_KEY, PROJECT_KEY])


@pytest.mark.usefixtures("registered")
def test_the_log_processor_uses_the_shared_redactor() -> None:
    stream = io.StringIO()
    saved = structlog.get_config()
    configure_logging(json=True, stream=stream)
    try:
        structlog.get_logger("test").error("call failed", detail=RAW, nested={"items": [RAW]})
    finally:
        structlog.configure(**saved)
    line = json.loads(stream.getvalue())
    assert (line["detail"], line["nested"]) == (EXPECTED, {"items": [EXPECTED]})
    assert redact(RAW) == EXPECTED


async def test_batch_errors_use_the_shared_redactor(unused_tcp_port: int) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error_code": "INVALID", "error_message": RAW}, status=400)

    app = web.Application()
    app.router.add_post("/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        destination = DestinationConfig(
            api_key_env="K",
            project_key_env="P",
            base_url=f"http://127.0.0.1:{unused_tcp_port}",
            rate_limit=False,
            max_attempts=1,
        )
        client = BatchClient(
            destination, Credentials(API_KEY, PROJECT_KEY), activation="vip", limiters=RateLimiterRegistry()
        )
        async with client:
            with pytest.raises(BatchContractError) as refused:
                await client.send(Endpoint.UPDATE, [ProfileUpdate("u1", {"points": 1})])
    finally:
        await runner.cleanup()
    assert f"(INVALID: {EXPECTED})" in str(refused.value)


@pytest.mark.usefixtures("registered")
def test_bigquery_errors_use_the_shared_redactor() -> None:
    from sync.sources.bigquery_errors import describe  # the source's one error formatter

    assert describe(api_exceptions.Forbidden(RAW)).startswith(EXPECTED)
    warehouse = Warehouse(cast(Any, None), activation="vip")  # no client: only the error translation runs
    translated = warehouse.translate("stage", api_exceptions.Forbidden(RAW))
    assert isinstance(translated, BigQueryPermissionDenied)
    assert EXPECTED in str(translated)
    assert API_KEY not in str(translated)
    assert URL_KEY not in str(translated)
