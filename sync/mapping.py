"""Row -> Batch profile payload: the schema check, and the mapper that runs a batch.

Two entry points, both pure:

* :func:`resolve_attribute_types` checks an activation's mapping against the segment's
  Arrow schema before anything is read (a missing column or an impossible type is a
  config error, not a million row errors), and fixes the Batch type of every custom
  attribute.
* :class:`ProfileMapper` runs the converters of :mod:`sync.convert` over a record batch
  (:meth:`ProfileMapper.convert_batch`): for every row the payload values, and every
  problem found, each with a :class:`sync.model.Reason`. :mod:`sync.encode` turns that
  into the JSON bodies and their fingerprints.

Mapping is the hot path of a run (a delta run maps every row whose raw values moved), so
converters are chosen per column at construction, and :mod:`sync.decode` hands each one
only the distinct values of a string or temporal column. The row-at-a-time reference
(``tests/support/reference_mapping.py``: one dict per row, each value converted in turn)
is what the batch path must agree with; the tests hold the two together.
``docs/mapping.md`` says what each Batch field accepts and how we normalise it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from sync.config import Activation, AttributeType, CustomAttributeConfig, InvalidValuePolicy, MappingConfig
from sync.convert import (
    CUSTOM_CONVERTERS,
    Converted,
    Converter,
    Failure,
    Unrepresentable,
    convert_custom_id,
    convert_date,
    has_timezone_data,
    lazy_modules,
    native_converter,
)
from sync.convert_columns import column_texts, custom_id_column, quoted
from sync.decode import (
    DecodedColumn,
    dates_in_columns,
    decode_column,
    failed_rows,
    is_string_type,
    is_temporal,
    readable_temporal,
    with_unrepresentable,
    zeros,
)
from sync.errors import ConfigError
from sync.model import RowIssue
from sync.natives import NATIVE_FIELDS, NativeType
from sync.preload import preload

__all__ = ["ConvertedBatch", "ConvertedField", "Failure", "MappedField", "ProfileMapper", "resolve_attribute_types"]


# --- The mapper ---------------------------------------------------------------------------


class MappedField(NamedTuple):
    """One mapped field: its source column, its Batch keys and the converter of its values."""

    column: str
    key: str  # bare key: "$email_address", "birthdate"; used for null
    present_key: str  # key for a present value: "date(birthdate)", "url(site)", else == key
    convert: Converter
    keep_null: bool = False  # on_null: keep: a null is left out of the payload, never sent


class ProfileMapper:
    """Maps source rows of one activation to Batch profile payloads.

    Build one per run (construction resolves converters and lookup tables) and call
    :meth:`convert_batch` for every record batch. The mapper holds no per-row state.

    Attributes:
        columns: The activation's mapped columns, custom_id first, in the order the raw
            fingerprint hashes them (``activation.mapped_columns``).
        owned_keys: The bare Batch keys this mapping writes: the native ``$...`` keys it
            maps and the custom attribute names (never ``date(...)``/``url(...)``).
        payload_keys: ``(bare key, present key)`` of every mapped field, in payload order:
            a payload holds one of the two unless the attribute was dropped or its null kept.
        kept_null_keys: The bare keys whose nulls are kept (``on_null: keep``): a null or
            dropped value of theirs is left out of the payload and of its fingerprint.
    """

    def __init__(self, activation: Activation, attribute_types: Mapping[str, AttributeType]) -> None:
        """Prepare the per-column converters.

        Args:
            activation: The validated activation.
            attribute_types: Column -> effective type of every custom attribute, as
                returned by :func:`resolve_attribute_types`.

        Raises:
            ConfigError: A custom attribute's column has no type in ``attribute_types``, or
                the time zone column is mapped and this machine has no IANA time zone data.
        """
        mapping = activation.mapping
        self.columns: list[str] = activation.mapped_columns
        self._id_column = mapping.custom_id
        self._reject_row = activation.on_invalid_value is InvalidValuePolicy.REJECT_ROW

        natives = mapping.mapped_natives()
        if any(native.type is NativeType.TIMEZONE for native, _ in natives) and not has_timezone_data():
            raise ConfigError(
                f"activation '{activation.name}': no IANA time zone database on this machine "
                "(install the 'tzdata' package)",
                field="mapping.timezone",
            )
        fields = [
            MappedField(
                column,
                native.key,
                native.key,
                native_converter(native.type, mapping.default_phone_region),
                activation.keeps_null(mapping.on_null.get(native.field)),
            )
            for native, column in natives
        ]

        for index, attribute in enumerate(activation.attributes):
            attribute_type = attribute_types.get(attribute.column)
            if attribute_type is None:
                raise ConfigError(
                    f"activation '{activation.name}': no resolved type for column '{attribute.column}' "
                    "(call resolve_attribute_types first)",
                    field=f"attributes.{index}.type",
                )
            name = attribute.batch_name
            if attribute_type is AttributeType.DATE:
                present_key = f"date({name})"
            elif attribute_type is AttributeType.URL:
                present_key = f"url({name})"
            else:
                present_key = name
            keep = activation.keeps_null(attribute.on_null)
            fields.append(MappedField(attribute.column, name, present_key, CUSTOM_CONVERTERS[attribute_type], keep))

        self._fields: tuple[MappedField, ...] = tuple(fields)
        self.owned_keys: frozenset[str] = frozenset(field.key for field in fields)
        # (bare key, key of a present value) of every field: what a payload holds when full.
        self.payload_keys: tuple[tuple[str, str], ...] = tuple((field.key, field.present_key) for field in fields)
        self.kept_null_keys: frozenset[str] = frozenset(field.key for field in fields if field.keep_null)
        # The validators the converters import at their first value (sync.convert.lazy_modules).
        self._lazy_modules = tuple(dict.fromkeys(name for native, _ in natives for name in lazy_modules(native.type)))

    def warm(self) -> threading.Thread | None:
        """Begin importing the validators the converters load on first use, on a thread (:mod:`sync.preload`).

        For a run that will map rows: the import (~0.06 s for email-validator and
        phonenumbers) overlaps DuckDB's read of those rows instead of delaying their mapping.
        None when there is nothing to import (no such field, or imported already).
        """
        return preload(*self._lazy_modules)

    @property
    def fields(self) -> tuple[MappedField, ...]:
        """Every mapped field with its converter, in payload order (read-only).

        The row-at-a-time reference in ``tests/support/reference_mapping.py`` walks these,
        one value at a time, to hold :meth:`convert_batch` to the same answers.
        """
        return self._fields

    @property
    def id_column(self) -> str:
        """The Custom ID column (named in every issue about the id)."""
        return self._id_column

    @property
    def reject_row(self) -> bool:
        """``on_invalid_value: reject_row``: an invalid attribute rejects its row (else it is dropped)."""
        return self._reject_row

    def convert_batch(self, batch: pa.RecordBatch) -> ConvertedBatch:
        """Run every converter over a record batch, column by column.

        Each mapped column is read out of the batch once (never a dict per row), and a
        string, boolean or temporal column is dictionary-encoded so its converter runs once
        per distinct value (a language or time zone column has a handful per batch). The
        converters see the same Python values as they would in a row dict of
        ``RecordBatch.to_pylist()``, so the results are the ones a row-at-a-time mapping
        puts in each row's payload: the reference in ``tests/support/reference_mapping.py``
        must agree, and the tests hold the two together.

        Args:
            batch: Rows of the segment whose schema passed :func:`resolve_attribute_types`.
                A mapped column missing from the batch reads as null, as a missing key of a row dict.
        """
        rows = batch.num_rows
        # Last one wins for a repeated name, as in the dicts of RecordBatch.to_pylist().
        positions = {name: index for index, name in enumerate(batch.schema.names)}
        id_position = positions.get(self._id_column)
        issues: dict[int, list[RowIssue]] = {}
        custom_ids = self._custom_ids(batch.column(id_position) if id_position is not None else None, rows, issues)

        decoded: dict[str, DecodedColumn] = {}
        fields: list[ConvertedField] = []
        for column, key, present_key, convert, keep in self._fields:
            position = positions.get(column)
            if position is None:
                fields.append(ConvertedField(column, key, present_key, [None], zeros(rows), False, keep))
                continue
            array = batch.column(position)
            unreadable: list[tuple[int, Unrepresentable]] = []
            texts: pa.StringArray | None = None
            if convert is convert_date and is_temporal(array.type):
                array, unreadable = readable_temporal(array)
                formatted = None if unreadable else dates_in_columns(array)
                if formatted is not None:
                    texts = quoted(formatted)  # digits, '-', ':', 'T', '.', 'Z': nothing to escape
            elif not unreadable:
                texts = column_texts(convert, array)
            if texts is None:
                source = decoded.get(column)
                if source is None:
                    source = decoded[column] = with_unrepresentable(decode_column(array), unreadable)
                values, codes = source
            else:
                # The rows Arrow answered for are done; the others (nulls, values the
                # column checks are unsure of) go to the converter, as any column's rows.
                values, codes = _the_rest(array, texts)
            # None is "no value" both as a source value and as a converter result.
            converted: list[Converted] = [None if value is None else convert(value) for value in values]
            has_failure = any(type(result) is Failure for result in converted)
            fields.append(ConvertedField(column, key, present_key, converted, codes, has_failure, keep, texts))
            if has_failure:
                for row in failed_rows(converted, codes):
                    failure = converted[row if codes is None else codes[row].as_py()]
                    assert isinstance(failure, Failure)  # failed_rows lists only these
                    issues.setdefault(row, []).append(RowIssue(column, failure.reason, failure.detail))
        return ConvertedBatch(rows, custom_ids, issues, tuple(fields), self._reject_row)

    def _custom_ids(self, array: pa.Array | None, rows: int, issues: dict[int, list[RowIssue]]) -> list[str | None]:
        """Each row's Custom ID (None when missing or invalid, with its issue added to ``issues``)."""
        if array is None:
            id_values: list[object] = [None] * rows
            known: list[str | None] = [None] * rows
        else:
            proven = custom_id_column(array)
            known = [None] * rows if proven is None else proven.to_pylist()
            if proven is not None and proven.null_count == 0:
                return known
            id_values = array.to_pylist()
        custom_ids: list[str | None] = []
        for row, (value, custom_id) in enumerate(zip(id_values, known, strict=True)):
            if custom_id is not None:
                custom_ids.append(custom_id)
                continue
            converted_id = convert_custom_id(value)
            if isinstance(converted_id, Failure):
                issues[row] = [RowIssue(self._id_column, converted_id.reason, converted_id.detail)]
                custom_ids.append(None)
            else:
                custom_ids.append(converted_id)
        return custom_ids


