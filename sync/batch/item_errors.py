"""Which per-item errors of a ``SUCCESS_WITH_PARTIAL_ERRORS`` answer refuse the profile's *value*.

Batch lists each item it did not apply as ``{"category", "bulk_index", "reason",
"attribute"?}`` and documents neither the categories nor what they mean (docs/batch-api.md,
"Per-item errors: value refusals and failures": our decision). The difference matters:

* a **value refusal** (Batch will refuse this payload again) is remembered, so an unchanged
  payload is not resent run after run;
* any **other** per-item error (``server``, a category we do not know, no category) says
  nothing about the data: the profile is retried like a failed request, and remembering it
  would lose the update for good.

Wrongly calling an error a value refusal loses an update; wrongly calling it a failure costs
a few resends (and, after :data:`sync.model.PERSISTENT_AFTER_RUNS` runs in a row, it is
remembered anyway). So the rule only says "value" on positive evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# Categories that name a part of the item we sent: its identifiers, its attributes or its
# events. Batch's own example says "attribute"; the request's keys are plural
# ("identifiers", "attributes", "events"), and an API may name its category after either the
# key or one element of it, so both forms are read the same. Compared case-insensitively.
VALUE_CATEGORIES: Final = frozenset({"attribute", "attributes", "identifier", "identifiers", "event", "events"})


def is_value_refusal(entry: Mapping[str, object]) -> bool:
    """Whether one per-item error is about the profile's data (docs/batch-api.md, "Per-item errors").

    True when it names an attribute (a non-empty string), or when its category is one of
    :data:`VALUE_CATEGORIES`. Anything else (category ``server``, an unknown category, no
    category, a category that is not a string) is not a value refusal.
    """
    attribute = entry.get("attribute")
    if isinstance(attribute, str) and attribute.strip():
        return True
    category = entry.get("category")
    return isinstance(category, str) and category.strip().casefold() in VALUE_CATEGORIES
