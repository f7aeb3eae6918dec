"""cepsync: keep Batch CEP profiles in step with a warehouse segment."""

__version__ = "0.1.0"
