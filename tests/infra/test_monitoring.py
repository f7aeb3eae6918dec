"""infra/monitoring.tf and infra/dashboard.json against the log lines the function really writes.

The lines come from the Cloud Function's Pub/Sub handler run twice on the real stack (a
503 retry, rejections ours and Batch's, then a 401). Each line is wrapped into the
LogEntry Cloud Logging makes of a JSON line on a Cloud Run revision (``severity`` and
``logging.googleapis.com/labels`` lifted out, the rest in ``jsonPayload``), and every
log-based metric's filter is evaluated on it by the small evaluator below. It knows only
the subset of the Logging query language the filters use (AND of comparisons, ``=`` and
``>=``, a parenthesised OR of strings) and refuses anything else, so a filter written
outside that subset fails here instead of being half-checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.runlog import RUN_END_EVENT
from tests.support.engine_support import API_KEY, PROJECT_KEY
from tests.support.report_support import function_log_lines

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICE = "cepsync-sync"  # local.function_name with the default name_prefix


# ---------------------------------------------------------------- the Terraform, resolved


def _parse(path: Path) -> dict[str, Any]:
    options = hcl2.SerializationOptions(strip_string_quotes=True)
    return hcl2.loads(path.read_text(encoding="utf-8"), serialization_options=options)


@pytest.fixture(scope="module")
def terraform() -> dict[str, Any]:
    monitoring = _parse(INFRA / "monitoring.tf")
    variables: dict[str, Any] = {}
    for entry in _parse(INFRA / "variables.tf").get("variable", []):
        variables.update(entry)
    resources: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in monitoring.get("resource", []):
        for rtype, named in entry.items():
            for name, body in named.items():
                resources[(rtype, name)] = body
    local_values: dict[str, Any] = {}
    for entry in monitoring.get("locals", []):
        local_values.update({k: v for k, v in entry.items() if not k.startswith("__")})
    return {"resources": resources, "variables": variables, "locals": local_values}


def _unquote(text: str) -> str:
    """python-hcl2 keeps the escapes of a quoted string: \\" stays as two characters."""
    return text.replace('\\"', '"')


