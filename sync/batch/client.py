"""The Batch Profile API client: one logical request per ``send``, with paced retries inside.

Contract (docs/batch-api.md):

* ``POST {base}/{version}/profiles/update`` (<=200 profiles, 300 profiles/s, burst 1,000) or
  ``.../profiles/mass-update`` (<=10,000 profiles, 10,000 profiles/s) with a JSON array of
  ``{"identifiers": {"custom_id": ...}, "attributes": {...}}`` (decision 1).
* ``202 SUCCESS`` acknowledges every profile; ``202 SUCCESS_WITH_PARTIAL_ERRORS``
  acknowledges every row not listed in ``errors``. A listed row whose error is about its
  value (:mod:`sync.batch.item_errors`) is *rejected*; any other listed row is resent alone,
  like a failed request for those profiles (same backoff and attempt bound), and *failed*
  if it still fails (docs/batch-api.md, "Per-item errors").
* 429, 5xx, timeouts and dropped connections are transient, 401/403 stop the run, a host
  that cannot be reached or does not answer is an outage: the rules every Batch call of an
  activation follows (:mod:`sync.batch.transport`, decisions 3 and 4). Once a request's
  attempts or its deadline run out, its pending rows are *failed for this run*. Any other
  answer means we broke the contract (decision 4).

Only :attr:`SendOutcome.acknowledged` may ever move stored fingerprints; ``failed`` rows are
simply sent again by a later attempt or run (upserts are idempotent).

Secrets (the REST API key and the project key) stay in the transport: headers only, and
scrubbed from any text that comes back from the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Unpack

# Re-exported: a rejection is read from Batch's answer (sync/batch/answers.py) and reported here.
from sync.batch.answers import Rejection as Rejection
from sync.batch.answers import error_details, item_errors_problem, quote, read_accepted
from sync.batch.endpoint import Endpoint

# Re-exported: the client sends what the engine encoded (sync/batch/profiles.py).
from sync.batch.profiles import EncodedProfiles as EncodedProfiles
from sync.batch.profiles import ProfileUpdate as ProfileUpdate
from sync.batch.ratelimit import endpoint_budget
from sync.batch.transport import (
    TRANSIENT_STATUSES,
    GiveUp,
    Response,
    Retry,
    Tally,
    Transport,
    TransportOptions,
    transport_errors,
)
from sync.config import Credentials, DestinationConfig, EndpointPolicy
from sync.errors import ConfigError, TransientError


def choose_endpoint(policy: EndpointPolicy, profiles_to_send: int, threshold: int) -> Endpoint:
    """Pick the endpoint for one run (docs/batch-api.md).

    Args:
        policy: The activation's ``destination.endpoint``.
        profiles_to_send: How many profiles this run will send.
        threshold: ``destination.mass_update_threshold``; with ``auto``, a run sending at
            least this many profiles is a "dump" and uses mass-update.

    Returns:
        The endpoint every request of the run should use.
    """
    if profiles_to_send < 0:
        raise ValueError(f"profiles_to_send must be >= 0, got {profiles_to_send}")
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if policy is EndpointPolicy.UPDATE:
        return Endpoint.UPDATE
    if policy is EndpointPolicy.MASS_UPDATE:
        return Endpoint.MASS_UPDATE
    # Batch meant mass-update for "around one to two times per day": a full load is such a
    # dump, an ordinary delta is not.
    return Endpoint.MASS_UPDATE if profiles_to_send >= threshold else Endpoint.UPDATE


@dataclass
class SendOutcome:
    """What became of the profiles of one logical request.

    Every profile of the request is in exactly one of ``acknowledged``, ``rejected`` (Batch
    refused its value: :func:`sync.batch.item_errors.is_value_refusal`) and ``failed`` (not
    acknowledged for this run: send it again later). ``item_failures`` details the failed
    profiles whose last error in this request was a per-item error not about the value
    (the others failed on the whole request: a 5xx, a timeout, the deadline).
    ``item_retries`` counts the profiles resent within this request after such an error.
    """

    acknowledged: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    item_failures: list[Rejection] = field(default_factory=list)
    failure: str | None = None
    attempts: int = 0
    rate_limited: int = 0
    item_retries: int = 0
    wire_seconds: float = 0.0
    wait_seconds: float = 0.0


@dataclass
class _ProfileRequest:
    """One logical request across its attempts (a :class:`sync.batch.transport.Call`): what is
    still to send, and what became of the rest."""

    transport: Transport
    endpoint: Endpoint
    url: str
    # What is still to send: the whole request, then only the rows Batch answered with a
    # per-item error that is not about their value.
    pending: EncodedProfiles
    outcome: SendOutcome = field(default_factory=SendOutcome)
    tally: Tally = field(default_factory=Tally)
    # Each pending row's latest per-item error, and how many rows the next attempt resends
    # because of one (counted once, when that attempt leaves).
    item_errors: dict[str, Rejection] = field(default_factory=dict)
    resending: int = 0
    retry_event = "batch_request_retry"

    @property
    def where(self) -> str:
        return f"/profiles/{self.endpoint.value}"

    def tokens(self) -> int:
        return len(self.pending)

    def body(self) -> bytes:
        self.outcome.item_retries += self.resending
        self.resending = 0
        return self.pending.payload

    def read(self, response: Response) -> Retry | None:
        """A 202 settles the rows it acknowledges or refuses; the others are resent alone.

        Raises:
            BatchContractError: Any status but 202 (401/403 and the transient ones aside).
        """
        transport = self.transport
        if response.status != 202:
            plural = "" if len(self.pending) == 1 else "s"
            raise transport.contract_error(
                response, f"a request of {len(self.pending)} profile{plural} on {self.where}"
            )
        answer = read_accepted(response.body, self.pending.ids, self.endpoint, scrub=transport.scrub, log=transport.log)
        if answer is None:
            return Retry(
                202,
                f"HTTP 202 with an unrecognised body: {quote(response.body, transport.scrub)}",
                response.retry_after,
            )
        self.outcome.acknowledged.extend(answer.acknowledged)
        self.outcome.rejected.extend(answer.refused)
        if not answer.failing:
            return None
        # The rest of the request is settled; these rows failed alone and are retried alone,
        # as a failed request would be.
        self.item_errors.update((error.custom_id, error) for error in answer.item_errors)
        self.pending = self.pending.subset(answer.failing)
        self.resending = len(self.pending)
        return Retry(202, item_errors_problem(answer.item_errors), response.retry_after)

    def log_fields(self) -> dict[str, object]:
        return {"endpoint": self.endpoint.value, "profiles": len(self.pending)}

    def settled(self) -> SendOutcome:
        """The outcome, with what the attempts cost."""
        outcome, tally = self.outcome, self.tally
        outcome.attempts = tally.attempts
        outcome.rate_limited = tally.rate_limited
        outcome.wait_seconds = tally.wait_seconds
        outcome.wire_seconds = tally.wire_seconds
        return outcome


class BatchClient:
    """Sends profile upserts to Batch for one activation.

    Use as an async context manager. Unless a session is injected, the client's transport
    owns one ``aiohttp.ClientSession`` with an explicit total timeout and a connection pool
    sized to ``destination.concurrency`` (callers bound their own in-flight requests to the
    same number). The session is made by the first request, not on entering: a run with
    nothing to send never loads aiohttp (docs/how-a-run-works.md, "Start-up"). The
    activation's audience calls go through the same transport (:attr:`transport`).

    Args:
        destination: The activation's destination settings.
        credentials: The REST API key and project key.
        activation: Activation name, used in errors and logs.
        options: How the transport is built (a session to use, the rate limiter registry,
            the sleep, jitter and clock): :class:`sync.batch.transport.Transport`.
    """

    def __init__(
        self,
        destination: DestinationConfig,
        credentials: Credentials,
        *,
        activation: str,
        **options: Unpack[TransportOptions],
    ) -> None:
        self.transport = Transport(destination, credentials, activation=activation, **options)

    def __repr__(self) -> str:
        dest = self.transport.destination
        return (
            f"BatchClient(activation={self.transport.activation!r}, base_url={dest.base_url!r}, "
            f"api_version={dest.api_version!r})"
        )

    async def __aenter__(self) -> BatchClient:
        self.transport.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created one (a client that sent nothing has none)."""
        await self.transport.close()

    def url(self, endpoint: Endpoint) -> str:
        """The full URL of an endpoint."""
        return self.transport.url(f"profiles/{endpoint.value}")

    async def check_credentials(self) -> None:
        """Ask Batch whether the keys are valid, without changing any profile.

        Posts an empty array to ``/profiles/update``. Only a 2xx answer means Batch accepted
        the keys: a 404 (a ``base_url`` with an extra path, a wrong ``api_version``) or any
        other answer is reported as it is, since a run would meet the same answer.

        Raises:
            BatchAuthError: 401/403, Batch refused the REST API key or the project key.
            TransientError: Batch could not be reached, or answered 429/5xx: nothing is
                known about the keys yet (``sync.errors.TransientError``).
            ConfigError: Any other answer: the URL does not lead to Batch's profile API.
        """
        transport = self.transport
        activation = transport.activation
        url = self.url(Endpoint.UPDATE)
        await transport.ensure_answering(None)
        try:
            response = await transport.post(url, b"[]", transport.destination.request_timeout_seconds)
        except transport_errors() as error:
            raise TransientError(
                f"activation '{activation}': cannot reach Batch at {url}: {transport.describe(error)}"
            ) from None
        if 200 <= response.status < 300:
            return
        if response.status in (401, 403):
            raise transport.auth_error(response, f"/profiles/{Endpoint.UPDATE.value}")
        details = error_details(response.body, transport.scrub)
        if response.status in TRANSIENT_STATUSES:
            raise TransientError(
                f"activation '{activation}': Batch answered {response.status} at {url}{details}: "
                "the credentials could not be checked; try again later"
            )
        raise ConfigError(
            f"Batch answered {response.status} at {url}{details}, not 2xx: the credentials could not be "
            "checked and a run would fail the same way; check destination.base_url (no path after the host) "
            "and destination.api_version",
            source=f"activation '{activation}'",
            field="destination",
        )

    async def send(
        self,
        endpoint: Endpoint,
        profiles: Sequence[ProfileUpdate] | EncodedProfiles,
        *,
        deadline: float | None = None,
    ) -> SendOutcome:
        """Send one logical request, retrying transient errors inside.

        Args:
            endpoint: Where to send.
            profiles: At most ``endpoint.max_batch`` profiles, one by one or already encoded.
            deadline: A time on the client's clock (the lease expiry or the run's time
                budget). No wait ends after it and no request outlives it; when the next
                wait would, the rows are returned as ``failed``.

        Returns:
            Which profiles were acknowledged, rejected (Batch refused their value) or failed
            (not acknowledged for this run: send them again later). A row answered with a
            per-item error that is not about its value is resent alone, within the same
            ``max_attempts`` (a 429 does not consume one), before it counts as failed.

        Raises:
            ValueError: More profiles than the endpoint accepts in one request.
            BatchAuthError: 401/403.
            BatchContractError: Any other 4xx, or a status the contract does not know.
            BatchUnreachable: The host cannot be connected to, or connects and does not
                answer (:mod:`sync.batch.transport`: ``UNREACHABLE_AFTER_ATTEMPTS``,
                ``PROBE_ATTEMPTS``, ``SILENT_AFTER_ATTEMPTS``).
        """
        transport = self.transport
        if len(profiles) > endpoint.max_batch:
            raise ValueError(
                f"activation '{transport.activation}': {len(profiles)} profiles in one request; "
                f"/profiles/{endpoint.value} accepts at most {endpoint.max_batch}"
            )
        if not profiles:
            return SendOutcome()
        await transport.ensure_answering(deadline)
        pending = profiles if isinstance(profiles, EncodedProfiles) else EncodedProfiles.of(profiles)
        request = _ProfileRequest(transport, endpoint, self.url(endpoint), pending)
        limiter = transport.limiter(endpoint_budget(endpoint))
        try:
            await transport.exchange(request, deadline=deadline, limiter=limiter, tally=request.tally)
        except GiveUp as stop:
            return self._give_up(request, stop.reason)
        return request.settled()

    def _give_up(self, request: _ProfileRequest, reason: str) -> SendOutcome:
        """Fail the pending rows for this run, for ``reason``, and return the request's outcome."""
        outcome = request.settled()
        outcome.failed = list(request.pending.ids)
        outcome.item_failures = [request.item_errors[c] for c in request.pending.ids if c in request.item_errors]
        outcome.failure = reason
        self.transport.log.warning(
            "batch_request_failed",
            endpoint=request.endpoint.value,
            profiles=len(request.pending),
            attempts=outcome.attempts,
            rate_limited=outcome.rate_limited,
            failure=reason,
        )
        return outcome
