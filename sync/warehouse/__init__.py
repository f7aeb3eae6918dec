"""``diff: warehouse``: the segment is diffed in BigQuery and its fingerprints live there.

* :mod:`sync.warehouse.sql`: every statement sent to BigQuery (pure functions).
* :mod:`sync.warehouse.bq`: jobs with a bytes cap and a cost ledger.
* :mod:`sync.warehouse.diff`: :class:`WarehouseDiff`, the BigQuery twin of ``sync.diff.SegmentDiff``.
* :mod:`sync.warehouse.store`: :class:`WarehouseStateStore`, fingerprints in BigQuery over
  the usual store (lease, intents, meta, runs).
* :mod:`sync.warehouse.switch`: carry the acknowledged state between modes.

The engine's hook is :mod:`sync.warehouse.hook`, which imports nothing of BigQuery until an
activation asks for the warehouse diff.
"""
