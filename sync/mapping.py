"""Row → Batch profile payload: typing, normalisation, validation and reason codes.

Two entry points, both pure:

* :func:`resolve_attribute_types` checks an activation's mapping against the segment's
  Arrow schema before anything is read (a missing column or an impossible type is a
  config error, not a million row errors), and fixes the Batch type of every custom
  attribute.
* :class:`ProfileMapper` turns one source row (a dict from ``RecordBatch.to_pylist()``)
  into a :class:`sync.model.MappedRow`: the full payload, or a rejection with every
  problem found, each with a :class:`sync.model.Reason`.

The rules are the project's reading of Batch's limits (``docs/batch-api.md``, "Checked before sending"):
strings 1-300 characters, ``url()`` at most 2048, string arrays 1-25 items, ``date()``
ISO-8601 UTC ending in ``Z``, E.164 phones, ISO 639-1 / 3166-1 codes, IANA time zones.
Values are validated with maintained libraries (``rphonenumbers`` and ``phonenumbers``,
``email-validator``, ``pycountry``, ``zoneinfo``), not hand-written patterns; the few
patterns here only pick out values those libraries certainly accept, to skip the call.

Mapping is the hot path of a run (a delta run maps every row whose raw values moved),
so lookup tables are built once per process and :meth:`ProfileMapper.map_row` allocates
little beyond the payload dict: converters are precomputed per column at construction
and a failure object is created only for a bad value. :meth:`ProfileMapper.map_batch`
maps a whole Arrow record batch with the same converters, each called once per distinct
value of a string or temporal column, and returns exactly what ``map_row`` returns for
each row. ``docs/mapping.md`` says what each Batch field accepts and how we normalise it.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
import zoneinfo
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
import pycountry
import rphonenumbers
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from email_validator.syntax import validate_email_local_part

from sync.config import Activation, AttributeType, InvalidValuePolicy
from sync.errors import ConfigError
from sync.model import MappedRow, Reason, RowIssue
from sync.natives import NATIVE_FIELDS, NativeType

__all__ = ["ConvertedBatch", "ConvertedField", "Failure", "ProfileMapper", "resolve_attribute_types"]

# --- Batch limits (docs/batch-api.md, "Checked before sending") -----------------
# custom_id: the SDK caps it at 1024 characters (doc.batch.com SDK "custom-user-id").
MAX_CUSTOM_ID_LENGTH: Final = 1024
# The SDKs refuse these ids (case-insensitive): they are what a null turns into when a
# client stringifies it, so a profile under such an id would merge unrelated people.
BLOCKED_CUSTOM_IDS: Final = frozenset({"null", "undefined", "nan"})
# ATTR_STRING_MAX_LENGTH_CEP = 300 in the Android SDK's ProfileDataHelper.
MAX_STRING_LENGTH: Final = 300
# URL attributes: at most 2048 characters (Android SDK, doc.batch.com attributes page).
MAX_URL_LENGTH: Final = 2048
# String arrays: 1 to 25 items (Android SDK, doc.batch.com attributes page).
MAX_ARRAY_ITEMS: Final = 25
# Email: at most 256 characters (Android SDK ProfileDataHelper).
MAX_EMAIL_LENGTH: Final = 256
# Batch integers are JSON numbers; we keep to what every JSON consumer and the
# warehouse (INT64) can hold exactly.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
# An issue's detail quotes the offending value, cut to about this many characters.
DETAIL_VALUE_LENGTH: Final = 40

_SUBSCRIBED: Final = "subscribed"
_UNSUBSCRIBED: Final = "unsubscribed"
# Spellings a warehouse commonly uses for a marketing consent flag, after strip + lower.
SUBSCRIPTION_VALUES: Final[Mapping[str, str]] = {
    **dict.fromkeys(
        ("subscribed", "true", "yes", "y", "1", "opt_in", "opt-in", "optin", "opted_in", "opted-in"),
        _SUBSCRIBED,
    ),
    **dict.fromkeys(
        ("unsubscribed", "false", "no", "n", "0", "opt_out", "opt-out", "optout", "opted_out", "opted-out"),
        _UNSUBSCRIBED,
    ),
}

# --- Lookup tables, built once per process on first use --------------------------------


@functools.cache
def _languages() -> dict[str, str]:
    """ISO 639-1 code (lowercase) -> itself."""
    return {lang.alpha_2.lower(): lang.alpha_2.lower() for lang in pycountry.languages if hasattr(lang, "alpha_2")}


@functools.cache
def _regions() -> dict[str, str]:
    """ISO 3166-1 alpha-2 and alpha-3 codes (uppercase) -> alpha-2."""
    table: dict[str, str] = {}
    for country in pycountry.countries:
        table[country.alpha_2] = country.alpha_2
        table[country.alpha_3] = country.alpha_2
    return table


@functools.cache
def _timezones() -> tuple[frozenset[str], dict[str, str]]:
    """IANA names, and lowercase name -> canonical spelling (no two names differ only by case)."""
    names = frozenset(zoneinfo.available_timezones())
    return names, {name.lower(): name for name in names}


# --- Converters --------------------------------------------------------------------------
# A converter takes a non-None source value and returns the payload value, None for
# "no value" (sent as null), or a Failure. Returning instead of raising keeps the common
# path free of exception set-up and makes "never raises" easy to hold.


class Failure:
    """A converter's verdict on an invalid value: the reason code and a human detail."""

    __slots__ = ("detail", "reason")

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail


Converter = Callable[[Any], Any]


def _quote(value: Any) -> str:
    # Slice long strings before repr so a 1 MB cell does not cost a 1 MB repr.
    text = repr(value[: DETAIL_VALUE_LENGTH + 1]) if isinstance(value, str) else repr(value)
    return text if len(text) <= DETAIL_VALUE_LENGTH else text[: DETAIL_VALUE_LENGTH - 1] + "…"


def _quote_number(value: int | Decimal) -> str:
    # A number is quoted whole up to 80 characters (DECIMAL(76, 38) has 77): the digits
    # lost are the point of the message.
    text = str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _fail(reason: Reason, message: str, value: Any) -> Failure:
    return Failure(reason, f"{message}: {_quote(value)}")


