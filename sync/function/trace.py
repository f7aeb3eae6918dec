"""The trace an invocation belongs to, from its headers, as Cloud Logging wants it on each log line.

Two headers carry it:

* W3C ``traceparent`` (www.w3.org/TR/trace-context/#traceparent-header), sent by Cloud Run
  and OpenTelemetry, and by Eventarc as the CloudEvent's ``traceparent`` extension. Parsed
  by OpenTelemetry's own propagator (``opentelemetry-api``, which google-api-core and
  google-cloud-pubsub already depend on): version ``ff``, all-zero ids, and a version ``00``
  header with extra fields are refused there, as the specification says.
* ``X-Cloud-Trace-Context`` (cloud.google.com/trace/docs/trace-context):
  ``TRACE_ID/SPAN_ID;o=OPTIONS``, with a *decimal* span id. OpenTelemetry's API has no
  propagator for it (that one lives in a separate package, opentelemetry-propagator-gcp,
  for one regular expression), so it is parsed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import format_span_id, format_trace_id, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# TRACE_ID/SPAN_ID;o=OPTIONS, where SPAN_ID is a decimal 64-bit integer and both the span and
# the options are optional.
_CLOUD_TRACE = re.compile(r"^(?P<trace>[0-9a-fA-F]{32})(?:/(?P<span>\d{1,20}))?(?:;o=(?P<options>\d+))?$")
_W3C = TraceContextTextMapPropagator()


class Headers(Protocol):
    """The part of a request's headers used here (werkzeug's ``EnvironHeaders`` fits)."""

    def get(self, key: str) -> str | None: ...


@dataclass(frozen=True)
class TraceContext:
    """A trace id, and the span and sampling decision when the header gave them."""

    trace_id: str
    span_id: str | None = None
    sampled: bool | None = None

    @classmethod
    def from_traceparent(cls, value: str | None) -> TraceContext | None:
        """W3C ``traceparent``: ``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``, or None if invalid."""
        if not value:
            return None
        context = _W3C.extract({"traceparent": value.strip().lower()})
        span = get_current_span(context).get_span_context()
        if not span.is_valid:
            return None
        return cls(format_trace_id(span.trace_id), format_span_id(span.span_id), span.trace_flags.sampled)

    @classmethod
    def from_cloud_trace_context(cls, value: str | None) -> TraceContext | None:
        """``X-Cloud-Trace-Context``: ``TRACE_ID/SPAN_ID;o=1`` (span id in decimal), or None if invalid."""
        match = _CLOUD_TRACE.match(value.strip()) if value else None
        if match is None or set(match["trace"]) == {"0"}:
            return None
        span = match["span"]
        span_hex = None
        if span is not None and 0 < int(span) < 2**64:
            span_hex = f"{int(span):016x}"  # Cloud Logging's spanId is 16 hex characters
        options = match["options"]
        return cls(match["trace"].lower(), span_hex, None if options is None else bool(int(options) & 1))

    def log_fields(self, project: str | None) -> dict[str, str | bool]:
        """Context fields for structlog; :mod:`sync.logs` turns ``trace`` into Cloud Logging's key.

        Cloud Logging links a line to a trace only by the full resource name, so without a
        project there is nothing useful to add.
        """
        if project is None:
            return {}
        fields: dict[str, str | bool] = {"trace": f"projects/{project}/traces/{self.trace_id}"}
        if self.span_id is not None:
            fields["logging.googleapis.com/spanId"] = self.span_id
        if self.sampled is not None:
            fields["logging.googleapis.com/trace_sampled"] = self.sampled
        return fields


def trace_from_headers(headers: Headers) -> TraceContext | None:
    """W3C ``traceparent`` first (sent by Cloud Run and OpenTelemetry), else ``X-Cloud-Trace-Context``."""
    return TraceContext.from_traceparent(headers.get("traceparent")) or TraceContext.from_cloud_trace_context(
        headers.get("X-Cloud-Trace-Context")
    )
