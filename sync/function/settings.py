"""The function's settings: one pydantic-settings model over the environment (docs/function.md).

Each field is one environment variable, as given (an empty variable counts as unset); the
properties resolve what the runtime uses from them (the state URL, the margin, the topic
path, the emulator endpoints). Every bad value is a :class:`sync.errors.ConfigError` naming
the variable and quoting the value (at most 20 characters), raised when the model is built.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sync.bigquery_clients import BigQueryEmulatorEndpoints
from sync.errors import ConfigError
from sync.logs import configure_logging, get_logger

log = get_logger("cepsync.function")

# Cloud Functions (2nd gen) kill an event-triggered invocation at 540 s and an HTTP one at
# 3600 s. The defaults leave room for the final flush, compaction and run record after the
# engine stops launching batches (budget - margin), and for the continuation publish.
DEFAULT_EVENT_BUDGET_SECONDS = 480.0
DEFAULT_HTTP_BUDGET_SECONDS = 3300.0
DEFAULT_BUDGET_MARGIN_SECONDS = 30.0
DEFAULT_LEASE_TTL_SECONDS = 180.0
# Pub/Sub deliveries of one message before it is acknowledged as failed_permanently. With the
# Eventarc subscription's backoff (10 s doubling up to 600 s) five attempts span about 2.5 min.
DEFAULT_MAX_DELIVERY_ATTEMPTS = 5
MAX_DELIVERY_ATTEMPTS_LIMIT = 100
# Deployed beside the sync package (what `make package` zips as activations/).
DEFAULT_ACTIVATIONS_DIR = Path(__file__).resolve().parents[2] / "activations"
# Pub/Sub topic ids: 3-255 characters, start with a letter (cloud.google.com/pubsub/docs/create-topic).
_TOPIC_ID = r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}"
_TOPIC_PATH = re.compile(rf"^projects/[^/\s]+/topics/{_TOPIC_ID}$")
_TOPIC_NAME = re.compile(rf"^{_TOPIC_ID}$")

# The variables Settings.from_env reads instead of os.environ, while it builds a model.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("cepsync_function_environ", default=None)


class _Environment(PydanticBaseSettingsSource):
    """Each field's variable (its validation alias), from ``os.environ`` or the mapping given to from_env.

    Only non-empty values count: an empty variable is unset, so its field keeps its default.
    pydantic-settings' own environment source reads ``os.environ`` only, and the handlers take
    an ``environ`` mapping (tests give one per invocation); this source serves both.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = str(field.validation_alias)
        environ = _ENVIRON.get()
        value = (os.environ if environ is None else environ).get(name) or None
        return value, name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, name, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[name] = value
        return values


