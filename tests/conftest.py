"""Shared pytest set-up. tests/ is on sys.path (no __init__.py), so helper modules here import by name."""

from __future__ import annotations

pytest_plugins: list[str] = []
