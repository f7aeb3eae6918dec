"""Convert in columns: the payload JSON of the values Arrow alone can prove valid.

The converters of :mod:`sync.convert` are the rules, and they run on one Python value at a
time. Most values of a segment are plain (an ASCII address, a web URL, a name, a count),
and for those the converter's answer is the value itself: this module finds them with
Arrow kernels over the whole column (RE2 patterns, lengths), and writes their JSON text
(what :func:`sync.encode.json_value` writes for the converter's result) without a Python
object per row. Every other row (null, blank, too long, unusual, invalid) is left to the
converter, one distinct value at a time as before, so an error names the row and field
exactly as it did.

Each check below is *narrower* than its converter: a row it accepts is one the converter
certainly returns unchanged; a row it is unsure of goes to the converter. The tests hold
the two together (``tests/mapping/test_columns.py``, and the batch path against the
row-at-a-time reference). ``docs/mapping.md`` says what each Batch field accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.config import AttributeType
from sync.convert import (
    BLOCKED_CUSTOM_IDS,
    CUSTOM_CONVERTERS,
    MAX_ARRAY_ITEMS,
    MAX_CUSTOM_ID_LENGTH,
    MAX_STRING_LENGTH,
    MAX_URL_LENGTH,
    PLAIN_WEB_URL,
    Converter,
    convert_email,
    email_names,
)

__all__ = ["column_texts", "custom_id_column", "quoted"]

# A character json.encoder.encode_basestring escapes (what json.dumps(..., ensure_ascii=False)
# writes for a str): '"', '\\' and the C0 controls, nothing else (checked over every code
# point in the tests). A string without one is its own JSON between quotes.
_NEEDS_ESCAPE: Final = r'[\x00-\x1f"\\]'
# An ASCII letter or digit: a string holding one is never blank (str.isspace() is False, and
# it is not empty), whatever else it holds. Python's whitespace is wider than RE2's \s, so
# "not blank" is proven by what a string has, never by what it lacks.
_HAS_ALNUM: Final = r"[A-Za-z0-9]"

# sync.convert._PLAIN_EMAIL with a lowercase domain: the converter returns such an address
# as it is (it lowercases the domain, already lowercase). Anchored with \A and \z (RE2).
_LOWER_EMAIL: Final = r"\A[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@(?:[a-z0-9]+(?:-[a-z0-9]+)*\.)+[a-z]{2,63}\z"
# At most this many characters: under the converter's 254 and 256, and a domain of at most
# 62 characters, so no label is over 63 (the converter's DNS label check).
_LOWER_EMAIL_MAX_LENGTH: Final = 64

# sync.convert.PLAIN_WEB_URL, anchored (its syntax is RE2's too); [!-~] is printable ASCII
# without the space.
_PLAIN_WEB_URL: Final = rf"\A(?:{PLAIN_WEB_URL.pattern})\z"

# The ids the SDKs refuse, in any case: only ASCII strings lowercase to them (the one code
# point beyond ASCII whose lowercase is an ASCII letter is the Kelvin sign, "k"), so ASCII
# classes catch every spelling convert_custom_id refuses.
_BLOCKED_ID: Final = (
    r"\A(?:"
    + "|".join("".join(f"[{c.upper()}{c}]" for c in blocked) for blocked in sorted(BLOCKED_CUSTOM_IDS))
    + r")\z"
)

# Marks an item of a string array the checks refuse: a control character no accepted item
# holds, so a row's joined items contain it exactly when one of its items was refused.
_REFUSED_ITEM: Final = "\x00"


def _alternatives(names: frozenset[str]) -> str:
    # The names are lowercase letters (email-validator's lists); anything else would need
    # escaping in RE2, so refuse to build a pattern that might not mean what it says.
    if not all(name.isascii() and name.isalpha() and name.islower() for name in names):
        raise ValueError(f"unexpected names for a pattern: {sorted(names)}")
    return "|".join(sorted(names))


def quoted(strings: pa.Array) -> pa.StringArray:
    """Each string between double quotes (null stays null): its JSON when it needs no escape."""
    texts: pa.StringArray = pc.binary_join_element_wise('"', strings, '"', "")
    return texts


def _accepted(strings: pa.Array, accepted: pa.BooleanArray) -> pa.StringArray:
    """The quoted string where ``accepted`` (a null counts as not accepted), null elsewhere."""
    texts: pa.StringArray = pc.if_else(pc.fill_null(accepted, False), quoted(strings), None)
    return texts


def _plain_strings(strings: pa.Array) -> pa.BooleanArray:
    """Not blank, at most Batch's 300 characters, and nothing JSON escapes (null: null)."""
    return pc.and_(
        pc.and_(
            pc.less_equal(pc.utf8_length(strings), MAX_STRING_LENGTH),
            pc.match_substring_regex(strings, _HAS_ALNUM),
        ),
        pc.invert(pc.match_substring_regex(strings, _NEEDS_ESCAPE)),
    )


