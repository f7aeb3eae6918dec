"""Removals: what a mirror run does for the ids that left its segment (``on_remove``).

* ``clear`` (the default): every key this activation owns is sent as null
  (:func:`sync.send.removal_body`), a window of request groups at a time, each window's
  ids noted as intents before any of its requests leaves (guarantee 7, ``sync/send.py``).
  An acknowledged removal deletes the id's fingerprint; a refused one is remembered by the
  removal payload's fingerprint (``RunBook.hold_refused_removals``).
* ``keep``: nothing is sent. Batch keeps the profile as it is, and the state forgets the
  id (its fingerprint, the intents an earlier run left for it, a remembered refusal): it is
  no longer tracked, and one that comes back to the segment is synced as new.

What decides the policy is :attr:`sync.config.Activation.removal_policy` (``on_remove``, or
its default), so an option that changes the default (an audience, say) changes it there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sync.config import RemovalPolicy
from sync.send import IntentNoter, Sender, SendGroup

__all__ = ["send_removals"]


async def send_removals(
    sender: Sender,
    removed: list[str],
    *,
    policy: RemovalPolicy,
    batch: int,
    noter: IntentNoter,
    window: int,
    checkpoint: Callable[[], Awaitable[None]],
) -> None:
    """Clear (or, under ``on_remove: keep``, only forget) the ids that left a mirror segment.

    Args:
        sender: The run's sender (its journal commits what Batch acknowledged).
        removed: The ids that left, after the refused removals were held back.
        policy: The activation's removal policy.
        batch: Profiles a request carries on the run's endpoint.
        noter: Notes each window's ids as intents (in a worker thread) before it is sent.
        window: Profiles noted at once (at least one group).
        checkpoint: Called after each request starts (the run record follows the commits).
    """
    if policy is RemovalPolicy.KEEP:
        sender.forget(removed)
        return
    groups = [SendGroup(removals=removed[start : start + batch]) for start in range(0, len(removed), batch)]
    per_window = max(1, window // batch)
    for start in range(0, len(groups), per_window):
        noted = await asyncio.to_thread(noter.note, groups[start : start + per_window])
        for group in noted:
            if not await sender.submit(group):
                return
            await checkpoint()
