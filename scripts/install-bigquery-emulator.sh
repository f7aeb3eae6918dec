#!/usr/bin/env bash
# Install the local BigQuery emulator (PyPI `local-bigquery`) into .venv-bq at the repo root.
#
# Why a separate virtualenv: local-bigquery 0.4.0 needs Python >= 3.13 while the project runs
# on 3.11, so it cannot live in .venv. The tests talk to it over HTTP/gRPC only.
#
# Why every pin and --no-deps: local-bigquery 0.4.0 declares `duckdb>=2.0.0`, but DuckDB 2.x
# has no offline extension packages on PyPI and the emulator needs three extensions at start-up
# (icu for `SET TimeZone`, ducklake for its catalog, spatial for GEOGRAPHY macros). DuckDB would
# download them from its own extension host, which this machine (and CI) cannot reach. The
# `duckdb-extension-*` 1.5.5 wheels ship those binaries, so we run the emulator on DuckDB 1.5.5
# (it passes every check our tests make) and install the exact, complete set below without
# letting pip's resolver substitute DuckDB 2.x.
#
# DuckDB looks for extensions in $HOME/.duckdb/extensions/v<version>/<platform>/. Rather than
# write into the user's real home, the extensions go into .venv-bq/duckdb-home and the launcher
# .venv-bq/bin/cepsync-bigquery-emulator runs the emulator with HOME pointing there. Deleting
# .venv-bq removes everything this script created.
#
# Idempotent: a stamp keyed by the pins, the interpreter and the extension files makes a second
# run a fast no-op. Non-interactive; prints what it does. Usage:
#   scripts/install-bigquery-emulator.sh [--force]
#   scripts/install-bigquery-emulator.sh --find-python   # print the Python 3.13 it would use, or exit 1
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CEPSYNC_BQ_VENV:-$REPO_ROOT/.venv-bq}"
PYTHON_MINOR="3.13"
DUCKDB_VERSION="1.5.5"
STAMP="$VENV/.cepsync-install-stamp"
DUCKDB_HOME="$VENV/duckdb-home"
LAUNCHER="$VENV/bin/cepsync-bigquery-emulator"

# The complete dependency closure of local-bigquery 0.4.0 on CPython 3.13 / linux x86_64,
# with duckdb held at 1.5.5 (see above). Installed with --no-deps, so nothing else is pulled.
PINS=(
  "local-bigquery==0.4.0"
  "duckdb==${DUCKDB_VERSION}"
  "duckdb-extension-icu==${DUCKDB_VERSION}"
  "duckdb-extension-ducklake==${DUCKDB_VERSION}"
  "duckdb-extension-spatial==${DUCKDB_VERSION}"
  "annotated-doc==0.0.7"
  "annotated-types==0.8.0"
  "anyio==4.16.0"
  "certifi==2026.10.19.post1"
  "cffi==2.1.1"
  "charset-normalizer==3.5.3"
  "click==8.5.1"
  "cryptography==50.0.2"
  "fastapi==0.165.0"
  "fastavro==1.13.1"
  "google-api-core==2.44.0"
  "google-auth==2.63.0"
  "google-cloud-bigquery-storage==2.43.0"
  "googleapis-common-protos==1.76.0"
  "grpcio==1.85.3"
  "grpcio-status==1.85.3"
  "h11==0.16.0"
  "idna==3.20"
  "mini-racer==0.14.1"
  "numpy==2.5.5"
  "opentelemetry-api==1.45.2"
  "prompt_toolkit==3.0.53"
  "proto-plus==1.29.0"
  "protobuf==7.36.2"
  "pyarrow==26.0.1"
  "pyasn1==0.6.5"
  "pyasn1_modules==0.4.2"
  "pycparser==3.12"
  "pydantic==2.14.4"
  "pydantic-settings==2.16.3"
  "pydantic_core==2.50.5"
  "Pygments==2.21.0"
  "python-dotenv==1.2.4"
  "requests==2.34.2"
  "sqlglot==30.30.0"
  "starlette==1.10.0"
  "typing-inspection==0.4.5"
  "typing_extensions==4.16.0"
  "urllib3==2.8.0"
  "uvicorn==0.54.0"
  "wcwidth==0.9.4"
)
EXTENSIONS=(icu ducklake spatial)

log() { printf '[install-bigquery-emulator] %s\n' "$*"; }
die() { printf '[install-bigquery-emulator] ERROR: %s\n' "$*" >&2; exit 1; }

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) DUCKDB_PLATFORM="linux_amd64" ;;
  *) die "the duckdb-extension-* ${DUCKDB_VERSION} wheels exist for Linux x86_64 only (this is $(uname -s) $(uname -m))" ;;
esac
EXTENSION_DIR="$DUCKDB_HOME/.duckdb/extensions/v${DUCKDB_VERSION}/${DUCKDB_PLATFORM}"

