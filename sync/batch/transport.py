"""How cepsync talks to Batch: one session, one probe, one retry loop, one set of outage rules.

The profile client (:mod:`sync.batch.client`) and the audience client
(:mod:`sync.batch.audiences`) both send through the :class:`Transport` of their activation, so
every Batch call follows the same rules (docs/batch-api.md, "Answers"):

* 429, 500, 502, 503, 504, timeouts and dropped connections are transient: exponential
  backoff with full jitter, ``Retry-After`` honoured, bounded attempts (a 429 spends a
  larger budget of its own), then the call gives up (:class:`GiveUp`). 401/403 stop the run
  (:class:`sync.errors.BatchAuthError`); what any other answer means is the calling
  client's to say (:class:`Call`).
* A host that cannot be connected to, or that connects and never answers, is an outage: the
  run stops at once (:class:`sync.errors.BatchUnreachable`) instead of spending every call's
  timeout and retries on it. The first call is preceded by a probe (a GET on ``base_url``
  without the keys) that must get any HTTP answer within seconds
  (:meth:`Transport.ensure_answering`).
* No wait ends after the caller's deadline and no attempt outlives it.

Secrets (the REST API key and the project key) go into request headers only. They never
appear in an exception, a log line or a repr; any text that comes back from the network
goes through the transport's redactor (:meth:`Transport.scrub`) before it is reused.
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypedDict, TypeVar

from sync import __version__
from sync.batch.answers import QUOTE_LIMIT, error_details, parse_retry_after
from sync.batch.ratelimit import PROCESS_LIMITERS, Budget, ProfileRateLimiter, RateLimiterRegistry, RateLimitWaitTooLong
from sync.config import Credentials, DestinationConfig
from sync.errors import BatchAuthError, BatchContractError, BatchUnreachable
from sync.logs import Logger, get_logger
from sync.preload import preload
from sync.redact import Redactor

if TYPE_CHECKING:
    import aiohttp

log = get_logger(__name__)

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
# Attempts in a row, over all the calls of a transport, that could not even connect (refused,
# DNS failure, no route) before the run stops: the host is wrong or down, and retrying every
# call of the segment would only take minutes and print a warning per attempt.
UNREACHABLE_AFTER_ATTEMPTS = 5
# A host that accepts connections and never answers (a stuck proxy, a firewall that holds the
# connection, a wrong port of a live machine) would otherwise take every call's full timeout
# and every retry: minutes of silence before a "partial" run. So the first call of a
# transport is preceded by a probe (a GET that changes nothing, without the keys) that must
# get an HTTP answer, any status, within PROBE_TIMEOUT_SECONDS; PROBE_ATTEMPTS silent probes
# stop the run as an outage (docs/batch-api.md, "Answers").
PROBE_TIMEOUT_SECONDS = 5.0
PROBE_ATTEMPTS = 2
# After the probe: attempts in a row, over the whole transport, that got no answer within
# their full timeout before the run stops as an outage (concurrent attempts all count).
SILENT_AFTER_ATTEMPTS = 3

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Response:
    """Batch's answer to one attempt: its status, its body, and the ``Retry-After`` it asked for."""

    status: int
    body: bytes
    retry_after: float | None


class Retry(NamedTuple):
    """An attempt that leaves the call to be tried again: its HTTP status (None without an
    answer), the problem to report, and the ``Retry-After`` Batch asked for."""

    status: int | None
    problem: str
    retry_after: float | None = None


class GiveUp(Exception):
    """A call stops here, for ``reason``: its attempts or the deadline ran out.

    Batch may or may not have applied what the call sent.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Tally:
    """What one call cost over its attempts (:meth:`Transport.exchange` keeps it)."""

    attempts: int = 0
    # Attempts answered 429, and the other attempts that left the call to be tried again.
    rate_limited: int = 0
    failures: int = 0
    # Waiting for the rate limiter and in backoff; and on the network.
    wait_seconds: float = 0.0
    wire_seconds: float = 0.0

    def add(self, other: Tally) -> None:
        """Count ``other``'s attempts and waits in this one (a sum over calls)."""
        self.attempts += other.attempts
        self.rate_limited += other.rate_limited
        self.failures += other.failures
        self.wait_seconds += other.wait_seconds
        self.wire_seconds += other.wire_seconds


