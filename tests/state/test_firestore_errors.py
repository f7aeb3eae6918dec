"""Firestore's errors reach a run as its own families: transient (retry) or fatal (fix the deployment).

Before, a Firestore outage ended a run as "unexpected ServiceUnavailable"; what a retry can
fix and what needs a person must read differently (sync/errors.py).
"""

from __future__ import annotations

import pytest
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from sync.errors import FatalError, LeaseLost, SyncError, TransientError
from sync.state.firestore.documents import translated

WHAT = "appending fp journal documents of activation 'vip'"


@pytest.mark.parametrize(
    "error",
    [
        api_exceptions.ServiceUnavailable("the service is unavailable"),
        api_exceptions.DeadlineExceeded("deadline exceeded"),
        api_exceptions.TooManyRequests("quota"),
        api_exceptions.InternalServerError("internal"),
        api_exceptions.Aborted("aborted"),
        api_exceptions.RetryError("retries ran out", cause=api_exceptions.ServiceUnavailable("down")),
        auth_exceptions.TransportError("connection reset"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_what_a_retry_may_fix_is_transient_and_says_what_was_being_done(error: Exception) -> None:
    expected = r"while appending fp journal documents of activation 'vip'"
    with pytest.raises(TransientError, match=expected) as raised, translated(WHAT):
        raise error
    assert "can be retried" in str(raised.value)
    assert raised.value.__cause__ is None


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (api_exceptions.PermissionDenied("missing datastore.entities.update"), "roles/datastore.user"),
        (auth_exceptions.RefreshError("token revoked"), "roles/datastore.user"),
        (api_exceptions.NotFound("database (default) does not exist"), "CEPSYNC_FIRESTORE_DATABASE"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_what_needs_a_person_is_fatal_and_says_what_to_check(error: Exception, advice: str) -> None:
    with pytest.raises(FatalError, match=advice), translated(WHAT):
        raise error


def test_our_own_errors_and_unknown_ones_pass_through() -> None:
    with pytest.raises(LeaseLost), translated(WHAT):
        raise LeaseLost("superseded")
    with pytest.raises(KeyError), translated(WHAT):
        raise KeyError("a bug of ours stays a bug")
    assert issubclass(LeaseLost, SyncError)