def resolve(text: str, terraform: dict[str, Any], overrides: dict[str, Any] | None = None) -> str:
    """Substitute ${local.X}, ${var.X} (defaults, or overrides) as Terraform would."""
    values = {**{name: body.get("default") for name, body in terraform["variables"].items()}, **(overrides or {})}
    names = {"function_name": "cepsync-sync", "http_function_name": "cepsync-sync-http"}

    def substitute(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "var":
            return str(values[name])
        if name in names:
            return names[name]
        return resolve(_unquote(str(terraform["locals"][name])), terraform, overrides)

    resolved = re.sub(r"\$\{(local|var)\.([a-z_]+)\}", substitute, _unquote(text))
    assert "${" not in resolved, resolved
    return resolved


def metric_filters(terraform: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Every log-based metric name -> its resolved filter (for_each expanded)."""
    filters = {}
    for (rtype, _), body in terraform["resources"].items():
        if rtype != "google_logging_metric":
            continue
        if "for_each" in body:
            for name in terraform["locals"]["run_value_metrics"]:
                filters[name] = resolve(body["filter"], terraform, overrides)
        else:
            filters[body["name"]] = resolve(body["filter"], terraform, overrides)
    return filters


# ---------------------------------------------------------------- a small filter evaluator

_TERM = re.compile(r'^(?P<path>[A-Za-z_][\w.]*(?:\."[^"]+")*[\w.]*)\s*(?P<op>>=|<=|!=|=|>|<)\s*(?P<value>.+)$')


def _split_and(text: str) -> list[str]:
    parts, depth, quoted, current = [], 0, False, ""
    tokens = re.split(r'(\s+AND\s+|"|\(|\))', text)
    for token in tokens:
        if token == '"':
            quoted = not quoted
        elif not quoted and token == "(":
            depth += 1
        elif not quoted and token == ")":
            depth -= 1
        if not quoted and depth == 0 and re.fullmatch(r"\s+AND\s+", token or ""):
            parts.append(current.strip())
            current = ""
        else:
            current += token or ""
    parts.append(current.strip())
    return parts


def field(entry: dict[str, Any], path: str) -> Any:
    value: Any = entry
    for part in re.findall(r'"[^"]+"|[^.]+', path):
        key = part.strip('"')
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _literal(text: str) -> list[Any]:
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        options = [option.strip() for option in text[1:-1].split(" OR ")]
        return [value for option in options for value in _literal(option)]
    if text.startswith('"') and text.endswith('"'):
        return [text[1:-1]]
    return [float(text)]


def matches(filter_text: str, entry: dict[str, Any]) -> bool:
    for term in _split_and(filter_text):
        parsed = _TERM.match(term)
        assert parsed is not None, f"the evaluator does not know this filter term: {term!r}"
        value = field(entry, parsed["path"])
        wanted = _literal(parsed["value"])
        op = parsed["op"]
        if op == "=":
            ok = any(value == w or (isinstance(w, float) and isinstance(value, int | float) and value == w)
                     for w in wanted)  # fmt: skip
        elif op == ">=":
            ok = isinstance(value, int | float) and value >= wanted[0]
        else:
            raise AssertionError(f"operator {op} is not used by our filters; extend the evaluator first")
        if not ok:
            return False
    return True


def test_the_evaluator_is_honest() -> None:
    entry = {"resource": {"type": "x", "labels": {"service_name": "a"}}, "jsonPayload": {"n": 3, "s": "v"}}
    assert matches('resource.type="x" AND resource.labels.service_name=("a" OR "b")', entry)
    assert not matches('resource.type="x" AND resource.labels.service_name=("b" OR "c")', entry)
    assert matches("jsonPayload.n>=3", entry)
    assert not matches("jsonPayload.n>=3.5", entry)
    assert not matches('jsonPayload.missing="v"', entry)
    assert matches('jsonPayload.s="v" AND jsonPayload.n>=0.2', entry)
    with pytest.raises(AssertionError, match="does not know"):
        matches("jsonPayload.s:v", entry)


# ---------------------------------------------------------------- real lines


def log_entry(line: dict[str, Any]) -> dict[str, Any]:
    """The LogEntry Cloud Logging builds from one JSON line of a Cloud Run revision."""
    payload = {k: v for k, v in line.items() if k not in ("severity", "logging.googleapis.com/labels")}
    return {
        "resource": {"type": "cloud_run_revision", "labels": {"service_name": SERVICE, "location": "europe-west1"}},
        "severity": line.get("severity"),
        "labels": line.get("logging.googleapis.com/labels", {}),
        "jsonPayload": payload,
    }


@pytest.fixture(scope="module")
def entries(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as simulator:
        lines = function_log_lines(tmp_path_factory.mktemp("monitoring"), simulator)
    return [log_entry(line) for line in lines]


def run_ends(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["jsonPayload"].get("cepsync_event") == RUN_END_EVENT]


def retries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["jsonPayload"].get("message") == "batch_request_retry"]


def test_the_test_run_wrote_run_ends_and_a_retry(entries: list[dict[str, Any]]) -> None:
    assert [e["jsonPayload"]["run"]["status"] for e in run_ends(entries)] == ["succeeded_with_rejections", "auth_error"]
    assert len(retries(entries)) == 1
    assert retries(entries)[0]["jsonPayload"]["status"] == 503


def test_run_metrics_match_exactly_the_run_end_lines(terraform: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    filters = metric_filters(terraform)
    run_metrics = ["cepsync_runs", *terraform["locals"]["run_value_metrics"]]
    assert set(run_metrics) | {"cepsync_runs_over_rejected_share", "cepsync_batch_retries"} == set(filters)
    for name in run_metrics:
        matched = [e for e in entries if matches(filters[name], e)]
        assert matched == run_ends(entries), name


def test_the_retry_metric_matches_the_retry_lines_only(
    terraform: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    matched = [e for e in entries if matches(metric_filters(terraform)["cepsync_batch_retries"], e)]
    assert matched == retries(entries)


def test_the_rejected_share_metric_follows_its_threshold(
    terraform: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    # The first run rejected 5 of 300 rows (1.67 %); the second 4 of 300 (1.33 %).
    default = metric_filters(terraform)["cepsync_runs_over_rejected_share"]
    assert not any(matches(default, e) for e in entries)  # 20 % by default
    low = metric_filters(terraform, {"alert_rejected_share": 0.015})["cepsync_runs_over_rejected_share"]
    assert [e["jsonPayload"]["run"]["status"] for e in entries if matches(low, e)] == ["succeeded_with_rejections"]


def test_a_line_from_another_service_or_event_is_not_counted(
    terraform: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    entry = run_ends(entries)[0]
    elsewhere = {**entry, "resource": {"type": "cloud_run_revision", "labels": {"service_name": "other"}}}
    older = {**entry, "jsonPayload": {**entry["jsonPayload"], "cepsync_event": "run_end.v0"}}
    runs = metric_filters(terraform)["cepsync_runs"]
    assert matches(runs, entry)
    assert not matches(runs, elsewhere)
    assert not matches(runs, older)


def _extracted(expression: str) -> str:
    match = re.fullmatch(r"EXTRACT\((?P<path>[\w.]+)\)", expression)
    assert match is not None, expression
    return match["path"]


def test_label_and_value_extractors_read_fields_the_lines_have(
    terraform: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    for (rtype, name), body in terraform["resources"].items():
        if rtype != "google_logging_metric":
            continue
        lines = retries(entries) if name == "batch_retries" else run_ends(entries)
        declared = {label["key"] for label in body["metric_descriptor"][0].get("labels", [])}
        assert set(body["label_extractors"]) == declared, name
        for label, expression in body["label_extractors"].items():
            for entry in lines:
                assert field(entry, _extracted(expression)) not in (None, ""), (name, label)
        if "value_extractor" in body:
            assert body["value_extractor"] == "EXTRACT(${each.value.field})", name
            for metric, spec in terraform["locals"]["run_value_metrics"].items():
                for entry in lines:
                    assert isinstance(field(entry, spec["field"]), int | float), (metric, spec["field"])


def test_alert_policies_reference_the_metrics_and_the_channels(terraform: dict[str, Any]) -> None:
    names = set(metric_filters(terraform))
    policies = {name: body for (rtype, name), body in terraform["resources"].items()
                if rtype == "google_monitoring_alert_policy"}  # fmt: skip
    assert set(policies) == {"failed_twice", "no_success", "rejected_share"}
    for name, policy in policies.items():
        assert policy["notification_channels"] == "${var.notification_channels}", name
        text = json.dumps(policy["conditions"])
        promql = set(re.findall(r"logging_googleapis_com:user_(\w+)", text))
        direct = set(re.findall(r"logging\.googleapis\.com/user/\$\{google_logging_metric\.(\w+)\.name\}", text))
        referenced = promql | {terraform["resources"][("google_logging_metric", d)]["name"] for d in direct}
        assert referenced, name
        assert referenced <= names, (name, referenced - names)
    twice = policies["failed_twice"]["conditions"][0]["condition_prometheus_query_language"][0]["query"]
    assert 'user_cepsync_runs{outcome="failure"}' in twice
    assert 'user_cepsync_runs{outcome="success"}' in twice
    assert ">= 2" in twice


def test_the_dashboard_charts_every_metric_per_activation(terraform: dict[str, Any]) -> None:
    dashboard = json.loads((INFRA / "dashboard.json").read_text(encoding="utf-8"))
    charted = set()
    for tile in dashboard["mosaicLayout"]["tiles"]:
        for data_set in tile["widget"]["xyChart"]["dataSets"]:
            query = data_set["timeSeriesQuery"]["timeSeriesFilter"]
            metric = re.search(r'metric\.type="logging\.googleapis\.com/user/(\w+)"', query["filter"])
            assert metric is not None, query["filter"]
            charted.add(metric.group(1))
            assert "metric.label.activation" in query["aggregation"]["groupByFields"]
    assert charted == set(metric_filters(terraform))
    assert dashboard["dashboardFilters"][0]["labelKey"] == "activation"