def _the_rest(array: pa.Array, texts: pa.StringArray) -> tuple[list[object], pa.Int64Array]:
    """The values of the rows ``texts`` has no text for, and the codes of every row (null where it has one)."""
    rows = len(array)
    if texts.null_count == 0:
        return [], pa.nulls(rows, pa.int64())
    rest = pc.is_null(texts)
    left = array.filter(rest)
    if left.null_count == len(left):
        # Only nulls are left (the usual case): each points at one None.
        return [None], pc.if_else(rest, pa.scalar(0, pa.int64()), pa.scalar(None, pa.int64()))
    values, codes = decode_column(left)
    if codes is None:
        codes = pa.array(range(len(values)), pa.int64())
    placed: pa.Int64Array = pc.replace_with_mask(pa.nulls(rows, pa.int64()), rest, codes)
    return values, placed


# --- Columns: what convert_batch hands to the encoder ---------------------------------------


class ConvertedField(NamedTuple):
    """One mapped field of a batch after conversion.

    Row i's result is, when ``texts`` is set and holds a text for it, that text: the JSON
    of a present value, proven in columns (:mod:`sync.convert_columns`); else
    ``values[codes[i]]`` when ``codes`` is set (a dictionary-encoded column: one converter
    call per distinct value; a row with a text has a null code), else ``values[i]``. A result is
    ``None`` (no value: the bare ``key`` is sent as null), a :class:`Failure` (the value
    is invalid: the row is rejected, or the attribute dropped), or the payload value,
    sent under ``present_key``. With ``keep_null`` (``on_null: keep``) a ``None`` is left
    out of the payload instead of sent as null.
    """

    column: str
    key: str
    present_key: str
    values: list[Converted]
    codes: pa.Int64Array | None
    has_failure: bool
    keep_null: bool = False
    texts: pa.StringArray | None = None

    def results(self) -> list[Converted]:
        """Each row's result as a Python value (a text read back from its JSON): for tests and previews."""
        codes: list[int | None] = self.codes.to_pylist() if self.codes is not None else list(range(len(self.values)))
        texts: list[str | None] = self.texts.to_pylist() if self.texts is not None else [None] * len(codes)
        results: list[Converted] = []
        for code, text in zip(codes, texts, strict=True):
            if text is not None:
                results.append(json.loads(text))
            else:
                assert code is not None, "a row without a text has a code"
                results.append(self.values[code])
        return results


