#!/usr/bin/env bash
# What `make test` needs from the machine, checked in seconds before anything long starts.
#
# Each missing prerequisite is one line on stderr saying what it is and how to get it; the
# exit status is 1 if any is missing. With --fast, only what `make test-fast` needs.
#   - Python >= 3.11 ($PYTHON, default python3): the project's virtualenv.
#   - Headless Chromium and its driver (the report's browser test), or the means to install
#     them: root, or sudo, with apt-get (`make browser`).
#   - A Python 3.13 interpreter and Linux x86_64 (the local BigQuery emulator's virtualenv,
#     scripts/install-bigquery-emulator.sh), unless that virtualenv is already installed.
#   - The Google Cloud CLI (`gcloud`) with its Firestore and Pub/Sub emulator components,
#     and Java, which runs them.
# Usage: scripts/check-prerequisites.sh [--fast]
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
missing=0
need() {
  printf 'make test needs %s\n' "$*" >&2
  missing=1
}

# -- everything -------------------------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  need "Python >= 3.11: '$PYTHON' is not on PATH (install it, or run make PYTHON=/path/to/python3.11 test)"
elif ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
  need "Python >= 3.11: '$PYTHON' is $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo 'not runnable') (run make PYTHON=/path/to/python3.11 test)"
fi

if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if ! command -v apt-get >/dev/null 2>&1; then
    need "headless Chromium and chromedriver (the report's browser test): install them with your package manager, no apt-get here"
  elif [[ "$(id -u)" != 0 ]] && ! command -v sudo >/dev/null 2>&1; then
    need "headless Chromium and chromedriver (the report's browser test): run as root or with sudo, or install chromium and chromium-driver yourself"
  fi
fi

if [[ "${1:-}" == "--fast" ]]; then
  exit "$missing"
fi

# -- the emulators ----------------------------------------------------------------------------
if [[ ! -x "${CEPSYNC_BQ_VENV:-$REPO_ROOT/.venv-bq}/bin/cepsync-bigquery-emulator" ]]; then
  if ! bash "$REPO_ROOT/scripts/install-bigquery-emulator.sh" --find-python >/dev/null 2>&1; then
    if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
      need "Linux x86_64 for the local BigQuery emulator (its DuckDB extension wheels exist for no other platform)"
    else
      need "a Python 3.13 interpreter for the local BigQuery emulator: install one (e.g. pyenv install 3.13) or set CEPSYNC_PYTHON313=/path/to/python3.13"
    fi
  fi
fi

if ! command -v gcloud >/dev/null 2>&1; then
  need "the Google Cloud CLI ('gcloud' on PATH, https://cloud.google.com/sdk/docs/install) with the cloud-firestore-emulator and pubsub-emulator components"
else
  sdk_root="$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null)"
  for component in cloud-firestore-emulator pubsub-emulator; do
    if [[ -n "$sdk_root" && ! -d "$sdk_root/platform/$component" ]]; then
      need "the gcloud component $component: gcloud components install $component (or apt-get install google-cloud-cli-${component/cloud-firestore-emulator/firestore-emulator})"
    fi
  done
fi

if ! command -v java >/dev/null 2>&1 || ! java -version >/dev/null 2>&1; then
  need "Java (a JRE 11 or later, e.g. apt-get install default-jre-headless): the Firestore and Pub/Sub emulators run on it"
fi

exit "$missing"