class Call(Protocol[T_co]):
    """What one kind of Batch call does its own way; :meth:`Transport.exchange` does the rest."""

    @property
    def url(self) -> str:
        """The full URL of the call (with its query, if any)."""
        ...

    @property
    def where(self) -> str:
        """The call in Batch's terms for errors: ``/profiles/update``, ``audiences/view``."""
        ...

    @property
    def retry_event(self) -> str:
        """The event name of the warning logged before each retry."""
        ...

    def tokens(self) -> int:
        """Tokens the next attempt takes from the call's rate limiter."""
        ...

    def body(self) -> bytes | None:
        """The next attempt's JSON body (a POST), or None (a GET); asked once per attempt, as it leaves."""
        ...

    def read(self, response: Response) -> T_co | Retry:
        """Classify an answer that is neither 401/403 nor transient: the call's result, or a Retry.

        Raises:
            BatchContractError: The answer breaks the contract (:meth:`Transport.contract_error`).
        """
        ...

    def log_fields(self) -> dict[str, object]:
        """Fields of the retry warning that tell which call it is (what it carries, where to)."""
        ...


class TransportOptions(TypedDict, total=False):
    """The keyword arguments of :class:`Transport` beyond ``activation``, for whoever builds one."""

    session: aiohttp.ClientSession | None
    limiters: RateLimiterRegistry | None
    sleep: Callable[[float], Awaitable[None]]
    random: Callable[[], float]
    clock: Callable[[], float]


