# One Cloud Scheduler job per activation file that has a `schedule` (see
# local.scheduled_activations in main.tf): the activation YAML is the single source of
# truth for cron and time zone. Adding, removing or rescheduling an activation is a
# YAML change followed by `make package` and `terraform apply`.

resource "google_cloud_scheduler_job" "activation" {
  for_each = local.pubsub_scheduled_activations

  project     = var.project_id
  region      = var.region
  name        = "${var.name_prefix}-${each.key}"
  description = "cepsync: run activation ${each.key} (from its activation file)."
  schedule    = each.value.cron
  time_zone   = each.value.time_zone

  pubsub_target {
    topic_name = google_pubsub_topic.sync.id
    data       = base64encode(jsonencode({ activation = each.key }))
    attributes = {
      activation = each.key
      origin     = "scheduler"
    }
  }

  # Publishing is cheap and idempotent downstream (the lease drops a duplicate run),
  # so retry a failed publish a few times rather than skip a scheduled run.
  retry_config {
    retry_count          = 3
    min_backoff_duration = "10s"
    max_backoff_duration = "300s"
  }

  lifecycle {
    precondition {
      # The rules of sync.config.ScheduleConfig, as far as Terraform can check them (schedule_checks.tf).
      condition     = length(local.schedule_problems[each.key]) == 0
      error_message = "Activation ${each.key}: ${join("; ", local.schedule_problems[each.key])}."
    }
  }

  depends_on = [google_project_service.required]
}

# Optional: activations routed to the HTTP function (enable_http_trigger and
# http_trigger_activations). Scheduler signs each call with an OIDC token of the
# invoker identity; the audience is the function URL.
resource "google_cloud_scheduler_job" "activation_http" {
  for_each = local.http_scheduled_activations

  project     = var.project_id
  region      = var.region
  name        = "${var.name_prefix}-${each.key}-http"
  description = "cepsync: run activation ${each.key} through the HTTP function (from its activation file)."
  schedule    = each.value.cron
  time_zone   = each.value.time_zone
  # Cloud Scheduler waits at most 30 minutes for an HTTP target. A longer run keeps
  # going (up to http_timeout_seconds) but the attempt is logged as DEADLINE_EXCEEDED.
  attempt_deadline = "1800s"

  http_target {
    http_method = "POST"
    uri         = google_cloudfunctions2_function.sync_http[0].service_config[0].uri
    body        = base64encode(jsonencode({ activation = each.key }))
    headers = {
      "Content-Type" = "application/json"
    }

    oidc_token {
      service_account_email = google_service_account.invoker.email
      audience              = google_cloudfunctions2_function.sync_http[0].service_config[0].uri
    }
  }

  # A retried HTTP call after a deadline would only meet the lease of the run still in
  # progress; the next schedule (or a continuation) picks up instead.
  retry_config {
    retry_count = 0
  }

  lifecycle {
    precondition {
      # The rules of sync.config.ScheduleConfig, as far as Terraform can check them (schedule_checks.tf).
      condition     = length(local.schedule_problems[each.key]) == 0
      error_message = "Activation ${each.key}: ${join("; ", local.schedule_problems[each.key])}."
    }
  }

  depends_on = [google_cloud_run_v2_service_iam_member.invoker_sync_http]
}
