# Metrics, alerts and a dashboard from the run-end log line (docs/run-end-log.md).
#
# The function writes one JSON line per finished run, recognised by
# jsonPayload.cepsync_event = "run_end.v1", with its fields under jsonPayload.run
# (sync/runlog.py). Log-based metrics turn those lines into time series labelled by
# activation; the Batch client's retry lines (jsonPayload.message = "batch_request_retry")
# give the 429/5xx retries. tests/infra/test_monitoring.py evaluates every filter below
# against lines a real function run wrote, so a renamed field fails a test, not production.
#
# Metric names are fixed (not prefixed): one cepsync deployment per project is monitored.

locals {
  # Cloud Functions (2nd gen) log as Cloud Run revisions of the function's service.
  function_log_filter = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=(\"${local.function_name}\" OR \"${local.http_function_name}\")"
  run_end_filter      = "${local.function_log_filter} AND jsonPayload.cepsync_event=\"run_end.v1\""

  # Value metrics: a distribution of one numeric field of the run-end line per run.
  run_value_metrics = {
    cepsync_profiles_sent = {
      field       = "jsonPayload.run.profiles.sent"
      unit        = "1"
      description = "Profiles sent to Batch per run."
    }
    cepsync_profiles_rejected = {
      field       = "jsonPayload.run.profiles.rejected"
      unit        = "1"
      description = "Rows rejected before sending (reason codes) per run."
    }
    cepsync_profiles_rejected_by_batch = {
      field       = "jsonPayload.run.profiles.rejected_by_batch"
      unit        = "1"
      description = "Profiles Batch refused (partial errors) per run."
    }
    cepsync_profiles_removed = {
      field       = "jsonPayload.run.profiles.removed"
      unit        = "1"
      description = "Profiles cleared because they left the segment (mirror) per run."
    }
    cepsync_run_duration = {
      field       = "jsonPayload.run.duration_seconds"
      unit        = "s"
      description = "Wall time of a run, in seconds."
    }
  }

  # Windows of the alerts: two scheduled runs (plus slack for a slow run), and N periods.
  two_runs_window_seconds   = 2 * var.alert_run_period_seconds + 600
  no_success_window_seconds = var.alert_missed_periods * var.alert_run_period_seconds
}

# ---------------------------------------------------------------- log-based metrics

resource "google_logging_metric" "runs" {
  project     = var.project_id
  name        = "cepsync_runs"
  description = "cepsync runs that ended, by activation, status and outcome (success, failure, other)."
  filter      = local.run_end_filter

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
    labels {
      key         = "activation"
      value_type  = "STRING"
      description = "Activation name."
    }
    labels {
      key         = "status"
      value_type  = "STRING"
      description = "Run status (succeeded, partial, aborted_by_guard, ...)."
    }
    labels {
      key         = "outcome"
      value_type  = "STRING"
      description = "success, failure or other."
    }
  }
  label_extractors = {
    activation = "EXTRACT(jsonPayload.run.activation)"
    status     = "EXTRACT(jsonPayload.run.status)"
    outcome    = "EXTRACT(jsonPayload.run.outcome)"
  }

  depends_on = [google_project_service.required]
}

resource "google_logging_metric" "run_values" {
  for_each = local.run_value_metrics

  project         = var.project_id
  name            = each.key
  description     = each.value.description
  filter          = local.run_end_filter
  value_extractor = "EXTRACT(${each.value.field})"

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "DISTRIBUTION"
    unit        = each.value.unit
    labels {
      key         = "activation"
      value_type  = "STRING"
      description = "Activation name."
    }
  }
  label_extractors = {
    activation = "EXTRACT(jsonPayload.run.activation)"
  }
  bucket_options {
    # 0, 1, 2, 4 ... 2^30: from one profile (or second) to a billion.
    exponential_buckets {
      num_finite_buckets = 32
      growth_factor      = 2
      scale              = 1
    }
  }

  depends_on = [google_project_service.required]
}

resource "google_logging_metric" "runs_over_rejected_share" {
  project     = var.project_id
  name        = "cepsync_runs_over_rejected_share"
  description = "Runs that rejected at least alert_rejected_share of their rows (ours and Batch's refusals)."
  filter      = "${local.run_end_filter} AND jsonPayload.run.rejected_share>=${var.alert_rejected_share}"

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
    labels {
      key         = "activation"
      value_type  = "STRING"
      description = "Activation name."
    }
  }
  label_extractors = {
    activation = "EXTRACT(jsonPayload.run.activation)"
  }

  depends_on = [google_project_service.required]
}

