"""Static checks of the Terraform in infra/: parsed with python-hcl2, no terraform binary needed.

They pin the deployment's safety properties (least privilege, bounded instances, retries,
pinned secrets, protected state) and prove that Scheduler jobs come from the activation
YAML files with the same selection the runtime loader makes. One test also evaluates the
real selection expressions with a terraform binary when one is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from sync.config import ScheduleConfig
from sync.config_file import load_activations
from sync.state.firestore import index_exemptions

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}

Block = dict[str, Any]


def _load(path: Path) -> Block:
    options = hcl2.SerializationOptions(strip_string_quotes=True)
    return hcl2.loads(path.read_text(encoding="utf-8"), serialization_options=options)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """Every top-level block of infra/*.tf, merged: resources by (type, name), variables, locals..."""
    resources: dict[tuple[str, str], Block] = {}
    variables: dict[str, Block] = {}
    outputs: dict[str, Block] = {}
    locals_: dict[str, Any] = {}
    files = sorted(INFRA.glob("*.tf"))
    assert files, "no .tf files in infra/"
    for path in files:
        parsed = _load(path)
        for entry in parsed.get("resource", []):
            for rtype, named in entry.items():
                for name, body in named.items():
                    assert (rtype, name) not in resources, f"{rtype}.{name} defined twice"
                    resources[(rtype, name)] = body
        for entry in parsed.get("variable", []):
            variables.update(entry)
        for entry in parsed.get("output", []):
            outputs.update(entry)
        for entry in parsed.get("locals", []):
            locals_.update({k: v for k, v in entry.items() if not k.startswith("__")})
    return {"resources": resources, "variables": variables, "outputs": outputs, "locals": locals_}


def _of_type(config: dict[str, Any], rtype: str) -> dict[str, Block]:
    return {name: body for (kind, name), body in config["resources"].items() if kind == rtype}


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair at any depth of a parsed block."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key, inner
            yield from _walk(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _walk(inner)


def _single(block: Any) -> Block:
    """A nested block that must appear exactly once (python-hcl2 gives a list of one)."""
    assert isinstance(block, list), block
    assert len(block) == 1, block
    return block[0]


def _validation_conditions(variable: Block) -> list[str]:
    return [v["condition"] for v in variable.get("validation", [])]


def _functions(config: dict[str, Any]) -> dict[str, Block]:
    functions = _of_type(config, "google_cloudfunctions2_function")
    assert set(functions) == {"sync", "sync_http"}
    return functions


# ---------------------------------------------------------------- inputs


def test_every_variable_has_a_description(config: dict[str, Any]) -> None:
    assert len(config["variables"]) >= 20
    for name, variable in config["variables"].items():
        description = variable.get("description", "")
        assert isinstance(description, str), name
        assert len(description.strip()) >= 15, f"variable {name} needs a real description"


def test_every_output_has_a_description(config: dict[str, Any]) -> None:
    for name, output in config["outputs"].items():
        assert len(str(output.get("description", "")).strip()) >= 15, f"output {name} needs a description"


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("max_instance_count", ["var.max_instance_count >= 1", "var.max_instance_count <= 10"]),
        ("timeout_seconds", ["var.timeout_seconds <= 540"]),
        ("http_timeout_seconds", ["var.http_timeout_seconds <= 3600"]),
        ("available_memory", ["regex("]),
        ("region", ["regex("]),
        ("project_id", ["regex("]),
    ],
)
def test_risky_variables_are_validated(config: dict[str, Any], variable: str, expected: list[str]) -> None:
    conditions = " ".join(_validation_conditions(config["variables"][variable]))
    for fragment in expected:
        assert fragment in conditions, f"{variable}: validation lacks {fragment!r}: {conditions}"


def test_timeout_default_and_budget_fit_the_event_limit(config: dict[str, Any]) -> None:
    variables = config["variables"]
    assert variables["timeout_seconds"]["default"] <= 540
    assert variables["time_budget_seconds"]["default"] < variables["timeout_seconds"]["default"]
    sync = _functions(config)["sync"]
    preconditions = [p["condition"] for p in _single(sync["lifecycle"])["precondition"]]
    assert "${var.time_budget_seconds < var.timeout_seconds}" in preconditions


@pytest.mark.parametrize("variable", ["rest_api_key_secret_version", "project_key_secret_version"])
def test_secret_version_variables_refuse_latest(config: dict[str, Any], variable: str) -> None:
    declared = config["variables"][variable]
    assert "default" not in declared, "a pinned version has no sensible default"
    (condition,) = _validation_conditions(declared)
    match = re.search(r'regex\("(.+?)", var\.' + variable + r"\)", condition)
    assert match is not None, condition
    pattern = re.compile(match.group(1).replace("\\\\", "\\"))
    assert pattern.fullmatch("latest") is None
    assert pattern.fullmatch("") is None
    assert pattern.fullmatch("0") is None
    assert pattern.fullmatch("1") is not None
    assert pattern.fullmatch("12") is not None


def test_tfvars_example_sets_every_required_variable(config: dict[str, Any]) -> None:
    example = {k for k in _load(INFRA / "terraform.tfvars.example") if not k.startswith("__")}
    required = {name for name, v in config["variables"].items() if "default" not in v}
    assert required <= set(example), f"terraform.tfvars.example misses {sorted(required - set(example))}"
    assert set(example) <= set(config["variables"]), "terraform.tfvars.example sets unknown variables"


# ---------------------------------------------------------------- functions


def test_functions_are_bounded_and_run_one_request_per_instance(config: dict[str, Any]) -> None:
    for name, function in _functions(config).items():
        service = _single(function["service_config"])
        assert service["max_instance_request_concurrency"] == 1, name
        assert service["max_instance_count"] == "${var.max_instance_count}", name
        assert service["ingress_settings"] == "ALLOW_INTERNAL_ONLY", name


def test_event_function_retries_pubsub_deliveries(config: dict[str, Any]) -> None:
    sync = _functions(config)["sync"]
    assert _single(sync["build_config"])["entry_point"] == "pubsub_sync"
    assert _single(sync["service_config"])["timeout_seconds"] == "${var.timeout_seconds}"
    trigger = _single(sync["event_trigger"])
    assert trigger["retry_policy"] == "RETRY_POLICY_RETRY"
    assert trigger["event_type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    assert trigger["pubsub_topic"] == "${google_pubsub_topic.sync.id}"
    assert trigger["service_account_email"] == "${google_service_account.invoker.email}"


def test_http_function_is_optional_and_uses_http_entry_point(config: dict[str, Any]) -> None:
    http = _functions(config)["sync_http"]
    assert http["count"] == "${var.enable_http_trigger ? 1 : 0}"
    assert config["variables"]["enable_http_trigger"]["default"] is False
    assert _single(http["build_config"])["entry_point"] == "http_sync"
    assert "event_trigger" not in http
    assert _single(http["service_config"])["timeout_seconds"] == "${var.http_timeout_seconds}"


def test_functions_run_as_the_dedicated_identities(config: dict[str, Any]) -> None:
    accounts = _of_type(config, "google_service_account")
    assert set(accounts) == {"runtime", "invoker", "build"}
    for name, function in _functions(config).items():
        assert _single(function["service_config"])["service_account_email"] == (
            "${google_service_account.runtime.email}"
        ), name
        assert _single(function["build_config"])["service_account"] == "${google_service_account.build.id}", name


def test_secrets_reach_the_functions_pinned_to_version_variables(config: dict[str, Any]) -> None:
    expected = {
        ("${var.rest_api_key_env}", "${google_secret_manager_secret.rest_api_key.secret_id}"): (
            "${var.rest_api_key_secret_version}"
        ),
        ("${var.project_key_env}", "${google_secret_manager_secret.project_key.secret_id}"): (
            "${var.project_key_secret_version}"
        ),
    }
    for name, function in _functions(config).items():
        service = _single(function["service_config"])
        found = {(s["key"], s["secret"]): s["version"] for s in service["secret_environment_variables"]}
        assert found == expected, name
        assert not any(key.startswith("BATCH") for key in service["environment_variables"]), (
            "a Batch key must never be a plain environment variable"
        )
    for path in INFRA.glob("*.tf"):
        assert not re.search(r'version\s*=\s*"latest"', path.read_text(encoding="utf-8")), path.name


def test_runtime_settings_reach_the_functions(config: dict[str, Any]) -> None:
    environment = config["locals"]["runtime_environment"]
    assert environment["CEPSYNC_STATE"] == "firestore"
    assert environment["CEPSYNC_ACTIVATIONS_DIR"] == "activations"
    assert environment["CEPSYNC_FIRESTORE_DATABASE"] == "${google_firestore_database.state.name}"
    assert environment["CEPSYNC_FIRESTORE_PREFIX"] == "${var.firestore_prefix}"
    assert environment["CEPSYNC_CONTINUATION_TOPIC"] == "${google_pubsub_topic.sync.id}"
    assert environment["GOOGLE_CLOUD_PROJECT"] == "${var.project_id}"
    budgets = {"sync": "var.time_budget_seconds", "sync_http": "var.http_time_budget_seconds"}
    for name, function in _functions(config).items():
        merged = _single(function["service_config"])["environment_variables"]
        assert "local.runtime_environment" in merged, name
        assert f"CEPSYNC_TIME_BUDGET_SECONDS = tostring({budgets[name]})" in merged, name


def test_source_bucket_is_private_and_versioned(config: dict[str, Any]) -> None:
    bucket = _of_type(config, "google_storage_bucket")["source"]
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert _single(bucket["versioning"])["enabled"] is True
    source = _single(_functions(config)["sync"]["build_config"])["source"]
    storage = _single(_single(source)["storage_source"])
    assert storage["bucket"] == "${google_storage_bucket.source.name}"
    assert storage["object"] == "${google_storage_bucket_object.source.name}"


# ---------------------------------------------------------------- IAM


def _role_bindings(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(resource type, resource name, role) for every IAM resource."""
    return [
        (rtype, name, body["role"])
        for (rtype, name), body in config["resources"].items()
        if "_iam_" in rtype and "role" in body
    ]


def test_no_primitive_role_anywhere(config: dict[str, Any]) -> None:
    bindings = _role_bindings(config)
    assert len(bindings) >= 10
    for rtype, name, role in bindings:
        assert role not in PRIMITIVE_ROLES, f"{rtype}.{name} grants {role}"
    for key, value in _walk(config["resources"]):
        if key in {"role", "roles"}:
            assert not (set(value if isinstance(value, list) else [value]) & PRIMITIVE_ROLES)
    for path in INFRA.glob("*.tf"):
        assert not re.search(r"roles/(owner|editor|viewer)\b", path.read_text(encoding="utf-8")), path.name


def test_dataset_read_is_granted_per_dataset_never_project_wide(config: dict[str, Any]) -> None:
    for rtype, name, role in _role_bindings(config):
        if role == "roles/bigquery.dataViewer":
            assert rtype == "google_bigquery_dataset_iam_member", f"{rtype}.{name}: dataViewer must be per dataset"
    readers = _of_type(config, "google_bigquery_dataset_iam_member")
    assert set(readers) == {"runtime_segment_reader", "runtime_state_editor", "runtime_results_editor"}
    reader = readers["runtime_segment_reader"]
    assert reader["for_each"] == "${local.bigquery_datasets}"
    assert reader["dataset_id"] == "${each.value.dataset_id}"


def test_warehouse_state_dataset_is_explicit_never_expires_and_only_it_is_writable(config: dict[str, Any]) -> None:
    datasets = _of_type(config, "google_bigquery_dataset")
    assert set(datasets) == {"warehouse_state", "results"}
    dataset = datasets["warehouse_state"]
    assert dataset["count"] == "${var.warehouse_state_dataset == null ? 0 : 1}"
    assert dataset["location"] == "${var.warehouse_state_location}"
    assert not {"default_table_expiration_ms", "default_partition_expiration_ms"} & set(dataset)
    assert dataset["delete_contents_on_destroy"] is False
    precondition = _single(_single(dataset["lifecycle"])["precondition"])
    assert precondition["condition"] == "${var.warehouse_state_location != null}"
    editors = [
        (rtype, name, body)
        for (rtype, name), body in config["resources"].items()
        if body.get("role") == "roles/bigquery.dataEditor" and name != "runtime_results_editor"
    ]
    assert len(editors) == 1
    rtype, name, editor = editors[0]
    assert (rtype, name) == ("google_bigquery_dataset_iam_member", "runtime_state_editor")
    assert editor["dataset_id"] == "${google_bigquery_dataset.warehouse_state[0].dataset_id}"
    assert editor["member"] == "serviceAccount:${google_service_account.runtime.email}"
    assert "warehouse_state_dataset" in config["variables"]


def test_results_dataset_is_optional_expires_by_partition_and_only_it_is_writable(config: dict[str, Any]) -> None:
    dataset = _of_type(config, "google_bigquery_dataset")["results"]
    assert dataset["count"] == "${var.results_dataset == null ? 0 : 1}"
    assert dataset["location"] == "${var.results_location}"
    assert dataset["dataset_id"] == "${var.results_dataset}"
    assert "default_table_expiration_ms" not in dataset  # a table's expiry would drop every run at once
    assert "var.results_retention_days" in dataset["default_partition_expiration_ms"]
    assert dataset["delete_contents_on_destroy"] is False
    precondition = _single(_single(dataset["lifecycle"])["precondition"])
    assert precondition["condition"] == "${var.results_location != null}"
    editors = {
        name: body
        for (rtype, name), body in config["resources"].items()
        if body.get("role") == "roles/bigquery.dataEditor"
    }
    assert set(editors) == {"runtime_state_editor", "runtime_results_editor"}
    editor = editors["runtime_results_editor"]
    assert editor["dataset_id"] == "${google_bigquery_dataset.results[0].dataset_id}"
    assert editor["member"] == "serviceAccount:${google_service_account.runtime.email}"
    assert editor["count"] == "${var.results_dataset == null ? 0 : 1}"
    assert config["variables"]["results_retention_days"]["default"] == 400


def test_project_level_grants_are_the_expected_short_list(config: dict[str, Any]) -> None:
    project_grants = {(name, body["role"]) for name, body in _of_type(config, "google_project_iam_member").items()}
    assert project_grants == {
        ("runtime_bigquery_job_user", "roles/bigquery.jobUser"),
        ("runtime_bigquery_read_session", "roles/bigquery.readSessionUser"),
        ("runtime_firestore_user", "roles/datastore.user"),
        ("invoker_event_receiver", "roles/eventarc.eventReceiver"),
        ("build_log_writer", "roles/logging.logWriter"),
        ("build_artifact_writer", "roles/artifactregistry.writer"),
        ("build_source_reader", "roles/storage.objectViewer"),
    }
    grants = _of_type(config, "google_project_iam_member")
    assert grants["runtime_bigquery_read_session"]["count"] == "${var.enable_bigquery_storage_read ? 1 : 0}"
    firestore_condition = _single(grants["runtime_firestore_user"]["condition"])["expression"]
    assert "google_firestore_database.state.name" in firestore_condition


def test_secret_accessor_is_bound_on_the_two_secrets_only(config: dict[str, Any]) -> None:
    for rtype, name, role in _role_bindings(config):
        if role == "roles/secretmanager.secretAccessor":
            assert rtype == "google_secret_manager_secret_iam_member", f"{rtype}.{name}"
    members = _of_type(config, "google_secret_manager_secret_iam_member")
    targets = sorted(body["secret_id"] for body in members.values())
    assert targets == [
        "${google_secret_manager_secret.project_key.secret_id}",
        "${google_secret_manager_secret.rest_api_key.secret_id}",
    ]
    for body in members.values():
        assert body["role"] == "roles/secretmanager.secretAccessor"
        assert body["member"] == "serviceAccount:${google_service_account.runtime.email}"
    assert set(_of_type(config, "google_secret_manager_secret")) == {"rest_api_key", "project_key"}
    assert not _of_type(config, "google_secret_manager_secret_version"), "secret values must stay out of state"


def test_runtime_publishes_to_the_sync_topic_only(config: dict[str, Any]) -> None:
    publishers = {
        name: body
        for name, body in _of_type(config, "google_pubsub_topic_iam_member").items()
        if body["member"] == "serviceAccount:${google_service_account.runtime.email}"
    }
    assert list(publishers) == ["runtime_continuation_publisher"]
    grant = publishers["runtime_continuation_publisher"]
    assert grant["topic"] == "${google_pubsub_topic.sync.name}"
    assert grant["role"] == "roles/pubsub.publisher"


def test_invoker_may_invoke_the_functions_and_nothing_more(config: dict[str, Any]) -> None:
    invoker = "serviceAccount:${google_service_account.invoker.email}"
    roles = {
        (rtype, body["role"])
        for (rtype, _name), body in config["resources"].items()
        if "_iam_" in rtype and body.get("member") == invoker
    }
    assert roles == {
        ("google_cloud_run_v2_service_iam_member", "roles/run.invoker"),
        ("google_project_iam_member", "roles/eventarc.eventReceiver"),
    }
    token_creator = _of_type(config, "google_service_account_iam_member")["pubsub_token_creator"]
    assert token_creator["service_account_id"] == "${google_service_account.invoker.name}"
    assert token_creator["role"] == "roles/iam.serviceAccountTokenCreator"


# ---------------------------------------------------------------- state and messaging


def test_firestore_database_is_native_and_protected(config: dict[str, Any]) -> None:
    database = _of_type(config, "google_firestore_database")["state"]
    assert database["type"] == "FIRESTORE_NATIVE"
    assert database["delete_protection_state"] == "DELETE_PROTECTION_ENABLED"
    assert database["deletion_policy"] == "ABANDON"


@pytest.mark.parametrize("prefix", ["cepsync", "acme_prod"])
def test_index_exemptions_match_the_firestore_store(config: dict[str, Any], prefix: str) -> None:
    field = _of_type(config, "google_firestore_field")["index_exemption"]
    assert field["for_each"] == "${local.firestore_index_exemptions}"
    assert field["collection"] == "${each.value.collection}"
    assert field["field"] == "${each.value.field}"
    assert field["index_config"] == [{"__is_block__": True}], "an empty index_config disables indexing"
    expression = config["locals"]["firestore_index_exemptions"]
    pairs = re.findall(r'\{collection = "([^"]+)", field = "([^"]+)"\}', expression)
    declared = {(collection.replace("${var.firestore_prefix}", prefix), f) for collection, f in pairs}
    wanted = {(e.collection, e.field) for e in index_exemptions(prefix)}
    assert declared == wanted


def test_dead_letter_topic_is_held_and_forwardable(config: dict[str, Any]) -> None:
    topics = _of_type(config, "google_pubsub_topic")
    assert set(topics) == {"sync", "dead_letter"}
    hold = _of_type(config, "google_pubsub_subscription")["dead_letter_hold"]
    assert hold["topic"] == "${google_pubsub_topic.dead_letter.id}"
    forwarding = _of_type(config, "google_pubsub_topic_iam_member")["dead_letter_forwarding"]
    assert forwarding["topic"] == "${google_pubsub_topic.dead_letter.name}"
    assert forwarding["member"] == "${local.pubsub_service_agent}"
    assert "--dead-letter-topic" in config["outputs"]["attach_dead_letter_commands"]["value"]


def test_checkov_skips_carry_a_reason() -> None:
    skips = [
        (path.name, line.strip())
        for path in INFRA.glob("*.tf")
        for line in path.read_text(encoding="utf-8").splitlines()
        if "checkov:skip" in line
    ]
    assert skips, "expected the documented skips"
    for name, line in skips:
        assert re.fullmatch(r"#checkov:skip=CKV2?_GCP_\d+:.{30,}", line), f"{name}: {line}"


# ---------------------------------------------------------------- scheduler jobs from activations

EXPECTED_SELECTION = {
    "activations_path": (
        '${startswith(var.activations_dir, "/") ? var.activations_dir : "${path.module}/${var.activations_dir}"}'
    ),
    "activation_files": '${fileset(local.activations_path, "*.{yaml,yml}")}',
    "activation_documents": (
        "${{for file_name in local.activation_files : "
        'file_name => yamldecode(file("${local.activations_path}/${file_name}"))}}'
    ),
    "activations": "${{for file_name, document in local.activation_documents : document.name => document}}",
    "scheduled_activations": (
        "${{for name, document in local.activations : name => "
        '{cron = try(document.schedule.cron, ""), time_zone = try(document.schedule.time_zone, "Etc/UTC")} '
        "if try(document.schedule, null) != null}}"
    ),
}


def test_activation_selection_expressions(config: dict[str, Any]) -> None:
    for name, expression in EXPECTED_SELECTION.items():
        assert config["locals"][name] == expression, name
    # The time zone default in Terraform is the runtime model's default.
    assert f'"{ScheduleConfig.model_fields["time_zone"].default}"' in config["locals"]["scheduled_activations"]


def test_scheduler_jobs_are_generated_per_activation(config: dict[str, Any]) -> None:
    jobs = _of_type(config, "google_cloud_scheduler_job")
    assert set(jobs) == {"activation", "activation_http"}
    pubsub, http = jobs["activation"], jobs["activation_http"]
    assert pubsub["for_each"] == "${local.pubsub_scheduled_activations}"
    assert http["for_each"] == "${local.http_scheduled_activations}"
    for job in (pubsub, http):
        assert job["schedule"] == "${each.value.cron}"
        assert job["time_zone"] == "${each.value.time_zone}"
        assert "${each.key}" in job["name"]
    target = _single(pubsub["pubsub_target"])
    assert target["topic_name"] == "${google_pubsub_topic.sync.id}"
    assert target["data"] == "${base64encode(jsonencode({activation = each.key}))}"
    http_target = _single(http["http_target"])
    assert http_target["body"] == "${base64encode(jsonencode({activation = each.key}))}"
    oidc = _single(http_target["oidc_token"])
    assert oidc["service_account_email"] == "${google_service_account.invoker.email}"
    # Together the two maps cover every scheduled activation exactly once.
    locals_ = config["locals"]
    assert "local.scheduled_activations" in locals_["http_scheduled_activations"]
    assert "!contains(keys(local.http_scheduled_activations), name)" in locals_["pubsub_scheduled_activations"]


def _terraform_selection(directory: Path) -> dict[str, dict[str, str]]:
    """The scheduled_activations expression of infra/main.tf, step by step, in Python."""
    # fileset(dir, "*.{yaml,yml}"): files directly in dir, case-sensitive glob.
    files = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and (fnmatchcase(p.name, "*.yaml") or fnmatchcase(p.name, "*.yml"))
    )
    documents = {f: yaml.safe_load((directory / f).read_text(encoding="utf-8")) for f in files}
    activations: dict[str, Any] = {}
    for document in documents.values():
        assert document["name"] not in activations, "terraform fails on a duplicate key"
        activations[document["name"]] = document
    return {
        name: {
            "cron": (document.get("schedule") or {}).get("cron", ""),
            "time_zone": (document.get("schedule") or {}).get("time_zone", "Etc/UTC"),
        }
        for name, document in activations.items()
        if document.get("schedule") is not None
    }


def _runtime_selection(directory: Path) -> dict[str, dict[str, str]]:
    """What the runtime loader (sync.config) says is scheduled."""
    return {
        name: {"cron": activation.schedule.cron, "time_zone": activation.schedule.time_zone}
        for name, activation in load_activations(directory).items()
        if activation.schedule is not None
    }


def _activation_yaml(name: str, schedule: dict[str, str] | None) -> str:
    document: dict[str, Any] = {
        "name": name,
        "source": {"type": "bigquery", "project": "acme-data", "location": "EU", "table": "crm.segment"},
        "destination": {"api_key_env": "BATCH_REST_API_KEY", "project_key_env": "BATCH_PROJECT_KEY"},
        "mapping": {"custom_id": "user_id"},
    }
    if schedule is not None:
        document["schedule"] = schedule
    return yaml.safe_dump(document, sort_keys=False)


@pytest.fixture
def activation_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "activations"
    directory.mkdir()
    (directory / "hourly.yaml").write_text(_activation_yaml("hourly", {"cron": "0 * * * *"}))
    (directory / "paris.yml").write_text(
        _activation_yaml("nightly-paris", {"cron": "30 2 * * *", "time_zone": "Europe/Paris"})
    )
    (directory / "manual.yaml").write_text(_activation_yaml("manual_only", None))
    (directory / "README.md").write_text("not an activation\n")
    (directory / "nested").mkdir()
    (directory / "nested" / "ignored.yaml").write_text(_activation_yaml("nested", {"cron": "* * * * *"}))
    return directory


def test_terraform_selection_matches_the_runtime_loader(activation_dir: Path) -> None:
    expected = {
        "hourly": {"cron": "0 * * * *", "time_zone": "Etc/UTC"},
        "nightly-paris": {"cron": "30 2 * * *", "time_zone": "Europe/Paris"},
    }
    assert _terraform_selection(activation_dir) == expected
    assert _runtime_selection(activation_dir) == expected
    for shipped in (REPO_ROOT / "activations", REPO_ROOT / "examples" / "activations"):
        if shipped.is_dir():
            assert _terraform_selection(shipped) == _runtime_selection(shipped), shipped


def _unwrap(expression: str) -> str:
    assert expression.startswith("${"), expression
    assert expression.endswith("}"), expression
    return expression[2:-1]


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary to evaluate expressions with")
def test_terraform_evaluates_the_selection_like_the_runtime(
    config: dict[str, Any], activation_dir: Path, tmp_path: Path
) -> None:
    """Evaluate the real locals of infra/main.tf with `terraform console` (offline, no providers)."""
    module = tmp_path / "module"
    module.mkdir()
    body = "\n".join(f"  {name} = {_unwrap(config['locals'][name])}" for name in EXPECTED_SELECTION)
    (module / "main.tf").write_text(
        f'variable "activations_dir" {{\n  type = string\n}}\n\nlocals {{\n{body}\n}}\n', encoding="utf-8"
    )
    environment = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",  # no version check call home
        "TF_CLI_CONFIG_FILE": str(tmp_path / "terraformrc"),
        "TF_IN_AUTOMATION": "1",
    }
    (tmp_path / "terraformrc").write_text("", encoding="utf-8")
    completed = subprocess.run(
        ["terraform", "console", f"-var=activations_dir={activation_dir}"],
        input="jsonencode(local.scheduled_activations)\n",
        capture_output=True,
        text=True,
        cwd=module,
        env=environment,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    evaluated = json.loads(json.loads(completed.stdout.strip().splitlines()[-1]))
    assert evaluated == _runtime_selection(activation_dir)
    assert set(evaluated) == {"hourly", "nightly-paris"}


SCHEDULES = {
    "hourly": ("0 * * * *", "Etc/UTC"),
    "office": ("*/15 9-17 * * mon-fri", "Europe/Paris"),
    "twice": ("30 2 1,15 jan,jul *", "America/Argentina/Buenos_Aires"),
    "words": ("every hour please", "Etc/UTC"),
    "minute61": ("61 * * * *", "Etc/UTC"),
    "hour24": ("* 24 * * *", "Etc/UTC"),
    "day32": ("0 0 32 * *", "Etc/UTC"),
    "monthname": ("0 0 * foo *", "Etc/UTC"),
    "fourfields": ("* * * *", "Etc/UTC"),
    "sixfields": ("0 * * * * *", "Etc/UTC"),
    "lastday": ("0 0 L * *", "Etc/UTC"),
    "emptyzone": ("0 * * * *", ""),
    "lowerzone": ("0 * * * *", "europe/paris"),
    "pathzone": ("0 * * * *", "../etc/passwd"),
}
# What Terraform cannot know without a time zone database; `make package` refuses them.
ONLY_THE_MODEL_REFUSES = {"Mars/Olympus"}


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary to evaluate expressions with")
def test_terraform_schedule_checks_agree_with_the_model(tmp_path: Path) -> None:
    """infra/schedule_checks.tf, evaluated by `terraform console`, refuses what ScheduleConfig refuses."""
    module = tmp_path / "module"
    module.mkdir()
    shutil.copy(INFRA / "schedule_checks.tf", module / "schedule_checks.tf")
    schedules = {name: {"cron": cron, "time_zone": zone} for name, (cron, zone) in SCHEDULES.items()}
    (module / "main.tf").write_text(
        'variable "schedules" {\n  type = map(object({ cron = string, time_zone = string }))\n}\n\n'
        "locals {\n  scheduled_activations = var.schedules\n}\n",
        encoding="utf-8",
    )
    (module / "terraform.tfvars.json").write_text(json.dumps({"schedules": schedules}), encoding="utf-8")
    (tmp_path / "terraformrc").write_text("", encoding="utf-8")
    environment = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": str(tmp_path / "terraformrc"),
        "TF_IN_AUTOMATION": "1",
    }
    completed = subprocess.run(
        ["terraform", "console"],
        input="jsonencode(local.schedule_problems)\n",
        capture_output=True,
        text=True,
        cwd=module,
        env=environment,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    problems = json.loads(json.loads(completed.stdout.strip().splitlines()[-1]))
    for name, (cron, zone) in SCHEDULES.items():
        try:
            ScheduleConfig(cron=cron, time_zone=zone)
            model_accepts = True
        except ValueError:
            model_accepts = False
        assert (problems[name] == []) is model_accepts, (name, problems[name])
    assert any("minute field '61'" in p for p in problems["minute61"])
    assert any("five fields" in p for p in problems["fourfields"])
    for zone in ONLY_THE_MODEL_REFUSES:
        with pytest.raises(ValueError, match="IANA"):
            ScheduleConfig(cron="0 * * * *", time_zone=zone)