class Settings(BaseSettings):
    """Runtime settings from the environment, built once per invocation at the entry point.

    Fields (one environment variable each, see docs/function.md):
        project: ``GOOGLE_CLOUD_PROJECT`` (trace links, bare topic names), or None.
        state: ``CEPSYNC_STATE`` (default ``firestore``); see :attr:`state_url`.
        firestore_database / firestore_prefix: ``CEPSYNC_FIRESTORE_DATABASE`` (default
            ``(default)``) and ``CEPSYNC_FIRESTORE_PREFIX`` (default ``cepsync``).
        activations: ``CEPSYNC_ACTIVATIONS_DIR``, or None; see :attr:`activations_dir`.
        time_budget_seconds: ``CEPSYNC_TIME_BUDGET_SECONDS``, counted from the start of the
            invocation (default 480 for events, 3300 for HTTP: :class:`HttpSettings`).
        margin: ``CEPSYNC_BUDGET_MARGIN_SECONDS`` as given, or None; see :attr:`budget_margin_seconds`.
        lease_ttl_seconds: ``CEPSYNC_LEASE_TTL_SECONDS`` (default 180).
        topic: ``CEPSYNC_CONTINUATION_TOPIC`` as given, or None; see :attr:`continuation_topic`.
        bigquery_emulator_host / bigquery_storage_emulator_host: ``BIGQUERY_EMULATOR_HOST`` and
            ``BIGQUERY_STORAGE_EMULATOR_HOST``; see :attr:`bigquery_emulator`.
        max_delivery_attempts: ``CEPSYNC_MAX_DELIVERY_ATTEMPTS`` (default 5, 1-100): Pub/Sub
            deliveries of one message before a retryable failure becomes ``failed_permanently``.
    """

    model_config = SettingsConfigDict(frozen=True, case_sensitive=True, extra="ignore")

    project: str | None = Field(None, validation_alias="GOOGLE_CLOUD_PROJECT")
    state: str = Field("firestore", validation_alias="CEPSYNC_STATE")
    firestore_database: str = Field("(default)", validation_alias="CEPSYNC_FIRESTORE_DATABASE")
    firestore_prefix: str = Field("cepsync", validation_alias="CEPSYNC_FIRESTORE_PREFIX")
    activations: Path | None = Field(None, validation_alias="CEPSYNC_ACTIVATIONS_DIR")
    time_budget_seconds: float = Field(DEFAULT_EVENT_BUDGET_SECONDS, validation_alias="CEPSYNC_TIME_BUDGET_SECONDS")
    margin: float | None = Field(None, validation_alias="CEPSYNC_BUDGET_MARGIN_SECONDS")
    lease_ttl_seconds: float = Field(DEFAULT_LEASE_TTL_SECONDS, validation_alias="CEPSYNC_LEASE_TTL_SECONDS")
    topic: str | None = Field(None, validation_alias="CEPSYNC_CONTINUATION_TOPIC")
    bigquery_emulator_host: str | None = Field(None, validation_alias="BIGQUERY_EMULATOR_HOST")
    bigquery_storage_emulator_host: str | None = Field(None, validation_alias="BIGQUERY_STORAGE_EMULATOR_HOST")
    max_delivery_attempts: int = Field(DEFAULT_MAX_DELIVERY_ATTEMPTS, validation_alias="CEPSYNC_MAX_DELIVERY_ATTEMPTS")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _Environment(settings_cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, http: bool = False) -> Settings:
        """Read and check every setting from ``environ`` (default ``os.environ``).

        ``http`` selects the HTTP trigger's longer default time budget. A bad value is a
        ConfigError naming the variable.
        """
        model = HttpSettings if http else cls
        with _reading(environ):
            try:
                return model()
            except ValidationError as error:  # a type our validators did not foresee
                first = error.errors()[0]
                name = str(first["loc"][0]) if first["loc"] else "environment"
                raise ConfigError(f"invalid value ({first['msg']})", field=name) from None

    # --- each variable on its own -----------------------------------------------------------

    @field_validator("time_budget_seconds", "margin", "lease_ttl_seconds", mode="before")
    @classmethod
    def _positive_seconds(cls, raw: object, info: ValidationInfo) -> object:
        if not isinstance(raw, str):  # a default
            return raw
        name = _variable(cls, info)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"must be a number of seconds, got {raw[:20]!r}", field=name) from None
        if not value > 0 or math.isinf(value):
            raise ConfigError(f"must be a positive number of seconds, got {raw[:20]!r}", field=name)
        return value

    @field_validator("max_delivery_attempts", mode="before")
    @classmethod
    def _attempts(cls, raw: object, info: ValidationInfo) -> object:
        if not isinstance(raw, str):
            return raw
        text = raw.strip()
        if not text.isdigit() or not 1 <= int(text) <= MAX_DELIVERY_ATTEMPTS_LIMIT:
            raise ConfigError(
                f"must be a whole number of attempts from 1 to {MAX_DELIVERY_ATTEMPTS_LIMIT}, got {raw[:20]!r}",
                field=_variable(cls, info),
            )
        return int(text)

    # --- what the runtime uses ------------------------------------------------------------

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        """Resolve every derived value once, so a bad combination fails when the model is built."""
        _ = (self.budget_margin_seconds, self.continuation_topic, self.bigquery_emulator)
        return self

    @property
    def state_url(self) -> str:
        """``CEPSYNC_STATE``; the word ``firestore`` means ``firestore://PROJECT/DATABASE?prefix=P``.

        Any other value is a state URL (see :func:`sync.runtime.open_store`).
        """
        if self.state != "firestore":
            return self.state
        return f"firestore://{self.project or ''}/{self.firestore_database}?prefix={self.firestore_prefix}"

    @property
    def activations_dir(self) -> Path:
        """``CEPSYNC_ACTIVATIONS_DIR``, or ``activations/`` beside the sync package."""
        return self.activations if self.activations is not None else DEFAULT_ACTIVATIONS_DIR

    @property
    def budget_margin_seconds(self) -> float:
        """No batch is launched after ``budget - margin``: 30 s, or half a smaller budget when not set.

        A margin that is set must be below the budget.
        """
        if self.margin is None:
            # A small budget (tests, a short HTTP timeout) keeps half of it for sending.
            return min(DEFAULT_BUDGET_MARGIN_SECONDS, self.time_budget_seconds / 2)
        budget = self.time_budget_seconds
        if self.margin >= budget:
            raise ConfigError(
                f"must be below CEPSYNC_TIME_BUDGET_SECONDS ({budget:g}): no batch could ever be sent",
                field="CEPSYNC_BUDGET_MARGIN_SECONDS",
            )
        return self.margin

    @property
    def continuation_topic(self) -> str | None:
        """``projects/P/topics/T`` (a bare topic name is resolved in ``project``), or None: no hand-over.

        Without a topic the next scheduled run continues from the checkpoint.
        """
        if self.topic is None or _TOPIC_PATH.match(self.topic):
            return self.topic
        if not _TOPIC_NAME.match(self.topic):
            raise ConfigError(
                "must be projects/PROJECT/topics/TOPIC or a topic name", field="CEPSYNC_CONTINUATION_TOPIC"
            )
        if self.project is None:
            raise ConfigError(
                "a bare topic name needs GOOGLE_CLOUD_PROJECT; or give projects/PROJECT/topics/TOPIC",
                field="CEPSYNC_CONTINUATION_TOPIC",
            )
        return f"projects/{self.project}/topics/{self.topic}"

    @property
    def bigquery_emulator(self) -> BigQueryEmulatorEndpoints | None:
        """A local BigQuery emulator's endpoints, or None (the real API, Application Default Credentials)."""
        return BigQueryEmulatorEndpoints.from_env(
            {
                "BIGQUERY_EMULATOR_HOST": self.bigquery_emulator_host or "",
                "BIGQUERY_STORAGE_EMULATOR_HOST": self.bigquery_storage_emulator_host or "",
            }
        )


class HttpSettings(Settings):
    """The HTTP trigger's settings: the platform allows it 3600 s, so its default budget is longer."""

    time_budget_seconds: float = Field(DEFAULT_HTTP_BUDGET_SECONDS, validation_alias="CEPSYNC_TIME_BUDGET_SECONDS")


def _variable(model: type[BaseSettings], info: ValidationInfo) -> str:
    """The environment variable of the field being validated."""
    assert info.field_name is not None
    return str(model.model_fields[info.field_name].validation_alias)


@contextmanager
def _reading(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


def configure_runtime_logging(environ: Mapping[str, str] | None = None) -> None:
    """JSON logs on stderr for Cloud Logging, at ``CEPSYNC_LOG_LEVEL`` (default info).

    An unknown level falls back to info (and says so) instead of failing the import of
    ``main.py``, which would take every trigger down with it.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    level = (env.get("CEPSYNC_LOG_LEVEL") or "info").lower()
    known = level.upper() in logging.getLevelNamesMapping()
    configure_logging(json=True, level=level if known else "info")
    if not known:
        log.warning("unknown CEPSYNC_LOG_LEVEL, using info", level=level[:20])
