"""What arrives: the sync request, the Pub/Sub envelope it comes in, and the HTTP trigger headers.

* :class:`SyncRequest` is the JSON object both triggers carry,
  ``{"activation": NAME, "full": false, "allow": [GUARD, ...]}`` (``continuation_of`` is
  written only by the function's own hand-over). Unknown keys are refused.
* :class:`PubSubEnvelope` is the data of a Pub/Sub ``messagePublished`` CloudEvent (the push
  body): ``{"message": {"data": BASE64, ...}, "subscription": ...}``; only ``message.data``
  is read, other keys are Pub/Sub's and ignored.
* :class:`TriggerHeaders` are the headers that make an HTTP trigger's idempotency key: Cloud
  Scheduler's job name and schedule time, or a caller's ``Idempotency-Key``.

Every refusal is a :class:`sync.errors.ConfigError` naming the key (never retried).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from sync.config import ACTIVATION_NAME
from sync.errors import ConfigError
from sync.function.trace import Headers
from sync.guard_names import GUARD_NAMES, check_guard_names

# Run ids are made by sync.engine.new_run_id: 20261129T020304Z-3f9a1c.
_RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
# Trigger ids end up in document ids and log labels: keep them short and printable.
MAX_TRIGGER_ID = 200
# The largest request body (HTTP) or Pub/Sub message data read: a request is a few hundred
# bytes, and Pub/Sub (10 MB) and Cloud Functions (32 MB) would let far more through.
MAX_MESSAGE_BYTES = 64 * 1024
# The base64 text of MAX_MESSAGE_BYTES bytes.
_MAX_MESSAGE_BASE64 = 4 * -(-MAX_MESSAGE_BYTES // 3)
_KNOWN_GUARDS = ", ".join(GUARD_NAMES)
# How pydantic reports a key the message must not have (models say the first, dataclasses the second).
_UNKNOWN_KEY = frozenset({"extra_forbidden", "unexpected_keyword_argument"})
# What a key of the message must be, when its value has the wrong type.
_EXPECTED = {
    "activation": "missing or not a string",
    "full": "must be true or false",
    "continuation_of": "must be a run id such as 20261129T020304Z-3f9a1c",
    "allow": f'must be a list of guard names, such as ["changed_percent"] (known: {_KNOWN_GUARDS})',
}


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SyncRequest:
    """What a message asks for: ``{"activation": NAME, "full": false}``.

    ``continuation_of`` is set only by the hand-over (:mod:`sync.function.handover`): the
    root run id of the pass being continued. ``allow`` lists guards approved for this run
    only (the CLI's ``--allow``), carried into its continuations.
    """

    activation: StrictStr
    full: StrictBool = False
    continuation_of: StrictStr | None = None
    allow: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: object) -> SyncRequest:
        """Validate a decoded message; every error is a ConfigError naming the key."""
        if not isinstance(data, dict):
            raise ConfigError('the message must be a JSON object like {"activation": "NAME", "full": false}')
        try:
            return _REQUESTS.validate_python(data)
        except ValidationError as error:
            raise _refusal(error) from None

    def digest(self) -> str:
        """SHA-256 of the request's canonical JSON: what an idempotency key is bound to.

        Two bodies that ask the same thing (key order, spacing, ``"full": false`` left out)
        have the same digest.
        """
        canonical = json.dumps(self.as_message(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def as_message(self) -> dict[str, object]:
        """The JSON object a message carries for this request."""
        message: dict[str, object] = {"activation": self.activation, "full": self.full}
        if self.continuation_of is not None:
            message["continuation_of"] = self.continuation_of
        if self.allow:
            message["allow"] = list(self.allow)
        return message

    @field_validator("activation")
    @classmethod
    def _activation_name(cls, name: str) -> str:
        if not ACTIVATION_NAME.match(name):
            raise ValueError(f"{name[:70]!r} is not an activation name ([a-z0-9][a-z0-9_-]*)")
        return name

    @field_validator("continuation_of")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_ID.match(value):
            raise ValueError(_EXPECTED["continuation_of"])
        return value

    @field_validator("allow", mode="before")
    @classmethod
    def _guard_names(cls, value: object) -> tuple[str, ...]:
        """A list of known guard names (a tuple too, when the function builds a request itself)."""
        if not isinstance(value, list | tuple) or not all(isinstance(name, str) for name in value):
            raise ValueError(_EXPECTED["allow"])
        try:
            return check_guard_names(value, field="allow")
        except ConfigError as error:  # the model names the field itself
            raise ValueError(str(error).removeprefix("field 'allow': ")) from None


_REQUESTS = TypeAdapter(SyncRequest)


def _refusal(error: ValidationError) -> ConfigError:
    """The first thing wrong with a message: its unknown keys, else the first bad key."""
    problems = error.errors()
    unknown = sorted(str(problem["loc"][0])[:40] for problem in problems if problem["type"] in _UNKNOWN_KEY)
    if unknown:
        return ConfigError(f"unknown key(s) in the message: {', '.join(unknown)}")
    problem = problems[0]
    key = str(problem["loc"][0])
    if problem["type"] == "value_error":
        return ConfigError(str(problem["ctx"]["error"]), field=key)
    return ConfigError(_EXPECTED.get(key, "invalid value"), field=key)


class PubSubMessage(BaseModel):
    """A Pub/Sub message as pushed: only ``data`` (base64 of the JSON request) is read."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    data: StrictStr = Field(min_length=1)


class PubSubEnvelope(BaseModel):
    """The data of a Pub/Sub ``messagePublished`` CloudEvent: ``{"message": {...}, "subscription": ...}``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    message: PubSubMessage

    def payload(self) -> object:
        """The message's JSON payload.

        Raises:
            ConfigError: the data is not base64, not UTF-8 or not JSON (never retried).
        """
        if len(self.message.data) > _MAX_MESSAGE_BASE64:
            raise MessageTooLarge(
                f"the Pub/Sub message data is larger than {MAX_MESSAGE_BYTES:,} bytes: a request is "
                '{"activation": "NAME", "full": false}'
            )
        try:
            data = base64.b64decode(self.message.data, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("the Pub/Sub message data is not base64-encoded UTF-8") from None
        return parse_json(data, what="the Pub/Sub message data")


class MessageTooLarge(ConfigError):
    """A request body or message data over :data:`MAX_MESSAGE_BYTES` (HTTP 413, never retried)."""


def parse_json(data: bytes, *, what: str) -> object:
    """A request's JSON from its bytes (HTTP body, Pub/Sub data), bounded in size and depth.

    Raises:
        MessageTooLarge: more than :data:`MAX_MESSAGE_BYTES` bytes.
        ConfigError: empty, not UTF-8, not JSON, or nested too deeply for the parser (a
            ``[`` repeated 100,000 times raises RecursionError inside ``json.loads``): every
            one of them the same on any redelivery, so never retried.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(
            f'{what} is larger than {MAX_MESSAGE_BYTES:,} bytes: a request is {{"activation": "NAME", "full": false}}'
        )
    if not data.strip():
        raise ConfigError(f'{what} is empty: send {{"activation": "NAME", "full": false}}')
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"{what} is JSON nested too deeply ({len(data):,} bytes)") from None
    except ValueError:
        raise ConfigError(f"{what} is not JSON ({len(text):,} characters)") from None


def decode_pubsub_data(envelope: object) -> object:
    """The JSON payload of a Pub/Sub CloudEvent body ``{"message": {"data": BASE64}, ...}``.

    Raises:
        ConfigError: no ``message.data``, not base64, not UTF-8 or not JSON (never retried).
    """
    try:
        parsed = PubSubEnvelope.model_validate(envelope)
    except ValidationError:
        raise ConfigError("the CloudEvent carries no Pub/Sub message data (expected message.data, base64)") from None
    return parsed.payload()


class TriggerHeaders(BaseModel):
    """The headers of an HTTP trigger that make its idempotency key (all optional)."""

    model_config = ConfigDict(frozen=True)

    scheduler_job: str | None = Field(None, alias="X-CloudScheduler-JobName")
    schedule_time: str | None = Field(None, alias="X-CloudScheduler-ScheduleTime")
    idempotency_key: str | None = Field(None, alias="Idempotency-Key")

    @classmethod
    def read(cls, headers: Headers) -> TriggerHeaders:
        return cls.model_validate(
            {str(field.alias): headers.get(str(field.alias)) for field in cls.model_fields.values()}
        )

    def trigger_id(self) -> str | None:
        """The idempotency key, or None (every request is a new run).

        Cloud Scheduler sends the same job name and schedule time on every retry of one slot.
        """
        if self.scheduler_job and self.schedule_time:
            return bounded_id(f"{self.scheduler_job}@{self.schedule_time}", prefix="scheduler:")
        return bounded_id(self.idempotency_key, prefix="http:") if self.idempotency_key else None


def http_trigger_id(headers: Headers) -> str | None:
    """The idempotency key of an HTTP trigger, or None (see :meth:`TriggerHeaders.trigger_id`)."""
    return TriggerHeaders.read(headers).trigger_id()


def bounded_id(value: str, *, prefix: str = "") -> str:
    """A trigger id as stored: ``prefix + value`` when it is printable and fits :data:`MAX_TRIGGER_ID`.

    Otherwise ``prefix + "sha256:" + the SHA-256 of value``: a long or unprintable key is
    hashed whole, never cut, so two keys that differ only past the bound (or in a character
    that cannot be shown) stay two triggers.
    """
    whole = prefix + value
    # A key that itself starts with "sha256:" is hashed too, so that form only ever means a hash.
    if len(whole) <= MAX_TRIGGER_ID and whole.isprintable() and not value.startswith("sha256:"):
        return whole
    return prefix + "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
