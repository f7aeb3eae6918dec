"""The guards' names, and the check of a list of guards to override (``--allow``, a message's ``allow``).

Its own room, free of the planning code (:mod:`sync.plan` and pyarrow), so the command line
and the function check what they were asked before a run loads anything heavy.
:mod:`sync.plan` re-exports both names.
"""

from __future__ import annotations

from collections.abc import Iterable

from sync.errors import ConfigError

__all__ = ["GUARD_NAMES", "check_guard_names"]

GUARD_NAMES = ("empty_segment", "removed_percent", "changed_percent")


def check_guard_names(names: Iterable[str], *, field: str) -> tuple[str, ...]:
    """Guards a person or a message asks to override for one run, each once, in the order given.

    Raises:
        ConfigError: a name is not a guard's; the error names ``field`` and lists the guards.
    """
    wanted = tuple(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in GUARD_NAMES]
    if unknown:
        # A name may come from an untrusted message: quoted, and cut short.
        quoted = ", ".join(repr(name[:40]) for name in unknown)
        raise ConfigError(f"unknown guard(s) {quoted}; known: {', '.join(GUARD_NAMES)}", field=field)
    return wanted
