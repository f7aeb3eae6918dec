"""State stores: where fingerprints, intents, leases and run records live."""

from sync.state.base import StateStore

__all__ = ["StateStore"]