def transport_errors() -> tuple[type[BaseException], ...]:
    """Failures that leave us not knowing whether Batch applied a request.

    Resending is safe: profile updates are idempotent upserts, and an audience call says what
    each id's membership must be. ServerTimeoutError and ServerDisconnectedError are
    ClientConnectionErrors; ClientPayloadError is a body cut short. The tuple is built when an
    error is being matched: aiohttp is imported with the session, not with this module.
    """
    import aiohttp

    return (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


def deadline_reason(attempts: int, what: str, problem: str | None = None) -> str:
    """Why a call gave up at its deadline, after ``attempts``, before ``what``."""
    last = f" (last: {problem})" if problem else ""
    return f"deadline reached after {attempts} attempt(s), no time left for {what}{last}"


class Transport:
    """The HTTP link to Batch of one activation: every profile and audience call goes through it.

    Use between :meth:`open` and :meth:`close`. Unless a session is injected, the transport
    owns one ``aiohttp.ClientSession`` with an explicit total timeout and a connection pool
    sized to ``destination.concurrency`` (callers bound their own in-flight calls to the
    same number); it is made by the first call, so a transport that sends nothing never
    loads aiohttp.

    Args:
        destination: The activation's destination settings.
        credentials: The REST API key and project key.
        activation: Activation name, used in errors and logs.
        session: A session to use instead of creating one (not closed by the transport).
        limiters: Rate limiter registry; defaults to the process-wide one, so every
            activation of this process that shares a project key shares its budgets.
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
        self.destination = destination
        self.activation = activation
        self._credentials = credentials
        self._redactor = Redactor([credentials.api_key.get_secret_value(), credentials.project_key.get_secret_value()])
        self._injected_session = session
        self._session: aiohttp.ClientSession | None = session
        # Between open() and close(): calls may be sent (the session itself comes with the first).
        self._is_open = False
        self._limiters = PROCESS_LIMITERS if limiters is None else limiters
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self.log: Logger = log.bind(activation=activation)
        # Attempts in a row that could not connect; any answer from the host resets it.
        self._connect_failures = 0
        # Attempts in a row that connected but got no answer within their full timeout.
        self._silent_attempts = 0
        # Whether the host answered the probe (once per transport), and the lock that makes
        # concurrent first calls wait for one probe.
        self._probed = False
        self._probe_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Transport(activation={self.activation!r}, base_url={self.destination.base_url!r})"

    # -- the session -------------------------------------------------------------------------

    def open(self) -> None:
        """Let calls be sent; the session is made by the first of them (:meth:`_opened`), not here.

        A run with nothing to send opens and closes its transport without ever importing
        aiohttp (~0.1 s of imports, TLS contexts built with them) or making a session
        (docs/how-a-run-works.md, "Start-up").
        """
        self._is_open = True

    async def close(self) -> None:
        """Close the session if this transport created one; a transport that sent nothing has none."""
        self._is_open = False
        session, self._session = self._session, self._injected_session
        if session is not None and session is not self._injected_session:
            await session.close()

    # -- one call, with its retries ----------------------------------------------------------

    async def exchange(
        self, call: Call[T], *, deadline: float | None, limiter: ProfileRateLimiter | None, tally: Tally
    ) -> T:
        """Send ``call`` until an answer settles it: what ``call.read`` made of that answer.

        Each attempt first takes ``call.tokens()`` from ``limiter`` (when the destination
        paces its calls) and never outlives ``deadline``; a transient answer is retried after
        a backoff, within ``destination.max_attempts`` (429s within their own, larger bound).
        ``tally`` counts the attempts and the waits as they happen. Call
        :meth:`ensure_answering` first.

        Raises:
            GiveUp: The attempts ran out, or the deadline would pass before the next attempt
                or the end of a wait.
            BatchAuthError: 401/403.
            BatchContractError: ``call.read`` found the answer breaks the contract.
            BatchUnreachable: The host cannot be connected to, or does not answer
                (:meth:`count_unanswered`).
        """
        while True:
            timeout = await self._wait_for_turn(call, deadline, limiter, tally)
            answer = await self._attempt(call, timeout, tally)
            if not isinstance(answer, Retry):
                return answer
            self._count_failure(answer, tally)
            await self._wait_before_retry(call, answer, deadline, tally)

    async def _wait_for_turn(
        self, call: Call[T], deadline: float | None, limiter: ProfileRateLimiter | None, tally: Tally
    ) -> float:
        """Wait for the rate limiter within the deadline, and return the next attempt's timeout.

        Raises:
            GiveUp: The limiter would let the call go only after the deadline, or it has passed.
        """
        if limiter is not None and self.destination.rate_limit:
            try:
                tally.wait_seconds += await limiter.acquire(call.tokens(), max_wait=self.remaining(deadline))
            except RateLimitWaitTooLong as error:
                raise GiveUp(f"deadline reached: {error}") from error
        remaining = self.remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise GiveUp(deadline_reason(tally.attempts, "the next attempt"))
        timeout = self.destination.request_timeout_seconds
        # Never let an attempt outlive the lease or the function's time budget.
        return timeout if remaining is None else min(timeout, remaining)

    async def _attempt(self, call: Call[T], timeout_seconds: float, tally: Tally) -> T | Retry:
        """Send the call once and classify what came back.

        Raises:
            BatchAuthError, BatchContractError, BatchUnreachable: As :meth:`exchange`.
        """
        tally.attempts += 1
        payload = call.body()
        started = self._clock()
        try:
            if payload is None:
                response = await self.get(call.url, timeout_seconds)
            else:
                response = await self.post(call.url, payload, timeout_seconds)
        except transport_errors() as error:
            problem = self.describe(error)
            self.count_unanswered(error, problem, call.url, timeout_seconds)
            return Retry(None, problem)
        finally:
            tally.wire_seconds += max(0.0, self._clock() - started)
        # The host answered: it is neither unreachable nor silent.
        self._connect_failures = 0
        self._silent_attempts = 0
        status = response.status
        if status in (401, 403):
            raise self.auth_error(response, call.where)
        if status in TRANSIENT_STATUSES:
            return Retry(status, f"HTTP {status}{error_details(response.body, self.scrub)}", response.retry_after)
        return call.read(response)

    def _count_failure(self, retry: Retry, tally: Tally) -> None:
        """Spend one attempt: a 429 from its own, larger budget, any other failure from ``max_attempts``.

        Raises:
            GiveUp: That budget is spent.
        """
        max_attempts = self.destination.max_attempts
        if retry.status == 429:
            tally.rate_limited += 1
            if tally.rate_limited >= RATE_LIMITED_ATTEMPTS_FACTOR * max_attempts:
                raise GiveUp(f"rate limited {tally.rate_limited} times (last: {retry.problem})")
        else:
            tally.failures += 1
            if tally.failures >= max_attempts:
                raise GiveUp(f"{tally.failures} attempts failed (last: {retry.problem})")

    async def _wait_before_retry(self, call: Call[T], retry: Retry, deadline: float | None, tally: Tally) -> None:
        """Sleep the backoff before the next attempt, unless the deadline comes first.

        Raises:
            GiveUp: The backoff would not end before the deadline.
        """
        wait = self.backoff(tally.attempts, retry.retry_after)
        remaining = self.remaining(deadline)
        if remaining is not None and wait >= remaining:
            raise GiveUp(deadline_reason(tally.attempts, f"a {wait:.2f} s backoff", retry.problem))
        self.log.warning(
            call.retry_event,
            **call.log_fields(),
            status=retry.status,
            problem=retry.problem,
            attempt=tally.attempts,
            wait_seconds=round(wait, 3),
        )
        await self._sleep(wait)
        tally.wait_seconds += wait

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after ``attempt`` failed: Batch's ``Retry-After`` (capped), else full jitter."""
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP_SECONDS)
        # Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))].
        ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** min(attempt - 1, 30))
        return self._random() * ceiling

    def remaining(self, deadline: float | None) -> float | None:
        """Seconds left before ``deadline`` on the transport's clock (None: no deadline)."""
        return None if deadline is None else deadline - self._clock()

    # -- outages -----------------------------------------------------------------------------

    def count_unanswered(self, error: BaseException, problem: str, url: str, timeout: float) -> None:
        """Count an attempt that got no answer toward an outage of the host (over the whole transport).

        Called while ``error`` is being handled; the outage errors do not chain it.

        Raises:
            BatchUnreachable: Too many attempts in a row could not connect, or got no answer
                within their full timeout.
        """
        import aiohttp  # loaded with the session (see _opened)

        if isinstance(error, aiohttp.ClientConnectorError):
            self._connect_failures += 1
            if self._connect_failures >= UNREACHABLE_AFTER_ATTEMPTS:
                raise BatchUnreachable(
                    f"activation '{self.activation}': cannot reach Batch at {url}: "
                    f"{self._connect_failures} attempts in a row could not connect (last: {problem}); "
                    "the run stopped, nothing more was sent and what Batch acknowledged before is kept. "
                    "Check destination.base_url and the network; the next run resends the rest"
                ) from None
        elif isinstance(error, TimeoutError) and timeout >= self.destination.request_timeout_seconds:
            # A full timeout, not one cut short by the deadline: the host said nothing.
            self._silent_attempts += 1
            if self._silent_attempts >= SILENT_AFTER_ATTEMPTS:
                raise self._silent_host(
                    f"{self._silent_attempts} requests in a row got no answer within "
                    f"{timeout:g} s (destination.request_timeout_seconds)"
                ) from None

    async def ensure_answering(self, deadline: float | None) -> None:
        """Probe the host once per transport: it must give an HTTP answer (any status) quickly.

        A probe that cannot connect says nothing more than the call would: the calls' own
        bounded connect failures report it. A probe cut short by the deadline is not counted
        (the next call probes again). Only a host that connects and stays silent is an
        outage here.

        Raises:
            BatchUnreachable: :data:`PROBE_ATTEMPTS` probes in a row got no answer.
        """
        if self._probed:
            return
        import aiohttp  # loaded with the session (see _opened)

        async with self._probe_lock:
            silent = 0
            while not self._probed:
                timeout = min(PROBE_TIMEOUT_SECONDS, self.destination.request_timeout_seconds)
                remaining = self.remaining(deadline)
                cut = remaining is not None and remaining < timeout
                if remaining is not None and remaining <= 0:
                    return  # the call itself reports the deadline
                try:
                    await self._probe(min(timeout, remaining) if remaining is not None else timeout)
                except aiohttp.ClientConnectorError:
                    # Refused, or no such host: the calls' own connect failures stop the run
                    # within seconds; probing again before each would only slow that down.
                    self._probed = True
                except TimeoutError as error:
                    if cut:
                        return
                    silent += 1
                    self.log.warning("batch_probe_silent", url=self.destination.base_url, attempt=silent)
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
                    # A dropped connection or a garbled answer: the host spoke, the calls and
                    # their retries deal with the rest.
                    self._probed = True
                else:
                    self._probed = True

    async def _probe(self, timeout_seconds: float) -> None:
        """A GET on the API root that changes nothing and carries no key; any HTTP answer will do."""
        import aiohttp  # loaded with the session (see _opened)

        async with self._opened().get(
            f"{self.destination.base_url}/",
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            allow_redirects=False,
        ):
            pass  # any status: the host speaks HTTP

    def _silent_host(self, what: str) -> BatchUnreachable:
        return BatchUnreachable(
            f"activation '{self.activation}': Batch at {self.destination.base_url} does not answer: {what}. "
            "The run stopped as a Batch outage: nothing more was sent, what Batch acknowledged before is kept "
            "and the next run resends the rest. Check destination.base_url (host and port) and the network"
        )

    # -- one attempt -------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """The full URL of an API path (``profiles/update``, ``audiences/view``)."""
        return f"{self.destination.base_url}/{self.destination.api_version}/{path}"

    def limiter(self, budget: Budget) -> ProfileRateLimiter:
        """The process-wide (or injected registry's) limiter of this project key for ``budget``."""
        return self._limiters.shared(self._credentials.project_key.get_secret_value(), budget)

    async def post(self, url: str, payload: bytes, timeout_seconds: float) -> Response:
        """POST a JSON body once, with the keys; Batch's answer, whatever its status."""
        return await self._send("POST", url, payload, timeout_seconds)

    async def get(self, url: str, timeout_seconds: float) -> Response:
        """GET once, with the keys; Batch's answer, whatever its status."""
        return await self._send("GET", url, None, timeout_seconds)

    async def _send(self, method: str, url: str, payload: bytes | None, timeout_seconds: float) -> Response:
        import aiohttp  # loaded with the session (see _opened)

        async with self._opened().request(
            method,
            url,
            data=payload,
            headers=self._headers(json_body=payload is not None),
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            allow_redirects=False,
        ) as response:
            body = await response.read()
            return Response(response.status, body, parse_retry_after(response.headers.get("Retry-After")))

    def warm(self) -> None:
        """Begin importing aiohttp on a thread of its own, for a run that will send soon (:mod:`sync.preload`).

        Nothing is made: the first call still makes the session (:meth:`_opened`), it only
        finds aiohttp imported, or waits for the import already under way.
        """
        if self._session is None:
            preload("aiohttp")

    def ready(self) -> None:
        """Make the session now, if no call has yet: before a caller computes a call's deadline.

        The first call would make it (:meth:`_opened`), but importing aiohttp and building its
        TLS contexts takes ~0.1 s, more on a busy machine, and a deadline computed before
        would lose that time: with a short lease, a first call could find its deadline gone
        before its first attempt. Idempotent; cheap once the session exists.
        """
        self._opened()

    def _opened(self) -> aiohttp.ClientSession:
        """The session, made by the first call that needs one (the one place a session is made).

        Nothing awaits between the check and the assignment, so calls that start together on
        the event loop share one session.
        """
        if self._session is not None:  # made by an earlier call, or injected
            return self._session
        if not self._is_open:
            raise RuntimeError("BatchClient must be used as 'async with BatchClient(...)'")
        # aiohttp loads here, with the first call, not with every command or every run.
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.destination.request_timeout_seconds),
            connector=aiohttp.TCPConnector(limit=self.destination.concurrency),
        )
        return self._session

    def _headers(self, *, json_body: bool) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._credentials.api_key.get_secret_value()}",
            "X-Batch-Project": self._credentials.project_key.get_secret_value(),
            "User-Agent": USER_AGENT,
        }
        if json_body:
            headers["Content-Type"] = "application/json"
        return headers

    # -- what is said about it ---------------------------------------------------------------

    def auth_error(self, response: Response, where: str) -> BatchAuthError:
        """Batch refused the keys (401/403) on ``where``: which keys to check, by their env names."""
        dest = self.destination
        return BatchAuthError(
            f"activation '{self.activation}': Batch answered {response.status} on "
            f"{where}{error_details(response.body, self.scrub)}: the REST API key is "
            f"not valid for this project; check the REST API key (env {dest.api_key_env}) and "
            f"the project key (env {dest.project_key_env})"
        )

    def contract_error(self, response: Response, what: str) -> BatchContractError:
        """Batch answered ``what`` (``a request of 3 profiles on /profiles/update``) as the contract does not say."""
        return BatchContractError(
            f"activation '{self.activation}': Batch answered {response.status} to "
            f"{what}{error_details(response.body, self.scrub)}"
        )

    def scrub(self, text: str) -> str:
        """Remove the secrets from text that came from elsewhere (a server or a library)."""
        return self._redactor.text(text)

    def describe(self, error: BaseException) -> str:
        """A transport failure in a few words, scrubbed and bounded."""
        if isinstance(error, TimeoutError):
            return "request timed out"
        detail = self.scrub(str(error))[:QUOTE_LIMIT]
        return f"{type(error).__name__}: {detail}" if detail else type(error).__name__
