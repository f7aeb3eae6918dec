"""Activation files: YAML read strictly into :class:`sync.config.Activation`.

A key given twice is refused; YAML merge keys are resolved; top-level ``x-`` keys (anchors)
are dropped.

Every error is a :class:`sync.errors.ConfigError` naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import yaml
from pydantic import ValidationError

from sync.config import Activation, DuckDBSourceConfig, _FieldError
from sync.errors import ConfigError

__all__ = ["EXTENSION_KEY_PREFIX", "json_schema", "load_activation", "load_activations", "parse_activation"]


def _format_validation_error(error: ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"] if part not in ("duckdb", "bigquery"))
    message = first["msg"].removeprefix("Value error, ")
    ctx = first.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _FieldError):
        loc = inner.field
        message = str(inner)
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return loc or "(root)", message


_MERGE_TAG = "tag:yaml.org,2002:merge"

# Top-level keys an activation file may hold for YAML's own use (anchors to merge with
# ``<<: *name``), dropped before validation, as in docker-compose files.
EXTENSION_KEY_PREFIX = "x-"


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    Plain PyYAML keeps the last value, so a second ``attributes:`` block would silently
    replace the first. YAML merge keys (``<<: *anchor`` or ``<<: [*a, *b]``) are resolved as
    the YAML 1.1 merge type says: keys written in the mapping win over merged ones, an
    earlier merged mapping over a later one; that is an override, not a duplicate. Only the
    keys written in one mapping are checked against each other (each merged mapping was
    checked where it was written), and ``<<`` itself may appear once.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, object]:
        seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                line = key_node.start_mark.line + 1
                if "<<" in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"merge key '<<' appears twice in one mapping (lines {seen['<<']} and {line}): "
                        "merge several with one list, <<: [*a, *b]",
                        key_node.start_mark,
                    )
                seen["<<"] = line
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # the base class refuses an unhashable key with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}): keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        # Resolves the merge keys in place (the base class would do it too, after our check).
        self.flatten_mapping(node)
        mapping: dict[Hashable, object] = super().construct_mapping(node, deep=deep)
        return mapping


def parse_activation(data: object, *, source: str) -> Activation:
    """Validate an already-parsed YAML/JSON document."""
    if not isinstance(data, dict):
        raise ConfigError("an activation file must hold a mapping at the top level", source=source)
    try:
        activation = Activation.model_validate(data)
    except ValidationError as error:
        field, message = _format_validation_error(error)
        count = error.error_count()
        if count > 1:
            message += f" (and {count - 1} more error{'s' if count > 2 else ''})"
        raise ConfigError(message, source=source, field=field) from None
    return activation


def load_activation(path: str | Path) -> Activation:
    """Read and validate one activation file.

    A DuckDB ``database`` path is resolved relative to the file, so an activation
    directory can be moved as a whole.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read activation file: {error.strerror}", source=str(path)) from None
    try:
        # utf-8-sig: a byte order mark some editors add is dropped, not a key's first character.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}): save the file as UTF-8",
            source=str(path),
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        # The text was decoded here, so PyYAML calls it "<unicode string>"; the source is the file.
        detail = str(error).replace('in "<unicode string>", ', "")
        raise ConfigError(f"not valid YAML: {detail}", source=str(path)) from None
    if isinstance(data, dict):
        # x- keys hold anchors for the YAML merge key; they are not configuration.
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith(EXTENSION_KEY_PREFIX))}
    activation = parse_activation(data, source=str(path))
    source = activation.source
    if isinstance(source, DuckDBSourceConfig):
        resolved = (path.parent / source.database).resolve()
        source = source.model_copy(update={"database": str(resolved)})
        activation = activation.model_copy(update={"source": source})
    results = activation.results
    if results is not None and results.database is not None:
        resolved = (path.parent / results.database).resolve()
        activation = activation.model_copy(update={"results": results.model_copy(update={"database": str(resolved)})})
    activation._source_path = str(path)
    return activation


def load_activations(directory: str | Path) -> dict[str, Activation]:
    """Every ``*.yaml``/``*.yml`` in a directory, by activation name (names must be unique)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError("activation directory not found", source=str(directory))
    found: dict[str, Activation] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        activation = load_activation(path)
        if activation.name in found:
            raise ConfigError(f"activation name {activation.name!r} is used twice", source=str(path), field="name")
        found[activation.name] = activation
    return found


def json_schema() -> dict[str, object]:
    """The JSON Schema of an activation file (``cepsync schema``)."""
    schema = Activation.model_json_schema()
    schema["$id"] = "https://github.com/cepsync/cepsync/activation.schema.json"
    schema["title"] = "cepsync activation"
    # Top-level x- keys hold YAML anchors (load_activation drops them).
    schema["patternProperties"] = {f"^{EXTENSION_KEY_PREFIX}": {}}
    return schema
