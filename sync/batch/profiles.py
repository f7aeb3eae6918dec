"""The profiles of one request, encoded as the JSON array Batch's profile API takes.

Its own module because encoding is a pure function of the profiles, apart from the client's
sending, pacing and retrying (:mod:`sync.batch.client`, which re-exports these names): the
engine builds a request's array once (``sync.encode.request_body``), and the client cuts
the rows it must resend alone out of it without decoding them.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple


class ProfileUpdate(NamedTuple):
    """One profile to upsert: its Custom ID and the attributes to set (``None`` deletes one).

    ``encoded``, when given, is the attributes already encoded as a JSON object (the
    engine's canonical payload bytes, ``sync.fingerprint.canonical_json``): the request body
    is assembled from it as it is, so a full load encodes each payload once, not twice.
    """

    custom_id: str
    attributes: dict[str, object] | None = None
    encoded: bytes | None = None

    def to_request_item(self) -> dict[str, object]:
        """The item as Batch expects it in the request array."""
        attributes = self.attributes if self.encoded is None else json.loads(self.encoded)
        return {"identifiers": {"custom_id": self.custom_id}, "attributes": attributes}

    def request_bytes(self) -> bytes:
        """The item as UTF-8 JSON bytes, ready to join into the request array."""
        attributes = self.encoded
        if attributes is None:
            attributes = json.dumps(self.attributes, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        identifier = json.dumps(self.custom_id, ensure_ascii=False).encode("utf-8")
        return b'{"identifiers":{"custom_id":' + identifier + b'},"attributes":' + attributes + b"}"


@dataclass(frozen=True, slots=True)
class EncodedProfiles:
    """Profiles already encoded as a request's JSON array (``sync.encode.request_body``).

    ``ids`` lists their Custom IDs in the array's order: Batch's partial errors name
    profiles by index, and every id must be acknowledged, rejected or failed. ``ends``
    gives, for each item, the offset in ``payload`` just past its closing brace (the
    next item starts after the comma there): it lets the client resend a few items of the
    array without decoding or re-encoding any of them.
    """

    ids: list[str]
    payload: bytes
    ends: Sequence[int]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, profiles: Sequence[ProfileUpdate]) -> EncodedProfiles:
        """The request array of profiles given one by one."""
        items = [profile.request_bytes() for profile in profiles]
        return cls(
            [profile.custom_id for profile in profiles],
            b"[" + b",".join(items) + b"]",
            array("q", accumulate(len(item) + 1 for item in items)),
        )

    def subset(self, indices: Sequence[int]) -> EncodedProfiles:
        """A request array of the items at ``indices`` (in that order), cut out of this one."""
        view = memoryview(self.payload)
        ends = self.ends
        items = [view[(ends[i - 1] + 1 if i else 1) : ends[i]] for i in indices]
        return EncodedProfiles(
            [self.ids[i] for i in indices],
            b"[" + b",".join(items) + b"]",
            array("q", accumulate(len(item) + 1 for item in items)),
        )
