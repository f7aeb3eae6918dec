"""Activation config: the pydantic model and the checks that run before any read.

Reading a file (YAML, its duplicate keys and merge keys) is :mod:`sync.config_file`'s.

One YAML file per activation. Secrets never live in the file: the destination names the
environment variables that hold the REST API key and the project key. The destination block
and the reading of those keys live in :mod:`sync.destination`; their names are re-exported
here, so ``from sync.config import Credentials`` keeps working.

Every error is a :class:`sync.errors.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import zoneinfo
from functools import cache
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from sync.destination import (
    ENV_VAR_NAME,
    HTTP_URL,
    KEY_WHITESPACE,
    Credentials,
    DestinationConfig,
    EndpointPolicy,
    base_url_problem,
    read_key,
)
from sync.natives import NATIVE_FIELDS, NativeField
from sync.policies import (
    CLOUD_SYNC_ID_COLUMN,
    MappingConvention,
    NullPolicy,
    RemovalPolicy,
    custom_id_optional_with_a_convention,
)

# Batch: custom attribute names are [a-z0-9_], 1 to 30 characters (doc.batch.com SDK
# "attributes" pages; the Android SDK pattern ^[a-zA-Z0-9_]{1,30}$ lowercases first).
# We do not lowercase silently: an uppercase name is a config error.
ATTRIBUTE_NAME = re.compile(r"^[a-z0-9_]{1,30}$")
# Batch's own Segment integration caps custom attributes at 50 per profile.
MAX_CUSTOM_ATTRIBUTES = 50
# Activation names end up in state keys, document ids and log labels.
ACTIVATION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# A Batch audience name (doc.batch.com, CEP Audience API "create"): case-sensitive.
AUDIENCE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
# BigQuery / DuckDB table references: project.dataset.table with plain identifiers only.
TABLE_REFERENCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*){0,2}$")
# Cloud Scheduler reads unix-cron: five fields of numbers, `*`, ranges, steps, lists, and
# three-letter month and day names. croniter also knows seconds, years, `L`, `#` and `H`,
# which Cloud Scheduler refuses, so the shape is checked first and the ranges by croniter.
# infra/scheduler.tf checks the same shape (its CRON_FIELD local) before a deploy.
_CRON_ATOM = r"(\*|[0-9]+|[A-Za-z]{3})"
CRON_FIELD = re.compile(rf"^{_CRON_ATOM}(-{_CRON_ATOM})?(/[0-9]+)?(,{_CRON_ATOM}(-{_CRON_ATOM})?(/[0-9]+)?)*$")


class RunType(enum.StrEnum):
    FULL_ONLY = "full_only"
    FULL_THEN_DELTA = "full_then_delta"


class SyncMode(enum.StrEnum):
    UPSERT = "upsert"
    MIRROR = "mirror"


class AttributeType(enum.StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    DATE = "date"
    URL = "url"
    STRING_ARRAY = "string_array"


class InvalidValuePolicy(enum.StrEnum):
    REJECT_ROW = "reject_row"
    DROP_ATTRIBUTE = "drop_attribute"


class SendPolicy(enum.StrEnum):
    """What a changed profile's payload holds (docs/changed-attributes.md)."""

    WHOLE_PROFILE = "whole_profile"
    CHANGED_ATTRIBUTES = "changed_attributes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SegmentSpec(_Strict):
    query: str | None = Field(None, description="SQL returning one row per person.")
    table: str | None = Field(None, description="Table reference; read whole. Validated, never interpolated raw.")

    @model_validator(mode="after")
    def _one_of_query_or_table(self) -> _SegmentSpec:
        if (self.query is None) == (self.table is None):
            raise ValueError("give exactly one of 'query' or 'table'")
        if self.query is not None and not self.query.strip():
            raise ValueError("'query' is empty")
        if self.table is not None and not TABLE_REFERENCE.match(self.table):
            raise ValueError(f"'table' must look like dataset.table (letters, digits, _ and -): {self.table!r}")
        return self


