"""The Batch simulator's Audience API (``/audiences/create``, ``/update``, ``/view``), in memory.

It answers as docs/batch-api.md ("Audiences") records Batch's pages, with the limits cepsync
assumes where Batch publishes none (:mod:`sync.batch.audiences`):

* ``POST /{version}/audiences/create`` ``{"name", "type": "custom_ids", "display_name"?}``: 202
  ``{"indexing_token"}``. A name of ``[A-Za-z0-9_-]{1,255}`` (case-sensitive); a name that
  exists is a 400 ``AUDIENCE_ALREADY_EXISTS`` (Batch's answer there is not documented).
* ``POST /{version}/audiences/update`` ``{"name", "ids": [{"action": "add"|"remove", "id"}]}``:
  at most 10,000 ids (else 400), each id a non-empty string of at most 1,024 characters; the
  last action given for an id wins. 202 ``{"indexing_token"}``. An unknown audience is a 400
  ``AUDIENCE_NOT_FOUND``.
* ``GET /{version}/audiences/view?name=...[&indexing_token=...]``: 200 ``{"name",
  "display_name", "type": "CUSTOM_ID", "nb_ids", "indexing_state", "created", "updated"}``;
  404 for an unknown audience, 400 for an unknown token. An update is *indexed*
  ``indexing_delay_seconds`` after it was accepted (``IN_PROGRESS`` until then, ``APPLIED``
  after): only then do its ids count in ``nb_ids`` and the members shown below.
* 429 ``TOO_MANY_REQUESTS`` from a token bucket per project key counted in ids (creates and
  views cost none), at :data:`sync.batch.audiences.IDS_PER_SECOND` with a capacity of
  :data:`sync.batch.audiences.BURST_IDS`.

Faults (``GET``/``POST /_sim/audiences/faults``, or :attr:`AudienceAPI.faults` in process),
applied to the three routes in this order: ``latency_ms``; ``fail_next`` (answer
``fail_status``, one of 429/500/502/503/504); ``failure_rate`` (seeded RNG, answering
``failure_status``, one of 500/502/503/504); the rate limit; ``drop_before_apply`` (close the
connection, nothing done); the call; ``drop_after_apply`` (done, then closed unanswered).
``indexing_delay_seconds`` (default 0.05) is how long an update takes to index.

Inspection (no auth): ``GET /_sim/projects/{project_key}/audiences`` lists the audiences;
``GET /_sim/projects/{project_key}/audiences/{name}`` gives ``{"name", "display_name",
"members": [sorted ids], "pending": n, "updates": n}`` (404 if unknown).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from sync.batch.audiences import BURST_IDS, IDS_PER_SECOND, MAX_IDS_PER_CALL

_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,255}")
_VERSION: Final = re.compile(r"2\.[0-9]+")
_MAX_ID: Final = 1024
_FAIL_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
_RANDOM_FAILURE_STATUSES: Final = frozenset({500, 502, 503, 504})
_BODIES: Final = {
    429: ("TOO_MANY_REQUESTS", "Too many requests: wait a few seconds before retrying"),
    500: ("SERVER_ERROR", "Unexpected error"),
    502: ("BAD_GATEWAY", "Bad gateway"),
    503: ("MAINTENANCE_ERROR", "Batch's services are under maintenance"),
    504: ("GATEWAY_TIMEOUT", "Gateway timeout"),
}


class _Refused(Exception):
    """A 4xx answer: status, error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class AudienceFaults:
    """Fault settings of the audience routes (see the module docstring)."""

    latency_ms: float = 0.0
    fail_next: int = 0
    fail_status: int = 503
    failure_rate: float = 0.0
    failure_status: int = 503
    drop_before_apply: int = 0
    drop_after_apply: int = 0
    indexing_delay_seconds: float = 0.05

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def clear(self) -> None:
        self.update(AudienceFaults().to_json())

    def update(self, settings: Mapping[str, Any]) -> None:
        """Replace the given settings after validating all of them (nothing changes on error).

        Raises:
            ValueError: naming the first unknown or invalid setting.
        """
        staged: dict[str, Any] = {}
        for name, value in settings.items():
            if name not in {f.name for f in fields(self)}:
                raise ValueError(f"unknown audience fault setting '{name}'")
            if name in ("fail_status", "failure_status"):
                allowed = _FAIL_STATUSES if name == "fail_status" else _RANDOM_FAILURE_STATUSES
                if type(value) is not int or value not in allowed:
                    raise ValueError(f"{name} must be one of {sorted(allowed)}")
            elif name in ("latency_ms", "failure_rate", "indexing_delay_seconds"):
                if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"{name} must be a finite number >= 0")
                if name == "failure_rate" and value > 1:
                    raise ValueError("failure_rate must be between 0 and 1")
                value = float(value)
            elif type(value) is not int or value < 0:
                raise ValueError(f"{name} must be an integer >= 0")
            staged[name] = value
        for name, value in staged.items():
            setattr(self, name, value)


