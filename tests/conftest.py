"""Shared pytest set-up. Helpers are the package ``tests.support``, imported by their full name.

The emulator fixtures live in plugin modules there: each starts its emulator once per
session, on a free port, only when a test asks for it, and fails loudly (never skips) if it
can't. So does ``unlimited_sim``, the Batch simulator in a test's own event loop.
"""

from __future__ import annotations

pytest_plugins = [
    "tests.support.fixtures_pubsub",
    "tests.support.fixtures_firestore",
    "tests.support.fixtures_bigquery",
    "tests.support.fixtures_simulator",
]
