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
* 429, 500, 502, 503, 504, timeouts and dropped connections are transient: exponential
  backoff with full jitter, ``Retry-After`` honoured, bounded attempts, then the rows are
  *failed for this run* (decision 3). 401/403 stop the run; other 4xx mean we broke the
  contract (decision 4).
* A host that cannot be connected to, or that connects and never answers, is an outage: the
  run stops at once (:class:`sync.errors.BatchUnreachable`) instead of spending every
  request's timeout and retries on it. The first request of a client is preceded by a probe
  (a GET on ``base_url`` without the keys) that must get any HTTP answer within seconds.

Only :attr:`SendOutcome.acknowledged` may ever move stored fingerprints; ``failed`` rows are
simply sent again by a later attempt or run (upserts are idempotent).

Secrets (the REST API key and the project key) go into request headers only. They never
appear in an exception, a log line or a repr; any text that comes back from the network
goes through the shared redactor (:mod:`sync.redact`) before it is reused.
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple

import structlog

from sync import __version__
from sync.batch.answers import (
    QUOTE_LIMIT,
    Answer,
    error_details,
    item_errors_problem,
    parse_retry_after,
    quote,
    read_accepted,
)

# Re-exported: a rejection is read from Batch's answer (sync/batch/answers.py) and reported here.
from sync.batch.answers import Rejection as Rejection
from sync.batch.endpoint import Endpoint

# Re-exported: the client sends what the engine encoded (sync/batch/profiles.py).
from sync.batch.profiles import EncodedProfiles as EncodedProfiles
from sync.batch.profiles import ProfileUpdate as ProfileUpdate
from sync.batch.ratelimit import PROCESS_LIMITERS, ProfileRateLimiter, RateLimiterRegistry, RateLimitWaitTooLong
from sync.config import Credentials, DestinationConfig, EndpointPolicy
from sync.errors import BatchAuthError, BatchContractError, BatchUnreachable, ConfigError, TransientError
from sync.redact import Redactor

if TYPE_CHECKING:
    import aiohttp

log = structlog.get_logger(__name__)

USER_AGENT = f"cepsync/{__version__}"

# Backoff: "wait a few seconds before retrying" (Batch's 429 text). Full jitter (AWS
# Architecture Blog, "Exponential Backoff And Jitter") spreads concurrent retriers apart.
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0
# A Retry-After larger than this is clipped: we would rather spend one more (bounded) 429
# than park a serverless function for minutes.
RETRY_AFTER_CAP_SECONDS = 300.0
# 429s do not consume ordinary attempts (a rate-limit wait is not a failure: Grouparoo's
# lesson), but they are still bounded so nothing retries forever.
RATE_LIMITED_ATTEMPTS_FACTOR = 4
# Statuses worth retrying. 500/503 are documented by Batch; 502/504 come from proxies and
# load balancers in front of it.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# Attempts in a row, over all the requests of a client, that could not even connect (refused,
# DNS failure, no route) before the run stops: the host is wrong or down, and retrying every
# request of the segment would only take minutes and print a warning per attempt.
UNREACHABLE_AFTER_ATTEMPTS = 5
# A host that accepts connections and never answers (a stuck proxy, a firewall that holds the
# connection, a wrong port of a live machine) would otherwise take every request's full
# timeout and every retry: minutes of silence before a "partial" run. So the first request of
# a client is preceded by a probe (a GET that changes nothing, without the keys) that must get
# an HTTP answer, any status, within PROBE_TIMEOUT_SECONDS; PROBE_ATTEMPTS silent probes stop
# the run as an outage (docs/batch-api.md, "Answers").
PROBE_TIMEOUT_SECONDS = 5.0
PROBE_ATTEMPTS = 2
# After the probe: requests in a row, over the whole client, that got no answer within their
# full timeout before the run stops as an outage (concurrent requests all count).
SILENT_AFTER_ATTEMPTS = 3


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
class _Response:
    status: int
    body: bytes
    retry_after: float | None


class _Failed(NamedTuple):
    """An attempt that left rows to send: its HTTP status (None without an answer), the
    problem to report, and the ``Retry-After`` Batch asked for."""

    status: int | None
    problem: str
    retry_after: float | None


