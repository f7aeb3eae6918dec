"""Reading Batch's answers: what a 202 body says of each profile, and how errors are quoted.

Its own module because reading an answer is a pure function of the bytes Batch sent (and
the profiles they answer), apart from the client's sending, pacing and retrying
(:mod:`sync.batch.client`): which rows a ``SUCCESS_WITH_PARTIAL_ERRORS`` acknowledges,
rejects (their value: :func:`sync.batch.item_errors.is_value_refusal`) or leaves to be
resent, ``Retry-After``, and the error details quoted in messages. Every text quoted from
the network goes through ``scrub`` (the client's redactor) first and is bounded in size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sync.batch.endpoint import Endpoint
from sync.batch.item_errors import is_value_refusal
from sync.logs import Logger

# How much of a server-provided text we quote in errors and logs.
QUOTE_LIMIT = 300

SUCCESS = "SUCCESS"
SUCCESS_WITH_PARTIAL_ERRORS = "SUCCESS_WITH_PARTIAL_ERRORS"

Scrub = Callable[[str], str]


@dataclass
class Rejection:
    """A profile Batch listed in ``errors`` of a ``SUCCESS_WITH_PARTIAL_ERRORS`` answer."""

    custom_id: str
    reason: str
    attribute: str | None
    category: str | None

    def describe(self) -> str:
        """Batch's words for people: ``category: reason`` (``no category: reason`` without one)."""
        return f"{self.category or 'no category'}: {self.reason}"


class Answer(NamedTuple):
    """A 202 read against the profiles it answers."""

    acknowledged: list[str]
    refused: list[Rejection]  # value refusals: final
    failing: list[int]  # indices of the rows listed with another per-item error: resent
    item_errors: list[Rejection]  # their errors, in the same order


def read_accepted(body: bytes, ids: list[str], endpoint: Endpoint, *, scrub: Scrub, log: Logger) -> Answer | None:
    """Map a 202 body to what became of each row, or None when the body is not understood.

    ``log`` receives the evidence of what was read past: an ``errors`` that is not a list,
    an entry without a usable ``bulk_index``.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    code = document.get("code")
    if code == SUCCESS:
        return Answer(list(ids), [], [], [])
    if code != SUCCESS_WITH_PARTIAL_ERRORS:
        return None
    errors = document.get("errors")
    if not isinstance(errors, list):
        # The code says "some rows were refused" but not which: Batch applied the rest,
        # and the request as a whole was accepted (decision 5 + the brief's rule for a
        # known code). Keep the evidence in the log.
        log.warning(
            "batch_partial_errors_unreadable",
            endpoint=endpoint.value,
            errors=quote(json.dumps(errors), scrub),
        )
        return Answer(list(ids), [], [], [])
    by_index: dict[int, list[dict[str, object]]] = {}
    for entry in errors:
        index = entry.get("bulk_index") if isinstance(entry, dict) else None
        # bool is an int in Python; a JSON true is not an index.
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(ids):
            log.warning(
                "batch_partial_error_ignored",
                endpoint=endpoint.value,
                profiles=len(ids),
                error=quote(json.dumps(entry), scrub),
                why="bulk_index missing, not an integer or out of range",
            )
            continue
        by_index.setdefault(index, []).append(entry)
    answer = Answer([custom_id for index, custom_id in enumerate(ids) if index not in by_index], [], [], [])
    for index, entries in sorted(by_index.items()):
        found = rejection(ids[index], entries, scrub)
        # One error about the value is enough: Batch would refuse this payload again,
        # whatever else it said about the row.
        if any(is_value_refusal(entry) for entry in entries):
            answer.refused.append(found)
        else:
            answer.failing.append(index)
            answer.item_errors.append(found)
    return answer


def rejection(custom_id: str, entries: Sequence[Mapping[str, object]], scrub: Scrub) -> Rejection:
    """One Rejection per row, even when Batch lists several errors for it."""

    def text(value: object) -> str | None:
        return None if value is None else scrub(str(value))[:QUOTE_LIMIT]

    reasons = [text(entry.get("reason")) or "no reason given" for entry in entries]
    attributes = list(dict.fromkeys(a for a in (text(entry.get("attribute")) for entry in entries) if a))
    categories = list(dict.fromkeys(c for c in (text(entry.get("category")) for entry in entries) if c))
    return Rejection(
        custom_id=custom_id,
        reason="; ".join(reasons),
        attribute=",".join(attributes) or None,
        category=",".join(categories) or None,
    )


def item_errors_problem(errors: Sequence[Rejection]) -> str:
    """What a retry log line and a failure say about per-item errors that are not about the value."""
    plural = "" if len(errors) == 1 else "s"
    first = errors[0].describe()
    return f"{len(errors)} profile{plural} answered with a per-item error not about the value (first: {first})"


def error_details(body: bytes, scrub: Scrub) -> str:
    """`` (error_code: message)`` from Batch's error body, or a quote of an unexpected one."""
    if not body.strip():
        return ""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict) and ("error_code" in document or "error_message" in document):
        code = document.get("error_code")
        message = document.get("error_message")
        parts = [scrub(str(part))[:QUOTE_LIMIT] for part in (code, message) if part is not None]
        return f" ({': '.join(parts)})"
    return f" (body: {quote(body, scrub)})"


def quote(body: bytes | str, scrub: Scrub) -> str:
    """A server's text, scrubbed of secrets and cut to :data:`QUOTE_LIMIT` characters."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = scrub(text)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; None when absent or not a number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