class DuckDBSourceConfig(_SegmentSpec):
    type: Literal["duckdb"] = "duckdb"
    database: str = Field(description="DuckDB database file, relative to the activation file. Opened read-only.")
    batch_rows: int = Field(
        2_048,
        ge=1_000,
        le=1_000_000,
        description="Rows per Arrow record batch (the differ maps 2,048 at a time; larger batches only hold more).",
    )
    memory_limit: str | None = Field(
        None,
        pattern=r"^[1-9][0-9]{0,5} ?(MB|GB|MiB|GiB)$",
        description=(
            "Memory DuckDB may use for the segment query and its cache of the file's blocks; "
            "a query needing more spills to a temporary directory. Unset, each read is sized: "
            "a query DuckDB streams (scans, filters, projections) runs on one thread with 8 MB "
            "plus 0.75 MB a column read, up to 128 MB; one that sorts, joins, aggregates or "
            "windows gets 128 MB."
        ),
    )


class BigQuerySourceConfig(_SegmentSpec):
    type: Literal["bigquery"] = "bigquery"
    project: str | None = Field(None, description="Project that runs the query job (default: the client's).")
    location: str | None = Field(None, description="Job location, e.g. EU or europe-west1.")
    parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Named query parameters (@name in the query)."
    )
    maximum_bytes_billed: int | None = Field(None, ge=1, description="Fail the query above this many bytes.")
    use_storage_api: bool = Field(True, description="Stream results with the BigQuery Storage Read API.")


SourceConfig = Annotated[DuckDBSourceConfig | BigQuerySourceConfig, Field(discriminator="type")]


