"""Shared pytest set-up. tests/ is on sys.path (no __init__.py), so helper modules here import by name.

The emulator fixtures live in plugin modules: each starts its emulator once per session,
on a free port, only when a test asks for it, and fails loudly (never skips) if it can't.
"""

from __future__ import annotations

pytest_plugins = ["fixtures_pubsub", "fixtures_firestore", "fixtures_bigquery"]
