"""Row → Batch payload mapping (sync/mapping.py), one module per converter family."""
