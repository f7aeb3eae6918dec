"""Results tables written by every run of an activation with ``results:`` (docs/results.md)."""
