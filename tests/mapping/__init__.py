"""Row → Batch payload mapping (sync/mapping.py, sync/convert.py), one module per converter family."""
