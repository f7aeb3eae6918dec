"""Convert: one source value -> the Batch payload value, or why it cannot be sent.

Every converter here takes one non-null Python value, as a row or a column of the
segment hands it over, and returns the payload value, None ("no value", sent as null) or
a :class:`Failure` with its reason code. They are pure functions of the value: the
batch path (:meth:`sync.mapping.ProfileMapper.convert_batch`) calls them once per
distinct value of a column, and the row-at-a-time reference in the tests
(``tests/support/reference_mapping.py``) once per cell; the two must agree. Kept apart
from the mapper because they are the rules (what Batch accepts, and how we normalise
it), while the mapper is only the plumbing that walks a batch.

The rules are the project's reading of Batch's limits (``docs/batch-api.md``, "Checked before sending"):
strings 1-300 characters, ``url()`` at most 2048, string arrays 1-25 items, ``date()``
ISO-8601 UTC ending in ``Z``, E.164 phones, ISO 639-1 / 3166-1 codes, IANA time zones.
Values are validated with maintained libraries (``rphonenumbers`` and ``phonenumbers``,
``email-validator``, ``pycountry``, ``zoneinfo``), not hand-written patterns; the few
patterns here only pick out values those libraries certainly accept, to skip the call.
Lookup tables are built once per process, and a failure object is created only for a
bad value. ``docs/mapping.md`` says what each Batch field accepts and how we normalise it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
import zoneinfo
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Final, TypeAlias, assert_never
from urllib.parse import urlsplit

import pycountry

from sync.config import AttributeType
from sync.model import Reason
from sync.natives import NativeType

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
    """ISO 639-1 code (lowercase) -> itself, from pycountry's own ISO 639-3 file.

    Read from the file rather than through ``pycountry.languages``, which builds an object
    and index entries for each of its ~7,900 languages (~6 MB, kept for the process's life)
    to give the 184 that have a two-letter code.
    """
    database = pycountry.languages
    with open(database.filename, encoding="utf-8") as file:
        entries: list[dict[str, str]] = json.load(file)[database.root_key]
    return {entry["alpha_2"].lower(): entry["alpha_2"].lower() for entry in entries if "alpha_2" in entry}


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


class Unrepresentable:
    """A date or timestamp cell no Python datetime holds; :func:`convert_date` rejects it.

    :mod:`sync.decode` puts one in place of each such cell of an Arrow column, with why
    (``infinity``, a year beyond 9999), so the row is rejected instead of the run failing.
    """

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


# A payload value as a converter returns it: what the JSON holds under a Batch key.
Value: TypeAlias = str | int | float | bool | list[str]
# A converter's answer: the value, None for "no value" (sent as null), or why it is refused.
Converted: TypeAlias = Value | Failure | None
Converter: TypeAlias = Callable[[object], Converted]


def _quote(value: object) -> str:
    # Slice long strings before repr so a 1 MB cell does not cost a 1 MB repr.
    text = repr(value[: DETAIL_VALUE_LENGTH + 1]) if isinstance(value, str) else repr(value)
    return text if len(text) <= DETAIL_VALUE_LENGTH else text[: DETAIL_VALUE_LENGTH - 1] + "…"


def _quote_number(value: int | Decimal) -> str:
    # A number is quoted whole up to 80 characters (DECIMAL(76, 38) has 77): the digits
    # lost are the point of the message.
    text = str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _fail(reason: Reason, message: str, value: object) -> Failure:
    return Failure(reason, f"{message}: {_quote(value)}")


def _wrong_type(reason: Reason, expected: str, value: object) -> Failure:
    return Failure(reason, f"expected {expected}, got {type(value).__name__} {_quote(value)}")


def _blank_or_wrong_type(reason: Reason, expected: str, value: object) -> Failure | None:
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


@functools.cache
def email_names() -> tuple[frozenset[str], frozenset[str]]:
    """email-validator's special-use top-level domains, and the mailbox names it lowercases.

    email-validator (~0.03 s of imports) loads with the first address, not with this module:
    a run that maps no row (a quiet segment) never imports it.
    """
    from email_validator import SPECIAL_USE_DOMAIN_NAMES
    from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

    return frozenset(SPECIAL_USE_DOMAIN_NAMES), frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


def _plain_domain(domain: str, tld: str) -> bool:
    """A domain the patterns matched that email-validator accepts as its lowercase self."""
    if tld.lower() in email_names()[0]:
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
    if local.lower() in email_names()[1]:
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
    from email_validator import EmailNotValidError
    from email_validator.syntax import validate_email_local_part

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


def convert_email(value: object) -> str | Failure | None:
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
    from email_validator import EmailNotValidError, validate_email

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


def phone_converter(default_region: str | None) -> Converter:
    # The phone libraries (~0.03 s of imports) load when an activation maps a phone field;
    # phonenumbers (a second opinion, ~2 MB more) only once rphonenumbers refuses a number.
    import rphonenumbers

    fast_e164 = rphonenumbers.PhoneNumberFormat.E164

    def convert(value: object) -> str | Failure | None:
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
                formatted: str = rphonenumbers.format_number(fast, fast_e164)  # untyped library
                return formatted
        import phonenumbers

        try:
            number = phonenumbers.parse(text, default_region)
        except phonenumbers.NumberParseException:
            return _fail(Reason.INVALID_PHONE, "not a phone number", value)
        if not phonenumbers.is_valid_number(number):
            return _fail(Reason.INVALID_PHONE, "not a valid phone number", value)
        # E.164 is what Batch accepts (SDK pattern ^\+[0-9]{1,15}$); extensions are dropped.
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    return convert


def _language_converter() -> Converter:
    table = _languages()

    def convert(value: object) -> str | Failure | None:
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

    def convert(value: object) -> str | Failure | None:
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

    def convert(value: object) -> str | Failure | None:
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


def _convert_subscription(value: object) -> str | Failure | None:
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


def _convert_string(value: object) -> str | Failure | None:
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


def _convert_integer(value: object) -> int | Failure | None:
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


def _convert_float(value: object) -> float | Failure | None:
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


def _convert_boolean(value: object) -> bool | Failure | None:
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


def convert_date(value: object) -> str | Failure | None:
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
PLAIN_WEB_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::[0-9]+)?(?:[/?#][!-~]*)?")


def _convert_url(value: object) -> str | Failure | None:
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
    if PLAIN_WEB_URL.fullmatch(text) is not None:
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


def _convert_string_array(value: object) -> list[str] | Failure | None:
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


CUSTOM_CONVERTERS: Final[Mapping[AttributeType, Converter]] = {
    AttributeType.STRING: _convert_string,
    AttributeType.INTEGER: _convert_integer,
    AttributeType.FLOAT: _convert_float,
    AttributeType.BOOLEAN: _convert_boolean,
    AttributeType.DATE: convert_date,
    AttributeType.URL: _convert_url,
    AttributeType.STRING_ARRAY: _convert_string_array,
}


def convert_custom_id(value: object) -> str | Failure:
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


def has_timezone_data() -> bool:
    """Whether this machine has an IANA time zone database (the time zone field needs one)."""
    return bool(_timezones()[0])


def lazy_modules(native_type: NativeType) -> tuple[str, ...]:
    """What a native field's converter imports on its first value, not with this module.

    email-validator at the first address (:func:`email_names`), phonenumbers at the first
    number rphonenumbers refuses (:func:`phone_converter`). A run about to map rows imports
    them on a thread while DuckDB reads those rows (``ProfileMapper.warm``, :mod:`sync.preload`).
    """
    if native_type is NativeType.EMAIL:
        return ("email_validator",)
    if native_type is NativeType.PHONE:
        return ("phonenumbers",)
    return ()


def native_converter(native_type: NativeType, default_phone_region: str | None) -> Converter:
    """The converter of a native field of this type (its lookup table is built on first use)."""
    if native_type is NativeType.EMAIL:
        return convert_email
    if native_type is NativeType.PHONE:
        return phone_converter(default_phone_region)
    if native_type is NativeType.LANGUAGE:
        return _language_converter()
    if native_type is NativeType.REGION:
        return _region_converter()
    if native_type is NativeType.TIMEZONE:
        return _timezone_converter()
    if native_type is NativeType.SUBSCRIPTION:
        return _convert_subscription
    assert_never(native_type)
