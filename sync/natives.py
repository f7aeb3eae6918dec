"""The seven Batch native profile fields, in one table.

The config reads the mapped columns from it (``MappingConfig``), the mapper picks each
field's converter by its type (:func:`sync.convert.native_converter`) and the schema check
(``resolve_attribute_types``, :mod:`sync.mapping`) the source column types each can be read
from, so adding or renaming a native field is one row here plus its ``MappingConfig`` field.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple


class NativeType(enum.StrEnum):
    """What a native field holds: it decides the converter and the readable source types."""

    EMAIL = "email"
    PHONE = "phone"
    LANGUAGE = "language"
    REGION = "region"
    TIMEZONE = "timezone"
    SUBSCRIPTION = "subscription"


class NativeField(NamedTuple):
    """One native field: where the activation names its column, and the Batch key it sets."""

    field: str  # the key under `mapping:` in an activation file (a MappingConfig field)
    key: str  # the Batch profile key
    type: NativeType


# In payload order, which is also the order the raw fingerprint hashes the mapped columns
# in (Activation.mapped_columns): reordering the rows changes every stored fingerprint.
NATIVE_FIELDS: Final[tuple[NativeField, ...]] = (
    NativeField("email", "$email_address", NativeType.EMAIL),
    NativeField("phone", "$phone_number", NativeType.PHONE),
    NativeField("language", "$language", NativeType.LANGUAGE),
    NativeField("region", "$region", NativeType.REGION),
    NativeField("timezone", "$timezone", NativeType.TIMEZONE),
    NativeField("email_marketing", "$email_marketing", NativeType.SUBSCRIPTION),
    NativeField("sms_marketing", "$sms_marketing", NativeType.SUBSCRIPTION),
)
