"""The activation's config as a run used it, kept in the run record (``record["config"]``).

Reports show it next to the run, so a reader sees what the sync did *with which settings*
even after the file changed. It holds no secret: the activation names the environment
variables that hold the Batch keys, never their values, and user information or a query
string in the Batch URL is dropped here in case someone put a credential there.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sync.config import Activation, mapping_version


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def config_as_run(activation: Activation) -> dict[str, Any]:
    """The activation as JSON-ready data, plus its mapping version; no secret values."""
    data = activation.model_dump(mode="json")
    destination = data.get("destination") or {}
    if isinstance(destination.get("base_url"), str):
        destination["base_url"] = _without_credentials(destination["base_url"])
    data["mapping_version"] = mapping_version(activation)
    return data
