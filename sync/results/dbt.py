"""``cepsync dbt-exposures DIR``: the activations as dbt exposures, for dbt's lineage graph.

One exposure per activation (type ``application``), its ``depends_on`` read from the segment
(docs/results.md, "dbt"): ``{{ ref('x') }}`` and ``{{ source('s', 't') }}`` written in the
query (a SQL comment is a fine place for them) are taken as they are; the tables the segment
names are matched against a dbt manifest's models and sources when one is given. What cannot
be resolved is said in YAML comments, never guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypedDict

import yaml

from sync.config import Activation, BigQuerySourceConfig
from sync.errors import ConfigError

# dbt: exposure names hold letters, digits and underscores only.
_EXPOSURE_NAME: Final = re.compile(r"[^A-Za-z0-9_]")
_QUOTED: Final = r"""\s*(?:'([^'\\]+)'|"([^"\\]+)")\s*"""
_REF: Final = re.compile(r"\{\{\s*ref\(" + _QUOTED + r"(?:," + _QUOTED + r")?\)\s*\}\}")
_SOURCE: Final = re.compile(r"\{\{\s*source\(" + _QUOTED + r"," + _QUOTED + r"\)\s*\}\}")
# A table after FROM or JOIN: `project.dataset.table` (backquoted, as a whole or per part) or
# plain identifiers joined by dots. A subquery, a function call or UNNEST is no table.
_PART: Final = r"(?:`[^`]+`|\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_-]*)"
_TABLE: Final = re.compile(rf"\b(?:FROM|JOIN)\s+({_PART}(?:\s*\.\s*{_PART}){{0,2}})(?!\s*\()", re.IGNORECASE)
_CTE: Final = re.compile(r"(?:\bWITH\s+(?:RECURSIVE\s+)?|,\s*)([A-Za-z_][A-Za-z0-9_]*)\s+AS\s*\(", re.IGNORECASE)
_LINE_COMMENT: Final = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_JINJA: Final = re.compile(r"\{\{.*?\}\}", re.DOTALL)
_NOT_TABLES: Final = frozenset({"unnest", "select", "lateral"})
_FROM_FUNCTIONS: Final = frozenset({"extract", "trim", "substring", "overlay", "position"})


def _mapping(value: object) -> Mapping[str, object]:
    """A part of the manifest (JSON) if it is an object, else an empty one."""
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class Relation:
    """A model or source of the manifest, as ``depends_on`` names it."""

    depends: str  # ref('x') / source('s', 't')
    database: str
    schema: str
    identifier: str


@dataclass
class Manifest:
    """The relations of a dbt manifest (``target/manifest.json``)."""

    relations: list[Relation] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read the dbt manifest: {error.strerror or error}", field="--manifest") from None
        except ValueError as error:
            raise ConfigError(f"the dbt manifest is not JSON: {error}", field="--manifest") from None
        if not isinstance(document, dict) or not isinstance(document.get("nodes"), dict):
            raise ConfigError("not a dbt manifest (no 'nodes' object)", field="--manifest")
        return cls.from_document(document)

    @classmethod
    def from_document(cls, document: Mapping[str, object]) -> Manifest:
        relations: list[Relation] = []
        for node in _mapping(document.get("nodes")).values():
            if not isinstance(node, dict) or node.get("resource_type") not in ("model", "seed", "snapshot"):
                continue
            name = str(node.get("name"))
            relations.append(
                Relation(
                    f"ref('{name}')",
                    str(node.get("database") or ""),
                    str(node.get("schema") or ""),
                    str(node.get("alias") or name),
                )
            )
        for source in _mapping(document.get("sources")).values():
            if not isinstance(source, dict):
                continue
            relations.append(
                Relation(
                    f"source('{source.get('source_name')}', '{source.get('name')}')",
                    str(source.get("database") or ""),
                    str(source.get("schema") or ""),
                    str(source.get("identifier") or source.get("name")),
                )
            )
        return cls(relations)

    def match(self, parts: list[str]) -> list[Relation]:
        """The relations a 1-, 2- or 3-part table name can mean (case-insensitive)."""
        wanted = [part.lower() for part in parts]
        found = []
        for relation in self.relations:
            full = [relation.database.lower(), relation.schema.lower(), relation.identifier.lower()]
            if full[-len(wanted) :] == wanted:
                found.append(relation)
        return found


@dataclass
class Lineage:
    depends_on: list[str]
    notes: list[str]


def segment_text(activation: Activation) -> str:
    source = activation.source
    return source.query if source.query is not None else str(source.table)


def table_names(sql: str) -> list[list[str]]:
    """The tables a segment's SQL reads from (FROM and JOIN), CTE names left out, each as parts."""
    text = _JINJA.sub(" ", _LINE_COMMENT.sub(" ", sql))
    ctes = {name.lower() for name in _CTE.findall(text)}
    names: list[list[str]] = []
    for match in _TABLE.finditer(text):
        if _inside_function(text, match.start()):
            continue  # EXTRACT(DAY FROM x), TRIM(... FROM x), SUBSTRING(x FROM 2): no table
        tokens = re.findall(_PART, match.group(1))
        parts = [piece for token in tokens for piece in token.strip('`"').split(".")]
        if len(parts) == 1 and (parts[0].lower() in ctes or parts[0].lower() in _NOT_TABLES):
            continue
        if parts not in names:
            names.append(parts)
    return names


