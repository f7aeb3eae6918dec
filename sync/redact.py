"""One redactor for all text that leaves the process: log lines, Batch errors, BigQuery errors.

A :class:`Redactor` applies two rules to a string, in this order, and writes :data:`MASK`
in place of what it removes:

1. **Known secrets.** A registered value (the Batch REST API key and project key) is
   replaced wherever it appears. Values shorter than :data:`MIN_SECRET_LENGTH` are not
   registered: they would redact innocent text, and Batch keys are long random strings.
2. **Credentials in URLs.** A URL parameter whose name ends in ``key``, ``token``,
   ``signature`` or ``sig`` keeps its name and loses its value (``?key=AIza…`` becomes
   ``?key=<redacted>``): Google API errors can quote a request URL with an API key or a
   signed-URL signature in it.

The three paths share it: the log processor (:class:`sync.logs.SecretScrubber`, over the
process-wide :data:`REDACTOR`, which :func:`sync.runtime.build_client` feeds the Batch keys),
the Batch client's error text (a redactor of its own credentials) and the BigQuery source's
and warehouse diff's error text (the process-wide one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "<redacted>"
MIN_SECRET_LENGTH = 6
_SECRET_IN_URL = re.compile(r"(?i)([a-z_.-]*(?:key|token|signature|sig))=[^&\s]+")


class Redactor:
    """Replaces known secrets and URL credentials with :data:`MASK` (see the module docstring)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets: tuple[str, ...] = ()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Register secret values; short ones (under :data:`MIN_SECRET_LENGTH`) are ignored."""
        known = set(self._secrets) | {secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH}
        self._secrets = tuple(sorted(known, key=len, reverse=True))

    def text(self, text: str) -> str:
        """``text`` without the registered secrets and without credentials in URL parameters."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if "=" in text:
            text = _SECRET_IN_URL.sub(rf"\1={MASK}", text)
        return text

    def value(self, value: object) -> object:
        """Every string inside ``value`` (nested dicts, lists and tuples too) redacted; others as they are."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.value(item) for item in value)
        return value


# The process-wide redactor: log lines and warehouse errors. build_client registers the Batch keys.
REDACTOR = Redactor()


def redact(text: str) -> str:
    """``text`` through the process-wide :data:`REDACTOR`."""
    return REDACTOR.text(text)


__all__ = ["MASK", "MIN_SECRET_LENGTH", "REDACTOR", "Redactor", "redact"]