find_python() {
  local candidate prefix
  if [[ -n "${CEPSYNC_PYTHON313:-}" ]]; then
    echo "$CEPSYNC_PYTHON313"
    return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    # Newest installed 3.13.x known to pyenv.
    while read -r version; do
      prefix="$(pyenv prefix "$version" 2>/dev/null || true)"
      if [[ -x "$prefix/bin/python${PYTHON_MINOR}" ]]; then
        candidate="$prefix/bin/python${PYTHON_MINOR}"
      fi
    done < <(pyenv versions --bare 2>/dev/null | grep -E "^${PYTHON_MINOR//./\\.}\.[0-9]+$" | sort -V)
    if [[ -n "${candidate:-}" ]]; then
      echo "$candidate"
      return
    fi
  fi
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/${PYTHON_MINOR}.*/bin/python${PYTHON_MINOR}; do
    [[ -x "$candidate" ]] && { echo "$candidate"; return; }
  done
  for candidate in "python${PYTHON_MINOR}" /usr/bin/python${PYTHON_MINOR} /usr/local/bin/python${PYTHON_MINOR}; do
    # Skip pyenv shims: they fail when no 3.13 is selected for this directory.
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys' >/dev/null 2>&1; then
      command -v "$candidate"
      return
    fi
  done
  return 1
}

# scripts/check-prerequisites.sh asks which interpreter would be used, before anything long.
if [[ "${1:-}" == "--find-python" ]]; then
  found="$(find_python)" || exit 1
  "$found" -c "import sys; sys.exit(sys.version_info[:2] != (${PYTHON_MINOR/./, }))" >/dev/null 2>&1 || exit 1
  echo "$found"
  exit 0
fi

PYTHON="$(find_python)" || die "Python ${PYTHON_MINOR} not found (tried pyenv, \$PYENV_ROOT/versions, PATH); set CEPSYNC_PYTHON313"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
[[ "$PY_VERSION" == ${PYTHON_MINOR}.* ]] || die "$PYTHON is Python $PY_VERSION, need ${PYTHON_MINOR}.x"

STAMP_KEY="$(printf '%s\n' "python=$PY_VERSION" "platform=$DUCKDB_PLATFORM" "${PINS[@]}" | sha256sum | cut -d' ' -f1)"

installed_ok() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_KEY" && -x "$VENV/bin/local-bigquery" && -x "$LAUNCHER" ]] || return 1
  local ext
  for ext in "${EXTENSIONS[@]}"; do
    [[ -s "$EXTENSION_DIR/$ext.duckdb_extension" ]] || return 1
  done
}

if [[ "${1:-}" != "--force" ]] && installed_ok; then
  log "up to date: $VENV (local-bigquery 0.4.0, duckdb ${DUCKDB_VERSION}, Python $PY_VERSION)"
  exit 0
fi

rm -f "$STAMP"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import sys; sys.exit(0 if '%d.%d.%d' % sys.version_info[:3] == '$PY_VERSION' else 1)"; then
  log "reusing virtualenv $VENV"
else
  log "creating virtualenv $VENV with $PYTHON (Python $PY_VERSION)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi

log "installing ${#PINS[@]} pinned packages (--no-deps: duckdb is held at ${DUCKDB_VERSION})"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps "${PINS[@]}"

log "copying DuckDB extensions into $EXTENSION_DIR"
mkdir -p "$EXTENSION_DIR"
for ext in "${EXTENSIONS[@]}"; do
  source_file="$("$VENV/bin/python" - "$ext" "$DUCKDB_VERSION" <<'PY'
import importlib.util
import pathlib
import sys

name, version = sys.argv[1], sys.argv[2]
spec = importlib.util.find_spec(f"duckdb_extension_{name}")
if spec is None or spec.origin is None:
    sys.exit(f"package duckdb_extension_{name} is not installed")
path = pathlib.Path(spec.origin).parent / "extensions" / f"v{version}" / f"{name}.duckdb_extension"
if not path.is_file():
    sys.exit(f"{path} missing from the duckdb-extension-{name} wheel")
print(path)
PY
)"
  cp -f "$source_file" "$EXTENSION_DIR/$ext.duckdb_extension"
  log "  $ext.duckdb_extension"
done

log "writing launcher $LAUNCHER"
cat >"$LAUNCHER" <<LAUNCH
#!/usr/bin/env bash
# Runs local-bigquery with the DuckDB extensions installed by scripts/install-bigquery-emulator.sh.
# DuckDB finds extensions under \$HOME/.duckdb; HOME points at the private copy so nothing is
# downloaded (the machine reaches no DuckDB extension host).
export HOME="$DUCKDB_HOME"
exec "$VENV/bin/local-bigquery" "\$@"
LAUNCH
chmod +x "$LAUNCHER"

log "verifying: the extensions load offline and the emulator CLI starts"
HOME="$DUCKDB_HOME" "$VENV/bin/python" - <<'PY'
import duckdb

con = duckdb.connect(config={"TimeZone": "UTC", "autoinstall_known_extensions": False})
for name in ("icu", "ducklake", "spatial"):
    con.execute(f"LOAD {name}")
print("[install-bigquery-emulator]   duckdb", duckdb.__version__, "loaded icu, ducklake, spatial")
PY
"$LAUNCHER" --help >/dev/null || die "local-bigquery --help failed"

echo "$STAMP_KEY" >"$STAMP"
log "done: start it with $LAUNCHER --host 127.0.0.1 --port 9050 --grpc-port 9060 --data-dir DIR"
