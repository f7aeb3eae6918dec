"""The column paths of sync/convert_columns.py against the converters they stand in for.

A row the column checks accept must be one its converter returns a value for, and the text
must be exactly that value's JSON (``json_value``); a row they are unsure of is left to the
converter (null). Each check is tried on the values near its edges and on generated ones,
and the two facts the checks lean on (what JSON escapes, what lowercases to a blocked id)
are checked over every code point.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config import AttributeType
from sync.convert import (
    BLOCKED_CUSTOM_IDS,
    CUSTOM_CONVERTERS,
    Converter,
    Failure,
    convert_custom_id,
    convert_email,
)
from sync.convert_columns import column_texts, custom_id_column
from sync.encode import json_value

convert_string = CUSTOM_CONVERTERS[AttributeType.STRING]
convert_url = CUSTOM_CONVERTERS[AttributeType.URL]
convert_integer = CUSTOM_CONVERTERS[AttributeType.INTEGER]
convert_string_array = CUSTOM_CONVERTERS[AttributeType.STRING_ARRAY]

# Characters that sit on the checks' edges: ASCII punctuation the patterns treat apart,
# JSON's escapes, Python's whitespace beyond RE2's \s, letters whose case maps oddly.
EDGE_CHARACTERS = 'aZ09._+-@:/?#"\\ \t\n\r\x00\x1f\x7f\x85\xa0\u2028\u3000éİıKſ'
edge_text = st.text(
    alphabet=st.sampled_from(EDGE_CHARACTERS) | st.characters(blacklist_categories=("Cs",)), max_size=24
)


def accepted_texts(convert: Converter, array: pa.Array) -> int:
    """Assert every text ``column_texts`` writes is the converter's value's JSON; how many it wrote."""
    texts = column_texts(convert, array)
    assert texts is not None, f"no column path for {array.type}"
    assert len(texts) == len(array)
    written = 0
    for value, text in zip(array.to_pylist(), texts.to_pylist(), strict=True):
        if text is None:
            continue
        written += 1
        assert value is not None
        result = convert(value)
        assert result is not None
        assert not isinstance(result, Failure), (value, result.detail)
        assert json_value(result) == text, value
    return written


def test_a_string_json_does_not_escape_is_itself_between_quotes() -> None:
    needs_escape = re.compile(r'[\x00-\x1f"\\]')
    wrong = [
        hex(code)
        for code in range(0x110000)
        if not 0xD800 <= code <= 0xDFFF
        and needs_escape.match(chr(code)) is None
        and json_value(chr(code)) != f'"{chr(code)}"'
    ]
    assert wrong == []


def test_only_ascii_strings_lowercase_to_a_blocked_id() -> None:
    letters = set("".join(BLOCKED_CUSTOM_IDS))
    beyond_ascii = [
        hex(code)
        for code in range(0x80, 0x110000)
        if not 0xD800 <= code <= 0xDFFF and chr(code).lower() and set(chr(code).lower()) <= letters
    ]
    assert beyond_ascii == []


EMAILS = [
    "jane.doe@example.com",
    "j+tag_1-x@mail.example.co.uk",
    "a@b.io",
    "Jane.Doe@example.com",
    "jane@Example.com",  # an uppercase domain is the converter's
    "postmaster@example.com",  # a mailbox name the library lowercases
    "PostMaster@example.com",
    "jane@example.local",  # special-use
    "jane@example.test",
    "jane@example.localhost",
    "jane@my-local.example.com",
    " jane@example.com",
    "jane@example.com ",
    "jane..doe@example.com",
    ".jane@example.com",
    "jane@example..com",
    "jane@-example.com",
    "jane@example-.com",
    "jane@exa--mple.com",
    "jane@example.c",
    "jane@example.c0m",
    "inès@example.com",
    "jane@exämple.com",
    "jane@",
    "@example.com",
    "jane",
    "",
    "j" * 52 + "@example.com",  # 64 characters
    "j" * 53 + "@example.com",  # 65
    "jane@" + "a" * 63 + ".com",
    "jane@" + "a" * 64 + ".com",
    'ja"ne@example.com',
    "jane@example.com\n",
]


def test_emails() -> None:
    array = pa.array([*EMAILS, None], pa.string())
    assert accepted_texts(convert_email, array) == 6
    texts = column_texts(convert_email, array)
    assert texts is not None
    assert texts.to_pylist()[:4] == [
        '"jane.doe@example.com"',
        '"j+tag_1-x@mail.example.co.uk"',
        '"a@b.io"',
        '"Jane.Doe@example.com"',
    ]
    assert texts.to_pylist()[-1] is None


@settings(max_examples=300, deadline=None)
@given(
    local=st.text(alphabet='aZ09._+-"é İ', min_size=0, max_size=12),
    domain=st.text(alphabet="az09.-AZ", min_size=0, max_size=16),
    extra=edge_text,
)
def test_generated_emails(local: str, domain: str, extra: str) -> None:
    accepted_texts(convert_email, pa.array([f"{local}@{domain}", f"{local}@{domain}.com", extra, extra + "@x.fr"]))


STRINGS = [
    "Jane",
    "Chloé",
    "x",
    " Jane ",
    " ",
    "\t",
    "\xa0",
    "\u3000",
    "",
    "é",
    "ab\ncd",
    'a"b',
    "a\\b",
    "a" * 300,
    "a" * 301,
]


def test_strings() -> None:
    array = pa.array([*STRINGS, None], pa.string())
    assert accepted_texts(convert_string, array) == 5


@settings(max_examples=300, deadline=None)
@given(values=st.lists(edge_text | st.text(max_size=310), max_size=8))
def test_generated_strings(values: list[str]) -> None:
    accepted_texts(convert_string, pa.array(values, pa.string()))


URLS = [
    "https://shop.example.com/u/cust-1",
    "HTTP://EXAMPLE.COM",
    "http://example.com:8080/a?b=c#d",
    "https://example.com/a b",
    " https://example.com",
    'https://example.com/"quoted"',
    "https://example.com/back\\slash",
    "https://exämple.com",
    "https://",
    "http:/example.com",
    "myapp:///home",
    "https://example.com/" + "a" * 2028,  # 2048 characters
    "https://example.com/" + "a" * 2029,
]


def test_urls() -> None:
    array = pa.array([*URLS, None], pa.string())
    assert accepted_texts(convert_url, array) == 4


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(["http://", "HTTPS://", "ftp://", "https:/", ""]), rest=edge_text)
def test_generated_urls(scheme: str, rest: str) -> None:
    accepted_texts(convert_url, pa.array([scheme + rest, f"{scheme}example.com/{rest}"], pa.string()))


@pytest.mark.parametrize("arrow_type", [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint32()])
def test_integers(arrow_type: pa.DataType) -> None:
    info = (0, 1, -1, 127, -128) if arrow_type == pa.int8() else (0, 1, 255) if arrow_type == pa.uint8() else (0, 7)
    values = [*info, None]
    if arrow_type == pa.int64():
        values += [2**63 - 1, -(2**63)]
    if arrow_type == pa.uint32():
        values += [2**32 - 1]
    array = pa.array(values, arrow_type)
    assert accepted_texts(convert_integer, array) == len(values) - 1


convert_float = CUSTOM_CONVERTERS[AttributeType.FLOAT]


@pytest.mark.parametrize("arrow_type", [pa.float64(), pa.float32()])
def test_floats(arrow_type: pa.DataType) -> None:
    values = [0.0, -0.0, 1.0, 0.1, -2.5, 1e16, 1e-5, 123456789012345680.0, 5e-324, float("nan"), float("inf"), None]
    array = pa.array(values, arrow_type)
    assert accepted_texts(convert_float, array) == 9
    texts = column_texts(convert_float, array)
    assert texts is not None
    assert texts.to_pylist()[:3] == ["0.0", "0.0", "1.0"]


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.none() | st.floats(), max_size=8))
def test_generated_floats(values: list[float | None]) -> None:
    accepted_texts(convert_float, pa.array(values, pa.float64()))


def test_a_uint64_column_is_left_to_the_converter() -> None:
    assert column_texts(convert_integer, pa.array([1, 2**64 - 1], pa.uint64())) is None


LISTS = [
    ["bikes"],
    ["bikes", "cinema", "Chloé"],
    ["a"] * 25,
    ["a"] * 26,
    [],
    ["bikes", None],
    [None],
    ["bikes", ""],
    ["bikes", " "],
    ["a" * 301],
    ['say "hi"'],
    ["x\ny"],
]


def test_string_arrays() -> None:
    array = pa.array([*LISTS, None], pa.list_(pa.string()))
    assert accepted_texts(convert_string_array, array) == 3
    # A slice of a list column: its offsets do not start at 0.
    assert accepted_texts(convert_string_array, array.slice(1, 4)) == 2


@settings(max_examples=300, deadline=None)
@given(lists=st.lists(st.none() | st.lists(st.none() | edge_text, max_size=27), max_size=8))
def test_generated_string_arrays(lists: list[list[str | None] | None]) -> None:
    accepted_texts(convert_string_array, pa.array(lists, pa.list_(pa.string())))


def test_a_list_of_other_items_is_left_to_the_converter() -> None:
    assert column_texts(convert_string_array, pa.array([[1]], pa.list_(pa.int64()))) is None
    assert column_texts(convert_string_array, pa.array([["a"]], pa.large_list(pa.string()))) is None


IDS = [
    "cust-1",
    "Chloé",
    " padded ",
    "null",
    "NULL",
    "Undefined",
    "nan",
    "nan ",
    "nanny",
    " ",
    "",
    "\xa0",
    "é",
    "x" * 1024,
    "x" * 1025,
]


def assert_ids_agree(array: pa.Array) -> int:
    ids = custom_id_column(array)
    assert ids is not None
    proven = 0
    for value, custom_id in zip(array.to_pylist(), ids.to_pylist(), strict=True):
        if custom_id is not None:
            proven += 1
            assert convert_custom_id(value) == custom_id
    return proven


def test_custom_ids() -> None:
    assert assert_ids_agree(pa.array([*IDS, None], pa.string())) == 6
    assert assert_ids_agree(pa.array([1, -5, 2**63 - 1, None], pa.int64())) == 3
    assert assert_ids_agree(pa.array([2**64 - 1], pa.uint64())) == 1
    assert custom_id_column(pa.array([1], pa.decimal128(10, 0))) is None


@settings(max_examples=300, deadline=None)
@given(values=st.lists(edge_text | st.sampled_from(sorted(BLOCKED_CUSTOM_IDS)).map(str.upper), max_size=8))
def test_generated_custom_ids(values: list[str]) -> None:
    assert_ids_agree(pa.array(values, pa.string()))


def test_only_the_known_converters_and_types_have_a_column_path() -> None:
    strings = pa.array(["a"], pa.string())
    assert column_texts(CUSTOM_CONVERTERS[AttributeType.FLOAT], strings) is None
    assert column_texts(CUSTOM_CONVERTERS[AttributeType.FLOAT], pa.array([1], pa.int64())) is None
    assert column_texts(CUSTOM_CONVERTERS[AttributeType.FLOAT], pa.array([1.5], pa.float16())) is None
    assert column_texts(convert_email, pa.array(["a@b.io"], pa.large_string())) is None
    assert column_texts(convert_string, pa.array(["a"]).dictionary_encode()) is None
    # The texts are JSON a reader parses back to the value.
    texts = column_texts(convert_string_array, pa.array([["a", "b"]]))
    assert texts is not None
    assert json.loads(texts[0].as_py()) == ["a", "b"]
