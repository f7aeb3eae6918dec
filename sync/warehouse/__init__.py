"""``diff: warehouse``: the segment is diffed in BigQuery and its fingerprints live there.

* :mod:`sync.warehouse.sql`: every statement sent to BigQuery (pure functions).
* :mod:`sync.warehouse.bq`: jobs with a bytes cap and a cost ledger.
* :mod:`sync.warehouse.diff`: :class:`WarehouseDiff`, a :class:`sync.differ.Differ` in
  BigQuery, and :class:`WarehouseDiffer`, its factory.
* :mod:`sync.warehouse.store`: :class:`WarehouseFingerprints`, the fingerprint role of the
  state in BigQuery (the lease, intents, meta and runs stay in the usual store).
* :mod:`sync.warehouse.switch`: carry the acknowledged state between modes, and refuse a
  run whose fingerprints were left in the other mode's store.

``sync.runtime.open_differ`` builds them, and imports nothing of BigQuery until an
activation asks for the warehouse diff; the engine never imports this package.
"""
