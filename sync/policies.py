"""The null and removal policies and the mapping convention: values of the activation model.

:mod:`sync.config` holds the fields (``on_null``, ``on_remove``, ``mapping.convention``,
``mapping.on_null``, ``attributes[].on_null``) and re-exports these names; what they do is
in docs/mapping.md ("Nulls"), :mod:`sync.removals` and :mod:`sync.convention`.
"""

from __future__ import annotations

import enum
from typing import Final

from pydantic.config import JsonDict

__all__ = [
    "CLOUD_SYNC_ID_COLUMN",
    "MappingConvention",
    "NullPolicy",
    "RemovalPolicy",
    "custom_id_optional_with_a_convention",
]


class NullPolicy(enum.StrEnum):
    """What a null warehouse value does to the Batch attribute: erase it, or leave Batch's value alone."""

    CLEAR = "clear"
    KEEP = "keep"


class RemovalPolicy(enum.StrEnum):
    """Mirror mode: what a profile that left the segment gets (``on_remove``)."""

    CLEAR = "clear"  # every key this activation owns is sent as null
    KEEP = "keep"  # nothing is sent; the profile is no longer tracked


class MappingConvention(enum.StrEnum):
    """A column-naming convention the mapping can read (docs/coming-from-batch-cloud-sync.md)."""

    BATCH_CLOUD_SYNC = "batch_cloud_sync"


# The id column of a table built for Batch Cloud Sync (the Custom ID unless mapping.custom_id names another).
CLOUD_SYNC_ID_COLUMN: Final = "custom_id"


def custom_id_optional_with_a_convention(schema: JsonDict) -> None:
    """JSON Schema of ``mapping``: ``custom_id`` is required unless ``convention`` is given (it then defaults)."""
    required = schema.get("required")
    if isinstance(required, list) and "custom_id" in required:
        required.remove("custom_id")
        schema["anyOf"] = [{"required": ["custom_id"]}, {"required": ["convention"]}]