class _GiveUp(Exception):
    """The request stops here: its pending rows are failed for this run, for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Request:
    """One logical request across its attempts: what is still to send, and what became of the rest."""

    endpoint: Endpoint
    url: str
    # What is still to send: the whole request, then only the rows Batch answered with a
    # per-item error that is not about their value.
    pending: EncodedProfiles
    deadline: float | None
    max_attempts: int
    outcome: SendOutcome = field(default_factory=SendOutcome)
    ordinary_failures: int = 0
    # Each pending row's latest per-item error, and how many rows the next attempt resends
    # because of one (counted once, when that attempt leaves).
    item_errors: dict[str, Rejection] = field(default_factory=dict)
    resending: int = 0

    def settle(self, answer: Answer) -> str | None:
        """Take a 202's answer; the problem of the rows left to resend alone, None when none is."""
        self.outcome.acknowledged.extend(answer.acknowledged)
        self.outcome.rejected.extend(answer.refused)
        if not answer.failing:
            return None
        # The rest of the request is settled; these rows failed alone and are retried alone,
        # as a failed request would be.
        self.item_errors.update((error.custom_id, error) for error in answer.item_errors)
        self.pending = self.pending.subset(answer.failing)
        self.resending = len(self.pending)
        return item_errors_problem(answer.item_errors)

    def count_failure(self, failed: _Failed) -> None:
        """Spend one attempt: a 429 from its own, larger budget, any other failure from ``max_attempts``.

        Raises:
            _GiveUp: That budget is spent.
        """
        if failed.status == 429:
            self.outcome.rate_limited += 1
            if self.outcome.rate_limited >= RATE_LIMITED_ATTEMPTS_FACTOR * self.max_attempts:
                raise _GiveUp(f"rate limited {self.outcome.rate_limited} times (last: {failed.problem})")
        else:
            self.ordinary_failures += 1
            if self.ordinary_failures >= self.max_attempts:
                raise _GiveUp(f"{self.ordinary_failures} attempts failed (last: {failed.problem})")