class ConvertedBatch(NamedTuple):
    """A batch after :meth:`ProfileMapper.convert_batch`: ids, field results and issues."""

    rows: int
    custom_ids: list[str | None]  # None: the id is missing or invalid (the row is rejected)
    issues: dict[int, list[RowIssue]]  # row -> its problems, the id's first; rows without any are absent
    fields: tuple[ConvertedField, ...]  # in payload order
    reject_row: bool  # on_invalid_value: an invalid attribute rejects its row (else: it is dropped)


# --- Schema checks -------------------------------------------------------------------------

# Arrow type families, as far as mapping is concerned.
_STRING = "string"
_INTEGER = "integer"
_FLOAT = "float"
_DECIMAL = "decimal"
_INTEGRAL_DECIMAL = "integral decimal"
_BOOLEAN = "boolean"
_TEMPORAL = "date/timestamp"
_STRING_LIST = "list of strings"
_NULL = "null"
_OTHER = "other"

# A decimal with a scale is inferred float, and each value is sent only when the double
# keeps all its digits (inexact_number otherwise); a decimal without one is inferred
# integer, each value sent only within the signed 64-bit range (invalid_integer
# otherwise). Nothing is ever rounded (docs/mapping.md, "Numbers").
_INFERRED: Final[Mapping[str, AttributeType]] = {
    _STRING: AttributeType.STRING,
    _INTEGER: AttributeType.INTEGER,
    _INTEGRAL_DECIMAL: AttributeType.INTEGER,
    _FLOAT: AttributeType.FLOAT,
    _DECIMAL: AttributeType.FLOAT,
    _BOOLEAN: AttributeType.BOOLEAN,
    _TEMPORAL: AttributeType.DATE,
    _STRING_LIST: AttributeType.STRING_ARRAY,
}

