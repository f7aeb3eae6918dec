"""Batch Cloud Sync's column names as a mapping shorthand (``mapping.convention: batch_cloud_sync``).

Batch's own warehouse sync reads a table whose columns say what they are by name
(doc.batch.com, Cloud Sync, "Create a Sync from BigQuery to Batch Profile attributes"):

* ``custom_id`` is the Custom ID, ``last_updated_at`` the cursor it picks changed rows by;
* ``batch__NAME`` is the native field ``$NAME`` (``batch__email_address``: ``$email_address``);
* ``date__NAME`` is the date attribute ``NAME``, ``url__NAME`` the URL attribute ``NAME``;
* any other column is the custom attribute of the same name, typed by its column.

With the convention, such a table is synced without renaming. It is expanded here, against
the segment's schema at run start, into the explicit mapping a user could have written;
everything downstream (the mapper, the mapping version, the differ) sees only that.
``last_updated_at`` is never read: cepsync compares content, so it needs no cursor.

Explicit entries win: ``mapping.email: col`` beats a ``batch__email_address`` column (which
is then not read), an ``attributes`` entry for a convention column sets what it gives
(``name``, ``type``, ``on_null``) and keeps the convention's reading for the rest, and an
explicit attribute's Batch name beats a convention column of the same name (not read).
Every problem is a config error naming the activation and the column, before anything is
read or sent (docs/coming-from-batch-cloud-sync.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

import pyarrow as pa

from sync.config import (
    ATTRIBUTE_NAME,
    CLOUD_SYNC_ID_COLUMN,
    MAX_CUSTOM_ATTRIBUTES,
    Activation,
    AttributeType,
    CustomAttributeConfig,
)
from sync.errors import ConfigError
from sync.mapping import resolve_attribute_types
from sync.natives import NATIVE_FIELDS, NativeField

__all__ = ["CURSOR_COLUMN", "NATIVE_PREFIX", "TYPE_PREFIXES", "expand_convention", "resolve_mapping"]

# The cursor column Cloud Sync picks changed rows by: never read (cepsync diffs content).
CURSOR_COLUMN: Final = "last_updated_at"
NATIVE_PREFIX: Final = "batch__"
# Prefix -> the Batch type it marks.
TYPE_PREFIXES: Final = {"date__": AttributeType.DATE, "url__": AttributeType.URL}
# batch__NAME -> the native field whose Batch key is $NAME.
_NATIVES_BY_NAME: Final[dict[str, NativeField]] = {native.key.removeprefix("$"): native for native in NATIVE_FIELDS}
_FIELD = "mapping.convention"


class _Read(NamedTuple):
    """One custom attribute the convention reads: its column, Batch name and type (None: inferred)."""

    column: str
    name: str
    type: AttributeType | None


def resolve_mapping(
    activation: Activation, schema: pa.Schema, *, source: str
) -> tuple[Activation, dict[str, AttributeType]]:
    """The activation with its convention expanded, and every custom attribute's type.

    :func:`sync.mapping.resolve_attribute_types` of the expanded activation; an activation
    without a convention is returned as it is. A problem with a column the convention read
    is reported on ``mapping.convention`` (the file has no entry of its own for it).

    Raises:
        ConfigError: see :func:`expand_convention` and ``resolve_attribute_types``.
    """
    expanded, origins = expand_convention(activation, schema, source=source)
    try:
        return expanded, resolve_attribute_types(expanded, schema, source=source)
    except ConfigError as error:
        origin = origins.get((error.field or "").rsplit(".", 1)[0]) or origins.get(error.field or "")
        if origin is None:
            raise
        raise ConfigError(f"{error.message} ({origin})", source=source, field=_FIELD) from None


def expand_convention(activation: Activation, schema: pa.Schema, *, source: str) -> tuple[Activation, dict[str, str]]:
    """The explicit mapping the convention stands for, against the segment's schema.

    Returns:
        The expanded activation (``mapping.convention`` unset, every native and attribute
        explicit: the file's attributes first, in its order, then the convention's, in the
        schema's), and, for every field of it the convention wrote, where it came from
        (``{"mapping.email": "a column mapping.convention: batch_cloud_sync reads"}``).

    Raises:
        ConfigError: a ``batch__`` column names no native field; a column would give a Batch
            attribute name Batch refuses (uppercase, too long, empty after its prefix); two
            columns give one Batch name; more than 50 custom attributes; a native field in
            ``mapping.on_null`` that nothing maps.
    """
    mapping = activation.mapping
    if mapping.convention is None:
        return activation, {}
    where = f"activation '{activation.name}'"
    convention = f"a column mapping.convention: {mapping.convention.value} reads"

    def error(message: str, field: str = _FIELD) -> ConfigError:
        return ConfigError(f"{where}: {message}", source=source, field=field)

    if mapping.custom_id not in schema.names:
        raise error(
            f"the segment has no column '{mapping.custom_id}' for the Custom ID (Batch Cloud Sync's id column is "
            f"'{CLOUD_SYNC_ID_COLUMN}'; give mapping.custom_id if yours has another name)",
            field="mapping.custom_id",
        )
    explicit_natives = {native.field: column for native, column in mapping.mapped_natives()}
    explicit_columns = {attribute.column: attribute for attribute in activation.attributes}
    explicit_names = {attribute.name for attribute in activation.attributes if attribute.name is not None}
    natives: dict[str, str] = {}  # native field -> the batch__ column it is read from
    read: list[_Read] = []
    for column in schema.names:
        if column == mapping.custom_id or column.casefold() == CURSOR_COLUMN or column in explicit_natives.values():
            continue
        if column.startswith(NATIVE_PREFIX) and column not in explicit_columns:
            native = _NATIVES_BY_NAME.get(column.removeprefix(NATIVE_PREFIX))
            if native is None:
                known = ", ".join(NATIVE_PREFIX + name for name in _NATIVES_BY_NAME)
                raise error(f"column '{column}' names no Batch native field; a batch__ column is one of {known}")
            if native.field not in explicit_natives:
                natives[native.field] = column
            continue
        name, kind = column, None
        for prefix, prefixed_type in TYPE_PREFIXES.items():
            if column.startswith(prefix):
                name, kind = column.removeprefix(prefix), prefixed_type
        explicit = explicit_columns.get(column)
        if explicit is None and name in explicit_names:
            continue  # an explicit attribute of that Batch name wins; this column is not read
        read.append(_Read(column, name, kind))

    attributes = _attributes(activation, read, error)
    for native_field in mapping.on_null:
        if native_field not in explicit_natives and native_field not in natives:
            key = next(native.key for native in NATIVE_FIELDS if native.field == native_field)
            raise error(
                f"mapping.on_null names {native_field}, but neither mapping.{native_field} nor a column "
                f"{NATIVE_PREFIX}{key.removeprefix('$')} maps it",
                field=f"mapping.on_null.{native_field}",
            )
    origins = {f"mapping.{field}": convention for field in natives}
    for index, attribute in enumerate(attributes):
        if attribute.column not in explicit_columns:
            origins[f"attributes.{index}"] = convention
    expanded_mapping = mapping.model_copy(update={**natives, "convention": None})
    return activation.model_copy(update={"mapping": expanded_mapping, "attributes": attributes}), origins


def _attributes(
    activation: Activation, read: list[_Read], error: Callable[[str], ConfigError]
) -> list[CustomAttributeConfig]:
    """The file's attributes (with the convention's name and type where they give none), then the convention's."""
    by_column = {entry.column: entry for entry in read}
    attributes: list[CustomAttributeConfig] = []
    origin_of: dict[str, str] = {}  # Batch name -> the column that gives it
    for attribute in activation.attributes:
        entry = by_column.pop(attribute.column, None)
        if entry is not None:
            attribute = attribute.model_copy(
                update={
                    "name": attribute.name if attribute.name is not None else entry.name,
                    "type": attribute.type if attribute.type is not None else entry.type,
                }
            )
        attributes.append(attribute)
    attributes += [CustomAttributeConfig(column=e.column, name=e.name, type=e.type) for e in by_column.values()]
    for attribute in attributes:
        name = attribute.batch_name
        if not ATTRIBUTE_NAME.match(name):
            raise error(
                f"column '{attribute.column}' gives the Batch attribute name {name!r}, which must be 1-30 "
                "characters of a-z, 0-9 and _ (no uppercase): rename the column, or name it in attributes "
                f"('- column: {attribute.column}' with a 'name')"
            )
        if name in origin_of:
            raise error(
                f"columns '{origin_of[name]}' and '{attribute.column}' both give the Batch attribute {name!r}: "
                "rename one, or name one in attributes"
            )
        origin_of[name] = attribute.column
    if len(attributes) > MAX_CUSTOM_ATTRIBUTES:
        raise error(
            f"the convention maps {len(attributes)} custom attributes; Batch accepts at most "
            f"{MAX_CUSTOM_ATTRIBUTES} per profile: select fewer columns in the segment query"
        )
    return attributes