class MappingConfig(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=custom_id_optional_with_a_convention)

    custom_id: str = Field(
        description="Column holding the Custom Profile ID (with convention batch_cloud_sync: 'custom_id' by default)."
    )
    email: str | None = Field(None, description="Column for $email_address.")
    phone: str | None = Field(None, description="Column for $phone_number (normalised to E.164).")
    language: str | None = Field(None, description="Column for $language (ISO 639-1).")
    region: str | None = Field(None, description="Column for $region (ISO 3166-1 alpha-2).")
    timezone: str | None = Field(None, description="Column for $timezone (IANA name).")
    email_marketing: str | None = Field(None, description="Column for $email_marketing.")
    sms_marketing: str | None = Field(None, description="Column for $sms_marketing.")
    default_phone_region: str | None = Field(
        None, description="Region used to read national phone numbers (e.g. FR for 06 12 34 56 78)."
    )
    convention: MappingConvention | None = Field(
        None,
        description="batch_cloud_sync: map the segment's columns by Batch Cloud Sync's names (custom_id, "
        "batch__email_address and the other natives, date__x, url__x, any other column as an attribute of its "
        "name; last_updated_at is not read). Explicit entries win (docs/coming-from-batch-cloud-sync.md).",
    )
    on_null: dict[str, NullPolicy] = Field(
        default_factory=dict,
        description="Per native field (email, phone, language, region, timezone, email_marketing, sms_marketing): "
        "clear | keep a null value; beats the activation's on_null.",
        json_schema_extra={"propertyNames": {"enum": [native.field for native in NATIVE_FIELDS]}},
    )

    @model_validator(mode="before")
    @classmethod
    def _convention_names_the_id(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("convention") is not None and "custom_id" not in data:
            return {**data, "custom_id": CLOUD_SYNC_ID_COLUMN}
        return data

    @field_validator("on_null")
    @classmethod
    def _native_names(cls, value: dict[str, NullPolicy]) -> dict[str, NullPolicy]:
        known = [native.field for native in NATIVE_FIELDS]
        for name in value:
            if name not in known:
                raise ValueError(f"{name!r} is not a native field; give one of {', '.join(known)}")
        return value

    @field_validator("default_phone_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.match(r"^[A-Z]{2}$", value):
            raise ValueError("must be an ISO 3166-1 alpha-2 code in uppercase, e.g. FR")
        # The phone library's tables load when a region is given (an activation mapping phones):
        # rphonenumbers, which the mapper asks first (sync.convert.phone_converter); phonenumbers,
        # its second opinion, knows the same regions (tests/test_config.py holds them together).
        import rphonenumbers

        # A code the phone library has no numbering plan for (XX, or a region without
        # phones of its own) would reject every national number of the segment.
        if value not in rphonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region with a phone numbering plan (libphonenumber); e.g. FR, GB, US")
        return value

    def mapped_natives(self) -> list[tuple[NativeField, str]]:
        """(native field, source column) of the mapped native fields, in the table's order."""
        return [(native, column) for native in NATIVE_FIELDS if (column := getattr(self, native.field)) is not None]

    def native_columns(self) -> dict[str, str]:
        """Native Batch key -> source column, for the mapped ones only."""
        return {native.key: column for native, column in self.mapped_natives()}


class CustomAttributeConfig(_Strict):
    column: str = Field(description="Source column.")
    name: str | None = Field(None, description="Batch attribute name (default: the column name).")
    type: AttributeType | None = Field(None, description="Batch type (default: inferred from the source type).")
    on_null: NullPolicy | None = Field(
        None, description="clear: a null value erases the attribute in Batch; keep: it is left out. Default: on_null."
    )

    @property
    def batch_name(self) -> str:
        return self.name if self.name is not None else self.column


class GuardsConfig(_Strict):
    abort_on_empty_segment: bool = Field(True, description="Abort when the segment is empty but state exists.")
    max_removed_percent: float = Field(
        20.0, ge=0, le=100, description="Abort when a mirror run would clear more than this share of synced profiles."
    )
    # Half the audience rewritten at once is rare in a delta and common in a mistake (a broken
    # join, a column swapped); a deliberate one (a new attribute) is one `--allow` away.
    max_changed_percent: float = Field(
        50.0, ge=0, le=100, description="Abort when more than this share of synced profiles changed (100 = off)."
    )


class DiffMode(enum.StrEnum):
    FUNCTION = "function"
    WAREHOUSE = "warehouse"


# [project.]dataset: the BigQuery dataset that holds a warehouse-diff activation's fingerprints.
# A project id is 6-30 lowercase letters, digits and hyphens, starting with a letter and not
# ending with a hyphen; a dataset name is letters, digits and underscores, at most 1,024.
STATE_DATASET = re.compile(r"^(?:[a-z][a-z0-9-]{4,28}[a-z0-9]\.)?[A-Za-z0-9_]{1,1024}$")
_PROJECT_RULE = (
    "a Google Cloud project id has 6 to 30 characters: lowercase letters, digits and hyphens, "
    "starting with a letter and not ending with a hyphen"
)
_DATASET_RULE = "a BigQuery dataset name has 1 to 1,024 characters: letters, digits and underscores"


def state_dataset_problem(value: str) -> str | None:
    """Why ``value`` is not ``[project.]dataset``, in words (None when it is)."""
    if STATE_DATASET.match(value):
        return None
    shown = repr(value[:80] + ("..." if len(value) > 80 else ""))
    parts = value.split(".")
    if len(parts) > 2:
        return f"'dataset' {shown} has {len(parts) - 1} dots: give dataset or project.dataset (one dot at most)"
    project, dataset = parts if len(parts) == 2 else (None, parts[0])
    if project is not None and not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", project):
        if not 6 <= len(project) <= 30:
            detail = f"has {len(project)} characters"
        elif not project[0].isalpha() or not project[0].islower():
            detail = "does not start with a lowercase letter"
        elif project.endswith("-"):
            detail = "ends with a hyphen"
        else:
            detail = "has a character other than a lowercase letter, a digit or a hyphen"
        return f"'dataset' {shown}: the project id {project[:40]!r} {detail}; {_PROJECT_RULE}"
    if not dataset:
        return f"'dataset' {shown} names no dataset; {_DATASET_RULE}"
    if len(dataset) > 1024:
        detail = f"has {len(dataset)} characters"
    else:
        detail = "has a character other than a letter, a digit or an underscore"
    return f"'dataset' {shown}: the dataset name {detail}; {_DATASET_RULE}"


# Warehouse diff: fewer, larger journal flushes. Each flush is one BigQuery load job, and
# BigQuery allows 1,500 load jobs per table per day (sync/warehouse/store.py).
WAREHOUSE_MIN_FLUSH_SECONDS = 30.0
WAREHOUSE_MIN_FLUSH_PROFILES = 100_000


class DiffConfig(_Strict):
    """Where the segment is compared with the acknowledged fingerprints."""

    mode: DiffMode = Field(
        DiffMode.FUNCTION,
        description="function: the function reads the whole segment and diffs it in DuckDB; "
        "warehouse: BigQuery diffs it and only changed rows leave the warehouse (BigQuery sources only).",
    )
    dataset: str | None = Field(
        None, description="warehouse mode: [project.]dataset holding the fingerprint tables (the function owns it)."
    )
    maximum_bytes_billed: int | None = Field(
        None, ge=1, description="warehouse mode: fail any query the run issues above this many bytes billed."
    )

    @model_validator(mode="after")
    def _dataset_for_warehouse(self) -> DiffConfig:
        if self.mode is DiffMode.WAREHOUSE:
            if self.dataset is None:
                raise ValueError("mode 'warehouse' needs 'dataset' ([project.]dataset for the fingerprint tables)")
            problem = state_dataset_problem(self.dataset)
            if problem is not None:
                raise ValueError(problem)
        elif self.dataset is not None or self.maximum_bytes_billed is not None:
            raise ValueError("'dataset' and 'maximum_bytes_billed' only apply to mode 'warehouse'")
        return self


class ResultsConfig(_Strict):
    """Where every run writes its results tables (``cepsync_runs``, ``cepsync_rejections``).

    Off unless the activation has a ``results`` key (docs/results.md). BigQuery sources name
    a dataset; DuckDB sources write into the source's file or the ``database`` named here.
    """

    dataset: str | None = Field(
        None, description="BigQuery sources: [project.]dataset for the results tables (created if missing)."
    )
    database: str | None = Field(
        None,
        description="DuckDB sources: the DuckDB file for the results tables, relative to the activation file "
        "(default: the source's own file).",
    )
    include_values: bool = Field(
        False,
        description="Write the rejected value itself into cepsync_rejections.value (values can be personal data).",
    )
    max_rejection_rows: int = Field(
        1_000_000, ge=1, description="Rejection rows written per run at most; the rest are counted, not written."
    )

    @model_validator(mode="after")
    def _one_place(self) -> ResultsConfig:
        if self.dataset is not None and self.database is not None:
            raise ValueError("give 'dataset' (BigQuery) or 'database' (DuckDB), not both")
        problem = state_dataset_problem(self.dataset) if self.dataset is not None else None
        if problem is not None:  # the same [project.]dataset rule as diff.dataset, said in words
            raise ValueError(problem)
        return self


class OwnerConfig(_Strict):
    """Who answers for the activation: dbt's exposure owner (``cepsync dbt-exposures``)."""

    name: str | None = Field(None, min_length=1, description="The owner's name.")
    email: str | None = Field(None, min_length=3, description="The owner's e-mail address.")

    @model_validator(mode="after")
    def _something(self) -> OwnerConfig:
        if self.name is None and self.email is None:
            raise ValueError("give the owner's 'name', 'email' or both")
        return self


class JournalConfig(_Strict):
    flush_every_profiles: int = Field(2_000, ge=1, description="Commit acknowledged profiles at least this often.")
    flush_every_seconds: float = Field(5.0, gt=0, description="...and at least this often in time.")


@cache
def _iana_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


class ScheduleConfig(_Strict):
    cron: str = Field(description="Cloud Scheduler (unix-cron) expression, five fields, e.g. '0 * * * *'.")
    time_zone: str = Field("Etc/UTC", description="IANA time zone for the cron expression.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter  # loads for an activation with a schedule only

        fields = value.split()
        if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields) or not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a five-field cron expression (minute hour day-of-month month day-of-week, "
                "e.g. '0 * * * *' or '*/15 9-17 * * mon-fri')"
            )
        return value

    @field_validator("time_zone")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        # Names exactly as the IANA database spells them (tzdata ships it): Europe/Paris.
        if value not in _iana_zones():
            raise ValueError(f"{value!r} is not an IANA time zone name, e.g. Europe/Paris or Etc/UTC")
        return value


class Activation(_Strict):
    """One segment → one Batch project, with its mapping, run type, sync mode and guards."""

    name: str = Field(description="Unique activation name: [a-z0-9][a-z0-9_-]*, at most 63 characters.")
    description: str | None = None
    source: SourceConfig
    destination: DestinationConfig
    run_type: RunType = RunType.FULL_THEN_DELTA
    sync_mode: SyncMode = SyncMode.UPSERT
    mapping: MappingConfig
    attributes: list[CustomAttributeConfig] = Field(default_factory=list)
    on_invalid_value: InvalidValuePolicy = Field(
        InvalidValuePolicy.REJECT_ROW,
        description="reject_row: the whole row is not sent; drop_attribute: only the bad value is left out.",
    )
    send: SendPolicy = Field(
        SendPolicy.WHOLE_PROFILE,
        description="whole_profile: a changed profile is sent with every mapped attribute; changed_attributes: "
        "only the attributes whose value changed since Batch's last acknowledgement (first syncs and full "
        "passes send everything).",
    )
    on_null: NullPolicy = Field(
        NullPolicy.CLEAR,
        description="clear: a null value is sent as null (Batch erases the attribute); keep: a null is never sent, "
        "Batch keeps what it holds. attributes[].on_null and mapping.on_null override it per field.",
    )
    on_remove: RemovalPolicy | None = Field(
        None,
        description="Mirror mode, a profile that left the segment. clear (default): every attribute this "
        "activation owns is sent as null; keep: nothing is sent and the profile is no longer tracked. "
        "Default: clear, or keep when the activation has an audience (the leaver leaves the audience).",
    )
    guards: GuardsConfig = Field(default_factory=lambda: GuardsConfig())
    journal: JournalConfig = Field(default_factory=lambda: JournalConfig())
    diff: DiffConfig = Field(default_factory=lambda: DiffConfig())
    schedule: ScheduleConfig | None = None
    results: ResultsConfig | None = Field(
        None, description="Write run records and rejected rows as tables (docs/results.md); off when absent."
    )
    owner: OwnerConfig | None = Field(None, description="Who answers for this sync (dbt exposure owner).")
    audience: str | None = Field(
        None, description="Keep the segment's membership in this Batch audience (docs/audiences.md); mirror only."
    )
    # Where the activation was loaded from, for error messages (not part of the file).
    _source_path: str | None = PrivateAttr(default=None)

    @property
    def origin(self) -> str:
        """The activation file, or the activation's name when it was not loaded from a file."""
        return self._source_path or f"activation '{self.name}'"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ACTIVATION_NAME.match(value):
            raise ValueError("must match [a-z0-9][a-z0-9_-]* and be at most 63 characters")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Activation:
        if self.sync_mode is SyncMode.MIRROR and self.run_type is not RunType.FULL_THEN_DELTA:
            raise ValueError("sync_mode 'mirror' needs run_type 'full_then_delta' (it must know what it synced)")
        if self.audience is not None:
            if not AUDIENCE_NAME.match(self.audience):
                raise _FieldError("audience", "a Batch audience name is 1-255 characters of A-Z, a-z, 0-9, _ and -")
            if self.sync_mode is not SyncMode.MIRROR:
                # An audience is the segment's membership: leavers must leave it, which is mirror.
                raise _FieldError(
                    "audience",
                    "an audience needs sync_mode 'mirror' (leavers are removed from it); with an audience, "
                    "mirror keeps the leavers' attributes and only takes them out of the audience",
                )
        if len(self.attributes) > MAX_CUSTOM_ATTRIBUTES:
            raise ValueError(
                f"{len(self.attributes)} custom attributes; Batch accepts at most {MAX_CUSTOM_ATTRIBUTES} per profile"
            )
        if self.on_remove is not None and self.sync_mode is not SyncMode.MIRROR:
            raise _FieldError("on_remove", "on_remove applies to sync_mode 'mirror' only (upsert never removes)")
        for native_field in self.mapping.on_null if self.mapping.convention is None else ():
            if getattr(self.mapping, native_field) is None:
                raise _FieldError(
                    f"mapping.on_null.{native_field}",
                    f"mapping.{native_field} is not mapped, so there is no null of it to clear or keep",
                )
        seen: dict[str, int] = {}
        for index, attribute in enumerate(self.attributes):
            if self.mapping.convention is not None and attribute.name is None:
                continue  # the convention names it from its column, checked at run start (sync/convention.py)
            name = attribute.batch_name
            if not ATTRIBUTE_NAME.match(name):
                raise _FieldError(
                    f"attributes.{index}.name",
                    f"Batch attribute name {name!r} must be 1-30 characters of a-z, 0-9 and _ (no uppercase)",
                )
            if name in seen:
                raise _FieldError(
                    f"attributes.{index}.name",
                    f"two attributes map to the Batch name {name!r} (attributes.{seen[name]} and this one)",
                )
            seen[name] = index
        if self.diff.mode is DiffMode.WAREHOUSE:
            if not isinstance(self.source, BigQuerySourceConfig):
                raise _FieldError("diff.mode", "mode 'warehouse' needs a BigQuery source (type: bigquery)")
            journal = self.journal
            if (
                journal.flush_every_seconds < WAREHOUSE_MIN_FLUSH_SECONDS
                or journal.flush_every_profiles < WAREHOUSE_MIN_FLUSH_PROFILES
            ):
                raise _FieldError(
                    "journal",
                    "with diff mode 'warehouse' each journal flush is a BigQuery load job (1,500 per table per "
                    f"day): set journal.flush_every_seconds >= {WAREHOUSE_MIN_FLUSH_SECONDS:.0f} and "
                    f"journal.flush_every_profiles >= {WAREHOUSE_MIN_FLUSH_PROFILES}",
                )
        if self.results is not None:
            if isinstance(self.source, BigQuerySourceConfig) and self.results.dataset is None:
                raise _FieldError("results.dataset", "a BigQuery source writes its results to a dataset: name it")
            if isinstance(self.source, DuckDBSourceConfig) and self.results.dataset is not None:
                raise _FieldError(
                    "results.dataset", "a DuckDB source writes its results to a DuckDB file: use 'database'"
                )
            if isinstance(self.source, BigQuerySourceConfig) and self.results.database is not None:
                raise _FieldError("results.database", "a BigQuery source writes its results to a dataset")
        return self

    @property
    def mapped_columns(self) -> list[str]:
        """Every source column the mapping reads, custom_id first, without duplicates."""
        columns = [self.mapping.custom_id, *self.mapping.native_columns().values()]
        columns += [a.column for a in self.attributes]
        return list(dict.fromkeys(columns))

    @property
    def removal_policy(self) -> RemovalPolicy:
        """What mirror removal does: ``on_remove``, else its default: keep with an audience, clear without.

        With an ``audience``, a leaver leaves the audience (``sync.audience``) and keeps its
        attributes unless ``on_remove: clear`` says to clear them too (docs/audiences.md).
        """
        if self.on_remove is not None:
            return self.on_remove
        return RemovalPolicy.KEEP if self.audience is not None else RemovalPolicy.CLEAR

    def keeps_null(self, policy: NullPolicy | None) -> bool:
        """A field's null is kept (never sent): its own policy, else the activation's ``on_null``."""
        return (policy if policy is not None else self.on_null) is NullPolicy.KEEP

    def kept_null_keys(self) -> list[str]:
        """The Batch keys whose nulls are never sent, sorted (part of the mapping version)."""
        keys = [n.key for n, _ in self.mapping.mapped_natives() if self.keeps_null(self.mapping.on_null.get(n.field))]
        return sorted([*keys, *(a.batch_name for a in self.attributes if self.keeps_null(a.on_null))])

    def mapping_spec(self) -> dict[str, object]:
        """The part of the config that decides payloads; its hash is the mapping version.

        How a policy is written (the activation's default or per field) and a convention
        (which expands to explicit entries before a run) are left out; what they decide is
        in: the keys whose nulls are kept. An activation without them hashes as before.
        """
        spec: dict[str, object] = {
            "mapping": self.mapping.model_dump(mode="json", exclude={"convention", "on_null"}),
            "attributes": [a.model_dump(mode="json", exclude={"on_null"}) for a in self.attributes],
            "on_invalid_value": self.on_invalid_value.value,
        }
        kept = self.kept_null_keys()
        if kept:
            spec["null_kept"] = kept
        return spec


class _FieldError(ValueError):
    """A model-level check that knows which field it is about."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def mapping_version(activation: Activation) -> str:
    """A short, stable hash of everything that decides a payload (see docs in fingerprint.py)."""
    from sync.fingerprint import MAPPING_RULES_VERSION

    spec = json.dumps(
        {"rules": MAPPING_RULES_VERSION, **activation.mapping_spec()},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()


__all__ = [
    "ACTIVATION_NAME",
    "ATTRIBUTE_NAME",
    "AUDIENCE_NAME",
    "CLOUD_SYNC_ID_COLUMN",
    "CRON_FIELD",
    "ENV_VAR_NAME",
    "HTTP_URL",
    "KEY_WHITESPACE",
    "MAX_CUSTOM_ATTRIBUTES",
    "STATE_DATASET",
    "TABLE_REFERENCE",
    "WAREHOUSE_MIN_FLUSH_PROFILES",
    "WAREHOUSE_MIN_FLUSH_SECONDS",
    "Activation",
    "AttributeType",
    "BigQuerySourceConfig",
    "Credentials",
    "CustomAttributeConfig",
    "DestinationConfig",
    "DiffConfig",
    "DiffMode",
    "DuckDBSourceConfig",
    "EndpointPolicy",
    "GuardsConfig",
    "InvalidValuePolicy",
    "JournalConfig",
    "MappingConfig",
    "MappingConvention",
    "NullPolicy",
    "OwnerConfig",
    "RemovalPolicy",
    "ResultsConfig",
    "RunType",
    "ScheduleConfig",
    "SendPolicy",
    "SourceConfig",
    "SyncMode",
    "base_url_problem",
    "mapping_version",
    "read_key",
    "state_dataset_problem",
]