# Which source families an explicit type may read. An all-null column fits any type.
_COMPATIBLE: Final[Mapping[AttributeType, frozenset[str]]] = {
    AttributeType.STRING: frozenset({_STRING, _NULL}),
    # A decimal with a scale may hold whole numbers: each value is checked (a fraction is
    # refused with invalid_integer, never rounded).
    AttributeType.INTEGER: frozenset({_INTEGER, _INTEGRAL_DECIMAL, _DECIMAL, _NULL}),
    AttributeType.FLOAT: frozenset({_FLOAT, _DECIMAL, _INTEGRAL_DECIMAL, _INTEGER, _NULL}),
    # Strings 'true'/'false' are read per row when a string column is typed boolean.
    AttributeType.BOOLEAN: frozenset({_BOOLEAN, _STRING, _NULL}),
    # Strings are parsed as ISO-8601 per row.
    AttributeType.DATE: frozenset({_TEMPORAL, _STRING, _NULL}),
    AttributeType.URL: frozenset({_STRING, _NULL}),
    AttributeType.STRING_ARRAY: frozenset({_STRING_LIST, _NULL}),
}

# Source families the custom_id, and a native field of each type, can be read from.
_CUSTOM_ID_COMPATIBLE: Final = frozenset({_STRING, _INTEGER, _INTEGRAL_DECIMAL, _DECIMAL})
_NATIVE_COMPATIBLE: Final[Mapping[NativeType, frozenset[str]]] = {
    NativeType.EMAIL: frozenset({_STRING, _NULL}),
    NativeType.PHONE: frozenset({_STRING, _INTEGER, _NULL}),
    NativeType.LANGUAGE: frozenset({_STRING, _NULL}),
    NativeType.REGION: frozenset({_STRING, _NULL}),
    NativeType.TIMEZONE: frozenset({_STRING, _NULL}),
    NativeType.SUBSCRIPTION: frozenset({_BOOLEAN, _STRING, _INTEGER, _NULL}),
}


