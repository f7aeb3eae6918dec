"""Logging set-up (structlog): console for people, JSON for Cloud Logging; secrets scrubbed.

Cloud Logging parses a JSON line on stdout: ``severity`` and ``message`` are understood,
``logging.googleapis.com/labels`` become labels and ``logging.googleapis.com/trace``
links the line to a trace.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from sync.redact import REDACTOR, Redactor

_SEVERITY = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "warn": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}


class SecretScrubber:
    """A structlog processor: every string value of a log line goes through a :class:`Redactor`."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def add(self, secrets: Iterable[str]) -> None:
        """Register secret values with the redactor (see :meth:`sync.redact.Redactor.add`)."""
        self._redactor.add(secrets)

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        return {key: self._redactor.value(value) for key, value in event_dict.items()}


# The process-wide redactor, shared with the BigQuery errors (sync.redact).
scrubber = SecretScrubber(REDACTOR)


def _cloud_logging_shape(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    event_dict["severity"] = _SEVERITY.get(method, "DEFAULT")
    event_dict["message"] = event_dict.pop("event", "")
    labels = {key: str(event_dict[key]) for key in ("activation", "run_id") if key in event_dict}
    if labels:
        event_dict["logging.googleapis.com/labels"] = labels
    trace = event_dict.pop("trace", None)
    if trace:
        event_dict["logging.googleapis.com/trace"] = trace
    return event_dict


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it out and close it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json: bool = False, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once per process (CLI or Cloud Function)."""
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become text first, so the scrubber sees them too.
        structlog.processors.format_exc_info,
        scrubber,
    ]
    if json:
        processors += [_cloud_logging_shape, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