def _wrong_type(reason: Reason, expected: str, value: Any) -> Failure:
    return Failure(reason, f"expected {expected}, got {type(value).__name__} {_quote(value)}")


def _blank_or_wrong_type(reason: Reason, expected: str, value: Any) -> Failure | None:
    # An empty string is "no value" whatever the column's type (decision 9), so it never
    # counts as a type error; checked only once the value is already off the happy path.
    if isinstance(value, str) and _is_blank(value):
        return None
    return _wrong_type(reason, expected, value)


def _is_blank(text: str) -> bool:
    # isspace() is False for "", so both tests are needed; neither allocates.
    return not text or text.isspace()


# Batch's SDKs check an address against this pattern (docs/batch-api.md, "Checked before sending"):
# any local part without "@", CR, LF or tab, and an ASCII domain. "[A-z]" is Batch's own
# spelling: it also admits [\]^_` , which the domain rule below never produces.
_BATCH_EMAIL = re.compile(r"[^@\r\n\t]+@[A-z0-9\-\.]+\.[A-z0-9]+")

# The fast path: ASCII addresses that email-validator (as we call it) certainly accepts,
# and whose normalised form is the address with its domain lowercased. Anything else,
# including every address this pattern is unsure of, goes through email-validator, so the
# result is the library's by construction; tests/test_mapping_columns.py checks the two
# against each other. The pattern is deliberately narrower than RFC 5322:
# * local part: dot-separated runs of letters, digits, "_", "+", "-" (a subset of the
#   library's dot-atom); the library lowercases a few RFC 2142 mailbox names
#   (CASE_INSENSITIVE_MAILBOX_NAMES), so those take the slow path;
# * domain: labels of letters and digits joined by single hyphens (the library refuses
#   "--" in the third and fourth place, "xn--" labels need IDNA checks), at least one dot,
#   and a top-level domain of 2-63 letters that is not a special-use name (.local, .test, ...);
# * at most 254 characters in all (the library's limit) and 63 per label (checked in code).
_PLAIN_EMAIL = re.compile(
    r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
    r"@((?:[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\.)+([A-Za-z]{2,63}))"
)
_EMAIL_MAX_LENGTH: Final = 254  # email-validator's EMAIL_MAX_LENGTH (RFC 5321 4.5.3.1.3)
_DNS_LABEL_MAX_LENGTH: Final = 63  # RFC 1035 2.3.1
_SPECIAL_USE_TLDS: Final = frozenset(SPECIAL_USE_DOMAIN_NAMES)
_CASE_INSENSITIVE_MAILBOXES: Final = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


def _plain_domain(domain: str, tld: str) -> bool:
    """A domain the patterns matched that email-validator accepts as its lowercase self."""
    if tld.lower() in _SPECIAL_USE_TLDS:
        return False
    return len(domain) <= _DNS_LABEL_MAX_LENGTH or max(map(len, domain.split("."))) <= _DNS_LABEL_MAX_LENGTH


def _plain_email(text: str) -> str | None:
    """The normalised address when ``text`` is on the fast path, else None."""
    if len(text) > _EMAIL_MAX_LENGTH:
        return None
    match = _PLAIN_EMAIL.fullmatch(text)
    if match is None:
        return _plain_domain_email(text)
    domain, tld = match.group(1, 2)
    if not _plain_domain(domain, tld):
        return None
    local = text[: match.start(1) - 1]
    if local.lower() in _CASE_INSENSITIVE_MAILBOXES:
        return None
    return f"{local}@{domain.lower()}"


# An internationalised local part (an accented name: "inès.martin@example.com") with a
# plain ASCII domain. email-validator's domain checks (IDNA, UTS-46) are most of its cost
# and such a domain never needs them; the local part still goes through the library's own
# check, NFC normalisation included, exactly as validate_email runs it. Anything the
# library refuses, or that comes near its length limit, takes the full path.
_INTL_LOCAL_EMAIL = re.compile(r"([\w+-]+(?:\.[\w+-]+)*)@((?:[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\.)+([A-Za-z]{2,63}))")


def _plain_domain_email(text: str) -> str | None:
    if text.isascii():
        return None
    match = _INTL_LOCAL_EMAIL.fullmatch(text)
    if match is None:
        return None
    local, domain, tld = match.group(1, 2, 3)
    if not _plain_domain(domain, tld):
        return None
    normalized = unicodedata.normalize("NFC", local)
    try:
        checked = validate_email_local_part(local)
        if normalized != local:
            checked = validate_email_local_part(normalized)
    except EmailNotValidError:
        return None
    if checked["ascii_local_part"] is not None:
        return None  # ASCII after all: the library may lowercase a mailbox name
    address = f"{checked['local_part']}@{domain.lower()}"
    if len(text.encode("utf-8")) > _EMAIL_MAX_LENGTH or len(address.encode("utf-8")) > _EMAIL_MAX_LENGTH:
        return None
    return address


def _convert_email(value: Any) -> Any:
    if not isinstance(value, str):
        return _wrong_type(Reason.INVALID_EMAIL, "a string", value)
    text = value.strip()
    if not text:
        return None
    if len(text) > MAX_EMAIL_LENGTH:
        return _fail(Reason.INVALID_EMAIL, f"longer than {MAX_EMAIL_LENGTH} characters", value)
    plain = _plain_email(text)
    if plain is not None:
        return plain
    try:
        # Syntax only: a DNS lookup per row would be slow, flaky and a network call.
        validated = validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        return _fail(Reason.INVALID_EMAIL, "not a valid email address", value)
    # Internationalised domains are sent in their ASCII (IDNA) form: Batch refuses a
    # domain with other characters (its pattern above), so "joe@examplé.fr" goes as
    # "joe@xn--exampl-gva.fr", the same mailbox. A non-ASCII local part is kept: Batch's
    # pattern accepts it, and it has no ASCII spelling to fall back on (docs/mapping.md).
    normalized = f"{validated.local_part}@{validated.ascii_domain}"
    if len(normalized) > MAX_EMAIL_LENGTH:
        return _fail(Reason.INVALID_EMAIL, f"longer than {MAX_EMAIL_LENGTH} characters", value)
    if _BATCH_EMAIL.fullmatch(normalized) is None:
        # Batch's pattern wants a top-level domain of letters and digits only, so an
        # internationalised one (".рф" is "xn--p1ai") can never be sent. Refusing it here
        # says so once, instead of a partial error from Batch and a re-send on every run.
        if "-" in validated.ascii_domain.rpartition(".")[2]:
            return _fail(Reason.INVALID_EMAIL, "Batch refuses an internationalised top-level domain", value)
        return _fail(Reason.INVALID_EMAIL, "an address Batch's email pattern refuses", value)
    return normalized