def _family(arrow_type: pa.DataType) -> str:
    """The mapping family of an Arrow type (dictionary-encoded columns read as their values)."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if is_string_type(arrow_type):
        return _STRING
    if pa.types.is_boolean(arrow_type):
        return _BOOLEAN
    if pa.types.is_integer(arrow_type):
        return _INTEGER
    if pa.types.is_floating(arrow_type):
        return _FLOAT
    if pa.types.is_decimal(arrow_type):
        return _INTEGRAL_DECIMAL if arrow_type.scale == 0 else _DECIMAL
    if pa.types.is_date(arrow_type) or pa.types.is_timestamp(arrow_type):
        return _TEMPORAL
    if (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
        or pa.types.is_list_view(arrow_type)
        or pa.types.is_large_list_view(arrow_type)
    ):
        item_type = arrow_type.value_type
        if pa.types.is_dictionary(item_type):
            item_type = item_type.value_type
        return _STRING_LIST if is_string_type(item_type) else _OTHER
    if pa.types.is_null(arrow_type):
        return _NULL
    return _OTHER


def _refuse_ambiguous_columns(activation: Activation, schema: pa.Schema, *, source: str) -> None:
    """Refuse a mapped column the segment returns more than once (a join's two ``email``).

    DuckDB and BigQuery compare column names without regard to case, and a query that
    names two columns alike would silently give the first, so the mapping does not guess.
    An unmapped name that repeats is never read, so it is left alone.
    """
    counts: dict[str, list[str]] = {}
    for name in schema.names:
        counts.setdefault(name.casefold(), []).append(name)
    mapping = activation.mapping
    mapped = [("custom_id", mapping.custom_id)]
    mapped += [(native.field, getattr(mapping, native.field)) for native in NATIVE_FIELDS]
    mapped += [
        (f"attributes.{index}.column", attribute.column) for index, attribute in enumerate(activation.attributes)
    ]
    for field, column in mapped:
        if column is None:
            continue
        alike = counts.get(column.casefold(), [])
        if len(alike) > 1:
            spelled = ", ".join(f"'{name}'" for name in alike)
            raise ConfigError(
                f"activation '{activation.name}': column '{column}' is ambiguous: the segment returns "
                f"{len(alike)} columns named {spelled} (a join of two tables that both have it?); "
                "give each its own name with AS in the query",
                source=source,
                field=field if field.startswith("attributes.") else f"mapping.{field}",
            )


def resolve_attribute_types(activation: Activation, schema: pa.Schema, *, source: str) -> dict[str, AttributeType]:
    """Check the mapping against the segment's schema and fix every custom attribute's type.

    Runs before the run reads a row, so a broken mapping stops the run with one clear
    error instead of rejecting every row.

    Args:
        activation: The validated activation.
        schema: The segment's Arrow schema (``Source.schema()``).
        source: Where the activation came from (file path), for the error.

    Returns:
        Column -> effective :class:`AttributeType` for every custom attribute column:
        the explicit type when given, else the type inferred from the Arrow type
        (string → string, integers → integer, floats and decimals → float (each value
        checked to be exact as a double), decimals with scale 0 → integer, bool →
        boolean, date/timestamp → date, list of strings → string_array).

    Raises:
        ConfigError: A mapped column (custom_id, a native, an attribute) is not in the
            schema, or is in it twice (names compared without regard to case); a native
            column has a type it cannot be read from; an explicit type does not fit the
            column's Arrow type; a type cannot be inferred; or one column is given two
            different types.
    """
    columns = _SegmentColumns(activation, schema, source=source)
    _refuse_ambiguous_columns(activation, schema, source=source)
    _check_readable_columns(activation.mapping, columns)
    return _resolve_custom_types(activation.attributes, columns)


class _SegmentColumns:
    """The segment's columns as the mapping checks see them, and the error each check raises.

    Every check names the activation and the field of the mapping at fault; holding that
    here keeps the wording of the errors in one place.
    """

    __slots__ = ("arrow_types", "families", "schema", "source", "where")

    def __init__(self, activation: Activation, schema: pa.Schema, *, source: str) -> None:
        self.schema = schema
        self.source = source
        self.where = f"activation '{activation.name}'"
        self.families = {arrow_field.name: _family(arrow_field.type) for arrow_field in schema}
        self.arrow_types: dict[str, pa.DataType] = {arrow_field.name: arrow_field.type for arrow_field in schema}

    def error(self, message: str, *, field: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}", source=self.source, field=field)

    def family(self, column: str, *, field: str) -> str:
        """The column's type family; a column the segment does not return is an error on ``field``."""
        family = self.families.get(column)
        if family is None:
            names = self.schema.names
            available = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise self.error(f"column '{column}' is not in the segment (columns: {available or 'none'})", field=field)
        return family

    def unreadable(self, column: str, as_what: str, *, field: str) -> ConfigError:
        return self.error(
            f"column '{column}' has Arrow type {self.arrow_types[column]}, which cannot be read as {as_what}",
            field=field,
        )


def _check_readable_columns(mapping: MappingConfig, columns: _SegmentColumns) -> None:
    """The custom_id column, and each mapped native's, exist with a type their converter reads."""
    readable = [("custom_id", _CUSTOM_ID_COMPATIBLE)]
    readable += [(native.field, _NATIVE_COMPATIBLE[native.type]) for native in NATIVE_FIELDS]
    for field_name, families_read in readable:
        column = getattr(mapping, field_name)
        if column is None:
            continue
        if columns.family(column, field=f"mapping.{field_name}") not in families_read:
            raise columns.unreadable(column, field_name, field=f"mapping.{field_name}")


def _resolve_custom_types(
    attributes: Sequence[CustomAttributeConfig], columns: _SegmentColumns
) -> dict[str, AttributeType]:
    """Each custom attribute column's type; a column mapped twice must get the same type both times."""
    resolved: dict[str, AttributeType] = {}
    resolved_from: dict[str, int] = {}
    for index, attribute in enumerate(attributes):
        column = attribute.column
        attribute_type = _attribute_type(index, attribute, columns)
        previous = resolved.get(column)
        if previous is not None and previous is not attribute_type:
            raise columns.error(
                f"column '{column}' is mapped as {previous.value} "
                f"(attributes.{resolved_from[column]}) and as {attribute_type.value}",
                field=f"attributes.{index}.type",
            )
        resolved[column] = attribute_type
        resolved_from[column] = index
    return resolved


def _attribute_type(index: int, attribute: CustomAttributeConfig, columns: _SegmentColumns) -> AttributeType:
    """One attribute's type: the explicit one, which must fit the column, else the one its Arrow type implies."""
    column = attribute.column
    family = columns.family(column, field=f"attributes.{index}.column")
    if attribute.type is not None:
        if family not in _COMPATIBLE[attribute.type]:
            raise columns.unreadable(column, attribute.type.value, field=f"attributes.{index}.type")
        return attribute.type
    inferred = _INFERRED.get(family)
    if inferred is None:
        raise columns.error(
            f"cannot infer a Batch type for column '{column}' (Arrow type {columns.arrow_types[column]}); "
            "give one in 'type' or cast the column in the segment query",
            field=f"attributes.{index}.type",
        )
    return inferred
