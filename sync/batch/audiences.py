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
  them: both send through the activation's :class:`sync.batch.transport.Transport` (its
  session, headers, probe, backoff with full jitter, attempt bounds, outage detection and
  redactor), so an activation has one way of talking to Batch.

Batch publishes no rate limit for these endpoints: the pace here (:data:`IDS_PER_SECOND`,
:data:`BURST_IDS`) is our assumption, a token bucket counted in ids per project key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

from sync.batch.answers import error_details, quote
from sync.batch.ratelimit import RATE_HEADROOM, Budget
from sync.batch.transport import GiveUp, Response, Retry, Tally, Transport
from sync.errors import BatchContractError, ConfigError, TransientError

# Confirmed by Batch's pages: "Supports up to 10,000 elements" per update call.
MAX_IDS_PER_CALL: Final = 10_000
# Assumed (Batch publishes none for audiences): the Profile API's mass-update pace, counted
# in ids, with a bucket of two full calls.
IDS_PER_SECOND: Final = 10_000.0
BURST_IDS: Final = 2 * MAX_IDS_PER_CALL
# One bucket per project key, shared by every activation of the process (the client's
# rate limiter registry: sync.batch.ratelimit).
BUDGET: Final = Budget("audiences", IDS_PER_SECOND * RATE_HEADROOM, BURST_IDS)
# The indexing states of Batch's view answer that end the wait for a token.
FINAL_STATES: Final = frozenset({"APPLIED", "REPLACED"})


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
class CallStats(Tally):
    """What the calls of one :class:`AudienceClient` cost, for the run record: their attempts and waits, summed."""

    calls: int = 0


@dataclass
class _AudienceCall:
    """One call of the Audience API across its attempts (a :class:`sync.batch.transport.Call`)."""

    transport: Transport
    audience: str
    action: str
    url: str
    payload: bytes | None
    ids: int
    # Answers that are the call's result rather than a broken contract: a 404 (the audience
    # does not exist), any 4xx (Batch refused, in its words).
    not_found: bool
    refused_ok: bool
    retry_event = "batch_audience_retry"

    @property
    def where(self) -> str:
        return f"audiences/{self.action}"

    def tokens(self) -> int:
        return self.ids

    def body(self) -> bytes | None:
        return self.payload

    def read(self, response: Response) -> Response | Retry:
        """2xx (or 404 with ``not_found``, a 4xx with ``refused_ok``) is the answer.

        Raises:
            BatchContractError: Any other status (401/403 and the transient ones aside).
        """
        status = response.status
        if 200 <= status < 300 or (status == 404 and self.not_found) or (self.refused_ok and 400 <= status < 500):
            return response
        raise self.transport.contract_error(response, f"{self.where} for audience {self.audience!r}")

    def log_fields(self) -> dict[str, object]:
        return {"action": self.action}


class AudienceClient:
    """The Audience API of one activation's audience, through the activation's transport.

    Use while the transport is open (inside ``async with`` the activation's
    :class:`sync.batch.client.BatchClient`, whose :attr:`~sync.batch.client.BatchClient.transport` it is).

    Args:
        transport: The activation's transport to Batch.
        name: The audience name.
    """

    def __init__(self, transport: Transport, name: str) -> None:
        self._transport = transport
        self.name = name
        self.stats = CallStats()

    def url(self, action: str) -> str:
        return self._transport.url(f"audiences/{action}")

    # -- the three calls ---------------------------------------------------------------------

    async def view(self, token: str | None = None, *, deadline: float | None) -> AudienceView | None:
        """The audience (and the indexing state of ``token``'s update), or None when it does not exist."""
        query = {"name": self.name} | ({"indexing_token": token} if token else {})
        response = await self._call("view", query=query, ids=0, deadline=deadline, not_found=True)
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
        response = await self._call("create", body=body, ids=0, deadline=deadline, refused_ok=True)
        if response.status != 202:
            raise ConfigError(
                f"Batch refused to create the audience {self.name!r}: HTTP {response.status}"
                f"{error_details(response.body, self._transport.scrub)}; create it in Batch's dashboard "
                "(type: Custom IDs) or check the name and the REST API key's rights",
                source=f"activation '{self._transport.activation}'",
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
        response = await self._call("update", body={"name": self.name, "ids": ids}, ids=count, deadline=deadline)
        return self._token(response, "update")

    # -- one call, with its retries -----------------------------------------------------------

    async def _call(
        self,
        action: str,
        *,
        ids: int,
        deadline: float | None,
        body: Mapping[str, object] | None = None,
        query: dict[str, str] | None = None,
        not_found: bool = False,
        refused_ok: bool = False,
    ) -> Response:
        """Send one call (a POST with ``body``, else a GET) until Batch takes it; see :class:`_AudienceCall`.

        Raises:
            BatchAuthError: 401/403.
            BatchContractError: Any other 4xx (unless allowed above).
            BatchUnreachable: The host cannot be reached or does not answer (the transport's rule).
            AudienceCallFailed: The retries or the deadline ran out.
        """
        transport = self._transport
        url = self.url(action) + (f"?{urlencode(query)}" if query else "")
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() if body is not None else None
        call = _AudienceCall(transport, self.name, action, url, payload, ids, not_found, refused_ok)
        await transport.ensure_answering(deadline)
        self.stats.calls += 1
        tally = Tally()
        try:
            return await transport.exchange(
                call, deadline=deadline, limiter=transport.limiter(BUDGET) if ids else None, tally=tally
            )
        except GiveUp as stop:
            raise AudienceCallFailed(f"audience {action} of {self.name!r}: {stop.reason}") from None
        finally:
            self.stats.add(tally)

    # -- reading answers ---------------------------------------------------------------------

    def _json_object(self, response: Response, action: str) -> dict[str, object]:
        try:
            data = json.loads(response.body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise BatchContractError(
                f"activation '{self._transport.activation}': audiences/{action} answered {response.status} with "
                f"a body that is not a JSON object: {quote(response.body, self._transport.scrub)}"
            )
        return data

    def _token(self, response: Response, action: str) -> str | None:
        """The answer's indexing token; None (logged) when a 2xx carries none: Batch took the call anyway."""
        try:
            token = json.loads(response.body).get("indexing_token")
        except (ValueError, AttributeError):
            token = None
        if isinstance(token, str) and token:
            return token
        self._transport.log.warning(
            "batch_audience_no_token", action=action, body=quote(response.body, self._transport.scrub)
        )
        return None