def _string_texts(strings: pa.Array) -> pa.StringArray:
    """``_convert_string``: a plain string of at most 300 characters is sent as it is."""
    return _accepted(strings, _plain_strings(strings))


def _email_texts(strings: pa.Array) -> pa.StringArray:
    """``convert_email``: a short ASCII address with a lowercase, ordinary domain is its own normal form.

    The converter's fast path (``_plain_email``) matches it, finds its domain's labels short
    and its top-level domain not special-use, its local part not a mailbox name the library
    lowercases, and returns ``local@domain.lower()``: the address itself.
    """
    accepted = pc.and_(
        pc.less_equal(pc.utf8_length(strings), _LOWER_EMAIL_MAX_LENGTH),
        pc.match_substring_regex(strings, _LOWER_EMAIL),
    )
    special_tlds, mailboxes = email_names()
    special = pc.match_substring_regex(strings, rf"\.(?:{_alternatives(special_tlds)})\z")
    mailbox = pc.match_substring_regex(strings, rf"\A(?i:{_alternatives(mailboxes)})@")
    return _accepted(strings, pc.and_(accepted, pc.invert(pc.or_(special, mailbox))))


def _url_texts(strings: pa.Array) -> pa.StringArray:
    """``_convert_url``: a web URL its fast pattern accepts is sent as it is (no quote or backslash to escape)."""
    accepted = pc.and_(
        pc.and_(
            pc.less_equal(pc.utf8_length(strings), MAX_URL_LENGTH),
            pc.match_substring_regex(strings, _PLAIN_WEB_URL),
        ),
        pc.invert(pc.match_substring(strings, '"')),
    )
    return _accepted(strings, pc.and_(accepted, pc.invert(pc.match_substring(strings, "\\"))))


def _integer_texts(integers: pa.Array) -> pa.StringArray:
    """``_convert_integer``: every integer of a signed (or narrow unsigned) column is in Batch's range.

    Its JSON is its decimal digits (``int.__repr__``), which Arrow's cast writes alike.
    """
    texts: pa.StringArray = integers.cast(pa.string())
    return texts


def _float_texts(floats: pa.Array) -> pa.StringArray:
    """``_convert_float``: a finite float is sent as ``float.__repr__`` writes it, -0.0 as 0.0.

    Not in Arrow alone (its shortest form is spelled apart from Python's: "1" for 1.0), but
    the very calls the converter and ``json_value`` make, without their per-value checks; a
    NaN or an infinity is left to the converter, which refuses it.
    """
    finite = pc.is_finite(floats)
    # Each -0.0 (equal to 0) becomes 0.0, as the converter sends it.
    values = pc.if_else(pc.equal(floats, 0), pa.scalar(0.0, floats.type), floats).to_pylist()
    texts: pa.StringArray = pc.if_else(
        pc.fill_null(finite, False),
        pa.array([None if value is None else float.__repr__(value) for value in values], pa.string()),
        None,
    )
    return texts