@dataclass
class _Update:
    token: str
    ready_at: float
    actions: dict[str, bool]  # id -> True: add, False: remove (the last action given)


@dataclass
class _Audience:
    display_name: str | None
    created: str
    updated: str
    members: set[str] = field(default_factory=set)
    # Accepted updates not yet indexed, oldest first; tokens of every update ever accepted.
    pending: list[_Update] = field(default_factory=list)
    tokens: dict[str, _Update] = field(default_factory=dict)

    def index(self, now: float) -> None:
        """Apply, in order, the updates whose indexing time has come."""
        while self.pending and self.pending[0].ready_at <= now:
            update = self.pending.pop(0)
            for custom_id, add in update.actions.items():
                if add:
                    self.members.add(custom_id)
                else:
                    self.members.discard(custom_id)


class _Bucket:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tokens = float(BURST_IDS)
        self._stamp = clock()

    def try_take(self, count: int) -> bool:
        now = self._clock()
        self._tokens = min(float(BURST_IDS), self._tokens + max(0.0, now - self._stamp) * IDS_PER_SECOND)
        self._stamp = now
        if count > self._tokens + 1e-9:
            return False
        self._tokens -= count
        return True


class AudienceAPI:
    """The audience routes of one :class:`sync.dev.simulator.BatchSimulator`.

    Args:
        authenticated: The simulator's check of a request's keys.
        rate_limit: Enforce the assumed id rate (429 past it).
        clock: Monotonic clock (rate limit, indexing delay).
        seed: Seed of the RNG behind ``failure_rate`` and the tokens.
    """

    def __init__(
        self, authenticated: Callable[[web.Request], bool], *, rate_limit: bool, clock: Callable[[], float], seed: int
    ) -> None:
        self._authenticated = authenticated
        self._rate_limit = rate_limit
        self._clock = clock
        self._seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._projects: dict[str, dict[str, _Audience]] = {}
        self._buckets: dict[str, _Bucket] = {}
        self.faults = AudienceFaults()
        self.calls: dict[str, int] = {"create": 0, "update": 0, "view": 0}
        self.status_codes: dict[str, int] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/_sim/audiences/faults", self._get_faults)
        app.router.add_post("/_sim/audiences/faults", self._set_faults)
        app.router.add_get("/_sim/projects/{project_key}/audiences", self._list_view)
        app.router.add_get("/_sim/projects/{project_key}/audiences/{name}", self._audience_view)
        app.router.add_post("/{version}/audiences/create", self._create)
        app.router.add_post("/{version}/audiences/update", self._update)
        app.router.add_get("/{version}/audiences/view", self._view)

    # -- in process -----------------------------------------------------------------------------

    def members(self, project_key: str, name: str) -> set[str] | None:
        """The indexed members of an audience (None when it does not exist)."""
        with self._lock:
            audience = self._projects.get(project_key, {}).get(name)
            if audience is None:
                return None
            audience.index(self._clock())
            return set(audience.members)

    def describe(self, project_key: str, name: str) -> dict[str, Any] | None:
        """What ``/_sim/projects/{key}/audiences/{name}`` serves."""
        with self._lock:
            audience = self._projects.get(project_key, {}).get(name)
            if audience is None:
                return None
            audience.index(self._clock())
            return {
                "name": name,
                "display_name": audience.display_name,
                "members": sorted(audience.members),
                "pending": len(audience.pending),
                "updates": len(audience.tokens),
            }

    def put_members(self, project_key: str, name: str, members: set[str]) -> None:
        """Create or overwrite an audience's indexed members directly (tests: someone else's edits)."""
        with self._lock:
            now = _now()
            audience = self._projects.setdefault(project_key, {}).setdefault(name, _Audience(None, now, now))
            audience.members = set(members)

    def delete(self, project_key: str, name: str) -> None:
        """Forget an audience (tests: deleted in Batch's dashboard)."""
        with self._lock:
            self._projects.get(project_key, {}).pop(name, None)

    def reset(self) -> None:
        with self._lock:
            self._projects.clear()
            self._buckets.clear()
            self._rng = random.Random(self._seed)
            self.calls = dict.fromkeys(self.calls, 0)
            self.status_codes = {}
        self.faults.clear()

    # -- the API routes ---------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        return await self._handle("create", request)

    async def _update(self, request: web.Request) -> web.StreamResponse:
        return await self._handle("update", request)

    async def _view(self, request: web.Request) -> web.StreamResponse:
        return await self._handle("view", request)

    async def _handle(self, action: str, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.calls[action] += 1
        faults = self.faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
        if _VERSION.fullmatch(request.match_info["version"]) is None:
            return self._error(404, "ROUTE_NOT_FOUND", f"Unknown API version '{request.match_info['version']}'")
        if not self._authenticated(request):
            return self._error(401, "AUTHENTICATION_INVALID", "The Rest API Key is not valid for this project")
        project_key = request.headers["X-Batch-Project"]
        try:
            body = await request.read() if action != "view" else b""
        except ConnectionResetError:
            raise web.HTTPBadRequest(reason="connection lost while reading the body") from None
        if faults.fail_next > 0:
            faults.fail_next -= 1
            return self._error(faults.fail_status, *_BODIES[faults.fail_status])
        if faults.failure_rate > 0 and self._rng.random() < faults.failure_rate:
            return self._error(faults.failure_status, *_BODIES[faults.failure_status])
        try:
            if action == "view":
                answer: dict[str, Any] = self._do_view(project_key, request.query)
                status = 200
            else:
                parsed = _json_object(body)
                actions: dict[str, bool] = {}
                if action == "update":
                    actions = _actions(parsed)
                    if self._rate_limit and actions and not self._take(project_key, len(actions)):
                        return self._error(429, *_BODIES[429])
                if faults.drop_before_apply > 0:
                    faults.drop_before_apply -= 1
                    return self._drop(request)
                answer = (
                    self._do_create(project_key, parsed)
                    if action == "create"
                    else self._do_update(project_key, parsed, actions)
                )
                status = 202
        except _Refused as refused:
            return self._error(refused.status, refused.code, refused.message)
        if action != "view" and faults.drop_after_apply > 0:
            faults.drop_after_apply -= 1
            return self._drop(request)
        self._count(status)
        return web.json_response(answer, status=status)

    def _do_create(self, project_key: str, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        if body.get("type") != "custom_ids":
            raise _Refused(400, "MALFORMED_REQUEST", "type must be 'custom_ids'")
        display = body.get("display_name")
        if display is not None and not isinstance(display, str):
            raise _Refused(400, "MALFORMED_REQUEST", "display_name must be a string")
        with self._lock:
            audiences = self._projects.setdefault(project_key, {})
            if name in audiences:
                raise _Refused(400, "AUDIENCE_ALREADY_EXISTS", f"An audience named {name!r} already exists")
            now = _now()
            audience = audiences[name] = _Audience(display, now, now)
            return {"indexing_token": self._accept(audience, {})}

    def _do_update(self, project_key: str, body: dict[str, Any], actions: dict[str, bool]) -> dict[str, Any]:
        name = _name(body)
        with self._lock:
            audience = self._projects.get(project_key, {}).get(name)
            if audience is None:
                raise _Refused(400, "AUDIENCE_NOT_FOUND", f"No audience named {name!r}")
            audience.updated = _now()
            return {"indexing_token": self._accept(audience, actions)}

    def _do_view(self, project_key: str, query: Mapping[str, str]) -> dict[str, Any]:
        name = query.get("name")
        if not name:
            raise _Refused(400, "MALFORMED_REQUEST", "the query parameter 'name' is required")
        token = query.get("indexing_token")
        with self._lock:
            audience = self._projects.get(project_key, {}).get(name)
            if audience is None:
                raise _Refused(404, "AUDIENCE_NOT_FOUND", f"No audience named {name!r}")
            audience.index(self._clock())
            if token is not None:
                update = audience.tokens.get(token)
                if update is None:
                    raise _Refused(400, "INDEXING_TOKEN_NOT_FOUND", "Unknown indexing token for this audience")
            else:
                update = audience.pending[-1] if audience.pending else None
            state = "IN_PROGRESS" if update is not None and update in audience.pending else "APPLIED"
            return {
                "name": name,
                "display_name": audience.display_name,
                "type": "CUSTOM_ID",
                "nb_ids": len(audience.members),
                "indexing_state": state,
                "created": audience.created,
                "updated": audience.updated,
            }

    def _accept(self, audience: _Audience, actions: dict[str, bool]) -> str:
        """Queue an update for indexing (lock held); its token."""
        token = f"{self._rng.getrandbits(128):032x}"
        update = _Update(token, self._clock() + self.faults.indexing_delay_seconds, actions)
        audience.pending.append(update)
        audience.tokens[token] = update
        return token

    def _take(self, project_key: str, count: int) -> bool:
        with self._lock:
            bucket = self._buckets.get(project_key)
            if bucket is None:
                bucket = self._buckets[project_key] = _Bucket(self._clock)
            return bucket.try_take(count)

    # -- plumbing ---------------------------------------------------------------------------------

    def _count(self, status: int) -> None:
        with self._lock:
            self.status_codes[str(status)] = self.status_codes.get(str(status), 0) + 1

    def _error(self, status: int, code: str, message: str) -> web.Response:
        self._count(status)
        return web.json_response({"error_code": code, "error_message": message}, status=status)

    def _drop(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=202)

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_json())

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            settings = json.loads(await request.read())
            if not isinstance(settings, dict):
                raise ValueError("fault settings must be a JSON object")
            self.faults.update(settings)
        except ValueError as exc:
            return web.json_response({"error_code": "MALFORMED_REQUEST", "error_message": str(exc)}, status=400)
        return web.json_response(self.faults.to_json())

    async def _list_view(self, request: web.Request) -> web.Response:
        with self._lock:
            names = sorted(self._projects.get(request.match_info["project_key"], {}))
        return web.json_response({"audiences": names})

    async def _audience_view(self, request: web.Request) -> web.Response:
        described = self.describe(request.match_info["project_key"], request.match_info["name"])
        if described is None:
            return web.json_response(
                {"error_code": "AUDIENCE_NOT_FOUND", "error_message": "No such audience in this project"}, status=404
            )
        return web.json_response(described)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        raise _Refused(400, "MALFORMED_REQUEST", "body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise _Refused(400, "MALFORMED_REQUEST", "body must be a JSON object")
    return parsed


def _name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _Refused(400, "MALFORMED_REQUEST", "name must be 1-255 characters of A-Z, a-z, 0-9, _ and -")
    return name


def _actions(body: dict[str, Any]) -> dict[str, bool]:
    """An update's ids as id -> add, the last action given for an id winning (Batch's rule)."""
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise _Refused(400, "MALFORMED_REQUEST", "ids must be an array")
    if len(ids) > MAX_IDS_PER_CALL:
        raise _Refused(400, "MALFORMED_REQUEST", f"{len(ids)} ids in one call, at most {MAX_IDS_PER_CALL} allowed")
    actions: dict[str, bool] = {}
    for index, item in enumerate(ids):
        if not isinstance(item, dict) or item.get("action") not in ("add", "remove"):
            raise _Refused(400, "MALFORMED_REQUEST", f"ids[{index}] needs an action 'add' or 'remove'")
        custom_id = item.get("id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > _MAX_ID:
            raise _Refused(400, "MALFORMED_REQUEST", f"ids[{index}].id must be a string of 1 to {_MAX_ID} characters")
        actions.pop(custom_id, None)
        actions[custom_id] = item["action"] == "add"
    return actions
