"""State locations as URLs, read without opening anything (see :mod:`sync.runtime` for the stores).

``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``firestore://PROJECT/DATABASE?prefix=P``,
the bare word ``firestore`` (the deployed function's setting) and the per-user default. Its own
room so a command can name and check its state before the state stores (and pyarrow) load:
``cepsync run`` prints what it is about to do first (docs/how-a-run-works.md, "Start-up").
:mod:`sync.runtime` re-exports every name here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from sync.errors import ConfigError

__all__ = ["default_state_url", "expand_state_url", "sqlite_state_path", "state_label"]


def default_state_url(environ: Mapping[str, str]) -> str:
    """The CLI's state when neither ``--state`` nor ``CEPSYNC_STATE`` is given.

    One SQLite file per user, in the XDG state directory, so that the same activation run
    from any directory finds the same state (a path relative to the working directory
    planned a full resend from elsewhere).
    """
    base = environ.get("XDG_STATE_HOME") or ""
    # The XDG spec ignores a relative value; so do we.
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return f"sqlite:///{root / 'cepsync' / 'state.db'}"


def expand_state_url(value: str, environ: Mapping[str, str]) -> str:
    """``firestore`` alone means what it means to the deployed function (sync/function/settings.py):
    Firestore in ``GOOGLE_CLOUD_PROJECT``, database ``CEPSYNC_FIRESTORE_DATABASE`` (default
    ``(default)``), collection prefix ``CEPSYNC_FIRESTORE_PREFIX`` (default ``cepsync``).
    An empty value is the default state."""
    if not value:
        return default_state_url(environ)
    if value == "firestore":
        project = environ.get("GOOGLE_CLOUD_PROJECT") or ""
        database = environ.get("CEPSYNC_FIRESTORE_DATABASE") or "(default)"
        prefix = environ.get("CEPSYNC_FIRESTORE_PREFIX") or "cepsync"
        return f"firestore://{project}/{database}?prefix={prefix}"
    return value


def sqlite_state_path(url: str) -> str | None:
    """The file a ``sqlite:`` state URL names, as written; None for another scheme.

    The path is taken verbatim (no percent-decoding, as always): ``sqlite:///rel/path.db``,
    ``sqlite:////abs/path.db``. A query string is refused, not made part of the file name:
    a SQLite state takes no parameters (``?mode=ro`` created a file named ``x.db?mode=ro``),
    and the commands that only read (plan, history, report) open the state read-only anyway.

    Raises:
        ConfigError: no path, or a query string.
    """
    parsed = urlparse(url)
    if parsed.scheme != "sqlite":
        return None
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else parsed.path
    path, mark, query = path.partition("?")
    if mark:
        raise ConfigError(
            f"sqlite state URLs take no query parameters (got {query!r}): name the file only; plan, history "
            "and report open the state read-only by themselves",
            field="--state",
        )
    if not path:
        raise ConfigError("sqlite state URL needs a path, e.g. sqlite:///state/cepsync.db", field="--state")
    return path


def state_label(url: str) -> str:
    """How a command names an expanded state URL to a person: a SQLite state by its file.

    Raises:
        ConfigError: a SQLite URL without a path or with a query string, or a scheme that is
            neither ``sqlite`` nor ``firestore`` (the message :func:`sync.runtime.open_store` gives).
    """
    path = sqlite_state_path(url)
    if path is not None:
        return path
    scheme = urlparse(url).scheme
    if scheme != "firestore":
        raise ConfigError(
            f"unknown state URL scheme {scheme!r}: use sqlite:///PATH or firestore://PROJECT/DATABASE",
            field="--state",
        )
    return url
