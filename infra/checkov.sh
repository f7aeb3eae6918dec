#!/usr/bin/env bash
# Static security scan of the Terraform in infra/ with checkov, without a terraform binary.
#
# checkov pulls in a large dependency tree (boto3, networkx, bc-python-hcl2, ...) that
# must not leak into the project virtualenv, so it lives in its own git-ignored venv at
# the repository root (.venv-*/ is in .gitignore). The version is pinned: a new checkov
# release adds checks, and a scan must not start failing without a change here.
#
# Exit status: 0 when every check passes (skips are inline `#checkov:skip=ID:reason`
# comments in the .tf files), non-zero on any failed check or tool error.
set -euo pipefail

CHECKOV_VERSION="3.3.30"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.venv-checkov"

python_bin="${CHECKOV_PYTHON:-}"
if [[ -z "${python_bin}" ]]; then
  for candidate in python3.11 python3; do
    if command -v "${candidate}" >/dev/null 2>&1; then
      python_bin="${candidate}"
      break
    fi
  done
fi
if [[ -z "${python_bin}" ]]; then
  echo "checkov.sh: no python3 found (set CHECKOV_PYTHON)" >&2
  exit 2
fi

installed_version=""
if [[ -x "${venv}/bin/checkov" ]]; then
  installed_version="$("${venv}/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true)"
fi
if [[ "${installed_version}" != "${CHECKOV_VERSION}" ]]; then
  echo "checkov.sh: installing checkov ${CHECKOV_VERSION} into ${venv} (one-time, a few minutes)" >&2
  rm -rf "${venv}"
  "${python_bin}" -m venv "${venv}"
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==${CHECKOV_VERSION}"
fi

cd "${repo_root}"
# --quiet prints failed checks only; --compact drops the code excerpts; --skip-download
# keeps checkov offline (it otherwise fetches guideline links from its vendor API). Checkov exits 1
# when any check fails, which `set -e` turns into this script's exit status.
exec "${venv}/bin/checkov" -d infra --framework terraform --compact --quiet --skip-download "$@"
