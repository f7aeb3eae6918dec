# The Pub/Sub-triggered sync function and the optional HTTP one.

resource "google_cloudfunctions2_function" "sync" {
  project     = var.project_id
  name        = local.function_name
  location    = var.region
  description = "cepsync: syncs one activation per Pub/Sub message (BigQuery segment -> Batch profiles)."
  labels      = merge(local.labels, { component = "sync" })

  build_config {
    runtime         = var.runtime
    entry_point     = "pubsub_sync"
    service_account = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email = google_service_account.runtime.email

    min_instance_count = 0
    max_instance_count = var.max_instance_count
    # One run per instance: a run is CPU- and memory-heavy (Arrow batches, fingerprint
    # shards) and budgets its own time, so it must not share an instance. This is NOT
    # what keeps two runs of one activation apart: Pub/Sub redeliveries, overlapping
    # schedules and continuations can still start a second run on another instance.
    # The engine's Firestore lease (expiry + fencing token) makes that second run exit.
    max_instance_request_concurrency = 1

    available_memory = var.available_memory
    available_cpu    = var.available_cpu
    timeout_seconds  = var.timeout_seconds

    # Pub/Sub pushes through Eventarc, which counts as internal traffic; nothing else
    # needs to reach the function.
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true

    environment_variables = merge(local.runtime_environment, {
      CEPSYNC_TIME_BUDGET_SECONDS   = tostring(var.time_budget_seconds)
      CEPSYNC_MAX_DELIVERY_ATTEMPTS = tostring(var.max_delivery_attempts)
    })

    # Pinned versions, never "latest": every instance of a deploy uses the same key.
    secret_environment_variables {
      key        = var.rest_api_key_env
      project_id = var.project_id
      secret     = google_secret_manager_secret.rest_api_key.secret_id
      version    = var.rest_api_key_secret_version
    }

    secret_environment_variables {
      key        = var.project_key_env
      project_id = var.project_id
      secret     = google_secret_manager_secret.project_key.secret_id
      version    = var.project_key_secret_version
    }
  }

  event_trigger {
    trigger_region = var.region
    event_type     = "google.cloud.pubsub.topic.v1.messagePublished"
    pubsub_topic   = google_pubsub_topic.sync.id
    # At-least-once: a run that fails transiently (BigQuery 5xx, Batch outage beyond the
    # client's retries, instance crash) is redelivered with backoff for up to 24 h. The
    # engine's lease, journal and acknowledged-only fingerprints make a redelivery safe.
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.invoker.email
  }

  lifecycle {
    precondition {
      condition     = var.time_budget_seconds < var.timeout_seconds
      error_message = "time_budget_seconds must be below timeout_seconds: the run must hand over before the platform kills it."
    }
    precondition {
      condition     = var.enable_http_trigger || length(var.http_trigger_activations) == 0
      error_message = "http_trigger_activations is set but enable_http_trigger is false: those activations would silently stay on Pub/Sub."
    }
    precondition {
      condition     = length(setsubtract(var.http_trigger_activations, keys(local.scheduled_activations))) == 0
      error_message = "http_trigger_activations names activations without a schedule in activations_dir: ${join(", ", setsubtract(var.http_trigger_activations, keys(local.scheduled_activations)))}."
    }
  }

  depends_on = [
    google_project_service.required,
    # The deploy checks that the runtime identity can read the pinned secret versions.
    google_secret_manager_secret_iam_member.runtime_rest_api_key,
    google_secret_manager_secret_iam_member.runtime_project_key,
    google_project_iam_member.invoker_event_receiver,
    google_service_account_iam_member.pubsub_token_creator,
    google_project_iam_member.build_log_writer,
    google_project_iam_member.build_artifact_writer,
    google_project_iam_member.build_source_reader,
  ]
}

# Optional: the HTTP entry point for runs that need the 60-minute HTTP limit. Cloud
# Scheduler calls it with an OIDC token of the invoker identity (scheduler.tf); its
# continuations still go through the sync topic.
resource "google_cloudfunctions2_function" "sync_http" {
  count = var.enable_http_trigger ? 1 : 0

  project     = var.project_id
  name        = local.http_function_name
  location    = var.region
  description = "cepsync: HTTP entry point (OIDC only) for long runs; same code as the Pub/Sub function."
  labels      = merge(local.labels, { component = "sync-http" })

  build_config {
    runtime         = var.runtime
    entry_point     = "http_sync"
    service_account = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email = google_service_account.runtime.email

    min_instance_count = 0
    max_instance_count = var.max_instance_count
    # Same reasoning as the event function: one run per instance; overlap safety is
    # the engine's lease.
    max_instance_request_concurrency = 1

    available_memory = var.available_memory
    available_cpu    = var.available_cpu
    timeout_seconds  = var.http_timeout_seconds

    # Cloud Scheduler requests count as internal for Cloud Run ingress in the same
    # project; no public ingress and no allUsers binding.
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true

    environment_variables = merge(local.runtime_environment, {
      CEPSYNC_TIME_BUDGET_SECONDS = tostring(var.http_time_budget_seconds)
    })

    secret_environment_variables {
      key        = var.rest_api_key_env
      project_id = var.project_id
      secret     = google_secret_manager_secret.rest_api_key.secret_id
      version    = var.rest_api_key_secret_version
    }

    secret_environment_variables {
      key        = var.project_key_env
      project_id = var.project_id
      secret     = google_secret_manager_secret.project_key.secret_id
      version    = var.project_key_secret_version
    }
  }

  lifecycle {
    precondition {
      condition     = var.http_time_budget_seconds < var.http_timeout_seconds
      error_message = "http_time_budget_seconds must be below http_timeout_seconds."
    }
  }

  depends_on = [
    google_project_service.required,
    google_secret_manager_secret_iam_member.runtime_rest_api_key,
    google_secret_manager_secret_iam_member.runtime_project_key,
    google_project_iam_member.build_log_writer,
    google_project_iam_member.build_artifact_writer,
    google_project_iam_member.build_source_reader,
  ]
}
