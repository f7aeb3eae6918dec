"""How a BigQuery failure becomes a cepsync error: the source's error classes and their rule.

Its own module because the rule is a table of its own (which HTTP and gRPC answers are
transient, which are fatal and why), read apart from how the segment is read; the source
(:mod:`sync.sources.bigquery`, which re-exports the classes) calls :func:`translate` around
every API call, and the warehouse diff reuses the classes.

Fatal means "the same request will get the same answer": permission denied (403, gRPC
PERMISSION_DENIED/UNAUTHENTICATED), not found (404, NOT_FOUND), an invalid query or argument
(400, INVALID_ARGUMENT) and a result too large to receive (gRPC RESOURCE_EXHAUSTED "message
larger than max", BigQuery ``responseTooLarge``). Only a quota, a rate limit or an outage is
transient (:class:`BigQueryUnavailable`, a :class:`sync.errors.TransientError`).
"""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Mapping

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from sync.errors import FatalError, TransientError
from sync.redact import redact


class BigQuerySourceError(FatalError):
    """BigQuery refused the segment; retrying the same run cannot help."""

    def __init__(self, message: str, *, activation: str, reason: str | None = None) -> None:
        self.activation = activation
        self.reason = reason
        super().__init__(f"activation '{activation}': {message}")


class BigQueryQueryInvalid(BigQuerySourceError):
    """The segment SQL (or a parameter) is invalid: syntax, unknown name, type mismatch."""


class BigQueryBytesLimitExceeded(BigQuerySourceError):
    """The query would bill more than ``maximum_bytes_billed``."""


class BigQueryNotFound(BigQuerySourceError):
    """A dataset, table or project the segment needs does not exist (or is in another location)."""


class BigQueryPermissionDenied(BigQuerySourceError):
    """The credentials were refused (expired, revoked), or the identity lacks a BigQuery permission."""


class BigQueryResultTooLarge(BigQuerySourceError):
    """A result or a Storage Read message is larger than the receiving side accepts.

    Retrying reads the same rows into the same limit, so it is fatal: a gRPC channel capped
    below the server's message size (``Received message larger than max``), or BigQuery's
    ``responseTooLarge`` for a query result that exceeds its response limit.
    """


class BigQueryUnavailable(TransientError):
    """BigQuery stayed unavailable (429/5xx/timeouts) through every bounded retry."""

    def __init__(self, message: str, *, activation: str) -> None:
        self.activation = activation
        super().__init__(f"activation '{activation}': {message}")


def translate(error: Exception, *, action: str, activation: str, maximum_bytes_billed: int | None) -> Exception | None:
    """The cepsync error a BigQuery failure while ``action`` means, or None when it is not BigQuery's.

    Transient (:class:`BigQueryUnavailable`): retries exhausted, a timeout, a connection
    failure, a quota, a rate limit or an outage. Everything else is a
    :class:`BigQuerySourceError` subclass: the same request would get the same answer.
    """
    if isinstance(error, api_exceptions.RetryError):
        cause = error.cause if isinstance(error.cause, Exception) else None
        detail = describe(cause) if cause is not None else "no answer"
        return BigQueryUnavailable(
            f"BigQuery unavailable while {action}, retries exhausted: {detail}", activation=activation
        )
    if isinstance(error, concurrent.futures.TimeoutError):
        return BigQueryUnavailable(f"BigQuery timed out while {action}", activation=activation)
    if isinstance(error, auth_exceptions.RefreshError | auth_exceptions.DefaultCredentialsError):
        return BigQueryPermissionDenied(
            f"Google credentials were refused while {action} (expired or revoked)", activation=activation
        )
    if isinstance(error, auth_exceptions.TransportError | ConnectionError):
        return BigQueryUnavailable(f"cannot reach BigQuery while {action}", activation=activation)
    if not isinstance(error, api_exceptions.GoogleAPICallError):
        return None
    reason = _reason(error)
    detail = describe(error)
    # Checked before the transient codes: gRPC reports an over-size message as
    # RESOURCE_EXHAUSTED (HTTP 429), which would otherwise read as a quota to wait out.
    if _too_large(error, reason):
        return BigQueryResultTooLarge(
            f"the result is too large to receive while {action}: {detail}. A Storage Read channel must accept "
            "messages of any size (see GRPC_CHANNEL_OPTIONS in sync/bigquery_clients.py); a query result over "
            "BigQuery's response limit needs use_storage_api: true",
            activation=activation,
            reason=reason,
        )
    if reason == "bytesBilledLimitExceeded":
        return BigQueryBytesLimitExceeded(
            f"the query would bill more than maximum_bytes_billed={maximum_bytes_billed}: {detail}",
            activation=activation,
            reason=reason,
        )
    if reason in ("rateLimitExceeded", "quotaExceeded", "backendError", "internalError") or isinstance(
        error,
        api_exceptions.TooManyRequests
        | api_exceptions.InternalServerError
        | api_exceptions.BadGateway
        | api_exceptions.ServiceUnavailable
        | api_exceptions.GatewayTimeout
        # gRPC ABORTED: a concurrency conflict the server asks the caller to retry.
        | api_exceptions.Aborted,
    ):
        return BigQueryUnavailable(f"BigQuery unavailable while {action}: {detail}", activation=activation)
    if isinstance(error, api_exceptions.NotFound):
        return BigQueryNotFound(f"not found while {action}: {detail}", activation=activation, reason=reason)
    if isinstance(error, api_exceptions.Forbidden | api_exceptions.Unauthorized):
        return BigQueryPermissionDenied(
            f"permission denied while {action}: {detail}", activation=activation, reason=reason
        )
    if isinstance(error, api_exceptions.BadRequest):
        return BigQueryQueryInvalid(
            f"BigQuery rejected the segment while {action}: {detail}", activation=activation, reason=reason
        )
    return BigQuerySourceError(f"BigQuery failed while {action}: {detail}", activation=activation, reason=reason)


# gRPC's own wording when a message exceeds a channel's max_receive_message_length (or the
# send limit): "Received message larger than max (7845001 vs. 4194304)".
_GRPC_TOO_LARGE = re.compile(r"(?:Received|Sent) message larger than max")


def _too_large(error: api_exceptions.GoogleAPICallError, reason: str | None) -> bool:
    if reason == "responseTooLarge":
        return True
    return isinstance(error, api_exceptions.ResourceExhausted) and bool(_GRPC_TOO_LARGE.search(str(error.message)))


def _reason(error: api_exceptions.GoogleAPICallError) -> str | None:
    for item in error.errors or []:
        if isinstance(item, Mapping) and isinstance(item.get("reason"), str):
            return str(item["reason"])
    return None


def describe(error: Exception) -> str:
    """The server's own explanation, first line only, without URLs' secrets, bounded in size."""
    message = ""
    if isinstance(error, api_exceptions.GoogleAPICallError):
        for item in error.errors or []:
            if isinstance(item, Mapping) and item.get("message"):
                message = str(item["message"])
                break
        if not message:
            message = str(error.message or "")
        code = f"HTTP {error.code}" if isinstance(error.code, int) else type(error).__name__
    else:
        code = type(error).__name__
        message = str(error)
    first_line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    first_line = redact(first_line)
    if len(first_line) > 500:
        first_line = first_line[:500] + "..."
    return f"{first_line} ({code})"