def _inside_function(text: str, position: int) -> bool:
    """Whether ``position`` is inside the parentheses of a function whose syntax uses FROM."""
    depth = 0
    for index in range(position - 1, -1, -1):
        char = text[index]
        if char == ")":
            depth += 1
        elif char == "(":
            if depth == 0:
                word = re.search(r"([A-Za-z_]+)\s*$", text[:index])
                return word is not None and word.group(1).lower() in _FROM_FUNCTIONS
            depth -= 1
    return False


def lineage(activation: Activation, manifest: Manifest | None) -> Lineage:
    """What the activation's segment depends on, and what could not be told."""
    text = segment_text(activation)
    depends: list[str] = []
    notes: list[str] = []
    for match in _REF.finditer(text):
        first, second = match.group(1) or match.group(2), match.group(3) or match.group(4)
        depends.append(f"ref('{first}', '{second}')" if second else f"ref('{first}')")
    for match in _SOURCE.finditer(text):
        depends.append(f"source('{match.group(1) or match.group(2)}', '{match.group(3) or match.group(4)}')")
    source = activation.source
    tables = [source.table.split(".")] if source.table is not None else table_names(text)
    default_project = source.project if isinstance(source, BigQuerySourceConfig) else None
    for parts in tables:
        name = ".".join(parts)
        if manifest is None:
            notes.append(f"table {name}: not matched to a dbt model or source (no --manifest given)")
            continue
        found = manifest.match(parts)
        if len(found) > 1 and len(parts) == 2 and default_project:
            # The segment's query runs in the source's project: that is the one it means.
            found = manifest.match([default_project, *parts])
        if len(found) == 1:
            depends.append(found[0].depends)
        elif not found:
            notes.append(f"table {name}: no model or source of the manifest has this relation")
        else:
            choices = ", ".join(sorted(relation.depends for relation in found))
            notes.append(f"table {name}: matches several relations of the manifest ({choices}); qualify it")
    if not tables and not depends:
        notes.append("the segment names no table and no ref() or source(): nothing to depend on")
    return Lineage(list(dict.fromkeys(depends)), notes)


def exposure_name(activation: str) -> str:
    return _EXPOSURE_NAME.sub("_", activation)


class Exposure(TypedDict):
    """One dbt exposure, as written to the YAML (dbt documents its properties under "exposures")."""

    name: str
    label: str
    type: str
    owner: dict[str, str]
    description: str
    depends_on: list[str]
    tags: list[str]
    meta: dict[str, str]


def exposure(activation: Activation, manifest: Manifest | None) -> tuple[Exposure, list[str]]:
    """One activation as a dbt exposure, and the comments to write above it."""
    found = lineage(activation, manifest)
    notes = list(found.notes)
    owner: dict[str, str]
    if activation.owner is not None:
        owner = {key: value for key, value in activation.owner.model_dump().items() if value is not None}
    else:
        owner = {"name": "cepsync"}
        notes.append("no owner in the activation: dbt needs one, so 'cepsync' stands in (set owner: {name, email})")
    meta: dict[str, str] = {
        "cepsync_activation": activation.name,
        "run_type": activation.run_type.value,
        "sync_mode": activation.sync_mode.value,
        "destination": "batch.com",
    }
    if activation.schedule is not None:
        meta["schedule"] = activation.schedule.cron
    if activation.results is not None:
        results = activation.results
        # A DuckDB file by its name only: the path is this machine's, not the dbt project's.
        meta["results"] = results.dataset or (Path(results.database).name if results.database else "the source's file")
    body: Exposure = {
        "name": exposure_name(activation.name),
        "label": activation.name,
        "type": "application",
        "owner": owner,
        "description": activation.description
        or f"cepsync syncs this segment to Batch profiles ({activation.sync_mode.value}).",
        "depends_on": found.depends_on,
        "tags": ["cepsync"],
        "meta": meta,
    }
    return body, notes


def render(activations: Iterable[Activation], manifest: Manifest | None = None) -> str:
    """The ``exposures:`` YAML document, with comments for what could not be resolved."""
    chosen = sorted(activations, key=lambda a: a.name)
    seen: dict[str, str] = {}
    lines = [
        "# Generated by `cepsync dbt-exposures`: one exposure per cepsync activation (docs/results.md).",
        "version: 2",
        "exposures:" if chosen else "exposures: []",
    ]
    for activation in chosen:
        body, notes = exposure(activation, manifest)
        name = body["name"]
        if name in seen:
            raise ConfigError(
                f"activations {seen[name]!r} and {activation.name!r} both become the dbt exposure {name!r}; rename one",
                source=activation.origin,
                field="name",
            )
        seen[name] = activation.name
        for note in notes:
            lines.append(f"  # {activation.name}: {_one_line(note)}")
        dumped = yaml.safe_dump([body], sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
        lines.extend("  " + line for line in dumped.splitlines())
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())
