"""The Batch destination of an activation: its config block and the two keys it sends.

Where profiles go (``destination:`` in the YAML, with the check of its URL) and how the
REST API key and project key are read from the environment: the part of the config that
touches secrets, kept apart from the segment and mapping rules so it can be read on its own.
:mod:`sync.config` re-exports every name here; the activation model holds a
:class:`DestinationConfig`.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from sync.errors import ConfigError

ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# An http(s) URL with a host: the Batch API root, a local emulator's endpoint.
HTTP_URL = re.compile(r"^https?://[^\s/]+")
# One label of a host name: letters, digits, inner hyphens (RFC 1123) and underscores (which
# container networks use), at most 63.
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


class EndpointPolicy(enum.StrEnum):
    AUTO = "auto"
    UPDATE = "update"
    MASS_UPDATE = "mass-update"


class DestinationConfig(BaseModel):
    # As every block of sync.config (its _Strict): an unknown key is an error, a loaded config is frozen.
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_env: str = Field(description="Environment variable holding the Batch REST API key.")
    project_key_env: str = Field(description="Environment variable holding the Batch project key.")
    base_url: str = Field("https://api.batch.com", description="Batch API root; point it at the simulator locally.")
    api_version: str = Field("2.11", pattern=r"^2\.\d{1,2}$")
    endpoint: EndpointPolicy = EndpointPolicy.AUTO
    mass_update_threshold: int = Field(
        10_000, ge=1, description="With endpoint 'auto': a run sending at least this many profiles uses mass-update."
    )
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    request_timeout_seconds: float = Field(60.0, gt=0, le=600)
    max_attempts: int = Field(6, ge=1, le=20, description="Attempts per request on transient errors.")
    rate_limit: bool = Field(True, description="Pace sends to Batch's published limits (profiles/s).")

    @field_validator("api_key_env", "project_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_VAR_NAME.match(value):
            raise ValueError(f"must be an environment variable name, not a value: {value[:3]}...")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        problem = base_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value.rstrip("/")


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the Batch API root, or None; the message never quotes the URL.

    The client appends ``/{api_version}/profiles/...`` to it and sends the keys in headers, so
    it must be ``http(s)://HOST[:PORT][/PATH]``: no user or password (a credential in a URL
    ends up in logs, and Batch takes its keys from the headers), no query or fragment (the
    path appended after them would be lost), a host, and a port from 1 to 65535.
    """
    if any(char.isspace() or not char.isprintable() for char in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a valid URL (an IPv6 host must be written in [brackets])"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if parts.scheme.lower() not in ("http", "https") or not url.lower().startswith(f"{parts.scheme.lower()}://"):
        return "must be an http(s) URL such as https://api.batch.com"
    if "@" in parts.netloc:
        return (
            "must not hold a user name or password (USER:PASSWORD@HOST): Batch takes its keys from the "
            "environment variables named by api_key_env and project_key_env; remove them from the URL"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "must not have a query (?...) or a fragment (#...): the client appends /VERSION/profiles/... to it"
    host = parts.hostname or ""
    if not host:
        return "has no host: give http(s)://HOST[:PORT], such as https://api.batch.com"
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    if not _valid_host(host):
        return "has a host that is neither a DNS name nor an IP address"
    return None


def _valid_host(host: str) -> bool:
    """A DNS name (internationalised ones too) or an IPv4/IPv6 address, as urlsplit gives it."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.rstrip(".").split(".")
    return len(ascii_host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


# What surrounds a key by accident and is removed: the newline `echo KEY | gcloud secrets
# create` stores, a Windows editor's CR LF, a pasted space or tab.
KEY_WHITESPACE = " \t\r\n\f\v"


def _key_problem(key: str) -> str | None:
    """What makes a (stripped) key unusable in a request header, without quoting it; None if fine.

    A Batch key travels in ``Authorization: Bearer KEY`` and ``X-Batch-Project: KEY``, so it must
    be visible ASCII without spaces (RFC 9110 ``field-vchar``): a control character makes the
    HTTP library refuse the header, a non-ASCII one cannot be sent as it is, and a space would
    split the bearer token. Only the position is named: the key itself is a secret.
    """
    if not key:
        return "is empty (or holds only whitespace)"
    for position, char in enumerate(key, start=1):
        if "!" <= char <= "~":
            continue
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            what = f"a control character (U+{code:04X})"
        elif char.isspace():
            what = "a space" if char == " " else "a whitespace character"
        elif code < 0x100 and not char.isprintable():
            what = f"a control character (U+{code:04X})"
        else:
            what = "a non-ASCII character"
        return (
            f"holds {what} at character {position} of {len(key)}: a Batch key is printable ASCII without "
            "spaces; check how the secret was stored (whitespace around it is removed already)"
        )
    return None


def read_key(environ: Mapping[str, str], name: str, *, activation: str, field: str) -> str:
    """The Batch key in environment variable ``name``, stripped of surrounding whitespace.

    Raises:
        ConfigError: The variable is unset or empty, or the key holds a character that cannot
            go into a request header; the message names the variable, never the value.
    """
    key = (environ.get(name) or "").strip(KEY_WHITESPACE)
    problem = _key_problem(key) if environ.get(name) else "is not set"
    if problem is not None:
        raise ConfigError(
            f"environment variable {name} (Batch credentials) {problem}",
            source=f"activation '{activation}'",
            field=field,
        )
    return key


class _ActivationLike(Protocol):
    """What :meth:`Credentials.from_env` reads of an activation (sync.config imports this module)."""

    @property
    def name(self) -> str: ...

    @property
    def destination(self) -> DestinationConfig: ...


class Credentials:
    """The two Batch secrets, resolved from the environment. The repr never shows them."""

    __slots__ = ("api_key", "project_key")

    def __init__(self, api_key: str, project_key: str) -> None:
        self.api_key = SecretStr(api_key)
        self.project_key = SecretStr(project_key)

    def __repr__(self) -> str:
        return "Credentials(api_key='**********', project_key='**********')"

    @classmethod
    def from_env(cls, activation: _ActivationLike, environ: Mapping[str, str] | None = None) -> Credentials:
        """Both keys from the environment (Secret Manager mounts them there in the function).

        Surrounding whitespace is removed (a key stored with ``echo KEY | gcloud secrets
        create`` ends with a newline); anything else a header cannot carry is a config error
        naming the variable (:func:`read_key`).
        """
        env = os.environ if environ is None else environ
        dest = activation.destination
        missing = [name for name in (dest.api_key_env, dest.project_key_env) if not env.get(name)]
        if missing:
            raise ConfigError(
                f"environment variable(s) {', '.join(missing)} not set (Batch credentials)",
                source=f"activation '{activation.name}'",
                field="destination",
            )
        api_key = read_key(env, dest.api_key_env, activation=activation.name, field="destination.api_key_env")
        project_key = read_key(
            env, dest.project_key_env, activation=activation.name, field="destination.project_key_env"
        )
        return cls(api_key, project_key)
