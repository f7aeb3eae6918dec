"""The two Batch profile endpoints and their published limits.

Its own module, below both the client and the rate limiter that read these limits, so
neither has to import the other for it.
"""

from __future__ import annotations

import enum


class Endpoint(enum.StrEnum):
    """The two Batch profile endpoints and their published limits (doc.batch.com D1-D3)."""

    UPDATE = "update"
    MASS_UPDATE = "mass-update"

    @property
    def max_batch(self) -> int:
        """Most profiles one request may carry ("or the API call will be rejected")."""
        return 200 if self is Endpoint.UPDATE else 10_000

    @property
    def rate_per_second(self) -> float:
        """Batch's sustained limit, in profiles (updates) per second."""
        return 300.0 if self is Endpoint.UPDATE else 10_000.0

    @property
    def burst(self) -> int:
        """Token-bucket capacity in profiles.

        ``/update`` allows bursts up to 1,000. ``/mass-update`` has "no burst", which we read
        as a bucket holding exactly one second of rate: it must still admit one full
        10,000-profile request, and never lets more than the per-second rate through at once.
        """
        return 1_000 if self is Endpoint.UPDATE else 10_000

    @property
    def send_batch(self) -> int:
        """Profiles per request we send: at most half the endpoint's bucket.

        ``/mass-update`` has "no burst": its bucket holds exactly one full 10,000-profile
        request, which Batch admits only if it arrives a full second after the previous one
        *at Batch's end*. Network and server jitter compress arrival gaps into 429s, each a
        10,000-profile resend (the 1M benchmark saw 27 of 128 requests refused).
        Half-bucket requests leave half a second of slack at the same paced rate.
        """
        return min(self.max_batch, self.burst // 2)
