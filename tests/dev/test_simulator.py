"""The local Batch Profile API simulator, exercised through real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from sync.dev.simulator import BatchSimulator, SimulatorFaults, SimulatorThread, kept

PROJECT = "project_0664hxvwffvbpn278gxdyhsadddqgna6"
KEY = "rest-key-a"
OTHER_PROJECT = "project_other"
OTHER_KEY = "rest-key-b"
CREDENTIALS = {PROJECT: KEY, OTHER_PROJECT: OTHER_KEY}
REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[BatchSimulator]:
    simulator = BatchSimulator(CREDENTIALS, clock=clock, seed=7)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


def base(sim: BatchSimulator) -> str:
    assert sim.base_url is not None
    return sim.base_url


async def post(
    session: aiohttp.ClientSession,
    sim: BatchSimulator,
    body: Any,
    *,
    endpoint: str = "update",
    version: str = "2.11",
    project: str | None = PROJECT,
    authorization: str | None = f"Bearer {KEY}",
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if project is not None:
        headers["X-Batch-Project"] = project
    if authorization is not None:
        headers["Authorization"] = authorization
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{base(sim)}/{version}/profiles/{endpoint}", data=data, headers=headers) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def profile(custom_id: str, **attributes: Any) -> dict[str, Any]:
    return {"identifiers": {"custom_id": custom_id}, "attributes": attributes}


def many(count: int, prefix: str = "u") -> list[dict[str, Any]]:
    return [profile(f"{prefix}{i}", n=i) for i in range(count)]


# --- success, 400, 401, 404 -------------------------------------------------------------


async def test_valid_update_is_applied_and_answered_success(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    item = {
        "identifiers": {"custom_id": "jane.doe@demobatch.com"},
        "attributes": {
            "$email_address": "jane.doe@demobatch.com",
            "$email_marketing": "subscribed",
            "$phone_number": "+33639981337",
            "$sms_marketing": "unsubscribed",
            "$language": "en",
            "$region": "FR",
            "$timezone": "Europe/Paris",
            "firstname": "Jane",
            "date(birthdate)": "1989-07-20T00:00:00Z",
            "interests": ["bikes", "cinema"],
            "reward_programs": {"$add": ["premium_customer"]},
        },
        "events": [{"name": "added_to_cart", "attributes": {"$label": "pumpkin", "quantity": 5}}],
    }
    status, body = await post(session, sim, [item])
    assert (status, body) == (202, {"code": "SUCCESS"})
    records = sim.profile_records(PROJECT)
    jane = records["jane.doe@demobatch.com"]
    assert jane["attributes"] == {
        "$email_address": "jane.doe@demobatch.com",
        "$email_marketing": "subscribed",
        "$phone_number": "+33639981337",
        "$sms_marketing": "unsubscribed",
        "$language": "en",
        "$region": "FR",
        "$timezone": "Europe/Paris",
        "firstname": "Jane",
        "birthdate": "1989-07-20T00:00:00Z",
        "interests": ["bikes", "cinema"],
        "reward_programs": ["premium_customer"],
    }
    assert jane["types"]["birthdate"] == "date"
    assert jane["types"]["firstname"] == "string"
    assert jane["types"]["$region"] == "native"
    assert jane["types"]["reward_programs"] == "array"
    assert jane["updates"] == 1
    assert jane["events"] == item["events"]
    assert sim.profiles(OTHER_PROJECT) == {}


async def test_empty_array_checks_credentials_only(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    assert await post(session, sim, []) == (202, {"code": "SUCCESS"})
    assert await post(session, sim, [], endpoint="mass-update") == (202, {"code": "SUCCESS"})
    assert sim.profiles(PROJECT) == {}


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        pytest.param("update", b"{not json", id="not-json"),
        pytest.param("update", b"\xff\xfe[]", id="not-utf8"),
        pytest.param("update", b"", id="empty-body"),
        pytest.param("update", b'[{"identifiers":{"custom_id":"a"},"attributes":{"x":NaN}}]', id="nan"),
        pytest.param("update", b'[{"identifiers":{"custom_id":"a"},"attributes":{"x":Infinity}}]', id="inf"),
        pytest.param("update", b'{"identifiers":{"custom_id":"a"}}', id="object-not-array"),
        pytest.param("update", b'"text"', id="string-not-array"),
        pytest.param("update", json.dumps(many(201)).encode(), id="201-on-update"),
        pytest.param("mass-update", json.dumps(many(10_001)).encode(), id="10001-on-mass-update"),
        pytest.param("update", b'[{"identifiers":{"custom_id":"a"}}, 1]', id="item-not-object"),
        pytest.param("update", b"[[]]", id="item-is-array"),
        pytest.param("update", b"[null]", id="item-is-null"),
    ],
)
async def test_malformed_requests_are_400_and_apply_nothing(
    sim: BatchSimulator, session: aiohttp.ClientSession, endpoint: str, body: bytes
) -> None:
    status, answer = await post(session, sim, body, endpoint=endpoint)
    assert status == 400
    assert answer["error_code"] == "MALFORMED_REQUEST"
    assert answer["error_message"].startswith("The request is malformed")
    assert sim.profiles(PROJECT) == {}


@pytest.mark.parametrize(("endpoint", "count"), [("update", 200), ("mass-update", 10_000)])
async def test_largest_allowed_request_is_accepted(
    sim: BatchSimulator, session: aiohttp.ClientSession, endpoint: str, count: int
) -> None:
    assert await post(session, sim, many(count), endpoint=endpoint) == (202, {"code": "SUCCESS"})
    assert len(sim.profiles(PROJECT)) == count


@pytest.mark.parametrize(
    ("project", "authorization"),
    [
        pytest.param(PROJECT, "Bearer wrong-key", id="wrong-key"),
        pytest.param(PROJECT, f"Bearer {OTHER_KEY}", id="key-of-another-project"),
        pytest.param("project_unknown", f"Bearer {KEY}", id="unknown-project"),
        pytest.param(PROJECT, None, id="missing-authorization"),
        pytest.param(None, f"Bearer {KEY}", id="missing-project-header"),
        pytest.param(PROJECT, KEY, id="no-bearer-scheme"),
        pytest.param(PROJECT, f"Basic {KEY}", id="basic-scheme"),
    ],
)
async def test_bad_credentials_are_401(
    sim: BatchSimulator, session: aiohttp.ClientSession, project: str | None, authorization: str | None
) -> None:
    status, body = await post(session, sim, [profile("a", x=1)], project=project, authorization=authorization)
    assert status == 401
    assert body == {
        "error_code": "AUTHENTICATION_INVALID",
        "error_message": "The Rest API Key is not valid for this project",
    }
    assert sim.profiles(PROJECT) == {}


@pytest.mark.parametrize("version", ["1.0", "3.0", "2", "2.x", "v2.11", "2.11.1"])
async def test_unknown_version_is_route_not_found(
    sim: BatchSimulator, session: aiohttp.ClientSession, version: str
) -> None:
    status, body = await post(session, sim, [profile("a", x=1)], version=version)
    assert status == 404
    assert body["error_code"] == "ROUTE_NOT_FOUND"
    assert sim.profiles(PROJECT) == {}


@pytest.mark.parametrize("version", ["2.0", "2.6", "2.11", "2.13"])
async def test_any_2x_version_is_accepted(sim: BatchSimulator, session: aiohttp.ClientSession, version: str) -> None:
    assert await post(session, sim, [profile("a", x=1)], version=version) == (202, {"code": "SUCCESS"})


async def test_unknown_path_is_route_not_found_json(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{base(sim)}/2.11/profiles/export") as resp:
        assert resp.status == 404
        assert (await resp.json())["error_code"] == "ROUTE_NOT_FOUND"


# --- per-item validation ------------------------------------------------------------------

GOOD = profile("good", firstname="Ok")

INVALID_ITEMS: list[Any] = [
    # (item, category, attribute)
    pytest.param({"attributes": {"x": 1}}, "identifiers", None, id="identifiers-missing"),
    pytest.param({"identifiers": "abc"}, "identifiers", None, id="identifiers-not-object"),
    pytest.param({"identifiers": {}}, "identifiers", None, id="identifiers-empty"),
    pytest.param(
        {"identifiers": {"custom_id": "a", "installation": {"installation_id": "i"}}},
        "identifiers",
        None,
        id="custom-id-and-installation",
    ),
    pytest.param({"identifiers": {"custom_id": "a", "email": "x"}}, "identifiers", None, id="extra-identifier"),
    pytest.param({"identifiers": {"custom_id": ""}}, "identifiers", None, id="custom-id-empty"),
    pytest.param({"identifiers": {"custom_id": 123}}, "identifiers", None, id="custom-id-number"),
    pytest.param({"identifiers": {"custom_id": "x" * 1025}}, "identifiers", None, id="custom-id-1025"),
    pytest.param({"identifiers": {"installation": {}}}, "identifiers", None, id="installation-empty"),
    pytest.param({"identifiers": {"installation": "i"}}, "identifiers", None, id="installation-not-object"),
    pytest.param({"identifiers": {"custom_id": "a"}, "attributes": ["x"]}, "attribute", None, id="attrs-not-object"),
    pytest.param(profile("a", FirstName="x"), "attribute", "FirstName", id="name-uppercase"),
    pytest.param(profile("a", **{"a" * 31: "x"}), "attribute", "a" * 31, id="name-31-chars"),
    pytest.param(profile("a", **{"first-name": "x"}), "attribute", "first-name", id="name-dash"),
    pytest.param(profile("a", **{"": "x"}), "attribute", "", id="name-empty"),
    pytest.param(profile("a", **{"prénom": "x"}), "attribute", "prénom", id="name-non-ascii"),
    pytest.param(
        profile("a", **{"date(Birth)": "1989-07-20T00:00:00Z"}), "attribute", "date(Birth)", id="date-bad-name"
    ),
    pytest.param(profile("a", **{"url()": "https://x.io"}), "attribute", "url()", id="url-empty-name"),
    pytest.param(profile("a", **{"$foo": "x"}), "attribute", "$foo", id="unknown-native"),
    pytest.param(profile("a", **{"$topic_preferences": ["a"]}), "attribute", "$topic_preferences", id="topics"),
    pytest.param(profile("a", **{"$email_address": "no-at-sign"}), "attribute", "$email_address", id="email-no-at"),
    pytest.param(profile("a", **{"$email_address": "a@b"}), "attribute", "$email_address", id="email-no-tld"),
    pytest.param(
        profile("a", **{"$email_address": "a" * 245 + "@example.com"}),
        "attribute",
        "$email_address",
        id="email-257-chars",
    ),
    pytest.param(profile("a", **{"$email_address": "a@b.com\n"}), "attribute", "$email_address", id="email-newline"),
    pytest.param(profile("a", **{"$email_address": 5}), "attribute", "$email_address", id="email-number"),
    pytest.param(profile("a", **{"$phone_number": "0639981337"}), "attribute", "$phone_number", id="phone-no-plus"),
    pytest.param(
        profile("a", **{"$phone_number": "+1234567890123456"}), "attribute", "$phone_number", id="phone-16-digits"
    ),
    pytest.param(profile("a", **{"$phone_number": "+33 6 39"}), "attribute", "$phone_number", id="phone-spaces"),
    pytest.param(profile("a", **{"$language": "EN"}), "attribute", "$language", id="language-upper"),
    pytest.param(profile("a", **{"$language": "eng"}), "attribute", "$language", id="language-3-letters"),
    pytest.param(profile("a", **{"$region": "fr"}), "attribute", "$region", id="region-lower"),
    pytest.param(profile("a", **{"$region": "FRA"}), "attribute", "$region", id="region-3-letters"),
    pytest.param(profile("a", **{"$timezone": "Mars/Olympus"}), "attribute", "$timezone", id="timezone-unknown"),
    pytest.param(profile("a", **{"$timezone": "../etc/passwd"}), "attribute", "$timezone", id="timezone-path"),
    pytest.param(profile("a", **{"$timezone": ""}), "attribute", "$timezone", id="timezone-empty"),
    pytest.param(profile("a", **{"$email_marketing": "yes"}), "attribute", "$email_marketing", id="email-mkt-yes"),
    pytest.param(profile("a", **{"$email_marketing": True}), "attribute", "$email_marketing", id="email-mkt-bool"),
    pytest.param(profile("a", **{"$sms_marketing": ["subscribed"]}), "attribute", "$sms_marketing", id="sms-list"),
    pytest.param(profile("a", **{"$sms_marketing": "Subscribed"}), "attribute", "$sms_marketing", id="sms-case"),
    pytest.param(profile("a", s=""), "attribute", "s", id="string-empty"),
    pytest.param(profile("a", s="  \t "), "attribute", "s", id="string-blank"),
    pytest.param(profile("a", s="x" * 301), "attribute", "s", id="string-301"),
    pytest.param(profile("a", n=2**63), "attribute", "n", id="integer-over-int64"),
    pytest.param(profile("a", tags=[]), "attribute", "tags", id="array-empty"),
    pytest.param(profile("a", tags=[f"t{i}" for i in range(26)]), "attribute", "tags", id="array-26"),
    pytest.param(profile("a", tags=[1, 2]), "attribute", "tags", id="array-of-numbers"),
    pytest.param(profile("a", tags=["ok", ""]), "attribute", "tags", id="array-empty-string"),
    pytest.param(profile("a", tags=["x" * 301]), "attribute", "tags", id="array-long-string"),
    pytest.param(profile("a", tags=[["nested"]]), "attribute", "tags", id="array-nested"),
    pytest.param(profile("a", obj={"a": 1}), "attribute", "obj", id="object"),
    pytest.param(profile("a", obj={}), "attribute", "obj", id="object-empty"),
    pytest.param(profile("a", obj={"$add": []}), "attribute", "obj", id="add-empty"),
    pytest.param(profile("a", obj={"$add": "x"}), "attribute", "obj", id="add-not-array"),
    pytest.param(profile("a", obj={"$remove": [1]}), "attribute", "obj", id="remove-numbers"),
    pytest.param(profile("a", obj={"$add": ["x"], "$set": ["y"]}), "attribute", "obj", id="edit-unknown-op"),
    pytest.param(profile("a", **{"date(d)": "1989-07-20"}), "attribute", "date(d)", id="date-no-time"),
    pytest.param(profile("a", **{"date(d)": "1989-07-20T00:00:00+02:00"}), "attribute", "date(d)", id="date-offset"),
    pytest.param(profile("a", **{"date(d)": "1989-07-20T00:00:00"}), "attribute", "date(d)", id="date-naive"),
    pytest.param(profile("a", **{"date(d)": "1989-07-20T00:00:00z"}), "attribute", "date(d)", id="date-lower-z"),
    pytest.param(profile("a", **{"date(d)": "1989-13-01T00:00:00Z"}), "attribute", "date(d)", id="date-month-13"),
    pytest.param(profile("a", **{"date(d)": "2023-02-29T00:00:00Z"}), "attribute", "date(d)", id="date-feb-29"),
    pytest.param(profile("a", **{"date(d)": 617241600}), "attribute", "date(d)", id="date-epoch"),
    pytest.param(profile("a", **{"date(d)": {"$add": ["x"]}}), "attribute", "date(d)", id="date-array-edit"),
    pytest.param(profile("a", **{"url(u)": "www.example.com"}), "attribute", "url(u)", id="url-no-scheme"),
    pytest.param(profile("a", **{"url(u)": "mailto:a@b.com"}), "attribute", "url(u)", id="url-no-slashes"),
    pytest.param(profile("a", **{"url(u)": "https://x.io/" + "p" * 2036}), "attribute", "url(u)", id="url-2049-chars"),
    pytest.param(profile("a", **{"url(u)": 42}), "attribute", "url(u)", id="url-number"),
    pytest.param(profile("a", **{f"a{i}": i for i in range(51)}), "attribute", None, id="51-custom-attributes"),
    pytest.param({"identifiers": {"custom_id": "a"}, "events": {"name": "x"}}, "event", None, id="events-object"),
    pytest.param({"identifiers": {"custom_id": "a"}, "events": ["x"]}, "event", None, id="event-not-object"),
    pytest.param(
        {"identifiers": {"custom_id": "a"}, "events": [{"name": "add-to-cart"}]}, "event", None, id="event-name-dash"
    ),
    pytest.param({"identifiers": {"custom_id": "a"}, "events": [{"name": "e" * 31}]}, "event", None, id="event-31"),
    pytest.param({"identifiers": {"custom_id": "a"}, "events": [{}]}, "event", None, id="event-no-name"),
    pytest.param(
        {"identifiers": {"custom_id": "a"}, "events": [{"name": "ok", "time": "yesterday"}]},
        "event",
        None,
        id="event-time",
    ),
    pytest.param(
        {"identifiers": {"custom_id": "a"}, "events": [{"name": "ok", "attributes": [1]}]},
        "event",
        None,
        id="event-attributes-array",
    ),
]


@pytest.mark.parametrize(("item", "category", "attribute"), INVALID_ITEMS)
async def test_invalid_item_is_a_partial_error_and_others_are_applied(
    sim: BatchSimulator,
    session: aiohttp.ClientSession,
    item: dict[str, Any],
    category: str,
    attribute: str | None,
) -> None:
    status, body = await post(session, sim, [GOOD, item, profile("after", n=1)])
    assert status == 202
    assert body["code"] == "SUCCESS_WITH_PARTIAL_ERRORS"
    assert len(body["errors"]) == 1
    (error,) = body["errors"]
    assert error["bulk_index"] == 1
    assert error["category"] == category
    assert error.get("attribute") == attribute
    assert isinstance(error["reason"], str)
    assert error["reason"]
    assert set(sim.profiles(PROJECT)) == {"good", "after"}


async def test_non_finite_float_from_an_overflowing_literal_is_rejected(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    body = b'[{"identifiers":{"custom_id":"a"},"attributes":{"x":1e400}}]'
    status, answer = await post(session, sim, body)
    assert status == 202
    assert answer["errors"] == [
        {"category": "attribute", "bulk_index": 0, "attribute": "x", "reason": "float must be finite"}
    ]


async def test_item_with_one_bad_attribute_is_dropped_whole(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    await post(session, sim, [profile("a", keep="old")])
    status, body = await post(session, sim, [profile("a", keep="new", bad="")])
    assert status == 202
    assert [e["attribute"] for e in body["errors"]] == ["bad"]
    assert sim.profiles(PROJECT) == {"a": {"keep": "old"}}
    assert sim.profile_records(PROJECT)["a"]["updates"] == 1


async def test_every_error_of_an_item_is_listed(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    status, body = await post(session, sim, [profile("a", A=1, s="", **{"$region": "fr"})])
    assert status == 202
    assert sorted(e["attribute"] for e in body["errors"]) == ["$region", "A", "s"]
    assert {e["bulk_index"] for e in body["errors"]} == {0}


VALID_ATTRIBUTES = [
    # (key, value, stored name, stored value, stored type)
    pytest.param("firstname", "Jane", "firstname", "Jane", "string", id="string"),
    pytest.param("bio", "x" * 300, "bio", "x" * 300, "string", id="string-300"),
    pytest.param("a" * 30, "x", "a" * 30, "x", "string", id="name-30"),
    pytest.param("age", 42, "age", 42, "integer", id="integer"),
    pytest.param("debt", -(2**63), "debt", -(2**63), "integer", id="int64-min"),
    pytest.param("score", 1.5, "score", 1.5, "float", id="float"),
    pytest.param("vip", False, "vip", False, "boolean", id="boolean"),
    pytest.param("date(birthdate)", "1989-07-20T00:00:00Z", "birthdate", "1989-07-20T00:00:00Z", "date", id="date"),
    pytest.param("date(seen)", "2024-02-29T23:59:59.123Z", "seen", "2024-02-29T23:59:59.123Z", "date", id="date-ms"),
    pytest.param("date(seen)", "2024-01-01T10:00Z", "seen", "2024-01-01T10:00Z", "date", id="date-minutes"),
    pytest.param("url(site)", "https://x.io/p?q=1#f", "site", "https://x.io/p?q=1#f", "url", id="url"),
    pytest.param("url(files)", "ftp://files.example.com", "files", "ftp://files.example.com", "url", id="url-ftp"),
    pytest.param("interests", ["bikes"], "interests", ["bikes"], "array", id="array-1"),
    pytest.param("many", [f"t{i}" for i in range(25)], "many", [f"t{i}" for i in range(25)], "array", id="array-25"),
    pytest.param("$email_address", "jane@demo.io", "$email_address", "jane@demo.io", "native", id="email"),
    pytest.param("$phone_number", "+33639981337", "$phone_number", "+33639981337", "native", id="phone"),
    pytest.param("$language", "fr", "$language", "fr", "native", id="language"),
    pytest.param("$region", "FR", "$region", "FR", "native", id="region"),
    pytest.param("$timezone", "America/New_York", "$timezone", "America/New_York", "native", id="timezone"),
    pytest.param("$timezone", "UTC", "$timezone", "UTC", "native", id="timezone-utc"),
    pytest.param("$email_marketing", "unsubscribed", "$email_marketing", "unsubscribed", "native", id="email-mkt"),
    pytest.param("$sms_marketing", "subscribed", "$sms_marketing", "subscribed", "native", id="sms-mkt"),
]


@pytest.mark.parametrize(("key", "value", "name", "stored", "stored_type"), VALID_ATTRIBUTES)
async def test_valid_attribute_is_stored_with_its_type(
    sim: BatchSimulator,
    session: aiohttp.ClientSession,
    key: str,
    value: Any,
    name: str,
    stored: Any,
    stored_type: str,
) -> None:
    assert await post(session, sim, [profile("a", **{key: value})]) == (202, {"code": "SUCCESS"})
    record = sim.profile_records(PROJECT)["a"]
    assert record["attributes"] == {name: stored}
    assert record["types"] == {name: stored_type}


async def test_longest_custom_id_and_fifty_custom_attributes_are_accepted(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    custom_id = "x" * 1024
    attributes = {f"a{i}": i for i in range(50)} | {"$language": "en"}
    assert await post(session, sim, [profile(custom_id, **attributes)]) == (202, {"code": "SUCCESS"})
    assert sim.profiles(PROJECT)[custom_id] == attributes


async def test_installation_identified_item_is_acknowledged_but_not_stored(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    item = {"identifiers": {"installation": {"installation_id": "i-1"}}, "attributes": {"x": 1}}
    assert await post(session, sim, [item]) == (202, {"code": "SUCCESS"})
    assert sim.profiles(PROJECT) == {}
    assert sim.stats()["profiles_applied"] == 1


# --- semantics: delete, array edits, upsert ------------------------------------------------


async def test_null_deletes_native_custom_and_wrapped_attributes(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    first = {
        "$email_address": "a@b.io",
        "firstname": "Jane",
        "date(birthdate)": "1989-07-20T00:00:00Z",
        "url(site)": "https://x.io",
        "kept": 1,
    }
    await post(session, sim, [profile("a", **first)])
    deletions = {"$email_address": None, "firstname": None, "birthdate": None, "url(site)": None, "absent": None}
    assert await post(session, sim, [profile("a", **deletions)]) == (202, {"code": "SUCCESS"})
    record = sim.profile_records(PROJECT)["a"]
    assert record["attributes"] == {"kept": 1}
    assert record["types"] == {"kept": "integer"}
    assert record["updates"] == 2


async def test_retyping_an_attribute_forgets_its_date_type(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    await post(session, sim, [profile("a", **{"date(seen)": "2024-01-01T00:00:00Z"})])
    await post(session, sim, [profile("a", seen="never")])
    assert sim.profile_records(PROJECT)["a"]["types"] == {"seen": "string"}


async def test_add_and_remove_edit_the_stored_array(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    await post(session, sim, [profile("a", tags=["a", "b", "c"])])
    await post(session, sim, [profile("a", tags={"$remove": ["b", "zz"], "$add": ["d", "a", "d"]})])
    assert sim.profiles(PROJECT)["a"]["tags"] == ["a", "c", "d"]
    await post(session, sim, [profile("a", tags={"$add": ["e"]}, fresh={"$add": ["x"]})])
    assert sim.profiles(PROJECT)["a"] == {"tags": ["a", "c", "d", "e"], "fresh": ["x"]}
    await post(session, sim, [profile("a", fresh={"$remove": ["x"]}, never={"$remove": ["y"]})])
    assert sim.profiles(PROJECT)["a"] == {"tags": ["a", "c", "d", "e"]}


async def test_update_merges_only_the_keys_sent(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    await post(session, sim, [profile("a", x=1, y="one")])
    await post(session, sim, [profile("a", y="two", z=True), profile("b", x=9)])
    assert sim.profiles(PROJECT) == {"a": {"x": 1, "y": "two", "z": True}, "b": {"x": 9}}
    records = sim.profile_records(PROJECT)
    assert (records["a"]["updates"], records["b"]["updates"]) == (2, 1)


async def test_projects_are_isolated(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    await post(session, sim, [profile("a", x=1)])
    await post(session, sim, [profile("a", x=2)], project=OTHER_PROJECT, authorization=f"Bearer {OTHER_KEY}")
    assert sim.profiles(PROJECT) == {"a": {"x": 1}}
    assert sim.profiles(OTHER_PROJECT) == {"a": {"x": 2}}


async def test_partial_errors_carry_the_right_bulk_indexes(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    items = [profile(f"p{i}", n=i) for i in range(6)]
    items[1] = profile("p1", N=1)
    items[4] = {"identifiers": {"custom_id": ""}}
    status, body = await post(session, sim, items, endpoint="mass-update")
    assert status == 202
    assert body["code"] == "SUCCESS_WITH_PARTIAL_ERRORS"
    assert [(e["bulk_index"], e["category"]) for e in body["errors"]] == [(1, "attribute"), (4, "identifiers")]
    assert sim.profiles(PROJECT) == {"p0": {"n": 0}, "p2": {"n": 2}, "p3": {"n": 3}, "p5": {"n": 5}}
    stats = sim.stats()
    assert (stats["profiles_received"], stats["profiles_applied"], stats["profiles_rejected"]) == (6, 4, 2)


# --- rate limits --------------------------------------------------------------------------


async def test_update_bucket_bursts_1000_then_refills_at_300_per_second(
    sim: BatchSimulator, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    for batch in range(5):
        assert await post(session, sim, many(200, f"b{batch}-")) == (202, {"code": "SUCCESS"})
    status, body = await post(session, sim, many(1, "over-"))
    assert status == 429
    assert body["error_code"] == "TOO_MANY_REQUESTS"
    assert "over-0" not in sim.profiles(PROJECT)

    clock.advance(0.5)  # 150 profiles refilled
    assert (await post(session, sim, many(151, "c-")))[0] == 429  # refused whole, consumes nothing
    assert (await post(session, sim, many(150, "c-")))[0] == 202
    assert (await post(session, sim, many(1, "d-")))[0] == 429

    clock.advance(3600)  # refill is capped at the burst of 1,000
    for batch in range(5):
        assert (await post(session, sim, many(200, f"e{batch}-")))[0] == 202
    assert (await post(session, sim, many(1, "f-")))[0] == 429
    stats = sim.stats()
    assert stats["too_many_requests"] == 4
    assert stats["status_codes"]["429"] == 4


async def test_buckets_are_per_project_and_per_endpoint(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    for batch in range(5):
        await post(session, sim, many(200, f"b{batch}-"))
    assert (await post(session, sim, many(1)))[0] == 429
    assert (await post(session, sim, many(1), endpoint="mass-update"))[0] == 202
    other = await post(session, sim, many(200), project=OTHER_PROJECT, authorization=f"Bearer {OTHER_KEY}")
    assert other[0] == 202


async def test_mass_update_allows_10000_per_second_without_burst(
    sim: BatchSimulator, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    assert (await post(session, sim, many(10_000), endpoint="mass-update"))[0] == 202
    assert (await post(session, sim, many(1, "x"), endpoint="mass-update"))[0] == 429
    clock.advance(0.25)
    assert (await post(session, sim, many(2_501, "y"), endpoint="mass-update"))[0] == 429
    assert (await post(session, sim, many(2_500, "y"), endpoint="mass-update"))[0] == 202
    clock.advance(60)
    assert (await post(session, sim, many(10_000, "z"), endpoint="mass-update"))[0] == 202
    assert (await post(session, sim, many(1, "w"), endpoint="mass-update"))[0] == 429


async def test_rate_limit_can_be_switched_off(session: aiohttp.ClientSession, clock: FakeClock) -> None:
    simulator = BatchSimulator(CREDENTIALS, rate_limit=False, clock=clock)
    await simulator.start()
    try:
        for batch in range(8):
            assert (await post(session, simulator, many(200, f"b{batch}-")))[0] == 202
        assert simulator.stats()["too_many_requests"] == 0
    finally:
        await simulator.stop()


# --- faults ------------------------------------------------------------------------------


async def test_latency_delays_every_api_answer(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    sim.faults.latency_ms = 150
    loop_time = asyncio.get_running_loop().time
    started = loop_time()
    assert (await post(session, sim, [profile("a", x=1)]))[0] == 202
    assert loop_time() - started >= 0.15


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_fail_next_answers_the_status_then_recovers(
    sim: BatchSimulator, session: aiohttp.ClientSession, status: int
) -> None:
    sim.faults.fail_next = 2
    sim.faults.fail_status = status
    for _ in range(2):
        got, body = await post(session, sim, [profile("a", x=1)])
        assert got == status
        if status in (502, 504):
            assert isinstance(body, str)  # a proxy's HTML page, not Batch JSON
            assert "<html>" in body
        else:
            assert isinstance(body["error_code"], str)
    assert sim.profiles(PROJECT) == {}
    assert await post(session, sim, [profile("a", x=1)]) == (202, {"code": "SUCCESS"})
    assert sim.faults.fail_next == 0
    assert sim.stats()["status_codes"] == {str(status): 2, "202": 1}


async def test_failure_rate_is_seeded_and_reproducible(session: aiohttp.ClientSession) -> None:
    async def statuses(seed: int) -> list[int]:
        simulator = BatchSimulator(CREDENTIALS, rate_limit=False, seed=seed)
        simulator.faults.update({"failure_rate": 0.5, "failure_status": 500})
        await simulator.start()
        try:
            return [(await post(session, simulator, [profile("a", x=i)]))[0] for i in range(30)]
        finally:
            await simulator.stop()

    first, again = await statuses(3), await statuses(3)
    assert first == again
    assert set(first) == {202, 500}


async def test_failure_rate_one_always_fails(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    sim.faults.failure_rate = 1.0
    sim.faults.failure_status = 503
    for _ in range(3):
        status, body = await post(session, sim, [profile("a", x=1)])
        assert (status, body["error_code"]) == (503, "MAINTENANCE_ERROR")
    assert sim.profiles(PROJECT) == {}


async def test_drop_before_apply_disconnects_and_applies_nothing(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    sim.faults.drop_before_apply = 1
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, sim, [profile("a", x=1)])
    assert sim.profiles(PROJECT) == {}
    assert await post(session, sim, [profile("a", x=1)]) == (202, {"code": "SUCCESS"})
    assert sim.profile_records(PROJECT)["a"]["updates"] == 1
    assert sim.stats()["connections_dropped"] == 1


async def test_drop_after_apply_applies_but_the_client_sees_a_disconnect(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    sim.faults.drop_after_apply = 1
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, sim, [profile("a", x=1)])
    assert sim.profiles(PROJECT) == {"a": {"x": 1}}
    # The client's retry is a second, idempotent application of the same update.
    assert await post(session, sim, [profile("a", x=1)]) == (202, {"code": "SUCCESS"})
    assert sim.profiles(PROJECT) == {"a": {"x": 1}}
    stats = sim.stats()
    assert stats["max_updates_per_custom_id"] == 2
    assert stats["profiles_applied"] == 2
    assert stats["connections_dropped"] == 1


async def test_rejected_custom_ids_are_partial_errors(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    sim.faults.reject_custom_ids = {"bad"}
    status, body = await post(session, sim, [profile("ok", x=1), profile("bad", x=2)])
    assert status == 202
    assert body["errors"] == [{"category": "identifiers", "bulk_index": 1, "reason": "simulated rejection"}]
    assert sim.profiles(PROJECT) == {"ok": {"x": 1}}


async def test_reject_custom_ids_still_works_beside_item_errors(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    sim.faults.update({"reject_custom_ids": ["bad"], "item_errors": {"server": 1.0}})
    status, body = await post(session, sim, [profile("bad", x=2)])
    assert status == 202
    # One error per item: the rejection, never an injected one on top.
    assert body["errors"] == [{"category": "identifiers", "bulk_index": 0, "reason": "simulated rejection"}]
    assert sim.stats()["item_errors"]["server"] == 0


# --- injected per-item errors -------------------------------------------------------------

ITEM_ERROR_SHAPES = [
    pytest.param("server", {"category": "server", "reason": "simulated: internal error"}, id="server"),
    pytest.param("unknown", {"category": "simulated_unknown", "reason": "simulated: unknown category"}, id="unknown"),
    pytest.param("none", {"reason": "simulated: no category"}, id="none"),
]


@pytest.mark.parametrize(("kind", "shape"), ITEM_ERROR_SHAPES)
async def test_item_errors_of_a_random_kind_have_its_shape_and_drop_the_item(
    sim: BatchSimulator, session: aiohttp.ClientSession, kind: str, shape: dict[str, str]
) -> None:
    sim.faults.update({"item_errors": {kind: 1.0}})
    status, body = await post(session, sim, [profile("a", x=1), profile("b", y=2)])
    assert status == 202
    assert body["code"] == "SUCCESS_WITH_PARTIAL_ERRORS"
    assert body["errors"] == [{**shape, "bulk_index": 0}, {**shape, "bulk_index": 1}]
    assert [list(error) for error in body["errors"]] == [list(error) for error in body["errors"][:1]] * 2
    assert ("category" in body["errors"][0]) == (kind != "none")
    assert sim.profiles(PROJECT) == {}
    stats = sim.stats()
    assert stats["item_errors"] == {"value": 0, "server": 0, "unknown": 0, "none": 0} | {kind: 2}
    assert stats["profiles_rejected"] == 2


async def test_value_item_errors_name_an_attribute_and_follow_the_payload(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    sim.faults.update({"item_errors": {"value": 1.0}})
    status, body = await post(
        session, sim, [profile("a", zeta=1, alpha="x"), {"identifiers": {"custom_id": "b"}}], endpoint="mass-update"
    )
    assert status == 202
    assert body["errors"] == [
        {"category": "attribute", "bulk_index": 0, "attribute": "alpha", "reason": "simulated: value refused"},
        {"category": "attribute", "bulk_index": 1, "attribute": "custom_id", "reason": "simulated: value refused"},
    ]
    assert sim.profiles(PROJECT) == {}
    assert sim.stats()["item_errors"]["value"] == 2


async def test_value_item_errors_are_decided_by_the_payload_not_by_chance(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    sim.faults.update({"item_errors": {"value": 0.3}})
    items = many(200)
    _, first = await post(session, sim, items)
    refused = {error["bulk_index"] for error in first["errors"]}
    assert 20 < len(refused) < 100  # about 30 %
    # The same payloads again (keys in another order): the very same items are refused.
    reordered = [{"attributes": item["attributes"], "identifiers": item["identifiers"]} for item in items]
    _, again = await post(session, sim, reordered)
    assert {error["bulk_index"] for error in again["errors"]} == refused
    # A changed payload is drawn again: some refused ones now pass, some others are refused.
    changed = [profile(f"u{i}", n=i, v=2) for i in range(200)]
    _, third = await post(session, sim, changed)
    refused_changed = {error["bulk_index"] for error in third["errors"]}
    assert refused_changed != refused
    assert set(sim.profiles(PROJECT)) == {f"u{i}" for i in range(200) if i not in refused or i not in refused_changed}


async def test_random_item_errors_follow_the_seed(session: aiohttp.ClientSession) -> None:
    async def errors(seed: int) -> list[tuple[int, str | None]]:
        simulator = BatchSimulator(CREDENTIALS, rate_limit=False, seed=seed)
        simulator.faults.update({"item_errors": {"server": 0.1, "unknown": 0.1, "none": 0.1}})
        await simulator.start()
        try:
            found: list[tuple[int, str | None]] = []
            for _ in range(3):
                _, body = await post(session, simulator, many(200))
                found.extend((e["bulk_index"], e.get("category")) for e in body.get("errors", []))
            return found
        finally:
            await simulator.stop()

    first, again, other = await errors(5), await errors(5), await errors(6)
    assert first == again
    assert first != other
    assert {category for _, category in first} == {"server", "simulated_unknown", None}


async def test_item_errors_setting_is_shown_completed_and_cleared_by_reset(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{base(sim)}/_sim/faults", json={"item_errors": {"server": 0.25}}) as resp:
        assert resp.status == 200
        shown = await resp.json()
    assert shown["item_errors"] == {"value": 0.0, "server": 0.25, "unknown": 0.0, "none": 0.0}
    async with session.post(f"{base(sim)}/_sim/faults", json={"item_errors": {"none": 1}}) as resp:
        # Partial objects replace the whole setting: the kinds not named are back to 0.
        assert (await resp.json())["item_errors"] == {"value": 0.0, "server": 0.0, "unknown": 0.0, "none": 1.0}
    await post(session, sim, [profile("a", x=1)])
    assert sim.stats()["item_errors"]["none"] == 1
    async with session.post(f"{base(sim)}/_sim/reset") as resp:
        assert resp.status == 200
    async with session.get(f"{base(sim)}/_sim/faults") as resp:
        assert (await resp.json())["item_errors"] == {"value": 0.0, "server": 0.0, "unknown": 0.0, "none": 0.0}
    assert sim.stats()["item_errors"] == {"value": 0, "server": 0, "unknown": 0, "none": 0}
    assert await post(session, sim, [profile("a", x=1)]) == (202, {"code": "SUCCESS"})


async def test_item_errors_leave_invalid_items_with_their_own_error_only(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    sim.faults.update({"item_errors": {"server": 1.0}})
    _, body = await post(session, sim, [profile("a", X=1)])
    assert body["errors"] == [
        {
            "category": "attribute",
            "bulk_index": 0,
            "attribute": "X",
            "reason": "attribute name must match [a-z0-9_]{1,30}",
        }
    ]
    assert sim.stats()["item_errors"]["server"] == 0


# --- /_sim endpoints ----------------------------------------------------------------------


async def test_sim_faults_endpoint_sets_and_reports_settings(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    settings = {"fail_next": 1, "fail_status": 500, "drop_after_apply": 2, "reject_custom_ids": ["x", "y"]}
    async with session.post(f"{base(sim)}/_sim/faults", json=settings) as resp:
        assert resp.status == 200
        shown = await resp.json()
    assert shown == SimulatorFaults(fail_next=1, fail_status=500, drop_after_apply=2).to_json() | {
        "reject_custom_ids": ["x", "y"]
    }
    assert sim.faults.reject_custom_ids == {"x", "y"}
    async with session.get(f"{base(sim)}/_sim/faults") as resp:
        assert await resp.json() == shown
    assert (await post(session, sim, [profile("a", x=1)]))[0] == 500


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"fail_next": -1}, id="negative"),
        pytest.param({"fail_status": 404}, id="status-not-transient"),
        pytest.param({"failure_status": 429}, id="random-status-not-5xx"),
        pytest.param({"failure_rate": 1.5}, id="rate-over-1"),
        pytest.param({"latency_ms": "slow"}, id="latency-text"),
        pytest.param({"reject_custom_ids": "abc"}, id="ids-not-list"),
        pytest.param({"item_errors": 0.5}, id="item-errors-not-object"),
        pytest.param({"item_errors": {"server": 1.5}}, id="item-errors-over-1"),
        pytest.param({"item_errors": {"server": -0.1}}, id="item-errors-negative"),
        pytest.param({"item_errors": {"server": "often"}}, id="item-errors-text"),
        pytest.param({"item_errors": {"server": True}}, id="item-errors-bool"),
        pytest.param({"item_errors": {"timeout": 0.1}}, id="item-errors-unknown-kind"),
        pytest.param({"explode": True}, id="unknown-setting"),
        pytest.param([1], id="not-an-object"),
    ],
)
async def test_sim_faults_endpoint_rejects_bad_settings(
    sim: BatchSimulator, session: aiohttp.ClientSession, settings: Any
) -> None:
    async with session.post(f"{base(sim)}/_sim/faults", json={"fail_next": 3}) as resp:
        assert resp.status == 200
    async with session.post(f"{base(sim)}/_sim/faults", json=settings) as resp:
        assert resp.status == 400
        assert (await resp.json())["error_code"] == "MALFORMED_REQUEST"
    assert sim.faults.fail_next == 3  # nothing changed


async def test_sim_stats_and_profiles_endpoints(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    await post(session, sim, [profile("a", x=1, **{"date(d)": "2024-01-01T00:00:00Z"}), profile("b", X=1)])
    await post(session, sim, [profile("a", x=2)], endpoint="mass-update")
    await post(session, sim, [], authorization="Bearer nope")
    async with session.get(f"{base(sim)}/_sim/stats") as resp:
        stats = await resp.json()
    assert stats == {
        "requests": {"update": 2, "mass-update": 1},
        "status_codes": {"202": 2, "401": 1},
        "profiles_received": 3,
        "profiles_applied": 2,
        "profiles_rejected": 1,
        "max_updates_per_custom_id": 2,
        "too_many_requests": 0,
        "connections_dropped": 0,
        "profiles_stored": 1,
        "item_errors": {"value": 0, "server": 0, "unknown": 0, "none": 0},
    }
    async with session.get(f"{base(sim)}/_sim/projects/{PROJECT}/profiles") as resp:
        profiles = await resp.json()
    assert profiles == {
        "profiles": {
            "a": {
                "attributes": {"x": 2, "d": "2024-01-01T00:00:00Z"},
                "types": {"x": "integer", "d": "date"},
                "updates": 2,
                "events": [],
            }
        }
    }
    async with session.get(f"{base(sim)}/_sim/projects/{PROJECT}/profiles/a") as resp:
        assert await resp.json() == profiles["profiles"]["a"]
    async with session.get(f"{base(sim)}/_sim/projects/{PROJECT}/profiles/missing") as resp:
        assert resp.status == 404
    async with session.get(f"{base(sim)}/_sim/projects/unknown/profiles") as resp:
        assert await resp.json() == {"profiles": {}}


async def test_sim_reset_clears_profiles_stats_faults_and_buckets(
    sim: BatchSimulator, session: aiohttp.ClientSession
) -> None:
    for batch in range(5):
        await post(session, sim, many(200, f"b{batch}-"))
    sim.faults.reject_custom_ids = {"z"}
    sim.faults.latency_ms = 5
    faults = sim.faults
    async with session.post(f"{base(sim)}/_sim/reset") as resp:
        assert resp.status == 200
    assert sim.profiles(PROJECT) == {}
    assert sim.faults is faults
    assert faults.to_json() == SimulatorFaults().to_json()
    assert sim.stats()["requests"] == {"update": 0, "mass-update": 0}
    assert (await post(session, sim, many(200)))[0] == 202  # the bucket is full again


async def test_profiles_returns_copies(sim: BatchSimulator, session: aiohttp.ClientSession) -> None:
    await post(session, sim, [profile("a", tags=["x"])])
    sim.profiles(PROJECT)["a"]["tags"].append("mutated")
    assert sim.profiles(PROJECT) == {"a": {"tags": ["x"]}}


# --- running in a thread, and as a process ------------------------------------------------


def _sync_post(base_url: str, items: list[dict[str, Any]]) -> tuple[int, Any]:
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request(
            "POST",
            "/2.11/profiles/update",
            body=json.dumps(items),
            headers={"Authorization": f"Bearer {KEY}", "X-Batch-Project": PROJECT},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_simulator_thread_serves_sync_callers_and_stops() -> None:
    with SimulatorThread(BatchSimulator(CREDENTIALS)) as running:
        assert running.base_url.startswith("http://127.0.0.1:")
        assert _sync_post(running.base_url, [profile("a", x=1)]) == (202, {"code": "SUCCESS"})
        assert running.simulator.profiles(PROJECT) == {"a": {"x": 1}}
        base_url = running.base_url
    with pytest.raises(ConnectionRefusedError):
        _sync_post(base_url, [])


def test_simulator_thread_reports_a_port_already_in_use() -> None:
    with SimulatorThread(BatchSimulator(CREDENTIALS)) as running:
        port = urlsplit(running.base_url).port
        assert port is not None
        with pytest.raises(OSError, match="address already in use"):
            SimulatorThread(BatchSimulator(CREDENTIALS), port=port).start()


def test_serve_logs_its_url_and_stops_on_sigterm() -> None:
    script = f"from sync.dev.simulator import serve; serve('127.0.0.1', 0, {{{PROJECT!r}: {KEY!r}}}, rate_limit=False)"
    process = subprocess.Popen(
        [sys.executable, "-u", "-c", script],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:[0-9]+", line)
        assert match is not None, line
        assert KEY not in line
        assert _sync_post(match.group(0), [profile("a", x=1)]) == (202, {"code": "SUCCESS"})
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


# --- keep_every: a large benchmark keeps a sample whole -----------------------------------


async def test_keep_every_keeps_a_sample_whole_and_counts_every_other_profile(
    clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    simulator = BatchSimulator(CREDENTIALS, clock=clock, seed=7, keep_every=4, rate_limit=False)
    await simulator.start()
    try:
        ids = [f"u{i}" for i in range(200)]
        for _ in range(2):
            status, _ = await post(session, simulator, [profile(cid, n=1) for cid in ids])
            assert status == 202
        whole = [cid for cid in ids if kept(cid, 4)]
        counted = [cid for cid in ids if not kept(cid, 4)]
        assert 20 < len(whole) < 80  # about one in four, by CRC-32
        assert set(simulator.profiles(PROJECT)) == set(whole)
        stats = simulator.stats()
        assert stats["profiles_stored"] == 200
        assert stats["max_updates_per_custom_id"] == 2
        views = f"{base(simulator)}/_sim/projects/{PROJECT}/profiles"
        async with session.get(f"{views}/{whole[0]}") as resp:
            record = await resp.json()
            assert record["attributes"] == {"n": 1}
            assert record["updates"] == 2
        async with session.get(f"{views}/{counted[0]}") as resp:
            assert await resp.json() == {"kept": False, "updates": 2}
        async with session.get(f"{views}/nobody") as resp:
            assert resp.status == 404
    finally:
        await simulator.stop()


def test_keep_every_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="keep_every"):
        BatchSimulator(CREDENTIALS, keep_every=0)
    assert kept("anyone", 1)
