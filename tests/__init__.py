"""cepsync's test suite; shared helpers are the package :mod:`tests.support`."""