class BatchClient:
    """Sends profile upserts to Batch for one activation.

    Use as an async context manager. Unless a session is injected, the client owns one
    ``aiohttp.ClientSession`` with an explicit total timeout and a connection pool sized to
    ``destination.concurrency`` (callers bound their own in-flight requests to the same
    number).

    Args:
        destination: The activation's destination settings.
        credentials: The REST API key and project key.
        activation: Activation name, used in errors and logs.
        session: A session to use instead of creating one (not closed by the client).
        limiters: Rate limiter registry; defaults to the process-wide one, so every
            activation of this process that shares a project key shares its budget.
        sleep: Sleep used for retry backoff (tests inject a recorder).
        random: Source of jitter in [0, 1).
        clock: Monotonic clock; ``deadline`` arguments are on this clock.
    """

    def __init__(
        self,
        destination: DestinationConfig,
        credentials: Credentials,
        *,
        activation: str,
        session: aiohttp.ClientSession | None = None,
        limiters: RateLimiterRegistry | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._destination = destination
        self._credentials = credentials
        self._redactor = Redactor([credentials.api_key.get_secret_value(), credentials.project_key.get_secret_value()])
        self._activation = activation
        self._injected_session = session
        self._session: aiohttp.ClientSession | None = session
        self._limiters = PROCESS_LIMITERS if limiters is None else limiters
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._log = log.bind(activation=activation)
        # Attempts in a row that could not connect; any answer from the host resets it.
        self._connect_failures = 0
        # Attempts in a row that connected but got no answer within their full timeout.
        self._silent_attempts = 0
        # Whether the host answered the probe (once per client), and the lock that makes
        # concurrent first requests wait for one probe.
        self._probed = False
        self._probe_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return (
            f"BatchClient(activation={self._activation!r}, base_url={self._destination.base_url!r}, "
            f"api_version={self._destination.api_version!r})"
        )

    async def __aenter__(self) -> BatchClient:
        if self._session is None:
            # aiohttp (~0.14 s of imports) loads when a client opens its session, not with every command.
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._destination.request_timeout_seconds),
                connector=aiohttp.TCPConnector(limit=self._destination.concurrency),
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._session is not None and self._session is not self._injected_session:
            await self._session.close()
        self._session = self._injected_session

    def url(self, endpoint: Endpoint) -> str:
        """The full URL of an endpoint."""
        dest = self._destination
        return f"{dest.base_url}/{dest.api_version}/profiles/{endpoint.value}"

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
        url = self.url(Endpoint.UPDATE)
        await self._ensure_answering(None)
        try:
            response = await self._post(url, b"[]", self._destination.request_timeout_seconds)
        except _transport_errors() as error:
            raise TransientError(
                f"activation '{self._activation}': cannot reach Batch at {url}: {self._describe(error)}"
            ) from None
        if 200 <= response.status < 300:
            return
        if response.status in (401, 403):
            raise self._auth_error(response, Endpoint.UPDATE)
        details = error_details(response.body, self._scrub)
        if response.status in TRANSIENT_STATUSES:
            raise TransientError(
                f"activation '{self._activation}': Batch answered {response.status} at {url}{details}: "
                "the credentials could not be checked; try again later"
            )
        raise ConfigError(
            f"Batch answered {response.status} at {url}{details}, not 2xx: the credentials could not be "
            "checked and a run would fail the same way; check destination.base_url (no path after the host) "
            "and destination.api_version",
            source=f"activation '{self._activation}'",
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
            BatchUnreachable: :data:`UNREACHABLE_AFTER_ATTEMPTS` attempts in a row (of any
                request of this client) could not connect to the host; or the host connects
                but does not answer: the first request's probe got no answer
                (:data:`PROBE_ATTEMPTS` times), or :data:`SILENT_AFTER_ATTEMPTS` requests in a
                row got none within their full timeout.
        """
        if len(profiles) > endpoint.max_batch:
            raise ValueError(
                f"activation '{self._activation}': {len(profiles)} profiles in one request; "
                f"/profiles/{endpoint.value} accepts at most {endpoint.max_batch}"
            )
        if not profiles:
            return SendOutcome()
        await self._ensure_answering(deadline)
        pending = profiles if isinstance(profiles, EncodedProfiles) else EncodedProfiles.of(profiles)
        request = _Request(endpoint, self.url(endpoint), pending, deadline, self._destination.max_attempts)
        limiter = self._limiters.get(self._credentials.project_key.get_secret_value(), endpoint)
        try:
            while True:
                timeout = await self._wait_for_turn(request, limiter)
                failed = await self._attempt(request, timeout)
                if failed is None:
                    return request.outcome
                request.count_failure(failed)
                await self._wait_before_retry(request, failed)
        except _GiveUp as stop:
            return self._give_up(request, stop.reason)

    # -- internals ---------------------------------------------------------------------

    async def _wait_for_turn(self, request: _Request, limiter: ProfileRateLimiter) -> float:
        """Wait for the rate limiter within the deadline, and return the next attempt's timeout.

        Raises:
            _GiveUp: The limiter would let the rows go only after the deadline, or it has passed.
        """
        if self._destination.rate_limit:
            try:
                request.outcome.wait_seconds += await limiter.acquire(
                    len(request.pending), max_wait=self._remaining(request.deadline)
                )
            except RateLimitWaitTooLong as error:
                raise _GiveUp(f"deadline reached: {error}") from error
        remaining = self._remaining(request.deadline)
        if remaining is not None and remaining <= 0:
            raise _GiveUp(self._deadline_reason(request.outcome, "before the next attempt"))
        timeout = self._destination.request_timeout_seconds
        if remaining is None:
            return timeout
        # Never let a request outlive the lease or the function's time budget.
        return min(timeout, remaining)

    async def _attempt(self, request: _Request, timeout_seconds: float) -> _Failed | None:
        """Post the pending rows once and classify what came back: None when every row is settled.

        Raises:
            BatchAuthError, BatchContractError, BatchUnreachable: As :meth:`send`.
        """
        request.outcome.attempts += 1
        request.outcome.item_retries += request.resending
        request.resending = 0
        started = self._clock()
        try:
            response = await self._post(request.url, request.pending.payload, timeout_seconds)
        except _transport_errors() as error:
            problem = self._describe(error)
            self._count_unanswered(error, problem, request.url, timeout_seconds)
            return _Failed(None, problem, None)
        else:
            return self._classify(request, response)
        finally:
            request.outcome.wire_seconds += max(0.0, self._clock() - started)

    def _count_unanswered(self, error: BaseException, problem: str, url: str, timeout: float) -> None:
        """Count an attempt that got no answer toward an outage of the host (over the whole client).

        Called while ``error`` is being handled; the outage errors do not chain it.

        Raises:
            BatchUnreachable: Too many attempts in a row could not connect, or got no answer
                within their full timeout.
        """
        import aiohttp  # loaded with the session (see __aenter__)

        if isinstance(error, aiohttp.ClientConnectorError):
            self._connect_failures += 1
            if self._connect_failures >= UNREACHABLE_AFTER_ATTEMPTS:
                raise BatchUnreachable(
                    f"activation '{self._activation}': cannot reach Batch at {url}: "
                    f"{self._connect_failures} attempts in a row could not connect (last: {problem}); "
                    "the run stopped, nothing more was sent and what Batch acknowledged before is kept. "
                    "Check destination.base_url and the network; the next run resends the rest"
                ) from None
        elif isinstance(error, TimeoutError) and timeout >= self._destination.request_timeout_seconds:
            # A full timeout, not one cut short by the deadline: the host said nothing.
            self._silent_attempts += 1
            if self._silent_attempts >= SILENT_AFTER_ATTEMPTS:
                raise self._silent_host(
                    f"{self._silent_attempts} requests in a row got no answer within "
                    f"{timeout:g} s (destination.request_timeout_seconds)"
                ) from None

    def _classify(self, request: _Request, response: _Response) -> _Failed | None:
        """Read Batch's answer to an attempt: None when every row is settled, else why rows are left.

        Raises:
            BatchAuthError: 401/403.
            BatchContractError: Any other 4xx, or a status the contract does not know.
        """
        # The host answered: it is neither unreachable nor silent.
        self._connect_failures = 0
        self._silent_attempts = 0
        status = response.status
        if status == 202:
            answer = read_accepted(
                response.body, request.pending.ids, request.endpoint, scrub=self._scrub, log=self._log
            )
            if answer is None:
                problem = f"HTTP 202 with an unrecognised body: {quote(response.body, self._scrub)}"
            else:
                settled = request.settle(answer)
                if settled is None:
                    return None
                problem = settled
        elif status in (401, 403):
            raise self._auth_error(response, request.endpoint)
        elif status in TRANSIENT_STATUSES:
            problem = f"HTTP {status}{error_details(response.body, self._scrub)}"
        else:
            raise self._contract_error(response, request.endpoint, len(request.pending))
        return _Failed(status, problem, response.retry_after)

    async def _wait_before_retry(self, request: _Request, failed: _Failed) -> None:
        """Sleep the backoff before the next attempt, unless the deadline comes first.

        Raises:
            _GiveUp: The backoff would not end before the deadline.
        """
        outcome = request.outcome
        wait = self._backoff(outcome.attempts, failed.retry_after)
        remaining = self._remaining(request.deadline)
        if remaining is not None and wait >= remaining:
            raise _GiveUp(self._deadline_reason(outcome, f"a {wait:.2f} s backoff", failed.problem))
        self._log.warning(
            "batch_request_retry",
            endpoint=request.endpoint.value,
            status=failed.status,
            problem=failed.problem,
            attempt=outcome.attempts,
            wait_seconds=round(wait, 3),
            profiles=len(request.pending),
        )
        await self._sleep(wait)
        outcome.wait_seconds += wait

    def _give_up(self, request: _Request, reason: str) -> SendOutcome:
        """Fail the pending rows for this run, for ``reason``, and return the request's outcome."""
        outcome = request.outcome
        outcome.failed = list(request.pending.ids)
        outcome.item_failures = [request.item_errors[c] for c in request.pending.ids if c in request.item_errors]
        outcome.failure = reason
        self._log.warning(
            "batch_request_failed",
            endpoint=request.endpoint.value,
            profiles=len(request.pending),
            attempts=outcome.attempts,
            rate_limited=outcome.rate_limited,
            failure=reason,
        )
        return outcome

    async def _ensure_answering(self, deadline: float | None) -> None:
        """Probe the host once per client: it must give an HTTP answer (any status) quickly.

        A probe that cannot connect says nothing more than the request would: the requests'
        own bounded connect failures report it. A probe cut short by the deadline is not
        counted (the next request probes again). Only a host that connects and stays silent
        is an outage here.

        Raises:
            BatchUnreachable: :data:`PROBE_ATTEMPTS` probes in a row got no answer.
        """
        if self._probed:
            return
        import aiohttp  # loaded with the session (see __aenter__)

        async with self._probe_lock:
            silent = 0
            while not self._probed:
                timeout = min(PROBE_TIMEOUT_SECONDS, self._destination.request_timeout_seconds)
                remaining = self._remaining(deadline)
                cut = remaining is not None and remaining < timeout
                if remaining is not None and remaining <= 0:
                    return  # the request itself reports the deadline
                try:
                    await self._probe(min(timeout, remaining) if remaining is not None else timeout)
                except aiohttp.ClientConnectorError:
                    # Refused, or no such host: the requests' own connect failures stop the
                    # run within seconds; probing again before each would only slow that down.
                    self._probed = True
                except TimeoutError as error:
                    if cut:
                        return
                    silent += 1
                    self._log.warning("batch_probe_silent", url=self._destination.base_url, attempt=silent)
                    if silent >= PROBE_ATTEMPTS:
                        how = (
                            "it did not even accept the connection:"
                            if isinstance(error, aiohttp.ConnectionTimeoutError)
                            else "it accepted the connection, but"
                        )
                        raise self._silent_host(
                            f"{how} {silent} requests in a row got no HTTP answer within {timeout:g} s"
                        ) from None
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
                    # A dropped connection or a garbled answer: the host spoke, the requests
                    # and their retries deal with the rest.
                    self._probed = True
                else:
                    self._probed = True

    async def _probe(self, timeout_seconds: float) -> None:
        """A GET on the API root that changes nothing and carries no key; any HTTP answer will do."""
        if self._session is None:
            raise RuntimeError("BatchClient must be used as 'async with BatchClient(...)'")
        import aiohttp  # loaded with the session (see __aenter__)

        async with self._session.get(
            f"{self._destination.base_url}/",
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            allow_redirects=False,
        ):
            pass  # any status: the host speaks HTTP

    def _silent_host(self, what: str) -> BatchUnreachable:
        return BatchUnreachable(
            f"activation '{self._activation}': Batch at {self._destination.base_url} does not answer: {what}. "
            "The run stopped as a Batch outage: nothing more was sent, what Batch acknowledged before is kept "
            "and the next run resends the rest. Check destination.base_url (host and port) and the network"
        )

    async def _post(self, url: str, payload: bytes, timeout_seconds: float) -> _Response:
        if self._session is None:
            raise RuntimeError("BatchClient must be used as 'async with BatchClient(...)'")
        import aiohttp  # loaded with the session (see __aenter__)

        async with self._session.post(
            url,
            data=payload,
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            allow_redirects=False,
        ) as response:
            body = await response.read()
            return _Response(response.status, body, parse_retry_after(response.headers.get("Retry-After")))

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._credentials.api_key.get_secret_value()}",
            "X-Batch-Project": self._credentials.project_key.get_secret_value(),
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - self._clock()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP_SECONDS)
        # Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))].
        ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** min(attempt - 1, 30))
        return self._random() * ceiling

    def _deadline_reason(self, outcome: SendOutcome, what: str, problem: str | None = None) -> str:
        last = f" (last: {problem})" if problem else ""
        return f"deadline reached after {outcome.attempts} attempt(s), no time left for {what}{last}"

    def _auth_error(self, response: _Response, endpoint: Endpoint) -> BatchAuthError:
        dest = self._destination
        return BatchAuthError(
            f"activation '{self._activation}': Batch answered {response.status} on "
            f"/profiles/{endpoint.value}{error_details(response.body, self._scrub)}: the REST API key is "
            f"not valid for this project; check the REST API key (env {dest.api_key_env}) and "
            f"the project key (env {dest.project_key_env})"
        )

    def _contract_error(self, response: _Response, endpoint: Endpoint, profiles: int) -> BatchContractError:
        plural = "" if profiles == 1 else "s"
        return BatchContractError(
            f"activation '{self._activation}': Batch answered {response.status} to a request of "
            f"{profiles} profile{plural} on /profiles/{endpoint.value}{error_details(response.body, self._scrub)}"
        )

    def _scrub(self, text: str) -> str:
        """Remove the secrets from text that came from elsewhere (a server or a library)."""
        return self._redactor.text(text)

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError):
            return "request timed out"
        detail = self._scrub(str(error))[:QUOTE_LIMIT]
        return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


# Transport failures that leave us not knowing whether Batch applied the request. Resending
# is safe because profile updates are idempotent upserts. ServerTimeoutError and
# ServerDisconnectedError are ClientConnectionErrors; ClientPayloadError is a body cut short.
def _transport_errors() -> tuple[type[BaseException], ...]:
    """The tuple, built when an error is being matched: aiohttp is imported with the session, not here."""
    import aiohttp

    return (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