def _phone_converter(default_region: str | None) -> Converter:
    e164 = phonenumbers.PhoneNumberFormat.E164
    fast_e164 = rphonenumbers.PhoneNumberFormat.E164

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            # An integer column cannot hold a leading "+" or "0". With a default region,
            # phonenumbers reads it as national or recognises the region's country code;
            # without one, an integer can only be an international number.
            text = str(value) if default_region is not None else f"+{value}"
        else:
            return _wrong_type(Reason.INVALID_PHONE, "a string or a positive integer", value)
        # rphonenumbers (libphonenumber in Rust, ~8x faster) answers first. A number it
        # refuses is asked again of phonenumbers, and only refused when both refuse it:
        # their metadata differ on a few ranges (docs/mapping.md), and a number one of
        # them knows is valid must not cost the user a profile. Batch only checks E.164.
        try:
            fast = rphonenumbers.parse(text, default_region)
        except rphonenumbers.NumberParseException:
            pass
        else:
            if rphonenumbers.is_valid_number(fast):
                return rphonenumbers.format_number(fast, fast_e164)
        try:
            number = phonenumbers.parse(text, default_region)
        except phonenumbers.NumberParseException:
            return _fail(Reason.INVALID_PHONE, "not a phone number", value)
        if not phonenumbers.is_valid_number(number):
            return _fail(Reason.INVALID_PHONE, "not a valid phone number", value)
        # E.164 is what Batch accepts (SDK pattern ^\+[0-9]{1,15}$); extensions are dropped.
        return phonenumbers.format_number(number, e164)

    return convert


def _language_converter() -> Converter:
    table = _languages()

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return _wrong_type(Reason.INVALID_LANGUAGE, "a string", value)
        text = value.strip()
        if not text:
            return None
        # A locale (fr-FR, fr_FR) carries its language first, as Batch's Segment mapping reads it.
        primary = text.replace("_", "-").split("-", 1)[0].lower()
        code = table.get(primary)
        if code is None:
            return _fail(Reason.INVALID_LANGUAGE, "not an ISO 639-1 language code", value)
        return code

    return convert


def _region_converter() -> Converter:
    table = _regions()

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return _wrong_type(Reason.INVALID_REGION, "a string", value)
        text = value.strip()
        if not text:
            return None
        code = table.get(text.upper())
        if code is None:
            return _fail(Reason.INVALID_REGION, "not an ISO 3166-1 country code", value)
        return code

    return convert


def _timezone_converter() -> Converter:
    names, by_lower = _timezones()

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return _wrong_type(Reason.INVALID_TIMEZONE, "a string", value)
        text = value.strip()
        if not text:
            return None
        if text in names:
            return text
        name = by_lower.get(text.lower())
        if name is None:
            return _fail(Reason.INVALID_TIMEZONE, "not an IANA time zone name", value)
        return name

    return convert


def _convert_subscription(value: Any) -> Any:
    if value is True:
        return _SUBSCRIBED
    if value is False:
        return _UNSUBSCRIBED
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        status = SUBSCRIPTION_VALUES.get(text.lower())
        if status is None:
            return _fail(Reason.INVALID_SUBSCRIPTION, "not a subscription status", value)
        return status
    if isinstance(value, int) and value in (0, 1):
        return _SUBSCRIBED if value else _UNSUBSCRIBED
    return _wrong_type(Reason.INVALID_SUBSCRIPTION, "a boolean or a subscription status", value)


def _convert_string(value: Any) -> Any:
    if not isinstance(value, str):
        return _wrong_type(Reason.INVALID_STRING, "a string", value)
    # Batch refuses empty and whitespace-only strings; they mean "no value" (decision 9).
    # The value itself is sent untrimmed: leading spaces may be meaningful to the user.
    if _is_blank(value):
        return None
    if len(value) > MAX_STRING_LENGTH:
        return _fail(Reason.STRING_TOO_LONG, f"{len(value)} characters, Batch accepts {MAX_STRING_LENGTH}", value)
    return value


def _integral_decimal(value: Decimal) -> int | None:
    """The int a Decimal holds exactly, or None (fractional, NaN, infinite or absurdly large)."""
    # adjusted() bounds the magnitude before int() so 1E+999999999 never becomes a huge int.
    if not value.is_finite() or value.adjusted() > MAX_CUSTOM_ID_LENGTH:
        return None
    if value != value.to_integral_value():
        return None
    return int(value)


def _convert_integer(value: Any) -> Any:
    if isinstance(value, bool):
        return _wrong_type(Reason.INVALID_INTEGER, "an integer", value)
    if isinstance(value, int):
        number = int(value)
    elif isinstance(value, Decimal):
        integral = _integral_decimal(value)
        if integral is None:
            return _fail(Reason.INVALID_INTEGER, "not a whole number", value)
        number = integral
    else:
        return _blank_or_wrong_type(Reason.INVALID_INTEGER, "an integer", value)
    if not INT64_MIN <= number <= INT64_MAX:
        return _fail(Reason.INVALID_INTEGER, "outside the signed 64-bit range", value)
    return number


# Significant decimal digits a double always keeps (C's DBL_DIG).
_DOUBLE_DIGITS: Final = 15


