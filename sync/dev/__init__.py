"""Development aids, never deployed: the local Batch API simulator and ``cepsync demo``.

``infra/package.py`` leaves this package out of the Cloud Functions zip, and production
modules import nothing from it at module level: ``cepsync simulator`` and ``cepsync demo``
import it when they run.
"""
