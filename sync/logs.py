"""Logging (structlog): console for people, JSON for Cloud Logging; secrets scrubbed; loaded when needed.

Cloud Logging parses a JSON line on stdout: ``severity`` and ``message`` are understood,
``logging.googleapis.com/labels`` become labels and ``logging.googleapis.com/trace``
links the line to a trace.

Every module of cepsync logs through a :class:`Logger` from :func:`get_logger`, and this is
the only module that imports structlog. Importing structlog imports its console renderer and
its tracebacks module, and with them rich's traceback and pretty-printer (~0.07 s), whatever
the renderer in use. So structlog loads with the first line that passes the level, and
:func:`configure_logging` waits until then: a `cepsync run` logs at ``warning``, so a run
with nothing to report (a run with no change, say) never loads it (docs/how-a-run-works.md,
"Start-up"). What a line looks like does not depend on when structlog loaded.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from sync.redact import REDACTOR, Redactor

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger

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


@dataclass(frozen=True, slots=True)
class _Settings:
    """What :func:`configure_logging` was asked, applied to structlog when it loads."""

    json: bool
    level: int
    stream: TextIO | None


# Until structlog loads, lines below this level are dropped here: the level of the last
# configure_logging (structlog's own default, before any, lets every level through).
_threshold = logging.NOTSET
# The configuration structlog gets when it loads, if configure_logging came first, and the
# lock under which a configuration is applied.
_pending: _Settings | None = None
_applying = threading.Lock()


def configure_logging(*, json: bool = False, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure logging once per process (CLI or Cloud Function).

    ``json`` renders each line as one JSON object shaped for Cloud Logging, otherwise as
    structlog's plain console line (no colours); either goes to ``stream`` (default: the
    current ``sys.stderr``). Lines below ``level`` are dropped. If structlog is not loaded
    yet, it is configured so when the first line at or above ``level`` is written.

    Raises:
        KeyError: ``level`` is not a level name of :mod:`logging`.
    """
    global _threshold, _pending
    settings = _Settings(json=json, level=logging.getLevelNamesMapping()[level.upper()], stream=stream)
    with _applying:
        _threshold = settings.level
        if "structlog" in sys.modules:
            _apply(settings)
            _pending = None
        else:
            _pending = settings


def _apply(settings: _Settings) -> None:
    import structlog

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become text first, so the scrubber sees them too.
        structlog.processors.format_exc_info,
        scrubber,
    ]
    if settings.json:
        processors += [_cloud_logging_shape, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(settings.level),
        logger_factory=structlog.PrintLoggerFactory(settings.stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def _configure_pending() -> None:
    """Give structlog the configuration waiting for it, once, before any line is written with it.

    The function's threads may write their first lines together: the others wait until the
    configuration is applied, and none writes with structlog's defaults meanwhile.
    """
    global _pending
    if _pending is None:
        return
    with _applying:
        if _pending is not None:
            _apply(_pending)
            _pending = None


class Logger:
    """A named logger with bound fields; structlog's bound logger does the writing, once a line passes the level.

    The methods take an event name and fields, as structlog's do (``log.warning("batch_request_retry",
    status=503)``); :meth:`exception` adds the exception being handled. :meth:`bind` returns a
    logger with more fields, as structlog's ``bind`` does.
    """

    __slots__ = ("_fields", "_name")

    def __init__(self, name: str, fields: Mapping[str, object] | None = None) -> None:
        self._name = name
        self._fields = dict(fields or {})

    def __repr__(self) -> str:
        return f"Logger({self._name!r})"

    def bind(self, **fields: object) -> Logger:
        """This logger with ``fields`` added to every line it writes."""
        return Logger(self._name, {**self._fields, **fields})

    def debug(self, event: str, **fields: object) -> None:
        self._write(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: object) -> None:
        self._write(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self._write(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: object) -> None:
        self._write(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: object) -> None:
        """An error line with the traceback of the exception being handled."""
        self._write(logging.ERROR, "exception", event, fields)

    def critical(self, event: str, **fields: object) -> None:
        self._write(logging.CRITICAL, "critical", event, fields)

    def _write(self, level: int, method: str, event: str, fields: dict[str, object]) -> None:
        if level < _threshold and "structlog" not in sys.modules:
            # Below the configured level: structlog would drop it, it need not load for that.
            # Once it is loaded, its own filter decides, as it always did.
            return
        _configure_pending()
        import structlog  # loaded here, with the first line written (module docstring)

        logger = structlog.get_logger(self._name)
        if self._fields:
            logger = logger.bind(**self._fields)
        getattr(logger, method)(event, **fields)


def get_logger(name: str) -> Logger:
    """The logger of a part of cepsync (``cepsync.engine``): loads nothing until it writes a line."""
    return Logger(name)


def bind_context(**fields: object) -> None:
    """Add ``fields`` to every line written from this context on (structlog's contextvars)."""
    _configure_pending()
    import structlog

    structlog.contextvars.bind_contextvars(**fields)


def clear_context() -> None:
    """Forget the fields :func:`bind_context` added in this context."""
    if "structlog" not in sys.modules:
        return  # nothing was ever bound: binding loads structlog
    import structlog

    structlog.contextvars.clear_contextvars()