def _string_array_texts(lists: pa.Array) -> pa.StringArray:
    """``_convert_string_array``: 1 to 25 items, each a plain string, is sent as it is.

    A list with a null, blank, long or escaped item (the converter drops or refuses those),
    an empty list or a longer one is left to the converter.
    """
    items = pc.list_flatten(lists)
    marked = pc.if_else(pc.fill_null(_plain_strings(items), False), quoted(items), _REFUSED_ITEM)
    # list_flatten leaves out null lists; their length is counted as 0 here alike.
    lengths = pc.fill_null(pc.list_value_length(lists), 0)
    offsets = pc.cumulative_sum(pc.cast(lengths, pa.int32()))
    offsets = pa.concat_arrays([pa.array([0], pa.int32()), offsets])
    rebuilt = pa.ListArray.from_arrays(offsets, marked, mask=pc.is_null(lists))
    joined = pc.binary_join(rebuilt, ",")
    accepted = pc.and_(
        pc.and_(pc.greater_equal(lengths, 1), pc.less_equal(lengths, MAX_ARRAY_ITEMS)),
        pc.invert(pc.match_substring(joined, _REFUSED_ITEM)),
    )
    texts: pa.StringArray = pc.if_else(
        pc.fill_null(accepted, False), pc.binary_join_element_wise("[", joined, "]", ""), None
    )
    return texts


def _is_list_of_strings(arrow_type: pa.DataType) -> bool:
    return bool(pa.types.is_list(arrow_type) and pa.types.is_string(arrow_type.value_type))


def _is_double_or_single(arrow_type: pa.DataType) -> bool:
    # A half float reads back as a numpy value, not a float: the converter's.
    return arrow_type in (pa.float32(), pa.float64())


def _is_exact_integer(arrow_type: pa.DataType) -> bool:
    # uint64 can exceed Batch's signed 64-bit range: its values go to the converter.
    return bool(pa.types.is_signed_integer(arrow_type) or arrow_type in (pa.uint8(), pa.uint16(), pa.uint32()))


_COLUMN_PATHS: Final[Mapping[Converter, tuple[Callable[[pa.DataType], bool], Callable[[pa.Array], pa.StringArray]]]] = {
    convert_email: (pa.types.is_string, _email_texts),
    CUSTOM_CONVERTERS[AttributeType.STRING]: (pa.types.is_string, _string_texts),
    CUSTOM_CONVERTERS[AttributeType.URL]: (pa.types.is_string, _url_texts),
    CUSTOM_CONVERTERS[AttributeType.INTEGER]: (_is_exact_integer, _integer_texts),
    CUSTOM_CONVERTERS[AttributeType.FLOAT]: (_is_double_or_single, _float_texts),
    CUSTOM_CONVERTERS[AttributeType.STRING_ARRAY]: (_is_list_of_strings, _string_array_texts),
}


def column_texts(convert: Converter, array: pa.Array) -> pa.StringArray | None:
    """The JSON of ``convert``'s result for each row Arrow proves it for; null for the others.

    Args:
        convert: The field's converter (:mod:`sync.convert`).
        array: The field's column of one batch.

    Returns:
        One text per row: what ``json_value(convert(value))`` is, where the checks prove
        ``convert`` returns a value (never None or a Failure); null where the row is null or
        its value needs the converter. None when this converter or column type has no
        column path (every row then goes to the converter).
    """
    path = _COLUMN_PATHS.get(convert)
    if path is None:
        return None
    applies, texts = path
    if not applies(array.type):
        return None
    return texts(array)


def custom_id_column(array: pa.Array) -> pa.StringArray | None:
    """The Custom ID of each row where Arrow proves what ``convert_custom_id`` returns; null elsewhere.

    A string id that is not blank, at most 1,024 characters and not a placeholder the SDKs
    refuse is its own id (never trimmed); an integer id is its decimal digits. None for any
    other column type (a decimal id): every row then goes to the converter.
    """
    arrow_type = array.type
    if pa.types.is_integer(arrow_type):
        digits: pa.StringArray = array.cast(pa.string())
        return digits
    if not pa.types.is_string(arrow_type):
        return None
    accepted = pc.and_(
        pc.and_(
            pc.less_equal(pc.utf8_length(array), MAX_CUSTOM_ID_LENGTH),
            pc.match_substring_regex(array, _HAS_ALNUM),
        ),
        pc.invert(pc.match_substring_regex(array, _BLOCKED_ID)),
    )
    ids: pa.StringArray = pc.if_else(pc.fill_null(accepted, False), array, None)
    return ids
