"""Build the Cloud Functions source zip: ``python infra/package.py [--out ZIP] [--activations DIR]``.

The zip holds what the Python runtime needs to build and run the functions:

- ``main.py`` (the functions-framework entry points ``pubsub_sync`` and ``http_sync``);
- the ``sync/`` package, without tests, ``__pycache__`` or compiled files, and without
  ``sync/dev/`` (the local Batch simulator and ``cepsync demo``: development aids the
  function never imports);
- ``activations/``: the activation YAML files, validated with :mod:`sync.config` first, so
  a broken file fails here rather than in the first scheduled run;
- ``requirements.txt``: the runtime closure of the project's dependencies plus the ``gcp``
  extra, pinned to the versions in ``requirements.lock``. Dev-only pins (pytest, hypothesis,
  ruff, mypy, python-hcl2, ...) are not in that closure, so they are not installed by the
  Cloud Build step.

The zip is deterministic (sorted entries, fixed timestamps and permissions): unchanged
sources give byte-identical zips, so the object name Terraform derives from the zip's MD5
does not change and ``terraform apply`` does not redeploy for nothing.

The dependency closure is read from the installed distributions' metadata, so run this
with the project's virtualenv (``.venv/bin/python``), the one ``requirements.lock`` was
installed into; a version mismatch between the two is an error.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import io
import re
import sys
import tomllib
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("dist/function-source.zip")
# Where the activations live in the zip; CEPSYNC_ACTIVATIONS_DIR in infra/main.tf says the same.
ACTIVATIONS_ARCNAME = "activations"
# The extras of the project that the deployed function needs.
DEPLOY_EXTRAS = ("gcp",)

# ZIP cannot store dates before 1980; any fixed date makes the archive reproducible.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
DIRECTORY_MODE = 0o755
_UNIX_SYSTEM = 3

_EXCLUDED_DIRECTORY_NAMES = frozenset({"__pycache__", "tests", "test", ".mypy_cache", ".pytest_cache"})
_EXCLUDED_SUFFIXES = (".pyc", ".pyo")
# Sub-packages of sync/ that stay out of the zip: development aids (sync/dev/: the Batch
# simulator and the demo), imported only inside the CLI commands that run them.
DEV_ONLY_PACKAGES = frozenset({"dev"})


class PackageError(Exception):
    """The package cannot be built; the message says which input is wrong."""


@dataclass(frozen=True)
class PackageResult:
    """What :func:`build_package` wrote."""

    path: Path
    size: int
    file_count: int
    activations_source: Path | None
    requirements: tuple[str, ...]


# ---------------------------------------------------------------- requirements


def read_lock(lock_path: Path) -> dict[NormalizedName, str]:
    """``name==version`` lines of a lock file, keyed by canonical name, in the lock's spelling.

    Returns:
        Canonical name -> the full ``Name==version`` line as written in the lock.
    """
    try:
        text = lock_path.read_text(encoding="utf-8")
    except OSError as error:
        raise PackageError(f"cannot read lock file {lock_path}: {error.strerror}") from None
    pins: dict[NormalizedName, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise PackageError(f"{lock_path}:{number}: expected an exact pin 'name==version', got {line!r}")
        pins[canonicalize_name(match.group(1))] = f"{match.group(1)}=={match.group(2)}"
    return pins


def project_requirements(pyproject_path: Path, extras: Iterable[str]) -> list[Requirement]:
    """The ``[project] dependencies`` plus the named optional-dependency groups."""
    try:
        data = tomllib.loads(pyproject_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise PackageError(f"cannot read {pyproject_path}: {error}") from None
    project = data.get("project", {})
    specs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise PackageError(f"{pyproject_path}: no optional-dependencies group {extra!r}")
        specs.extend(optional[extra])
    return [Requirement(spec) for spec in specs]


def _marker_applies(marker: Marker | None, extras: frozenset[str]) -> bool:
    if marker is None:
        return True
    # A requirement without an extra condition applies whatever extras were asked for;
    # evaluating with extra="" covers it. One with `extra == "x"` applies when x was asked for.
    return any(marker.evaluate({"extra": extra}) for extra in (*sorted(extras), ""))


def runtime_closure(roots: Iterable[Requirement], lock: dict[NormalizedName, str]) -> list[str]:
    """Every distribution the roots need at run time, as lock lines, sorted by name.

    Walks the installed distributions' ``Requires-Dist`` metadata, following extras and
    evaluating environment markers for this interpreter (the one the lock was resolved on).

    Raises:
        PackageError: a needed distribution is not in the lock, not installed, or installed
            at another version than the lock pins.
    """
    wanted: dict[NormalizedName, set[str]] = {}
    queue: list[tuple[NormalizedName, frozenset[str]]] = []
    for requirement in roots:
        if _marker_applies(requirement.marker, frozenset()):
            queue.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))

    while queue:
        name, extras = queue.pop()
        known = wanted.get(name)
        if known is not None and extras <= known:
            continue
        wanted.setdefault(name, set()).update(extras)
        if name not in lock:
            raise PackageError(f"{name} is a runtime dependency but is not pinned in requirements.lock")
        locked_version = lock[name].split("==", 1)[1]
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise PackageError(
                f"{name} is not installed in {sys.prefix}; run this script with the project's .venv python"
            ) from None
        if distribution.version != locked_version:
            raise PackageError(
                f"{name} is installed at {distribution.version} but requirements.lock pins {locked_version}; "
                "reinstall the virtualenv from the lock"
            )
        for spec in distribution.requires or []:
            requirement = Requirement(spec)
            if _marker_applies(requirement.marker, frozenset(wanted[name])):
                queue.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))

    return [lock[name] for name in sorted(wanted)]


def render_requirements(lines: Iterable[str]) -> str:
    """The requirements.txt text the Cloud Functions build installs."""
    header = (
        "# Generated by infra/package.py from requirements.lock: the runtime closure of\n"
        "# cepsync's dependencies plus the 'gcp' extra. Do not edit; rebuild the package.\n"
    )
    return header + "".join(f"{line}\n" for line in lines)


# ---------------------------------------------------------------- import coverage


@cache
def _distribution_by_file() -> dict[Path, NormalizedName]:
    index: dict[Path, NormalizedName] = {}
    for distribution in importlib.metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        for file in distribution.files or []:
            index[Path(str(distribution.locate_file(file))).resolve()] = name
    return index


def _imported_modules(source: str, filename: str) -> set[str]:
    """Absolute module names a file imports, lazily imported ones included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            # `from google.cloud import pubsub_v1` may name a submodule: prefer it when it is one.
            names.update(f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")
            names.add(node.module)
    return names


def _distribution_of(module: str) -> NormalizedName | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or spec.origin in ("built-in", "frozen"):
        return None
    return _distribution_by_file().get(Path(spec.origin).resolve())


def uncovered_imports(files: Mapping[str, bytes], requirements: Iterable[str]) -> list[str]:
    """Third-party imports of the packaged Python files that requirements.txt would not install.

    A module imported only inside a function (a lazy import) still fails at run time on
    Cloud Functions if its distribution is not installed, so every import counts.

    Returns:
        One message per uncovered import, naming the file, the module and its distribution.
    """
    pinned = {canonicalize_name(line.split("==", 1)[0]) for line in requirements}
    local_roots = {name.split("/", 1)[0].removesuffix(".py") for name in files if name.endswith(".py")}
    problems: list[str] = []
    for arcname, content in sorted(files.items()):
        if not arcname.endswith(".py"):
            continue
        for module in sorted(_imported_modules(content.decode("utf-8"), arcname)):
            root = module.split(".", 1)[0]
            if root in sys.stdlib_module_names or root in local_roots or root == "__future__":
                continue
            distribution = _distribution_of(module)
            if distribution is None:
                # `from package import name` where name is an attribute, not a module: the
                # package itself is checked on its own entry.
                if importlib.util.find_spec(root) is None:
                    problems.append(f"{arcname} imports {module}, which is not installed anywhere")
                continue
            if distribution not in pinned:
                problems.append(
                    f"{arcname} imports {module} from {distribution}, which is not a runtime dependency "
                    "(add it to pyproject.toml [project] dependencies or the 'gcp' extra, and to requirements.lock)"
                )
    return problems


# ---------------------------------------------------------------- sources


def _package_files(package_dir: Path) -> Iterator[Path]:
    for path in sorted(package_dir.rglob("*")):
        relative = path.relative_to(package_dir)
        if any(part in _EXCLUDED_DIRECTORY_NAMES or part.startswith(".") for part in relative.parts):
            continue
        if relative.parts[0] in DEV_ONLY_PACKAGES:
            continue
        if not path.is_file() or path.suffix in _EXCLUDED_SUFFIXES:
            continue
        if path.name.startswith("test_") or path.name.endswith("_test.py") or path.name == "conftest.py":
            continue
        yield path


def default_activations_dir(root: Path) -> Path | None:
    """``activations/`` if present, else ``examples/activations/``, else None (empty directory)."""
    for candidate in (root / "activations", root / "examples" / "activations"):
        if candidate.is_dir():
            return candidate
    return None


def _activation_files(directory: Path) -> list[Path]:
    # The same selection as sync.config.load_activations and infra/main.tf (fileset "*.{yaml,yml}").
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def validate_activations(directory: Path) -> list[str]:
    """Load every activation file with the runtime's own loader.

    Returns:
        Warnings (activations that cannot run on Cloud Functions).

    Raises:
        PackageError: a file does not load (the message names the file and field).
    """
    from sync.config import BigQuerySourceConfig
    from sync.config_file import load_activations
    from sync.errors import ConfigError

    try:
        activations = load_activations(directory)
    except ConfigError as error:
        raise PackageError(f"invalid activation: {error}") from None
    return [
        f"activation {name!r} reads a {activation.source.type} source; the deployed function reads BigQuery only"
        for name, activation in sorted(activations.items())
        if not isinstance(activation.source, BigQuerySourceConfig)
    ]


# ---------------------------------------------------------------- zip


def _zip_info(arcname: str, *, directory: bool = False) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=FIXED_DATE_TIME)
    info.create_system = _UNIX_SYSTEM
    if directory:
        info.external_attr = (0o040000 | DIRECTORY_MODE) << 16 | 0x10
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.external_attr = (0o100000 | FILE_MODE) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_deterministic_zip(out: Path, files: dict[str, bytes], directories: Iterable[str] = ()) -> None:
    """Write ``files`` (arcname -> content) and empty ``directories`` sorted, with fixed metadata."""
    entries: list[tuple[str, bytes | None]] = [(name, content) for name, content in files.items()]
    entries += [(name.rstrip("/") + "/", None) for name in directories]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for arcname, content in sorted(entries, key=lambda entry: entry[0]):
            if content is None:
                archive.writestr(_zip_info(arcname, directory=True), b"")
            else:
                archive.writestr(_zip_info(arcname), content, compresslevel=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted build never leaves a truncated zip for Terraform.
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(out)


def build_package(
    out: Path,
    *,
    root: Path = REPO_ROOT,
    activations: Path | None = None,
    lock: Path | None = None,
) -> PackageResult:
    """Build the function source zip.

    Args:
        out: Where to write the zip (parent directories are created).
        root: Repository root holding main.py, sync/, pyproject.toml.
        activations: Activation directory to pack as ``activations/``; default
            :func:`default_activations_dir` (an empty ``activations/`` when none exists).
        lock: Lock file; default ``root/requirements.lock``.

    Raises:
        PackageError: a missing input, an invalid activation, or a dependency not in step
            with the lock.
    """
    main_py = root / "main.py"
    package_dir = root / "sync"
    if not main_py.is_file():
        raise PackageError(f"{main_py} not found: the functions-framework entry points live there")
    if not (package_dir / "__init__.py").is_file():
        raise PackageError(f"{package_dir} is not a Python package")

    files: dict[str, bytes] = {"main.py": main_py.read_bytes()}
    for path in _package_files(package_dir):
        files[path.relative_to(root).as_posix()] = path.read_bytes()

    source = activations if activations is not None else default_activations_dir(root)
    directories: list[str] = []
    if source is None:
        directories.append(ACTIVATIONS_ARCNAME)
    else:
        if not source.is_dir():
            raise PackageError(f"activation directory {source} not found")
        for warning in validate_activations(source):
            print(f"warning: {warning}", file=sys.stderr)
        activation_files = _activation_files(source)
        if not activation_files:
            directories.append(ACTIVATIONS_ARCNAME)
        for path in activation_files:
            files[f"{ACTIVATIONS_ARCNAME}/{path.name}"] = path.read_bytes()

    requirements = runtime_closure(
        project_requirements(root / "pyproject.toml", DEPLOY_EXTRAS),
        read_lock(lock if lock is not None else root / "requirements.lock"),
    )
    problems = uncovered_imports(files, requirements)
    if problems:
        raise PackageError("the function would fail to import on Cloud Functions:\n  " + "\n  ".join(problems))
    files["requirements.txt"] = render_requirements(requirements).encode("utf-8")

    write_deterministic_zip(out, files, directories)
    return PackageResult(
        path=out,
        size=out.stat().st_size,
        file_count=len(files),
        activations_source=source,
        requirements=tuple(requirements),
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description="Build the cepsync Cloud Functions source zip.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"zip to write (default {DEFAULT_OUT})")
    parser.add_argument(
        "--activations",
        type=Path,
        default=None,
        help="activation directory (default: activations/, else examples/activations/, else none)",
    )
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--lock", type=Path, default=None, help="lock file (default: ROOT/requirements.lock)")
    arguments = parser.parse_args(argv)

    root = arguments.root.resolve()
    # sync.config validates the activations; import it from the tree being packaged.
    sys.path.insert(0, str(root))
    out = arguments.out if arguments.out.is_absolute() else Path.cwd() / arguments.out
    try:
        result = build_package(out, root=root, activations=arguments.activations, lock=arguments.lock)
    except PackageError as error:
        print(f"package.py: {error}", file=sys.stderr)
        return 1
    source = result.activations_source.as_posix() if result.activations_source else "(none: empty activations/)"
    print(f"{result.path} {result.size} bytes, {result.file_count} files")
    print(f"activations from {source}; {len(result.requirements)} pinned requirements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
