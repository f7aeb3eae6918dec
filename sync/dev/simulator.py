"""A local, in-memory simulator of Batch's CEP Profile API (``/profiles/update``, ``/profiles/mass-update``).

It follows docs/batch-api.md: the documented facts where Batch documents them, and
the project's choices where Batch is silent. Integration tests, ``cepsync demo``,
``cepsync simulator`` and the 1M-profile benchmark all run against it, so validation is
written for speed (a 10,000-item mass-update is validated in a small fraction of a second).

Profile API routes (auth: ``Authorization: Bearer <api_key>`` + ``X-Batch-Project: <project_key>``):

* ``POST /{version}/profiles/update`` (<= 200 items) and ``POST /{version}/profiles/mass-update``
  (<= 10,000 items). ``version`` must look like ``2.<digits>``, else 404 ``ROUTE_NOT_FOUND``.
* 401 ``AUTHENTICATION_INVALID``: unknown project key, wrong key, or a missing header.
* 400 ``MALFORMED_REQUEST``: body not JSON (``NaN``/``Infinity`` included), not an array, too many
  items, or an item that is not an object. An empty array is accepted: clients use it to check
  credentials.
* 429 ``TOO_MANY_REQUESTS``: a token bucket counted in profiles, per (project key, endpoint):
  ``update`` 300/s with a burst of 1,000, ``mass-update`` 10,000/s with no burst (capacity 10,000).
  A request needing more tokens than the bucket holds is refused whole and consumes nothing.
* 202 ``{"code":"SUCCESS"}`` or ``{"code":"SUCCESS_WITH_PARTIAL_ERRORS","errors":[...]}``: each
  error is ``{"category": "identifiers"|"attribute"|"event", "bulk_index": i, "attribute"?: key,
  "reason": text}``. An item with any error is dropped whole; every other item is applied.

Per-item rules (docs/batch-api.md): ``identifiers`` holds exactly one of ``custom_id``
(non-empty string, <= 1024 characters) or ``installation`` (a non-empty object; its shape is
unconfirmed, so such items are validated and acknowledged but not stored). Attribute names are
``[a-z0-9_]{1,30}``, bare or wrapped as ``date(name)`` / ``url(name)``; native keys are
``$email_address``, ``$phone_number``, ``$language``, ``$region``, ``$timezone``,
``$email_marketing``, ``$sms_marketing``, any other ``$`` key is an error. ``null`` deletes
an attribute (for ``date(x)`` / ``url(x)``, the attribute ``x``). Strings are 1-300 characters
and not blank; integers fit in 64 bits (Batch's range is unconfirmed; this is the usual
backend limit); floats are finite; arrays hold 1-25 valid strings; ``{"$add": [...]}`` and/or
``{"$remove": [...]}`` edit the stored array (remove first, then add what is missing; an
array left empty is deleted). At most 50 custom (non-``$``) attributes per item. ``events``,
if present, is an array of objects with a ``name`` matching ``[a-zA-Z0-9_]{1,30}``, an
optional ``time`` (ISO-8601 string; the 24 h window of the MEP API is not enforced, so tests
stay clock-free) and optional ``attributes`` (an object, stored as sent). Unknown top-level
item keys are ignored.

A simulator started with ``keep_every=N`` (``cepsync simulator --keep-every N``) keeps the
attributes of one custom id in N (those whose CRC-32 is a multiple of N, :func:`kept`) and only
an update count for the others: a whole profile costs ~1.9 kB of Python objects, so ten million
kept whole need ~18 GB, and a benchmark at that size checks a sample anyway. The view of an id
that is only counted says ``"kept": false`` and has no attributes.

Inspection and control (no auth):

* ``GET /_sim/projects/{project_key}/profiles`` ->
  ``{"profiles": {custom_id: {"attributes": {...}, "types": {...}, "updates": n, "events": [...]}}}``;
  ``GET /_sim/projects/{project_key}/profiles/{custom_id}`` -> one such record (404 if unknown).
  Types are ``string``, ``integer``, ``float``, ``boolean``, ``date``, ``url``, ``array`` and
  ``native`` (for ``$`` keys); dates are shown as the ISO string that was sent.
* ``GET /_sim/stats`` -> ``{"requests": {"update": n, "mass-update": n}, "status_codes": {"202": n, ...},
  "profiles_received": n, "profiles_applied": n, "profiles_rejected": n,
  "max_updates_per_custom_id": n, "too_many_requests": n, "connections_dropped": n,
  "profiles_stored": n, "item_errors": {"value": n, "server": n, "unknown": n, "none": n}}``.
  ``profiles_stored`` counts every custom id ever applied, kept whole or only counted (below).
  ``profiles_received`` counts the items of every well-formed, authenticated request (retries
  included); ``profiles_applied`` counts items applied (an item re-sent after a dropped
  connection counts again: that is what ``max_updates_per_custom_id`` makes visible);
  ``profiles_rejected`` counts items answered as partial errors (injected ones included);
  ``item_errors`` counts the injected ones by kind.
* ``GET /_sim/faults`` -> the current fault settings; ``POST /_sim/faults`` with a JSON object
  holding any subset of::

      {"latency_ms": 0,             # added to every Profile API request, >= 0
       "fail_next": 0,              # answer the next N well-formed requests with fail_status
       "fail_status": 503,          # 429, 500, 502, 503 or 504
       "failure_rate": 0.0,         # probability (seeded RNG) of answering failure_status
       "failure_status": 503,       # 500, 502, 503 or 504
       "drop_before_apply": 0,      # close the next N connections without applying or answering
       "drop_after_apply": 0,       # apply the next N requests, then close without answering
       "reject_custom_ids": [],     # custom_ids always answered as partial errors
       "item_errors": {"value": 0.0, "server": 0.0, "unknown": 0.0, "none": 0.0}}

  Given keys replace the current value; the answer is the new settings. Invalid input is a 400.

  ``item_errors`` injects per-item partial errors into otherwise valid items, one kind each
  (a probability 0..1 per kind; a partial object sets the kinds it names and the others to 0):

  * ``value``: Batch refusing the item's *data*. Decided by a hash of (custom_id, the item's
    ``attributes`` as sent), not by the RNG, so the same payload is refused every time and a
    changed payload is drawn again. Answered ``{"category": "attribute", "bulk_index": i,
    "attribute": <the first of the item's attribute keys, sorted; "custom_id" if it has none>,
    "reason": "simulated: value refused"}``.
  * ``server``: ``{"category": "server", "bulk_index": i, "reason": "simulated: internal error"}``.
  * ``unknown``: ``{"category": "simulated_unknown", "bulk_index": i, "reason": "simulated: unknown category"}``.
  * ``none``: ``{"bulk_index": i, "reason": "simulated: no category"}`` (no ``category`` key).

  ``server``, ``unknown`` and ``none`` are drawn per item and per request from the seeded RNG,
  in that order (an item takes the first kind that hits, so it gets at most one injected
  error); an installation-identified item is never drawn for ``value``. ``reject_custom_ids``
  is a value refusal too (category ``identifiers``); an item it rejects, or that breaks a
  rule, is never given an injected error on top.
* ``POST /_sim/reset`` clears profiles, stats, faults and rate-limit buckets, and re-seeds the RNG.
* The Audience API (``/audiences/create``, ``/update``, ``/view``), its faults and its views
  under ``/_sim/``: :mod:`sync.dev.audiences`.

Order of processing for a Profile API request: latency, route version, auth, body parsing,
injected failure (``fail_next``, then ``failure_rate``), rate limit, item validation,
injected item errors, ``drop_before_apply``, apply, ``drop_after_apply``, answer. 502 and 504 are answered with an
HTML body, as a proxy in front of Batch would, so clients prove they never fail on an
unexpected body (docs/batch-api.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import functools
import hashlib
import hmac
import json
import math
import random
import re
import signal
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from types import TracebackType
from typing import Any, Final, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from sync.dev.audiences import AudienceAPI
from sync.errors import ConfigError
from sync.logs import get_logger

__all__ = ["ITEM_ERROR_KINDS", "BatchSimulator", "SimulatorFaults", "SimulatorThread", "serve"]

_log = get_logger(__name__)

# --- Batch limits (docs/batch-api.md, "Limits, counted in profiles") -------------------------------------------------

UPDATE: Final = "update"
MASS_UPDATE: Final = "mass-update"
# Items per call: 200 for /update (D1), 10,000 for /mass-update (D2).
_MAX_ITEMS: Final = {UPDATE: 200, MASS_UPDATE: 10_000}
# (refill per second, capacity) in profiles: /update 300/s burst 1000, /mass-update 10,000/s, no burst (D2, D3).
_RATE_LIMITS: Final = {UPDATE: (300.0, 1_000.0), MASS_UPDATE: (10_000.0, 10_000.0)}

_MAX_CUSTOM_ID: Final = 1024  # SDK limit (C1); the API's own limit is unconfirmed.
_MAX_STRING: Final = 300  # ATTR_STRING_MAX_LENGTH_CEP (C1).
_MAX_URL: Final = 2048  # C1, D7.
_MAX_ARRAY: Final = 25  # C1, D7.
_MAX_EMAIL: Final = 256  # C1.
_MAX_CUSTOM_ATTRIBUTES: Final = 50  # Batch's own Segment integration caps here (C2).
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# aiohttp's default body cap is 1 MiB; a 10,000-item mass-update is routinely larger.
_MAX_BODY_BYTES: Final = 256 * 1024 * 1024

_VERSION = re.compile(r"2\.[0-9]+")
_CUSTOM_NAME = re.compile(r"[a-z0-9_]{1,30}")
_EVENT_NAME = re.compile(r"[a-zA-Z0-9_]{1,30}")
# The Android SDK's checks (C1), kept verbatim (including the odd `A-z` range).
_EMAIL = re.compile(r"[^@\r\n\t]+@[A-z0-9\-\.]+\.[A-z0-9]+")
_PHONE = re.compile(r"\+[0-9]{1,15}")
_LANGUAGE = re.compile(r"[a-z]{2}")
_REGION = re.compile(r"[A-Z]{2}")
_URL_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_UTC_DATETIME = re.compile(
    r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
    r"T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]{1,9}))?)?Z"
)
_SUBSCRIPTIONS: Final = frozenset({"subscribed", "unsubscribed"})

_FAIL_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
_RANDOM_FAILURE_STATUSES: Final = frozenset({500, 502, 503, 504})

# The legacy 1.x names are the only ones seen for these statuses (docs/batch-api.md, "Answers").
_ERROR_BODIES: Final = {
    429: ("TOO_MANY_REQUESTS", "Too many requests: wait a few seconds before retrying"),
    500: ("SERVER_ERROR", "Unexpected error"),
    503: ("MAINTENANCE_ERROR", "Batch's services are under maintenance"),
}

_CATEGORY_IDENTIFIERS: Final = "identifiers"
_CATEGORY_ATTRIBUTE: Final = "attribute"
_CATEGORY_EVENT: Final = "event"

# Kinds of injected per-item error (SimulatorFaults.item_errors), in the order they are drawn.
# "value" is about the profile's data (a refusal worth remembering); the others are not.
ITEM_ERROR_KINDS: Final = ("value", "server", "unknown", "none")
_RANDOM_ITEM_ERROR_KINDS: Final = ITEM_ERROR_KINDS[1:]
_INJECTED_ERRORS: Final[dict[str, dict[str, str]]] = {
    "server": {"category": "server", "reason": "simulated: internal error"},
    "unknown": {"category": "simulated_unknown", "reason": "simulated: unknown category"},
    "none": {"reason": "simulated: no category"},
}

# Operation kinds produced by validation and consumed by apply.
_SET: Final = 0
_DELETE: Final = 1
_ARRAY_EDIT: Final = 2

_NATIVE_TYPE: Final = "native"


class _Malformed(Exception):
    """The whole request breaks the contract: answered 400."""


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON (and Batch) does not.
    raise ValueError(f"{name} is not valid JSON")


# --- validation ---------------------------------------------------------------------------


class _KeySpec(NamedTuple):
    kind: str  # "custom" | "date" | "url" | "native" | "" (invalid)
    name: str  # the bare attribute name, or the native key
    error: str


@functools.lru_cache(maxsize=16_384)
def _classify_key(key: str) -> _KeySpec:
    # Attribute keys repeat across the items of a request and across requests: caching their
    # classification keeps a 10,000-item validation cheap.
    if key.startswith("$"):
        if key in _NATIVE_VALIDATORS:
            return _KeySpec("native", key, "")
        return _KeySpec("", key, f"unknown native attribute '{key}'")
    kind = "custom"
    name = key
    if key.endswith(")"):
        if key.startswith("date("):
            kind, name = "date", key[5:-1]
        elif key.startswith("url("):
            kind, name = "url", key[4:-1]
    if _CUSTOM_NAME.fullmatch(name) is None:
        return _KeySpec("", name, "attribute name must match [a-z0-9_]{1,30}")
    return _KeySpec(kind, name, "")


def _string_error(value: Any) -> str:
    if type(value) is not str:
        return "expected a string"
    if not value or value.isspace():
        return "string must not be empty or blank"
    if len(value) > _MAX_STRING:
        return f"string longer than {_MAX_STRING} characters"
    return ""


def _string_list_error(value: Any, what: str) -> str:
    if type(value) is not list or not value:
        return f"{what} must be an array of 1-{_MAX_ARRAY} strings"
    if len(value) > _MAX_ARRAY:
        return f"{what} has more than {_MAX_ARRAY} items"
    for element in value:
        problem = _string_error(element)
        if problem:
            return f"{what} item: {problem}"
    return ""


@functools.lru_cache(maxsize=1024)
def _is_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: not a normalised relative path; OSError: e.g. a directory name.
        return False
    return True


def _utc_datetime_error(value: Any) -> str:
    if type(value) is not str:
        return "date must be an ISO-8601 UTC string ending in 'Z'"
    match = _UTC_DATETIME.fullmatch(value)
    if match is None:
        return "date must be an ISO-8601 UTC string ending in 'Z'"
    try:
        datetime(
            int(match["y"]),
            int(match["mo"]),
            int(match["d"]),
            int(match["h"]),
            int(match["mi"]),
            int(match["s"] or 0),
        )
    except ValueError:
        return "date is not a valid calendar date and time"
    return ""


def _email_error(value: Any) -> str:
    if type(value) is not str or len(value) > _MAX_EMAIL or _EMAIL.fullmatch(value) is None:
        return f"invalid email address (syntax, at most {_MAX_EMAIL} characters)"
    return ""


def _phone_error(value: Any) -> str:
    if type(value) is not str or _PHONE.fullmatch(value) is None:
        return "phone number must be E.164 (+ and 1-15 digits)"
    return ""


def _language_error(value: Any) -> str:
    if type(value) is not str or _LANGUAGE.fullmatch(value) is None:
        return "language must be 2 lowercase letters (ISO 639-1)"
    return ""


def _region_error(value: Any) -> str:
    if type(value) is not str or _REGION.fullmatch(value) is None:
        return "region must be 2 uppercase letters (ISO 3166-1 alpha-2)"
    return ""


def _timezone_error(value: Any) -> str:
    if type(value) is not str or len(value) > 64 or not _is_timezone(value):
        return "timezone must be a valid IANA time zone name"
    return ""


def _subscription_error(value: Any) -> str:
    if type(value) is not str or value not in _SUBSCRIPTIONS:
        return "subscription must be 'subscribed', 'unsubscribed' or null"
    return ""


_NATIVE_VALIDATORS: Final[dict[str, Callable[[Any], str]]] = {
    "$email_address": _email_error,
    "$phone_number": _phone_error,
    "$language": _language_error,
    "$region": _region_error,
    "$timezone": _timezone_error,
    "$email_marketing": _subscription_error,
    "$sms_marketing": _subscription_error,
}

# An operation: (kind, attribute name, stored type, value).
_Op = tuple[int, str, str, Any]


def _custom_value(key: str, value: Any) -> tuple[str, _Op | None]:
    """Validate one bare custom attribute value; return (error, operation)."""
    kind = type(value)
    if kind is str:
        problem = _string_error(value)
        return problem, (None if problem else (_SET, key, "string", value))
    if kind is bool:
        return "", (_SET, key, "boolean", value)
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return "", (_SET, key, "integer", value)
        return "integer outside the signed 64-bit range", None
    if kind is float:
        if math.isfinite(value):
            return "", (_SET, key, "float", value)
        return "float must be finite", None
    if kind is list:
        problem = _string_list_error(value, "array")
        return problem, (None if problem else (_SET, key, "array", tuple(value)))
    if kind is dict:
        if not value or not value.keys() <= {"$add", "$remove"}:
            return "objects are not allowed in profile attributes (only {'$add'|'$remove': [...]})", None
        for edit in ("$remove", "$add"):
            if edit in value:
                problem = _string_list_error(value[edit], edit)
                if problem:
                    return problem, None
        return "", (_ARRAY_EDIT, key, "array", (value.get("$remove", ()), value.get("$add", ())))
    return "unsupported value type", None


class _Accepted(NamedTuple):
    custom_id: str | None  # None for an installation-identified item
    ops: list[_Op]
    events: list[Any]


def _error(category: str, index: int, reason: str, attribute: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"category": category, "bulk_index": index}
    if attribute is not None:
        entry["attribute"] = attribute
    entry["reason"] = reason
    return entry


def _validate_identifiers(index: int, identifiers: Any, errors: list[dict[str, Any]]) -> str | None:
    if type(identifiers) is not dict:
        errors.append(_error(_CATEGORY_IDENTIFIERS, index, "identifiers must be an object"))
        return None
    custom_id = identifiers.get("custom_id")
    installation = identifiers.get("installation")
    if (custom_id is None) == (installation is None) or len(identifiers) != 1:
        errors.append(_error(_CATEGORY_IDENTIFIERS, index, "exactly one of 'custom_id' or 'installation' is required"))
        return None
    if installation is not None:
        if type(installation) is not dict or not installation:
            errors.append(_error(_CATEGORY_IDENTIFIERS, index, "installation must be a non-empty object"))
        return None
    if type(custom_id) is not str or not custom_id:
        errors.append(_error(_CATEGORY_IDENTIFIERS, index, "custom_id must be a non-empty string"))
        return None
    if len(custom_id) > _MAX_CUSTOM_ID:
        errors.append(_error(_CATEGORY_IDENTIFIERS, index, f"custom_id longer than {_MAX_CUSTOM_ID} characters"))
        return None
    return custom_id


def _validate_attributes(index: int, attributes: Any, errors: list[dict[str, Any]]) -> list[_Op]:
    if type(attributes) is not dict:
        errors.append(_error(_CATEGORY_ATTRIBUTE, index, "attributes must be an object"))
        return []
    ops: list[_Op] = []
    custom_count = 0
    for key, value in attributes.items():
        spec = _classify_key(key)
        if spec.error:
            errors.append(_error(_CATEGORY_ATTRIBUTE, index, spec.error, key))
            continue
        kind = spec.kind
        if kind == "native":
            if value is None:
                ops.append((_DELETE, key, _NATIVE_TYPE, None))
                continue
            problem = _NATIVE_VALIDATORS[key](value)
            if problem:
                errors.append(_error(_CATEGORY_ATTRIBUTE, index, problem, key))
            else:
                ops.append((_SET, key, _NATIVE_TYPE, value))
            continue
        custom_count += 1
        name = spec.name
        if value is None:
            ops.append((_DELETE, name, kind, None))
        elif kind == "custom":
            problem, op = _custom_value(key, value)
            if op is None:
                errors.append(_error(_CATEGORY_ATTRIBUTE, index, problem, key))
            else:
                ops.append(op)
        elif kind == "date":
            problem = _utc_datetime_error(value)
            if problem:
                errors.append(_error(_CATEGORY_ATTRIBUTE, index, problem, key))
            else:
                ops.append((_SET, name, "date", value))
        else:  # url
            if type(value) is not str or len(value) > _MAX_URL or _URL_PREFIX.match(value) is None:
                errors.append(
                    _error(
                        _CATEGORY_ATTRIBUTE,
                        index,
                        f"url must have a scheme and '://' and at most {_MAX_URL} characters",
                        key,
                    )
                )
            else:
                ops.append((_SET, name, "url", value))
    if custom_count > _MAX_CUSTOM_ATTRIBUTES:
        errors.append(_error(_CATEGORY_ATTRIBUTE, index, f"more than {_MAX_CUSTOM_ATTRIBUTES} custom attributes"))
    return ops


def _validate_events(index: int, events: Any, errors: list[dict[str, Any]]) -> list[Any]:
    if type(events) is not list:
        errors.append(_error(_CATEGORY_EVENT, index, "events must be an array"))
        return []
    for position, event in enumerate(events):
        where = f"events[{position}]"
        if type(event) is not dict:
            errors.append(_error(_CATEGORY_EVENT, index, f"{where} must be an object"))
            continue
        name = event.get("name")
        if type(name) is not str or _EVENT_NAME.fullmatch(name) is None:
            errors.append(_error(_CATEGORY_EVENT, index, f"{where}.name must match [a-zA-Z0-9_]{{1,30}}"))
        when = event.get("time")
        if when is not None:
            try:
                if type(when) is not str:
                    raise ValueError(when)
                datetime.fromisoformat(when)
            except ValueError:
                errors.append(_error(_CATEGORY_EVENT, index, f"{where}.time must be an ISO-8601 string"))
        if "attributes" in event and type(event["attributes"]) is not dict:
            errors.append(_error(_CATEGORY_EVENT, index, f"{where}.attributes must be an object"))
    return events


def _validate_item(
    index: int, item: dict[str, Any], rejected_ids: frozenset[str], errors: list[dict[str, Any]]
) -> _Accepted | None:
    """Validate one item, appending its errors; return what to apply, or None if it is dropped."""
    found_before = len(errors)
    custom_id = _validate_identifiers(index, item.get("identifiers"), errors)
    if custom_id is not None and custom_id in rejected_ids:
        errors.append(_error(_CATEGORY_IDENTIFIERS, index, "simulated rejection"))
    attributes = item.get("attributes")
    ops = [] if attributes is None else _validate_attributes(index, attributes, errors)
    raw_events = item.get("events")
    events = [] if raw_events is None else _validate_events(index, raw_events, errors)
    if len(errors) != found_before:
        return None
    return _Accepted(custom_id, ops, events)


def _value_refused(custom_id: str, attributes: Any, rate: float) -> bool:
    """Whether the ``value`` kind refuses this payload: a hash of it against the rate, no RNG.

    The same (custom_id, attributes) always gets the same answer, as a real value refusal
    would; key order does not matter, any changed value draws again.
    """
    text = json.dumps([custom_id, attributes], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2.0**64


def _injected_error(kind: str, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """The partial error of one injected kind for the item at ``index``."""
    if kind == "value":
        attributes = item.get("attributes")
        # A valid item's attributes are an object (or absent): name one of its keys, as Batch's
        # own example does, or the identifier when it has none.
        attribute = min(attributes) if type(attributes) is dict and attributes else "custom_id"
        return _error(_CATEGORY_ATTRIBUTE, index, "simulated: value refused", attribute)
    template = _INJECTED_ERRORS[kind]
    entry: dict[str, Any] = {}
    if "category" in template:
        entry["category"] = template["category"]
    entry["bulk_index"] = index
    entry["reason"] = template["reason"]
    return entry


# --- storage --------------------------------------------------------------------------------


class _Profile:
    """One stored profile. Kept small: the benchmark stores a million of these.

    Only ``date`` and ``url`` attributes need their type remembered; every other type is
    read off the value (or the ``$`` of a native key), so ``special_types`` stays ``None``
    for most profiles. Arrays are stored as tuples: a dict holding only strings, numbers and
    tuples of strings is untracked by CPython's cyclic GC, which otherwise spends most of a
    million-profile run re-scanning the store in full collections.
    """

    __slots__ = ("attributes", "events", "special_types", "updates")

    def __init__(self) -> None:
        self.attributes: dict[str, Any] = {}
        self.special_types: dict[str, str] | None = None
        self.events: list[Any] | None = None
        self.updates = 0

    def type_of(self, name: str) -> str:
        if self.special_types is not None and name in self.special_types:
            return self.special_types[name]
        if name.startswith("$"):
            return _NATIVE_TYPE
        value = self.attributes[name]
        if type(value) is bool:
            return "boolean"
        if type(value) is int:
            return "integer"
        if type(value) is float:
            return "float"
        if type(value) is tuple:
            return "array"
        return "string"

    def plain_attributes(self) -> dict[str, Any]:
        # Values are scalars or tuples of strings, so this is a deep copy, and far cheaper
        # than copy.deepcopy when a benchmark reads back a million profiles.
        return {name: list(value) if type(value) is tuple else value for name, value in self.attributes.items()}

    def view(self) -> dict[str, Any]:
        return {
            "attributes": self.plain_attributes(),
            "types": {name: self.type_of(name) for name in self.attributes},
            "updates": self.updates,
            "events": copy.deepcopy(self.events or []),
        }

    def apply(self, ops: Iterable[_Op]) -> None:
        attributes = self.attributes
        for kind, name, stored_type, value in ops:
            if kind == _SET:
                attributes[name] = value
            elif kind == _DELETE:
                attributes.pop(name, None)
            else:
                removed, added = value
                current = attributes.get(name)
                result = [v for v in current if v not in removed] if type(current) is tuple else []
                result.extend(v for v in dict.fromkeys(added) if v not in result)
                if not result:
                    # Batch arrays hold 1-25 strings: an edit that empties one removes it.
                    attributes.pop(name, None)
                    kind = _DELETE
                else:
                    attributes[name] = tuple(result)
            if stored_type in ("date", "url") and kind == _SET:
                if self.special_types is None:
                    self.special_types = {}
                self.special_types[name] = stored_type
            elif self.special_types is not None:
                self.special_types.pop(name, None)


class _TokenBucket:
    """Token bucket counted in profiles, driven by an injectable monotonic clock."""

    __slots__ = ("_capacity", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock()

    def try_take(self, count: int) -> bool:
        now = self._clock()
        if now > self._stamp:
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
        # A hair of slack so refills computed in floating point (e.g. 300/s x 1/3 s) are exact.
        if count > self._tokens + 1e-9:
            return False
        self._tokens = max(0.0, self._tokens - count)
        return True


@dataclass
class SimulatorFaults:
    """Fault injection settings, mutable in-process or through ``POST /_sim/faults``.

    Attributes:
        latency_ms: Delay added to every Profile API request.
        fail_next: Answer the next N well-formed, authenticated requests with ``fail_status``.
        fail_status: One of 429, 500, 502, 503, 504.
        failure_rate: Probability, from the simulator's seeded RNG, of answering ``failure_status``.
        failure_status: One of 500, 502, 503, 504.
        drop_before_apply: Close the next N connections without applying or answering.
        drop_after_apply: Apply the next N requests, then close without answering.
        reject_custom_ids: custom_ids always answered as partial errors ("simulated rejection").
        item_errors: Probability (0..1) of injecting a per-item partial error of each kind
            (:data:`ITEM_ERROR_KINDS`) into a valid item; see the module docstring.
    """

    latency_ms: float = 0.0
    fail_next: int = 0
    fail_status: int = 503
    failure_rate: float = 0.0
    failure_status: int = 503
    drop_before_apply: int = 0
    drop_after_apply: int = 0
    reject_custom_ids: set[str] = field(default_factory=set)
    item_errors: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ITEM_ERROR_KINDS, 0.0))

    def clear(self) -> None:
        """Reset every setting in place (references held by tests stay valid)."""
        self.update(SimulatorFaults().to_json())

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (``reject_custom_ids`` sorted)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["reject_custom_ids"] = sorted(self.reject_custom_ids)
        data["item_errors"] = {kind: float(self.item_errors.get(kind, 0.0)) for kind in ITEM_ERROR_KINDS}
        return data

    def update(self, settings: Mapping[str, Any]) -> None:
        """Replace the given settings after validating all of them (nothing changes on error).

        Raises:
            ValueError: naming the first unknown or invalid setting.
        """
        staged: dict[str, Any] = {}
        known = {f.name for f in fields(self)}
        for name, value in settings.items():
            if name not in known:
                raise ValueError(f"unknown fault setting '{name}'")
            staged[name] = _checked_fault(name, value)
        for name, value in staged.items():
            setattr(self, name, value)


def _checked_item_errors(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"item_errors must be an object with any of the keys {list(ITEM_ERROR_KINDS)}")
    rates = dict.fromkeys(ITEM_ERROR_KINDS, 0.0)
    for kind, rate in value.items():
        if kind not in rates:
            raise ValueError(f"unknown item_errors kind '{kind}' (known: {', '.join(ITEM_ERROR_KINDS)})")
        if type(rate) not in (int, float) or not math.isfinite(rate) or not 0 <= rate <= 1:
            raise ValueError(f"item_errors.{kind} must be a probability between 0 and 1")
        rates[kind] = float(rate)
    return rates


def _checked_fault(name: str, value: Any) -> Any:
    if name == "item_errors":
        return _checked_item_errors(value)
    if name == "reject_custom_ids":
        if not isinstance(value, list | set | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError("reject_custom_ids must be a list of strings")
        return set(value)
    if name in ("fail_status", "failure_status"):
        allowed = _FAIL_STATUSES if name == "fail_status" else _RANDOM_FAILURE_STATUSES
        if type(value) is not int or value not in allowed:
            raise ValueError(f"{name} must be one of {sorted(allowed)}")
        return value
    if name in ("latency_ms", "failure_rate"):
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0")
        if name == "failure_rate" and value > 1:
            raise ValueError("failure_rate must be between 0 and 1")
        return float(value)
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an integer >= 0")
    return value


@dataclass
class _Stats:
    requests: dict[str, int] = field(default_factory=lambda: {UPDATE: 0, MASS_UPDATE: 0})
    status_codes: dict[str, int] = field(default_factory=dict)
    profiles_received: int = 0
    profiles_applied: int = 0
    profiles_rejected: int = 0
    max_updates_per_custom_id: int = 0
    too_many_requests: int = 0
    connections_dropped: int = 0
    item_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ITEM_ERROR_KINDS, 0))


# --- the simulator -------------------------------------------------------------------------


class BatchSimulator:
    """An in-memory Batch CEP Profile API served by aiohttp.

    Args:
        credentials: project key -> REST API key accepted for it.
        rate_limit: Enforce Batch's per-endpoint token buckets (429 when exceeded).
        clock: Monotonic clock, in seconds, driving the rate-limit buckets.
        seed: Seed of the RNG behind ``SimulatorFaults.failure_rate`` and the random kinds of
            ``SimulatorFaults.item_errors``.
    """

    def __init__(
        self,
        credentials: Mapping[str, str],
        *,
        rate_limit: bool = True,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        keep_every: int = 1,
    ) -> None:
        if keep_every < 1:
            raise ValueError(f"keep_every must be at least 1, not {keep_every}")
        self._keep_every = keep_every
        # custom_id -> updates, for ids whose attributes are not kept (keep_every > 1).
        self._counted: dict[str, dict[str, int]] = {}
        self._credentials = dict(credentials)
        self._rate_limit = rate_limit
        self._clock = clock
        self._seed = seed
        self._rng = random.Random(seed)
        # Guards every store and stats mutation so another thread (SimulatorThread users)
        # can inspect safely; never held across an await.
        self._lock = threading.Lock()
        self._projects: dict[str, dict[str, _Profile]] = {}
        self._buckets: dict[tuple[str, str], _TokenBucket] = {}
        self._stats = _Stats()
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None  # set while serving
        self.faults = SimulatorFaults()
        # The Audience API (sync/dev/audiences.py): its own routes, faults and state.
        self.audiences = AudienceAPI(self._authenticated, rate_limit=rate_limit, clock=clock, seed=seed)
        self.app = self._build_app()

    # -- public in-process API ------------------------------------------------------------

    def profiles(self, project_key: str) -> dict[str, dict[str, Any]]:
        """custom_id -> attributes (plain JSON values, dates as ISO strings) of one project."""
        with self._lock:
            store = self._projects.get(project_key, {})
            return {cid: profile.plain_attributes() for cid, profile in store.items()}

    def profile_records(self, project_key: str) -> dict[str, dict[str, Any]]:
        """custom_id -> ``{"attributes", "types", "updates", "events"}``, as served under ``/_sim/``."""
        with self._lock:
            store = self._projects.get(project_key, {})
            return {cid: profile.view() for cid, profile in store.items()}

    def write_as_app(self, project_key: str, custom_id: str, attributes: Mapping[str, Any]) -> None:
        """Write attributes to a profile as the app's SDK would: not through the API.

        Validated like an API item's ``attributes`` (``null`` deletes), but neither rate
        limited nor counted in the stats or the profile's ``updates``: a value the app owns,
        which a sync must not overwrite unless the warehouse changed it
        (``send: changed_attributes``, docs/changed-attributes.md).

        Raises:
            ValueError: An attribute Batch would refuse (the message says which and why).
        """
        errors: list[dict[str, Any]] = []
        ops = _validate_attributes(0, dict(attributes), errors)
        if errors:
            raise ValueError("; ".join(f"{error.get('attribute')}: {error['reason']}" for error in errors))
        with self._lock:
            store = self._projects.setdefault(project_key, {})
            profile = store.get(custom_id)
            if profile is None:
                profile = store[custom_id] = _Profile()
            profile.apply(ops)

    def stats(self) -> dict[str, Any]:
        """Totals since start or the last reset (keys described in the module docstring)."""
        with self._lock:
            stats = self._stats
            return {
                "requests": dict(stats.requests),
                "status_codes": dict(stats.status_codes),
                "profiles_received": stats.profiles_received,
                "profiles_applied": stats.profiles_applied,
                "profiles_rejected": stats.profiles_rejected,
                "max_updates_per_custom_id": stats.max_updates_per_custom_id,
                "too_many_requests": stats.too_many_requests,
                "connections_dropped": stats.connections_dropped,
                "profiles_stored": sum(len(store) for store in self._projects.values())
                + sum(len(counted) for counted in self._counted.values()),
                "item_errors": dict(stats.item_errors),
            }

    def reset(self) -> None:
        """Forget profiles, stats, faults and rate-limit state; re-seed the RNG."""
        with self._lock:
            self._projects.clear()
            self._counted.clear()
            self._buckets.clear()
            self._stats = _Stats()
            self._rng = random.Random(self._seed)
        self.faults.clear()
        self.audiences.reset()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 picks a free port) and return the base URL.

        Raises:
            RuntimeError: if this simulator is already serving.
        """
        if self._runner is not None:
            raise RuntimeError("the Batch simulator is already started")
        # No access log: the benchmark sends thousands of requests and tests stay quiet.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        self.base_url = None
        if runner is not None:
            await runner.cleanup()

    # -- HTTP plumbing ----------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY_BYTES, middlewares=[_json_not_found])
        app.router.add_get("/_sim/stats", self._handle_stats)
        app.router.add_get("/_sim/faults", self._handle_get_faults)
        app.router.add_post("/_sim/faults", self._handle_set_faults)
        app.router.add_post("/_sim/reset", self._handle_reset)
        app.router.add_get("/_sim/projects/{project_key}/profiles", self._handle_profiles_view)
        app.router.add_get("/_sim/projects/{project_key}/profiles/{custom_id:.+}", self._handle_profile_view)
        app.router.add_post("/{version}/profiles/update", functools.partial(self._handle_api, UPDATE))
        app.router.add_post("/{version}/profiles/mass-update", functools.partial(self._handle_api, MASS_UPDATE))
        self.audiences.add_routes(app)
        return app

    def _count_status(self, status: int) -> None:
        with self._lock:
            codes = self._stats.status_codes
            codes[str(status)] = codes.get(str(status), 0) + 1
            if status == 429:
                self._stats.too_many_requests += 1

    def _api_error(self, status: int, code: str, message: str) -> web.Response:
        self._count_status(status)
        return web.json_response({"error_code": code, "error_message": message}, status=status)

    def _injected_failure(self, status: int) -> web.Response:
        if status in _ERROR_BODIES:
            return self._api_error(status, *_ERROR_BODIES[status])
        # 502/504 come from a proxy in front of the API, not from Batch: HTML, no JSON.
        self._count_status(status)
        reason = "Bad Gateway" if status == 502 else "Gateway Timeout"
        return web.Response(
            status=status,
            text=f"<html><head><title>{status} {reason}</title></head><body>{reason}</body></html>",
            content_type="text/html",
        )

    def _authenticated(self, request: web.Request) -> bool:
        project_key = request.headers.get("X-Batch-Project")
        authorization = request.headers.get("Authorization", "")
        if not project_key or not authorization.startswith("Bearer "):
            return False
        expected = self._credentials.get(project_key)
        if expected is None:
            return False
        return hmac.compare_digest(authorization[len("Bearer ") :].encode(), expected.encode())

    async def _handle_api(self, endpoint: str, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._stats.requests[endpoint] += 1
        faults = self.faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
        if _VERSION.fullmatch(request.match_info["version"]) is None:
            return self._api_error(404, "ROUTE_NOT_FOUND", f"Unknown API version '{request.match_info['version']}'")
        if not self._authenticated(request):
            return self._api_error(401, "AUTHENTICATION_INVALID", "The Rest API Key is not valid for this project")
        project_key = request.headers["X-Batch-Project"]
        try:
            body = await request.read()
        except ConnectionResetError:
            # The client went away mid-body (timed out, interrupted): nothing to apply or answer.
            raise web.HTTPBadRequest(reason="connection lost while reading the body") from None
        try:
            items = _parse_items(body, _MAX_ITEMS[endpoint])
        except _Malformed as exc:
            return self._api_error(400, "MALFORMED_REQUEST", f"The request is malformed: {exc}")
        with self._lock:
            self._stats.profiles_received += len(items)

        if faults.fail_next > 0:
            faults.fail_next -= 1
            return self._injected_failure(faults.fail_status)
        if faults.failure_rate > 0 and self._rng.random() < faults.failure_rate:
            return self._injected_failure(faults.failure_status)
        if self._rate_limit and items and not self._take_tokens(project_key, endpoint, len(items)):
            return self._api_error(429, *_ERROR_BODIES[429])

        errors: list[dict[str, Any]] = []
        accepted: list[_Accepted] = []
        rejected_ids = frozenset(faults.reject_custom_ids)
        rates = {kind: float(faults.item_errors.get(kind, 0.0)) for kind in ITEM_ERROR_KINDS}
        inject = any(rates.values())
        injected = dict.fromkeys(ITEM_ERROR_KINDS, 0)
        for index, item in enumerate(items):
            outcome = _validate_item(index, item, rejected_ids, errors)
            if outcome is None:
                continue
            kind = self._injected_kind(outcome.custom_id, item, rates) if inject else None
            if kind is not None:
                errors.append(_injected_error(kind, index, item))
                injected[kind] += 1
                continue
            accepted.append(outcome)

        if faults.drop_before_apply > 0:
            faults.drop_before_apply -= 1
            return self._drop(request)
        rejected_count = len(items) - len(accepted)
        self._apply(project_key, accepted, rejected_count, injected)
        if faults.drop_after_apply > 0:
            faults.drop_after_apply -= 1
            return self._drop(request)

        self._count_status(202)
        if errors:
            return web.json_response({"code": "SUCCESS_WITH_PARTIAL_ERRORS", "errors": errors}, status=202)
        return web.json_response({"code": "SUCCESS"}, status=202)

    def _take_tokens(self, project_key: str, endpoint: str, count: int) -> bool:
        with self._lock:
            bucket = self._buckets.get((project_key, endpoint))
            if bucket is None:
                rate, capacity = _RATE_LIMITS[endpoint]
                bucket = self._buckets[(project_key, endpoint)] = _TokenBucket(rate, capacity, self._clock)
            return bucket.try_take(count)

    def _injected_kind(self, custom_id: str | None, item: dict[str, Any], rates: Mapping[str, float]) -> str | None:
        """The kind of error to inject into one valid item, or None (see ``SimulatorFaults.item_errors``)."""
        if (
            custom_id is not None
            and rates["value"] > 0
            and _value_refused(custom_id, item.get("attributes"), rates["value"])
        ):
            return "value"
        for kind in _RANDOM_ITEM_ERROR_KINDS:
            # Draw only for the kinds switched on: the RNG sequence behind failure_rate stays
            # what it was for a run without item errors.
            if rates[kind] > 0 and self._rng.random() < rates[kind]:
                return kind
        return None

    def _apply(
        self, project_key: str, accepted: list[_Accepted], rejected_count: int, injected: Mapping[str, int]
    ) -> None:
        with self._lock:
            store = self._projects.setdefault(project_key, {})
            counted = self._counted.setdefault(project_key, {})
            keep_every = self._keep_every
            stats = self._stats
            for kind, count in injected.items():
                stats.item_errors[kind] += count
            most = stats.max_updates_per_custom_id
            for custom_id, ops, events in accepted:
                if custom_id is None:
                    continue  # installation-identified: acknowledged, not modelled (shape unconfirmed)
                if keep_every > 1 and not kept(custom_id, keep_every):
                    updates = counted[custom_id] = counted.get(custom_id, 0) + 1
                    most = max(most, updates)
                    continue
                profile = store.get(custom_id)
                if profile is None:
                    profile = store[custom_id] = _Profile()
                profile.apply(ops)
                if events:
                    if profile.events is None:
                        profile.events = []
                    profile.events.extend(events)  # freshly parsed from this request: no copy needed
                profile.updates += 1
                if profile.updates > most:
                    most = profile.updates
            stats.max_updates_per_custom_id = most
            stats.profiles_applied += len(accepted)
            stats.profiles_rejected += rejected_count

    def _drop(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._stats.connections_dropped += 1
        transport = request.transport
        if transport is not None:
            transport.close()
        # aiohttp discards a response written to a closed transport: the client sees a disconnect.
        return web.Response(status=202)

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_json())

    async def _handle_set_faults(self, request: web.Request) -> web.Response:
        try:
            settings = json.loads(await request.read(), parse_constant=_reject_constant)
            if not isinstance(settings, dict):
                raise ValueError("fault settings must be a JSON object")
            self.faults.update(settings)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return web.json_response({"error_code": "MALFORMED_REQUEST", "error_message": str(exc)}, status=400)
        return web.json_response(self.faults.to_json())

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _handle_profiles_view(self, request: web.Request) -> web.Response:
        return web.json_response({"profiles": self.profile_records(request.match_info["project_key"])})

    async def _handle_profile_view(self, request: web.Request) -> web.Response:
        project_key = request.match_info["project_key"]
        custom_id = request.match_info["custom_id"]
        with self._lock:
            profile = self._projects.get(project_key, {}).get(custom_id)
            record = None if profile is None else profile.view()
            updates = self._counted.get(project_key, {}).get(custom_id)
        if record is None and updates is not None:
            return web.json_response({"kept": False, "updates": updates})
        if record is None:
            return web.json_response(
                {"error_code": "PROFILE_NOT_FOUND", "error_message": "No such profile in this project"},
                status=404,
            )
        return web.json_response(record)


def _parse_items(body: bytes, max_items: int) -> list[dict[str, Any]]:
    try:
        items = json.loads(body, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _Malformed("body is not valid JSON") from exc
    if type(items) is not list:
        raise _Malformed("body must be a JSON array of profiles")
    if len(items) > max_items:
        raise _Malformed(f"{len(items)} profiles in one call, at most {max_items} allowed")
    for index, item in enumerate(items):
        if type(item) is not dict:
            raise _Malformed(f"item {index} is not a JSON object")
    return items


@web.middleware
async def _json_not_found(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    # Unknown routes answer like Batch's 1.x API did (ROUTE_NOT_FOUND), in JSON, so a
    # client's error parsing sees one body shape.
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPNotFound:
        return web.json_response(
            {"error_code": "ROUTE_NOT_FOUND", "error_message": f"No route for {request.method} {request.path}"},
            status=404,
        )
    return response


# --- running it -------------------------------------------------------------------------------


class SimulatorThread:
    """Run a :class:`BatchSimulator` on its own event loop in a background thread.

    For synchronous callers (the CLI demo, subprocess tests)::

        with SimulatorThread(BatchSimulator({"project": "key"})) as running:
            run_sync_against(running.base_url)
            assert running.simulator.profiles("project")

    In-process inspection (``simulator.profiles()``, ``stats()``) is safe from the calling
    thread: the simulator takes a lock around every mutation and copies what it returns.
    """

    def __init__(self, simulator: BatchSimulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = simulator
        self.base_url = ""
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Start serving; return once the server accepts connections.

        Raises:
            RuntimeError: if already started, or the server did not come up within 30 s.
            OSError: if the address cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("the simulator thread is already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="batch-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the Batch simulator did not start within 30 s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error

    def stop(self) -> None:
        """Stop the server and its thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed on its own
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None
        self._loop = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                self.base_url = loop.run_until_complete(self.simulator.start(self._host, self._port))
            except BaseException as exc:  # handed to the starting thread, which re-raises it
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self.simulator.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def kept(custom_id: str, keep_every: int) -> bool:
    """Whether a simulator started with ``keep_every`` keeps this id's attributes (CRC-32 of its UTF-8)."""
    return keep_every <= 1 or zlib.crc32(custom_id.encode("utf-8", "surrogatepass")) % keep_every == 0


def serve(
    host: str, port: int, credentials: Mapping[str, str], *, rate_limit: bool = True, keep_every: int = 1
) -> None:
    """Serve a simulator until SIGINT or SIGTERM (blocking; used by ``cepsync simulator``).

    Args:
        host: Interface to bind.
        port: Port to bind (0 picks a free one; the URL is logged).
        credentials: project key -> REST API key.
        rate_limit: Enforce Batch's rate limits.
        keep_every: Keep the attributes of one custom id in this many (:func:`kept`).

    Raises:
        ConfigError: The address cannot be listened on (a port in use or out of range, a
            host that does not resolve or is not this machine's), in one line.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range: give 0 to 65535 (0 picks a free one)", field="--port")
    if keep_every < 1:
        raise ConfigError(f"--keep-every {keep_every}: give 1 (keep every profile) or more", field="--keep-every")
    asyncio.run(_serve(host, port, credentials, rate_limit=rate_limit, keep_every=keep_every))


def _listen_error(host: str, port: int, error: OSError) -> ConfigError:
    """Why ``host:port`` cannot be listened on, in words a user can act on."""
    where = f"{host}:{port}"
    if isinstance(error, socket.gaierror):
        return ConfigError(
            f"cannot listen on {where}: host {host!r} does not resolve ({error.strerror})", field="--host"
        )
    if error.errno == errno.EADDRINUSE:
        return ConfigError(
            f"cannot listen on {where}: the port is already in use (another simulator?); stop it or pick another "
            "--port",
            field="--port",
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"cannot listen on {where}: {host} is not an address of this machine", field="--host")
    if error.errno == errno.EACCES:
        return ConfigError(
            f"cannot listen on {where}: permission denied (ports below 1024 need privileges); pick another --port",
            field="--port",
        )
    return ConfigError(f"cannot listen on {where}: {error.strerror or error}", field="--host")


async def _serve(host: str, port: int, credentials: Mapping[str, str], *, rate_limit: bool, keep_every: int) -> None:
    simulator = BatchSimulator(credentials, rate_limit=rate_limit, keep_every=keep_every)
    try:
        url = await simulator.start(host, port)
    except OSError as error:  # socket.gaierror included
        raise _listen_error(host, port, error) from None
    except (OverflowError, UnicodeError) as error:  # a port the OS cannot take; a host IDNA cannot encode
        raise ConfigError(f"cannot listen on {host}:{port}: {error}", field="--host") from None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Signal handlers can only be installed from the main thread.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stopping.set)
            installed.append(signum)
    # Project keys are identifiers, not secrets, but the API keys are never logged.
    _log.info(
        "batch_simulator_listening", url=url, projects=len(credentials), rate_limit=rate_limit, keep_every=keep_every
    )
    try:
        await stopping.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await simulator.stop()
        _log.info("batch_simulator_stopped", url=url)
