"""One status vocabulary (sync.record.RunStatus) and error families mapped to it at the edges."""

from __future__ import annotations

import inspect

import pytest

from sync import errors
from sync.errors import (
    BatchAuthError,
    BatchContractError,
    BatchUnreachable,
    ConfigError,
    ConflictError,
    FatalError,
    GuardTripped,
    LeaseHeld,
    LeaseLost,
    RetryableRunError,
    SyncError,
    TransientError,
)
from sync.record import (
    EXIT_CODES,
    RunStatus,
    exit_code_of,
    http_status_of,
    is_retryable,
    status_of_error,
)

FAMILIES = (FatalError, TransientError, ConflictError)


def test_every_error_of_the_package_is_in_exactly_one_family() -> None:
    kinds = [
        kind
        for _, kind in inspect.getmembers(errors, inspect.isclass)
        if issubclass(kind, SyncError) and kind is not SyncError and kind not in FAMILIES
    ]
    assert LeaseHeld in kinds
    assert RetryableRunError in kinds
    for kind in kinds:
        assert sum(issubclass(kind, family) for family in FAMILIES) == 1, kind
        assert not hasattr(kind, "exit_code"), kind  # numbers belong to statuses, not errors


@pytest.mark.parametrize(
    ("error", "status", "exit_code", "http_status", "retryable"),
    [
        (ConfigError("bad", field="x"), RunStatus.CONFIG_ERROR, 2, 422, False),
        (GuardTripped("too many removals"), RunStatus.ABORTED_BY_GUARD, 3, 412, False),
        (BatchAuthError("401"), RunStatus.AUTH_ERROR, 4, 502, False),
        (LeaseHeld("held by another run"), RunStatus.SKIPPED_LEASE_HELD, 5, 409, False),
        (BatchContractError("400"), RunStatus.FAILED, 1, 500, False),
        (LeaseLost("lost"), RunStatus.FAILED, 1, 500, False),
        (BatchUnreachable("down"), RunStatus.FAILED, 1, 500, True),
        (RetryableRunError("publish failed"), RunStatus.FAILED, 1, 500, True),
        (OSError("disk"), RunStatus.FAILED, 1, 500, True),
    ],
)
def test_an_error_family_gives_the_status_and_the_status_the_codes(
    error: BaseException, status: RunStatus, exit_code: int, http_status: int, retryable: bool
) -> None:
    assert status_of_error(error) is status
    assert (status.exit_code, status.http_status, is_retryable(error)) == (exit_code, http_status, retryable)


def test_every_status_has_an_exit_code_and_an_http_status() -> None:
    for status in RunStatus:
        assert isinstance(status.exit_code, int)
        assert 200 <= status.http_status < 600
        assert EXIT_CODES[status.value] == status.exit_code == exit_code_of(status.value)
        assert http_status_of(status.value) == status.http_status
    assert RunStatus.of("succeeded") is RunStatus.SUCCEEDED
    assert RunStatus.of("something_new") is None
    assert (exit_code_of("something_new"), http_status_of("something_new")) == (1, 500)
