"""The official Firestore emulator (Google Cloud CLI) for tests: start, reset, connect, stop.

The process handling (own process group, scratch gcloud config) is in ``gcloud_emulator``.
The Firestore client picks the emulator up from ``FIRESTORE_EMULATOR_HOST`` *when it is
constructed*; :meth:`FirestoreEmulator.client` sets it only for that moment, so the variable
does not leak into other tests.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import firestore

from tests.support.gcloud_emulator import DEFAULT_PROJECT, EmulatorError, GcloudEmulator

__all__ = ["DEFAULT_PROJECT", "EmulatorError", "FirestoreEmulator"]


class FirestoreEmulator(GcloudEmulator):
    """One Firestore emulator process group on 127.0.0.1."""

    label = "Firestore"
    host_variable = "FIRESTORE_EMULATOR_HOST"

    def command(self, gcloud: str, workdir: Path) -> list[str]:
        return [gcloud, "emulators", "firestore", "start", f"--host-port={self.host}", f"--project={self.project}"]

    def reset(self) -> None:
        """Delete every document in the emulator's default database.

        Raises:
            EmulatorError: The emulator refused the reset.
        """
        url = f"http://{self.host}/emulator/v1/projects/{self.project}/databases/(default)/documents"
        request = urllib.request.Request(url, method="DELETE")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - fixed http URL to 127.0.0.1
                if response.status != 200:
                    raise EmulatorError(f"emulator reset answered HTTP {response.status}")
        except urllib.error.URLError as exc:
            raise EmulatorError(f"emulator reset failed: {exc}\n{self.log_tail()}") from exc

    def client(self) -> firestore.Client:
        """A real Firestore client connected to this emulator."""
        previous = os.environ.get("FIRESTORE_EMULATOR_HOST")
        os.environ["FIRESTORE_EMULATOR_HOST"] = self.host
        try:
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]  # google-auth leaves it unannotated
            return firestore.Client(project=self.project, credentials=credentials)
        finally:
            if previous is None:
                os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
            else:
                os.environ["FIRESTORE_EMULATOR_HOST"] = previous
