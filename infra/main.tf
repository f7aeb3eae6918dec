# Shared values, the project lookup and the APIs. The other files are split by concern:
# storage.tf (source zip), pubsub.tf (topics), firestore.tf (state), secrets.tf (Batch
# keys), iam.tf (identities and their grants), function.tf, scheduler.tf, monitoring.tf
# (log-based metrics, alerts, dashboard).

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  labels = merge({ app = "cepsync", managed-by = "terraform" }, var.labels)

  # Paths given relative to this directory keep working whatever directory terraform runs from.
  activations_path = startswith(var.activations_dir, "/") ? var.activations_dir : "${path.module}/${var.activations_dir}"
  source_zip_path  = startswith(var.source_zip, "/") ? var.source_zip : "${path.module}/${var.source_zip}"

  # ---- activations: the YAML files are the single source of truth for schedules.
  # Same selection as sync.config.load_activations: *.yaml and *.yml directly in the
  # directory, keyed by the activation `name` (a name used twice fails the plan with
  # "Duplicate object key", as it fails the runtime loader).
  activation_files = fileset(local.activations_path, "*.{yaml,yml}")
  activation_documents = {
    for file_name in local.activation_files :
    file_name => yamldecode(file("${local.activations_path}/${file_name}"))
  }
  activations = {
    for file_name, document in local.activation_documents : document.name => document
  }
  # Files without `schedule` are run by hand or by continuations only. The time zone
  # default is ScheduleConfig.time_zone's default in sync/config.py.
  scheduled_activations = {
    for name, document in local.activations : name => {
      cron      = try(document.schedule.cron, "")
      time_zone = try(document.schedule.time_zone, "Etc/UTC")
    } if try(document.schedule, null) != null
  }
  # Scheduled activations that go through the optional HTTP function instead of Pub/Sub.
  http_scheduled_activations = {
    for name, schedule in local.scheduled_activations : name => schedule
    if var.enable_http_trigger && contains(var.http_trigger_activations, name)
  }
  pubsub_scheduled_activations = {
    for name, schedule in local.scheduled_activations : name => schedule
    if !contains(keys(local.http_scheduled_activations), name)
  }

  function_name        = "${var.name_prefix}-sync"
  http_function_name   = "${var.name_prefix}-sync-http"
  bigquery_job_project = coalesce(var.bigquery_job_project, var.project_id)
  bigquery_datasets = {
    for reference in var.bigquery_datasets : reference => {
      project    = split(".", reference)[0]
      dataset_id = split(".", reference)[1]
    }
  }

  # The Pub/Sub service agent exists once the Pub/Sub API is enabled.
  pubsub_service_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # Settings read by main.py (one settings object at the entry point). The activations
  # directory name is fixed by infra/package.py, which always packs it as `activations/`.
  runtime_environment = {
    CEPSYNC_ACTIVATIONS_DIR    = "activations"
    CEPSYNC_STATE              = "firestore"
    CEPSYNC_FIRESTORE_DATABASE = google_firestore_database.state.name
    CEPSYNC_FIRESTORE_PREFIX   = var.firestore_prefix
    CEPSYNC_CONTINUATION_TOPIC = google_pubsub_topic.sync.id
    # Python 3.8+ runtimes no longer set the project id variable; the clients need it.
    GOOGLE_CLOUD_PROJECT = var.project_id
    # Adds the execution id to every log line, so one run's logs filter together.
    LOG_EXECUTION_ID = "true"
  }

  required_apis = toset([
    "artifactregistry.googleapis.com", # build output of Cloud Functions (2nd gen)
    "bigquery.googleapis.com",
    "bigquerystorage.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudscheduler.googleapis.com",
    "eventarc.googleapis.com",
    "firestore.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com", # alert policies and the dashboard (monitoring.tf)
    "pubsub.googleapis.com",
    "run.googleapis.com", # 2nd gen functions are Cloud Run services
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
  ])
}

resource "google_project_service" "required" {
  for_each = var.enable_apis ? local.required_apis : toset([])

  project = var.project_id
  service = each.value
  # Turning an API off on destroy would break anything else in the project using it.
  disable_on_destroy = false
}