def _exact_float(value: int | Decimal, number: float) -> bool:
    """Whether the double sent for ``value`` loses none of its digits.

    Either the double is ``value`` itself (2**60), or the shortest text that reads back as
    the double, which is what the JSON carries, is ``value`` (0.1, 19.99): whoever reads
    the attribute gets the source's number back. ``12345678901234567890123456789.123456789``
    is neither (it would arrive as ``1.2345678901234568e+28``).
    """
    if isinstance(value, int):
        return int(number) == value
    # Any decimal of at most 15 significant digits (DBL_DIG) reads back from its double as
    # itself: no need to build the double's exact value (a DECIMAL(38,9) of money, say).
    # Counted on its text, the cheapest form to get (as_tuple() builds a tuple of ints):
    # "-0.019990000" -> "1999". Leading and trailing zeros are not significant.
    mantissa = str(value).partition("E")[0].replace("-", "").replace(".", "").strip("0")
    if len(mantissa) <= _DOUBLE_DIGITS:
        return True
    return Decimal(number) == value or Decimal(float.__repr__(number)) == value


def _convert_float(value: Any) -> Any:
    if isinstance(value, bool):
        return _wrong_type(Reason.INVALID_FLOAT, "a number", value)
    if isinstance(value, float):
        number = value
    elif isinstance(value, int | Decimal):
        if isinstance(value, Decimal) and not value.is_finite():
            return _fail(Reason.INVALID_FLOAT, "not a finite number", value)
        try:
            number = float(value)
        except OverflowError:
            return _fail(Reason.INVALID_FLOAT, "too large for a float", value)
        # A Batch float is a 64-bit double: 15 to 17 significant digits. A wider number is
        # refused rather than sent rounded (docs/mapping.md, "Numbers").
        if math.isfinite(number) and not _exact_float(value, number):
            return Failure(
                Reason.INEXACT_NUMBER,
                f"{_quote_number(value)} has more digits than a Batch float (a 64-bit double) keeps; "
                f"it would arrive as {float.__repr__(number)}",
            )
    else:
        return _blank_or_wrong_type(Reason.INVALID_FLOAT, "a number", value)
    # JSON has no NaN or Infinity; Batch would refuse the whole body.
    if not math.isfinite(number):
        return _fail(Reason.INVALID_FLOAT, "not a finite number", value)
    # -0.0 and 0.0 are the same attribute value; send one spelling.
    return 0.0 if number == 0 else number


def _convert_boolean(value: Any) -> Any:
    if value is True or value is False:
        return value
    if isinstance(value, str):
        # Reachable only from a string column explicitly typed boolean.
        text = value.strip().lower()
        if not text:
            return None
        if text == "true":
            return True
        if text == "false":
            return False
        return _fail(Reason.INVALID_BOOLEAN, "expected 'true' or 'false'", value)
    return _wrong_type(Reason.INVALID_BOOLEAN, "a boolean", value)


def _format_utc(moment: datetime) -> str:
    millis = moment.microsecond // 1000
    base = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    return f"{base}.{millis:03d}Z" if millis else f"{base}Z"


