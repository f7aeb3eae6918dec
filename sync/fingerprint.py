"""Fingerprint recipe (versioned). Two 64-bit hashes per profile.

**Payload fingerprint** — decides what is sent::

    blake2b(b"cepsync/payload/1\\0" + canonical_json(attributes), digest_size=8), big-endian unsigned

``canonical_json`` is UTF-8 JSON with sorted keys, no whitespace, no NaN/Infinity,
``-0.0`` written as ``0.0`` and non-ASCII kept as is. The attributes are the mapped
payload (already normalised: E.164 phones, ISO-8601 ``…Z`` dates, lowercase languages…),
so a cosmetic change in the source (``fr`` → ``FR``) that maps to the same payload is
not sent again. The payload fingerprint is *not* salted with the mapping version: the
payload is exactly what Batch holds for the keys we own, so if a mapping change leaves a
profile's payload unchanged there is nothing to resend.

**Raw fingerprint** — lets a delta run skip mapping unchanged rows. It is computed in
columns by the differ (DuckDB's ``hash()`` over the mapped columns, salted with the mapping
version, the column types, the source engine and the DuckDB version): see
:mod:`sync.diff`. It only says "the source values may have moved"; the payload
fingerprint alone decides what is sent, so it is the same whatever engine read the rows.

64 bits: a change is missed only if a profile's old and new payloads collide, about
one chance in 1.8e19 per change.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

# Bump when mapping rules change in a way that alters payloads (it is part of the mapping
# version, so every profile is re-mapped and what changed is resent).
# "2": a decimal or integer that a double cannot hold exactly is refused (inexact_number)
# instead of sent rounded; nanosecond and infinite timestamps are read (issue 19).
MAPPING_RULES_VERSION = "2"

PAYLOAD_SALT = b"cepsync/payload/1\0"


def _normalise(value: object) -> object:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite float in a payload")
        return 0.0 if value == 0 else value
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(item) for item in value]
    return value


def canonical_json(value: object) -> bytes:
    """Canonical UTF-8 JSON of a payload (sorted keys, compact, finite numbers)."""
    return json.dumps(
        _normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def canonical_payload(attributes: Mapping[str, object]) -> bytes:
    """:func:`canonical_json` of a payload the mapper built, without the normalising walk.

    The mapper already writes every float finite and ``0.0`` for ``-0.0``
    (``sync.convert._convert_float``), so the walk would return its input unchanged: the
    bytes are the same, at half the cost on the hot path of a full load.
    ``allow_nan=False`` still refuses a non-finite float, should one ever slip through.
    """
    return json.dumps(attributes, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def payload_fingerprint(attributes: Mapping[str, object]) -> int:
    return payload_fingerprint_of(canonical_json(attributes))


def payload_fingerprint_of(canonical: bytes) -> int:
    """Payload fingerprint of bytes already produced by :func:`canonical_json` (no second encoding)."""
    digest = hashlib.blake2b(PAYLOAD_SALT + canonical, digest_size=8).digest()
    return int.from_bytes(digest, "big")
