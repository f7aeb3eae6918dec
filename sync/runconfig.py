"""The activation's config as a run used it, kept in the run record (``record["config"]``).

Reports show it next to the run, so a reader sees what the sync did *with which settings*
even after the file changed. It holds no secret: the activation names the environment
variables that hold the Batch keys, never their values, and user information or a query
string in the Batch URL is dropped here in case someone put a credential there.

It is bounded: every run stores a copy, and a Firestore document holds at most 1 MiB. A
long text (a 5 MB ``description``, a generated query) is kept as its beginning plus its
length and SHA-256, so two runs still show whether the text changed; long lists and maps
(query parameters) keep their first entries and say how many there were.
"""

from __future__ import annotations

import hashlib
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from sync.config import Activation, mapping_version

# A text longer than this is cut to TEXT_KEPT characters plus a note of its length and hash.
MAX_TEXT: Final = 4_000
TEXT_KEPT: Final = 1_000
# Lists and maps keep this many entries (an activation has at most 50 attributes).
MAX_ITEMS: Final = 100


def bounded(value: object) -> object:
    """``value`` (JSON data) with long texts, lists and maps cut to a bounded size, saying so."""
    if isinstance(value, str):
        if len(value) <= MAX_TEXT:
            return value
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{value[:TEXT_KEPT]}… [cut: {len(value):,} characters, sha256 {digest}]"
    if isinstance(value, list):
        kept = [bounded(item) for item in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            kept.append(f"… [cut: {len(value):,} items]")
        return kept
    if isinstance(value, dict):
        items = list(value.items())
        kept_map: dict[object, object] = {key: bounded(item) for key, item in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            kept_map["…"] = f"[cut: {len(items):,} entries]"
        return kept_map
    return value


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def config_as_run(activation: Activation, *, resolved: Activation | None = None) -> dict[str, object]:
    """The activation as JSON-ready data, plus its mapping version; no secret values.

    ``resolved``: the activation as the run mapped it, when a mapping convention was
    expanded against the segment (sync/convention.py): its explicit ``mapping`` and
    ``attributes`` are kept as ``resolved_mapping``, and the mapping version is its own.
    """
    data = activation.model_dump(mode="json")
    destination = data.get("destination") or {}
    if isinstance(destination.get("base_url"), str):
        destination["base_url"] = _without_credentials(destination["base_url"])
    if resolved is not None:
        data["resolved_mapping"] = resolved.model_dump(mode="json", include={"mapping", "attributes"})
    data["mapping_version"] = mapping_version(resolved or activation)
    kept = bounded(data)
    assert isinstance(kept, dict)  # a map stays a map
    return {str(key): value for key, value in kept.items()}