def _convert_date(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        return f"{value.year:04d}-{value.month:02d}-{value.day:02d}T00:00:00Z"
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return _fail(Reason.INVALID_DATE, "not an ISO-8601 date", value)
    elif type(value) is Unrepresentable:
        return Failure(Reason.INVALID_DATE, value.detail)
    else:
        return _wrong_type(Reason.INVALID_DATE, "a date, a timestamp or an ISO-8601 string", value)
    # Batch wants UTC with a Z (decision 7). A naive value is taken as UTC: BigQuery
    # DATETIME and DuckDB TIMESTAMP carry no zone, and UTC is the warehouse convention.
    if moment.tzinfo is not None:
        try:
            moment = moment.astimezone(UTC)
        except (OverflowError, ValueError):
            return _fail(Reason.INVALID_DATE, "outside the representable range in UTC", value)
    return _format_utc(moment)


# The common case, a web URL with an ASCII host, passes every check below; urlsplit
# would find scheme "http(s)" and a non-empty host (no brackets, so no ValueError), so it
# is accepted without the ~2 µs urlsplit costs. Whitespace and control characters are
# refused before this pattern is tried, and it admits none.
_PLAIN_WEB_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::[0-9]+)?(?:[/?#][!-~]*)?")


def _convert_url(value: Any) -> Any:
    if not isinstance(value, str):
        return _wrong_type(Reason.INVALID_URL, "a string", value)
    text = value.strip()
    if not text:
        return None
    if len(text) > MAX_URL_LENGTH:
        return _fail(Reason.INVALID_URL, f"{len(text)} characters, Batch accepts {MAX_URL_LENGTH}", value)
    # RFC 3986 has no raw spaces or control characters; urlsplit would silently drop some.
    if " " in text or not text.isprintable():
        return _fail(Reason.INVALID_URL, "contains whitespace or control characters", value)
    if _PLAIN_WEB_URL.fullmatch(text) is not None:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return _fail(Reason.INVALID_URL, "not a URL", value)
    # Batch's shape is scheme://[authority][path][?query][#fragment]: the authority may be
    # empty for app deep links (myapp:///home), but a web URL without a host is useless.
    if not parts.scheme or not text[len(parts.scheme) :].startswith("://"):
        return _fail(Reason.INVALID_URL, "expected scheme://...", value)
    if not parts.netloc and parts.scheme.lower() in ("http", "https"):
        return _fail(Reason.INVALID_URL, "no host", value)
    return text


def _convert_string_array(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        return _blank_or_wrong_type(Reason.INVALID_ARRAY, "a list of strings", value)
    items: list[str] = []
    for item in value:
        # Null and empty items carry no value (decision 9); they are dropped, not refused.
        if item is None:
            continue
        if not isinstance(item, str):
            return _wrong_type(Reason.INVALID_ARRAY, "string items", item)
        if _is_blank(item):
            continue
        if len(item) > MAX_STRING_LENGTH:
            return _fail(
                Reason.INVALID_ARRAY, f"an item of {len(item)} characters, Batch accepts {MAX_STRING_LENGTH}", item
            )
        items.append(item)
    if not items:
        return None
    if len(items) > MAX_ARRAY_ITEMS:
        return _fail(Reason.ARRAY_TOO_LONG, f"{len(items)} items, Batch accepts {MAX_ARRAY_ITEMS}", items)
    return items


_CUSTOM_CONVERTERS: Final[Mapping[AttributeType, Converter]] = {
    AttributeType.STRING: _convert_string,
    AttributeType.INTEGER: _convert_integer,
    AttributeType.FLOAT: _convert_float,
    AttributeType.BOOLEAN: _convert_boolean,
    AttributeType.DATE: _convert_date,
    AttributeType.URL: _convert_url,
    AttributeType.STRING_ARRAY: _convert_string_array,
}


def _convert_custom_id(value: Any) -> str | Failure:
    if value is None:
        return Failure(Reason.MISSING_CUSTOM_ID, "custom_id is null")
    if isinstance(value, str):
        # Batch ids are case- and whitespace-sensitive: never trimmed, only refused when blank.
        if _is_blank(value):
            return _fail(Reason.MISSING_CUSTOM_ID, "custom_id is empty", value)
        if len(value) > MAX_CUSTOM_ID_LENGTH:
            return _fail(
                Reason.CUSTOM_ID_TOO_LONG, f"{len(value)} characters, Batch accepts {MAX_CUSTOM_ID_LENGTH}", value
            )
        if value.lower() in BLOCKED_CUSTOM_IDS:
            return _fail(Reason.INVALID_CUSTOM_ID, "a placeholder the Batch SDKs refuse as an id", value)
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, Decimal) and (integral := _integral_decimal(value)) is not None:
        # BigQuery NUMERIC ids arrive as Decimal even when they hold whole numbers.
        text = str(integral)
    else:
        return _wrong_type(Reason.INVALID_CUSTOM_ID, "a string or an integer", value)
    if len(text) > MAX_CUSTOM_ID_LENGTH:
        return _fail(Reason.CUSTOM_ID_TOO_LONG, f"{len(text)} digits, Batch accepts {MAX_CUSTOM_ID_LENGTH}", value)
    return text


# --- The mapper ---------------------------------------------------------------------------


class _Field(NamedTuple):
    column: str
    key: str  # bare key: "$email_address", "birthdate"; used for null
    present_key: str  # key for a present value: "date(birthdate)", "url(site)", else == key
    convert: Converter


class ProfileMapper:
    """Maps source rows of one activation to Batch profile payloads.

    Build one per run (construction resolves converters and lookup tables) and call
    :meth:`map_row` for every row. The mapper holds no per-row state.

    Attributes:
        columns: The activation's mapped columns, custom_id first, in the order the raw
            fingerprint hashes them (``activation.mapped_columns``).
        owned_keys: The bare Batch keys this mapping writes: the native ``$...`` keys it
            maps and the custom attribute names (never ``date(...)``/``url(...)``).
        payload_keys: ``(bare key, present key)`` of every mapped field, in payload order:
            a payload holds one of the two unless the attribute was dropped.
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
        if any(native.type is NativeType.TIMEZONE for native, _ in natives) and not _timezones()[0]:
            raise ConfigError(
                f"activation '{activation.name}': no IANA time zone database on this machine "
                "(install the 'tzdata' package)",
                field="mapping.timezone",
            )
        # Factories, so a lookup table is only built when a native field of its type is mapped.
        native_converters: dict[NativeType, Callable[[], Converter]] = {
            NativeType.EMAIL: lambda: _convert_email,
            NativeType.PHONE: lambda: _phone_converter(mapping.default_phone_region),
            NativeType.LANGUAGE: _language_converter,
            NativeType.REGION: _region_converter,
            NativeType.TIMEZONE: _timezone_converter,
            NativeType.SUBSCRIPTION: lambda: _convert_subscription,
        }
        fields = [
            _Field(column, native.key, native.key, native_converters[native.type]()) for native, column in natives
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
            fields.append(_Field(attribute.column, name, present_key, _CUSTOM_CONVERTERS[attribute_type]))

        self._fields: tuple[_Field, ...] = tuple(fields)
        self.owned_keys: frozenset[str] = frozenset(field.key for field in fields)
        # (bare key, key of a present value) of every field: what a payload holds when full.
        self.payload_keys: tuple[tuple[str, str], ...] = tuple((field.key, field.present_key) for field in fields)

    def map_row(self, row: Mapping[str, Any]) -> MappedRow:
        """Map one source row; never raises on any value of any type.

        Args:
            row: Column name -> value, as produced by ``RecordBatch.to_pylist()``. A
                missing column reads as null.

        Returns:
            The payload with every mapped key (``None`` where the row has no value), or
            ``attributes=None`` when the row is rejected. ``issues`` lists every problem
            found, each naming the source column. A bad custom_id always rejects the row
            (``custom_id`` is then ``None``); a bad attribute value rejects it under
            ``reject_row`` and is left out of the payload under ``drop_attribute``.
        """
        issues: list[RowIssue] = []
        custom_id: str | None
        converted_id = _convert_custom_id(row.get(self._id_column))
        if isinstance(converted_id, Failure):
            issues.append(RowIssue(self._id_column, converted_id.reason, converted_id.detail))
            custom_id = None
        else:
            custom_id = converted_id

        attributes: dict[str, Any] = {}
        for column, key, present_key, convert in self._fields:
            value = row.get(column)
            if value is None:
                attributes[key] = None
                continue
            result = convert(value)
            if result is None:
                attributes[key] = None
            elif type(result) is Failure:
                issues.append(RowIssue(column, result.reason, result.detail))
            else:
                attributes[present_key] = result

        if custom_id is None:
            return MappedRow(custom_id=None, attributes=None, issues=issues)
        if issues and self._reject_row:
            return MappedRow(custom_id=custom_id, attributes=None, issues=issues)
        return MappedRow(custom_id=custom_id, attributes=attributes, issues=issues)

    def convert_batch(self, batch: pa.RecordBatch) -> ConvertedBatch:
        """Run every converter over a record batch, column by column.

        Each mapped column is read out of the batch once (never a dict per row), and a
        string, boolean or temporal column is dictionary-encoded so its converter runs once
        per distinct value (a language or time zone column has a handful per batch). The
        same converters see the same Python values as in :meth:`map_row`, so the results
        are the ones ``map_row`` would put in each row's payload.

        Args:
            batch: Rows of the segment whose schema passed :func:`resolve_attribute_types`.
                A mapped column missing from the batch reads as null, as in ``map_row``.
        """
        rows = batch.num_rows
        # Last one wins for a repeated name, as in the dicts of RecordBatch.to_pylist().
        positions = {name: index for index, name in enumerate(batch.schema.names)}
        id_position = positions.get(self._id_column)
        id_values = batch.column(id_position).to_pylist() if id_position is not None else [None] * rows
        issues: dict[int, list[RowIssue]] = {}
        custom_ids: list[str | None] = []
        for row, value in enumerate(id_values):
            converted_id = _convert_custom_id(value)
            if isinstance(converted_id, Failure):
                issues[row] = [RowIssue(self._id_column, converted_id.reason, converted_id.detail)]
                custom_ids.append(None)
            else:
                custom_ids.append(converted_id)

        decoded: dict[str, _DecodedColumn] = {}
        fields: list[ConvertedField] = []
        for column, key, present_key, convert in self._fields:
            position = positions.get(column)
            if position is None:
                fields.append(ConvertedField(column, key, present_key, [None], _zeros(rows), False))
                continue
            array = batch.column(position)
            unreadable: list[tuple[int, Unrepresentable]] = []
            if convert is _convert_date and _is_temporal(array.type):
                array, unreadable = _readable_temporal(array)
                formatted = None if unreadable else _dates_in_columns(array)
                if formatted is not None:
                    fields.append(ConvertedField(column, key, present_key, formatted.to_pylist(), None, False))
                    continue
            source = decoded.get(column)
            if source is None:
                source = decoded[column] = _with_unrepresentable(_decode_column(array), unreadable)
            # None is "no value" both as a source value and as a converter result.
            converted: list[Any] = [None if value is None else convert(value) for value in source.values]
            has_failure = any(type(result) is Failure for result in converted)
            fields.append(ConvertedField(column, key, present_key, converted, source.codes, has_failure))
            if has_failure:
                for row in _failed_rows(converted, source.codes):
                    failure: Failure = converted[row if source.codes is None else source.codes[row].as_py()]
                    issues.setdefault(row, []).append(RowIssue(column, failure.reason, failure.detail))
        return ConvertedBatch(rows, custom_ids, issues, tuple(fields), self._reject_row)

    def map_batch(self, batch: pa.RecordBatch) -> list[MappedRow]:
        """Map every row of a record batch: exactly ``[self.map_row(row) for row in batch.to_pylist()]``.

        The converters run in columns (:meth:`convert_batch`); the payload dicts are then
        assembled row by row, in the same key and issue order as ``map_row``. The engine
        does not build dicts at all: it encodes the converted columns straight to JSON
        (:mod:`sync.encode`). This is the form the tests and the mapping benchmark compare.
        """
        converted = self.convert_batch(batch)
        payloads: list[dict[str, Any]] = [{} for _ in range(converted.rows)]
        for field in converted.fields:
            values = field.values
            results = values if field.codes is None else list(map(values.__getitem__, field.codes.to_pylist()))
            key, present_key = field.key, field.present_key
            for payload, result in zip(payloads, results, strict=True):
                if result is None:
                    payload[key] = None
                elif type(result) is not Failure:
                    payload[present_key] = result
        mapped: list[MappedRow] = []
        for row, (custom_id, payload) in enumerate(zip(converted.custom_ids, payloads, strict=True)):
            row_issues = converted.issues.get(row, [])
            if custom_id is None:
                mapped.append(MappedRow(custom_id=None, attributes=None, issues=row_issues))
            elif row_issues and self._reject_row:
                mapped.append(MappedRow(custom_id=custom_id, attributes=None, issues=row_issues))
            else:
                mapped.append(MappedRow(custom_id=custom_id, attributes=payload, issues=row_issues))
        return mapped


# --- Columns: what convert_batch hands to the encoder ---------------------------------------


class ConvertedField(NamedTuple):
    """One mapped field of a batch after conversion.

    Row i's result is ``values[codes[i]]`` when ``codes`` is set (a dictionary-encoded
    column: one converter call per distinct value), else ``values[i]``. A result is
    ``None`` (no value: the bare ``key`` is sent as null), a :class:`Failure` (the value
    is invalid: the row is rejected, or the attribute dropped), or the payload value,
    sent under ``present_key``.
    """

    column: str
    key: str
    present_key: str
    values: list[Any]
    codes: pa.Int64Array | None
    has_failure: bool


class ConvertedBatch(NamedTuple):
    """A batch after :meth:`ProfileMapper.convert_batch`: ids, field results and issues."""

    rows: int
    custom_ids: list[str | None]  # None: the id is missing or invalid (the row is rejected)
    issues: dict[int, list[RowIssue]]  # row -> its problems in map_row's order; rows without any are absent
    fields: tuple[ConvertedField, ...]  # in payload order
    reject_row: bool  # on_invalid_value: an invalid attribute rejects its row (else: it is dropped)


# --- Temporal values Python's datetime cannot hold -------------------------------------------
# DuckDB writes TIMESTAMP/DATE 'infinity' and '-infinity' into Arrow as the largest and
# (almost) smallest value of the storage integer; a year beyond 9999 or before 1 is an
# ordinary value there. Python's datetime holds years 1-9999 only, so pyarrow raises
# OverflowError for these: one such cell used to fail the whole run. They are found in
# columns, before any value reaches Python, and become an ``invalid_date`` rejection of
# their row (docs/mapping.md, "Dates and timestamps").

# The instants of datetime.min and datetime.max (naive, read as UTC), in epoch seconds.
_FIRST_SECOND: Final = -62_135_596_800
_LAST_SECOND: Final = 253_402_300_799
_SECONDS_PER_DAY: Final = 86_400
_UNIT_PER_SECOND: Final[Mapping[str, int]] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class Unrepresentable:
    """A date or timestamp cell no Python datetime holds; :func:`_convert_date` rejects it."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


def _storage_bounds(arrow_type: pa.DataType) -> tuple[pa.DataType, int, int]:
    """The integer type a temporal column is stored as, and the stored values Python can read."""
    if pa.types.is_date32(arrow_type):
        return pa.int32(), _FIRST_SECOND // _SECONDS_PER_DAY, _LAST_SECOND // _SECONDS_PER_DAY
    if pa.types.is_date64(arrow_type):
        return pa.int64(), _FIRST_SECOND * 1_000, (_LAST_SECOND + 1) * 1_000 - 1
    # A nanosecond value of 2**63 - 1 is a real instant (2262-04-11) but, in practice, only
    # ever DuckDB's 'infinity': the bounds leave both infinities out for every unit.
    per_second = _UNIT_PER_SECOND[arrow_type.unit]
    first, last = _FIRST_SECOND, _LAST_SECOND
    if arrow_type.tz is not None and arrow_type.tz not in _UTC_ZONES:
        # pyarrow builds an aware value in UTC, then moves it into its zone: a day's margin
        # keeps that move inside datetime's range whatever the zone's offset. (A UTC column
        # is read as naive: _decode_column.)
        first, last = first + _SECONDS_PER_DAY, last - _SECONDS_PER_DAY
    low, high = first * per_second, (last + 1) * per_second - 1
    return pa.int64(), max(low, -(2**63) + 2), min(high, 2**63 - 2)


def _unrepresentable_detail(stored: int, arrow_type: pa.DataType) -> str:
    largest = 2**31 - 1 if pa.types.is_date32(arrow_type) else 2**63 - 1
    if stored == largest:
        return "infinity, which is not a date Batch can store"
    if stored in (-largest, -largest - 1):
        return "-infinity, which is not a date Batch can store"
    return f"outside the years 1 to 9999 (stored value {stored} of Arrow type {arrow_type})"


def _readable_temporal(array: pa.Array) -> tuple[pa.Array, list[tuple[int, Unrepresentable]]]:
    """A date or timestamp column Python can read, and the rows it could not, with why.

    Nanosecond timestamps (pandas' and Spark's Parquet, DuckDB's TIMESTAMP_NS) are cut to
    microseconds, toward the past: Batch keeps milliseconds, and the millisecond is cut
    the same way from microseconds (:func:`_format_utc`), so a value is never rounded up
    into the next second, day or year. A cell outside the years 1-9999 (DuckDB's
    ``infinity``) is set to null in the returned array and listed with its row.
    """
    arrow_type = array.type
    storage_type, low, high = _storage_bounds(arrow_type)
    stored = array.view(storage_type)
    outside = pc.fill_null(pc.or_(pc.less(stored, low), pc.greater(stored, high)), False)
    bad: list[tuple[int, Unrepresentable]] = []
    if pc.any(outside).as_py():
        rows = pc.indices_nonzero(outside)
        values = stored.take(rows).to_pylist()
        bad = [
            (row, Unrepresentable(_unrepresentable_detail(value, arrow_type)))
            for row, value in zip(rows.to_pylist(), values, strict=True)
        ]
        array = pc.if_else(outside, pa.scalar(None, arrow_type), array)
    if pa.types.is_timestamp(arrow_type) and arrow_type.unit == "ns":
        # floor_temporal on the naive instants: a zoned value would be floored in its local
        # time, which may not exist (a DST gap); a microsecond is the same in both.
        naive = array.cast(pa.timestamp("ns")) if arrow_type.tz is not None else array
        floored = pc.floor_temporal(naive, unit="microsecond").cast(pa.timestamp("us"))
        array = floored.cast(pa.timestamp("us", arrow_type.tz)) if arrow_type.tz is not None else floored
    return array, bad


class _DecodedColumn(NamedTuple):
    """One column as Python values: ``values[codes[i]]`` is row i's value when ``codes``
    is set (a dictionary-encoded column; nulls point at a trailing None), else ``values[i]``."""

    values: list[Any]
    codes: pa.Int64Array | None


def _is_temporal(arrow_type: pa.DataType) -> bool:
    return bool(pa.types.is_date(arrow_type) or pa.types.is_timestamp(arrow_type))


def _with_unrepresentable(decoded: _DecodedColumn, unreadable: list[tuple[int, Unrepresentable]]) -> _DecodedColumn:
    """``decoded`` with each unreadable row pointing at its own :class:`Unrepresentable`."""
    if not unreadable:
        return decoded
    values = list(decoded.values)
    first = len(values)
    values.extend(marker for _, marker in unreadable)
    rows = pa.array([row for row, _ in unreadable], pa.int64())
    codes = decoded.codes if decoded.codes is not None else pa.array(range(len(decoded.values)), pa.int64())
    mask = pc.is_in(pa.array(range(len(codes)), pa.int64()), value_set=rows)
    patched: pa.Int64Array = pc.replace_with_mask(codes, mask, pa.array(range(first, len(values)), pa.int64()))
    return _DecodedColumn(values, patched)


def _zeros(rows: int) -> pa.Int64Array:
    zeros: pa.Int64Array = pc.fill_null(pa.nulls(rows, pa.int64()), 0)
    return zeros


def _failed_rows(converted: list[Any], codes: pa.Int64Array | None) -> list[int]:
    """The rows whose result is a Failure, in row order."""
    failed = [index for index, result in enumerate(converted) if type(result) is Failure]
    if codes is None:
        return failed
    rows: list[int] = pc.indices_nonzero(pc.is_in(codes, pa.array(failed, pa.int64()))).to_pylist()
    return rows


def _dates_in_columns(array: pa.Array) -> pa.StringArray | None:
    """What :func:`_convert_date` returns for each value of a date or timestamp column, in Arrow.

    None when the column is not one this covers (a string or dictionary column, a
    nanosecond timestamp not yet cut by :func:`_readable_temporal`, a year outside
    2..9998 where Python's datetime or the UTC conversion reach their limits): the
    converter then runs per distinct value, as for any column. The property tests of
    ``map_batch`` against ``map_row`` hold the two paths together.
    """
    arrow_type = array.type
    if pa.types.is_date(arrow_type):
        naive = array
    elif pa.types.is_timestamp(arrow_type) and arrow_type.unit in ("s", "ms", "us"):
        # The values of a zoned timestamp are UTC instants: read without the zone they have
        # the UTC fields _convert_date formats after astimezone(UTC).
        naive = array.cast(pa.timestamp(arrow_type.unit)) if arrow_type.tz is not None else array
    else:
        return None
    if array.null_count == len(array):
        nulls: pa.StringArray = pa.nulls(len(array), pa.string())
        return nulls
    years = pc.min_max(pc.year(naive))
    if years["min"].as_py() < 2 or years["max"].as_py() > 9998:
        return None
    if pa.types.is_date(arrow_type):
        days: pa.StringArray = pc.strftime(naive, format="%Y-%m-%dT00:00:00Z")
        return days
    seconds = pc.floor_temporal(naive, unit="second")
    base = pc.strftime(seconds.cast(pa.timestamp("s")), format="%Y-%m-%dT%H:%M:%S")
    # Milliseconds when there are any (microseconds are cut, as _format_utc cuts them).
    millis = pc.milliseconds_between(seconds, naive)
    fraction = pc.binary_join_element_wise(".", pc.utf8_lpad(millis.cast(pa.string()), 3, "0"), "Z", "")
    moments: pa.StringArray = pc.binary_join_element_wise(base, pc.if_else(pc.equal(millis, 0), "Z", fraction), "")
    return moments


def _dedupes(arrow_type: pa.DataType) -> bool:
    # Strings repeat (codes, flags, names) and cost a converter call each; dates and
    # timestamps repeat and cost a datetime each. Numbers are cheaper to convert than
    # to hash, and lists cannot be dictionary-encoded. Equal Arrow values of one type
    # are equal Python values of one type, so a converter sees exactly what map_row sees.
    return bool(
        _is_string_type(arrow_type)
        or pa.types.is_date(arrow_type)
        or pa.types.is_timestamp(arrow_type)
        or pa.types.is_boolean(arrow_type)
    )


# Time zones whose offset is always zero.
_UTC_ZONES: Final = frozenset({"UTC", "Etc/UTC", "+00:00"})


def _decode_column(array: pa.Array) -> _DecodedColumn:
    if pa.types.is_timestamp(array.type) and array.type.tz in _UTC_ZONES:
        # A UTC timestamp read as naive has the same fields, and _convert_date formats an
        # aware value's UTC fields and a naive value's own fields alike, so the result is
        # the same; pyarrow builds naive datetimes several times faster than aware ones.
        # Only _convert_date reads temporal columns (resolve_attribute_types).
        array = array.cast(pa.timestamp(array.type.unit))
    if pa.types.is_dictionary(array.type):
        encoded = array
    elif _dedupes(array.type):
        encoded = pc.dictionary_encode(array)
    else:
        return _DecodedColumn(array.to_pylist(), None)
    values = encoded.dictionary.to_pylist()
    # A null row points past the dictionary, at the None appended there.
    codes = pc.fill_null(encoded.indices.cast(pa.int64()), len(values))
    values.append(None)
    return _DecodedColumn(values, codes)


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


def _is_string_type(arrow_type: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)
    )


