"""Batch's CEP Audience API (v2): an audience of Custom IDs, its members added and removed.

Contract (docs/batch-api.md, "Audiences"; doc.batch.com, CEP API, Audiences):

* ``POST {base}/{version}/audiences/create`` with ``{"name", "type": "custom_ids",
  "display_name"?}``; ``POST .../audiences/update`` with ``{"name", "ids": [{"action": "add" |
  "remove", "id"}]}``, at most 10,000 ids a call. Both answer ``202 {"indexing_token": ...}``.
* ``GET .../audiences/view?name=...&indexing_token=...`` answers 200 with the audience
  (``nb_ids``, ``type``) and the ``indexing_state`` of the update that returned the token:
  ``IN_PROGRESS``, ``APPLIED``, or ``REPLACED`` (the audience was replaced since). An audience
  that does not exist is a 404.
* 401/403, 429, 5xx, timeouts and dropped connections are read as the profile client reads
  them (:mod:`sync.batch.client`): this module uses that client's session, headers, probe,
  backoff with full jitter, attempt bounds, outage detection and redactor, so an activation
  has one way of talking to Batch.

Batch publishes no rate limit for these endpoints: the pace here (:data:`IDS_PER_SECOND`,
:data:`BURST_IDS`) is our assumption, a token bucket counted in ids per project key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

from sync.batch.answers import error_details, parse_retry_after, quote
from sync.batch.client import (
    RATE_LIMITED_ATTEMPTS_FACTOR,
    TRANSIENT_STATUSES,
    BatchClient,
    _Response,
    _transport_errors,
)
from sync.batch.ratelimit import RATE_HEADROOM, ProfileRateLimiter, RateLimitWaitTooLong
from sync.errors import BatchAuthError, BatchContractError, ConfigError, TransientError

# Confirmed by Batch's pages: "Supports up to 10,000 elements" per update call.
MAX_IDS_PER_CALL: Final = 10_000
# Assumed (Batch publishes none for audiences): the Profile API's mass-update pace, counted
# in ids, with a bucket of two full calls.
IDS_PER_SECOND: Final = 10_000.0
BURST_IDS: Final = 2 * MAX_IDS_PER_CALL
# The indexing states of Batch's view answer that end the wait for a token.
FINAL_STATES: Final = frozenset({"APPLIED", "REPLACED"})

# One bucket per project key (hashed), shared by every activation of the process.
_LIMITERS: dict[bytes, ProfileRateLimiter] = {}


class AudienceCallFailed(TransientError):
    """An audience call still failed after its retries (or the deadline came first)."""


@dataclass(frozen=True)
class AudienceView:
    """What ``/audiences/view`` says of an audience (and of one update, given its token)."""

    name: str
    type: str | None
    nb_ids: int | None
    indexing_state: str | None


@dataclass
class CallStats:
    """What the calls of one :class:`AudienceClient` cost, for the run record."""

    calls: int = 0
    attempts: int = 0
    rate_limited: int = 0
    wait_seconds: float = 0.0


class AudienceClient:
    """The Audience API of one activation's audience, through the activation's :class:`BatchClient`.

    Use inside ``async with client``: the session is the profile client's.

    Args:
        client: The activation's Batch client (entered).
        name: The audience name.
    """

    def __init__(self, client: BatchClient, name: str) -> None:
        self._client = client
        self.name = name
        self.stats = CallStats()

    def url(self, action: str) -> str:
        dest = self._client._destination
        return f"{dest.base_url}/{dest.api_version}/audiences/{action}"

    # -- the three calls ---------------------------------------------------------------------

    async def view(self, token: str | None = None, *, deadline: float | None) -> AudienceView | None:
        """The audience (and the indexing state of ``token``'s update), or None when it does not exist."""
        query = {"name": self.name} | ({"indexing_token": token} if token else {})
        response = await self._call("GET", "view", query=query, ids=0, deadline=deadline, not_found=True)
        if response.status == 404:
            return None
        data = self._json_object(response, "view")
        count = data.get("nb_ids")
        kind, state = data.get("type"), data.get("indexing_state")
        return AudienceView(
            name=str(data.get("name", self.name)),
            type=kind if isinstance(kind, str) else None,
            nb_ids=count if isinstance(count, int) and not isinstance(count, bool) else None,
            indexing_state=state.upper() if isinstance(state, str) else None,
        )

    async def create(self, display_name: str, *, deadline: float | None) -> str | None:
        """Create the audience (type ``custom_ids``); its indexing token.

        Raises:
            ConfigError: Batch refused to create it (a 4xx other than 401/403/429), with its words.
        """
        body = {"name": self.name, "type": "custom_ids", "display_name": display_name}
        response = await self._call("POST", "create", body=body, ids=0, deadline=deadline, refused_ok=True)
        if response.status != 202:
            raise ConfigError(
                f"Batch refused to create the audience {self.name!r}: HTTP {response.status}"
                f"{error_details(response.body, self._client._scrub)}; create it in Batch's dashboard "
                "(type: Custom IDs) or check the name and the REST API key's rights",
                source=f"activation '{self._client._activation}'",
                field="audience",
            )
        return self._token(response, "create")

    async def update(self, adds: Sequence[str], removes: Sequence[str], *, deadline: float | None) -> str | None:
        """Add and remove ids in one call (at most :data:`MAX_IDS_PER_CALL`); its indexing token, if Batch gave one.

        Raises:
            AudienceCallFailed: Still failing after the retries, or the deadline came first:
                Batch may or may not have applied it.
            ValueError: More ids than one call takes.
        """
        count = len(adds) + len(removes)
        if count > MAX_IDS_PER_CALL:
            raise ValueError(f"{count} ids in one audience call; Batch takes at most {MAX_IDS_PER_CALL}")
        ids = [{"action": "add", "id": custom_id} for custom_id in adds]
        ids += [{"action": "remove", "id": custom_id} for custom_id in removes]
        response = await self._call(
            "POST", "update", body={"name": self.name, "ids": ids}, ids=count, deadline=deadline
        )
        return self._token(response, "update")

    # -- one call, with its retries -----------------------------------------------------------

    async def _call(
        self,
        method: str,
        action: str,
        *,
        ids: int,
        deadline: float | None,
        body: Mapping[str, object] | None = None,
        query: dict[str, str] | None = None,
        not_found: bool = False,
        refused_ok: bool = False,
    ) -> _Response:
        """Send one call until Batch takes it; 2xx (or 404 with ``not_found``, a 4xx with ``refused_ok``).

        Raises:
            BatchAuthError: 401/403.
            BatchContractError: Any other 4xx (unless allowed above).
            BatchUnreachable: The host cannot be reached or does not answer (the client's rule).
            AudienceCallFailed: The retries or the deadline ran out.
        """
        client = self._client
        url = self.url(action) + (f"?{urlencode(query)}" if query else "")
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() if body is not None else None
        await client._ensure_answering(deadline)
        self.stats.calls += 1
        failures = rate_limited = 0
        max_attempts = client._destination.max_attempts
        while True:
            remaining = client._remaining(deadline)
            if ids and client._destination.rate_limit:
                try:
                    self.stats.wait_seconds += await self._limiter().acquire(ids, max_wait=remaining)
                except RateLimitWaitTooLong as error:
                    raise AudienceCallFailed(f"audience {action}: deadline reached: {error}") from None
                remaining = client._remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise AudienceCallFailed(f"audience {action}: deadline reached before the next attempt")
            timeout = client._destination.request_timeout_seconds
            timeout = timeout if remaining is None else min(timeout, remaining)
            self.stats.attempts += 1
            try:
                response = await self._send(method, url, payload, timeout)
            except _transport_errors() as error:
                problem = client._describe(error)
                client._count_unanswered(error, problem, url, timeout)
                status, retry_after = None, None
            else:
                client._connect_failures = client._silent_attempts = 0
                status, retry_after = response.status, response.retry_after
                if 200 <= status < 300 or (status == 404 and not_found):
                    return response
                if status in (401, 403):
                    raise self._auth_error(response, action)
                if status not in TRANSIENT_STATUSES:
                    if refused_ok and 400 <= status < 500:
                        return response
                    raise BatchContractError(
                        f"activation '{client._activation}': Batch answered {status} to audiences/{action} "
                        f"for audience {self.name!r}{error_details(response.body, client._scrub)}"
                    )
                problem = f"HTTP {status}{error_details(response.body, client._scrub)}"
            if status == 429:
                rate_limited += 1
                self.stats.rate_limited += 1
                exhausted = rate_limited >= RATE_LIMITED_ATTEMPTS_FACTOR * max_attempts
            else:
                failures += 1
                exhausted = failures >= max_attempts
            if exhausted:
                raise AudienceCallFailed(
                    f"audience {action} of {self.name!r} failed after {failures + rate_limited} attempt(s) "
                    f"(last: {problem})"
                )
            wait = client._backoff(failures + rate_limited, retry_after)
            left = client._remaining(deadline)
            if left is not None and wait >= left:
                raise AudienceCallFailed(f"audience {action}: deadline reached, no time left for a backoff")
            client._log.warning(
                "batch_audience_retry", action=action, status=status, problem=problem, wait_seconds=round(wait, 3)
            )
            await client._sleep(wait)
            self.stats.wait_seconds += wait

    async def _send(self, method: str, url: str, payload: bytes | None, timeout_seconds: float) -> _Response:
        client = self._client
        if method == "POST" and payload is not None:
            return await client._post(url, payload, timeout_seconds)
        session = client._session
        if session is None:
            raise RuntimeError("BatchClient must be used as 'async with BatchClient(...)'")
        import aiohttp  # loaded with the client's session

        headers = {key: value for key, value in client._headers().items() if key != "Content-Type"}
        async with session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_seconds), allow_redirects=False
        ) as response:
            body = await response.read()
            return _Response(response.status, body, parse_retry_after(response.headers.get("Retry-After")))

    def _limiter(self) -> ProfileRateLimiter:
        client = self._client
        key = hashlib.blake2b(client._credentials.project_key.get_secret_value().encode(), digest_size=16).digest()
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = ProfileRateLimiter(IDS_PER_SECOND * RATE_HEADROOM, BURST_IDS)
        return limiter

    # -- reading answers ---------------------------------------------------------------------

    def _json_object(self, response: _Response, action: str) -> dict[str, object]:
        try:
            data = json.loads(response.body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise BatchContractError(
                f"activation '{self._client._activation}': audiences/{action} answered {response.status} with "
                f"a body that is not a JSON object: {quote(response.body, self._client._scrub)}"
            )
        return data

    def _token(self, response: _Response, action: str) -> str | None:
        """The answer's indexing token; None (logged) when a 2xx carries none: Batch took the call anyway."""
        try:
            token = json.loads(response.body).get("indexing_token")
        except (ValueError, AttributeError):
            token = None
        if isinstance(token, str) and token:
            return token
        self._client._log.warning(
            "batch_audience_no_token", action=action, body=quote(response.body, self._client._scrub)
        )
        return None

    def _auth_error(self, response: _Response, action: str) -> BatchAuthError:
        dest = self._client._destination
        return BatchAuthError(
            f"activation '{self._client._activation}': Batch answered {response.status} on audiences/{action}"
            f"{error_details(response.body, self._client._scrub)}: the REST API key is not valid for this "
            f"project; check the REST API key (env {dest.api_key_env}) and the project key (env {dest.project_key_env})"
        )