resource "google_logging_metric" "batch_retries" {
  project     = var.project_id
  name        = "cepsync_batch_retries"
  description = "Requests to Batch retried after a 429, a 5xx or a transport error, by activation and HTTP status."
  filter      = "${local.function_log_filter} AND jsonPayload.message=\"batch_request_retry\""

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
    labels {
      key         = "activation"
      value_type  = "STRING"
      description = "Activation name."
    }
    labels {
      key         = "status"
      value_type  = "STRING"
      description = "HTTP status Batch answered (empty for a transport error)."
    }
  }
  label_extractors = {
    activation = "EXTRACT(jsonPayload.activation)"
    status     = "EXTRACT(jsonPayload.status)"
  }

  depends_on = [google_project_service.required]
}

# ---------------------------------------------------------------- alert policies

resource "google_monitoring_alert_policy" "failed_twice" {
  project               = var.project_id
  display_name          = "${var.name_prefix}: an activation failed twice in a row"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.notification_channels

  conditions {
    display_name = "two failed runs and no success in two run periods"
    condition_prometheus_query_language {
      # Scheduled runs come one per period: two failures and no success within two periods
      # (plus slack) are two failures in a row. Failures include guard stops (they need a person).
      query               = <<-EOT
        sum by (activation) (increase(logging_googleapis_com:user_cepsync_runs{outcome="failure"}[${local.two_runs_window_seconds}s])) >= 2
        unless on (activation)
        sum by (activation) (increase(logging_googleapis_com:user_cepsync_runs{outcome="success"}[${local.two_runs_window_seconds}s])) > 0
      EOT
      duration            = "0s"
      evaluation_interval = "60s"
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "An activation's last two runs failed or were stopped by a guard. Run `cepsync history NAME --state firestore://...` or `cepsync report NAME` for the errors, and the Error Reporting page for grouped failures."
  }
  alert_strategy {
    auto_close = "86400s"
  }

  depends_on = [google_logging_metric.runs]
}

resource "google_monitoring_alert_policy" "no_success" {
  project               = var.project_id
  display_name          = "${var.name_prefix}: no successful run for ${var.alert_missed_periods} periods"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.notification_channels

  conditions {
    display_name = "an activation ran but never succeeded"
    condition_prometheus_query_language {
      query               = <<-EOT
        sum by (activation) (increase(logging_googleapis_com:user_cepsync_runs[${local.no_success_window_seconds}s])) > 0
        unless on (activation)
        sum by (activation) (increase(logging_googleapis_com:user_cepsync_runs{outcome="success"}[${local.no_success_window_seconds}s])) > 0
      EOT
      duration            = "0s"
      evaluation_interval = "300s"
    }
  }
  conditions {
    display_name = "no run succeeded at all (the sync has stopped)"
    condition_prometheus_query_language {
      query               = "absent_over_time(logging_googleapis_com:user_cepsync_runs{outcome=\"success\"}[${local.no_success_window_seconds}s])"
      duration            = "0s"
      evaluation_interval = "300s"
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "No run succeeded within ${var.alert_missed_periods} run periods: the scheduler, the function or Batch may be down, or every run fails. Check the function's logs and `cepsync report NAME`."
  }
  alert_strategy {
    auto_close = "86400s"
  }

  depends_on = [google_logging_metric.runs]
}

resource "google_monitoring_alert_policy" "rejected_share" {
  project               = var.project_id
  display_name          = "${var.name_prefix}: a run rejected over ${var.alert_rejected_share * 100} % of its rows"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.notification_channels

  conditions {
    display_name = "runs over the rejected-row share"
    condition_threshold {
      filter          = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.runs_over_rejected_share.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["metric.label.activation"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "A run rejected a large share of its rows: often an upstream schema change (a renamed column, a new format). `cepsync report NAME` groups the rejected rows by reason code, with samples."
  }
  alert_strategy {
    auto_close = "86400s"
  }
}

# ---------------------------------------------------------------- dashboard

resource "google_monitoring_dashboard" "runs" {
  project        = var.project_id
  dashboard_json = file("${path.module}/dashboard.json")

  depends_on = [google_logging_metric.runs, google_logging_metric.run_values, google_logging_metric.batch_retries]
}