def _family(arrow_type: pa.DataType) -> str:
    """The mapping family of an Arrow type (dictionary-encoded columns read as their values)."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if _is_string_type(arrow_type):
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
        return _STRING_LIST if _is_string_type(item_type) else _OTHER
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
    where = f"activation '{activation.name}'"
    families: dict[str, str] = {}
    for arrow_field in schema:
        families[arrow_field.name] = _family(arrow_field.type)
    arrow_types = {arrow_field.name: arrow_field.type for arrow_field in schema}

    def require(column: str, field: str) -> str:
        family = families.get(column)
        if family is None:
            available = ", ".join(schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
            raise ConfigError(
                f"{where}: column '{column}' is not in the segment (columns: {available or 'none'})",
                source=source,
                field=field,
            )
        return family

    _refuse_ambiguous_columns(activation, schema, source=source)
    mapping = activation.mapping
    readable = [("custom_id", _CUSTOM_ID_COMPATIBLE)]
    readable += [(native.field, _NATIVE_COMPATIBLE[native.type]) for native in NATIVE_FIELDS]
    for field_name, families_read in readable:
        column = getattr(mapping, field_name)
        if column is None:
            continue
        family = require(column, f"mapping.{field_name}")
        if family not in families_read:
            raise ConfigError(
                f"{where}: column '{column}' has Arrow type {arrow_types[column]}, "
                f"which cannot be read as {field_name}",
                source=source,
                field=f"mapping.{field_name}",
            )

    resolved: dict[str, AttributeType] = {}
    resolved_from: dict[str, int] = {}
    for index, attribute in enumerate(activation.attributes):
        column = attribute.column
        family = require(column, f"attributes.{index}.column")
        arrow_type = arrow_types[column]
        if attribute.type is not None:
            attribute_type = attribute.type
            if family not in _COMPATIBLE[attribute_type]:
                raise ConfigError(
                    f"{where}: column '{column}' has Arrow type {arrow_type}, "
                    f"which cannot be read as {attribute_type.value}",
                    source=source,
                    field=f"attributes.{index}.type",
                )
        else:
            inferred = _INFERRED.get(family)
            if inferred is None:
                raise ConfigError(
                    f"{where}: cannot infer a Batch type for column '{column}' (Arrow type {arrow_type}); "
                    "give one in 'type' or cast the column in the segment query",
                    source=source,
                    field=f"attributes.{index}.type",
                )
            attribute_type = inferred
        previous = resolved.get(column)
        if previous is not None and previous is not attribute_type:
            raise ConfigError(
                f"{where}: column '{column}' is mapped as {previous.value} "
                f"(attributes.{resolved_from[column]}) and as {attribute_type.value}",
                source=source,
                field=f"attributes.{index}.type",
            )
        resolved[column] = attribute_type
        resolved_from[column] = index
    return resolved
