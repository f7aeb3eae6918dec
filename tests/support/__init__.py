"""Helpers the tests import as ``tests.support.<module>``.

* ``engine_support``, ``report_support``: activations, segments, clients and run histories
  built the same way by every test that needs them.
* ``reference_plan``: a slow, obviously correct planner the property tests compare the engine's with.
* ``reference_mapping``: the row-at-a-time mapping, encoding and planning the columnar path
  (``ProfileMapper.convert_batch``, ``encode_batch``, ``plan_rows``) must agree with.
* ``gcloud_emulator``, ``firestore_emulator``, ``pubsub_emulator``, ``bigquery_emulator``:
  local Google Cloud emulators, each started on a free port.
* ``fixtures_firestore``, ``fixtures_pubsub``, ``fixtures_bigquery``: pytest plugins (loaded by
  ``pytest_plugins`` in tests/conftest.py) with the session fixtures that run those emulators.
"""
