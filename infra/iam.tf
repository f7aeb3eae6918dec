# Identities and their grants. Three service accounts, each with only what it needs:
#   runtime  - the function's own identity: reads segments, keeps state, reads the two
#              secrets, publishes continuations.
#   invoker  - Eventarc's push identity (and Cloud Scheduler's OIDC identity for the
#              optional HTTP function): may invoke the functions, nothing else.
#   build    - Cloud Build's identity for building the function image.
# No primitive role (owner/editor/viewer) appears anywhere.

resource "google_service_account" "runtime" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-runtime"
  display_name = "cepsync sync function runtime"
  description  = "Runs the cepsync functions: BigQuery read, Firestore state, Batch secrets, continuation publish."

  depends_on = [google_project_service.required]
}

resource "google_service_account" "invoker" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-invoker"
  display_name = "cepsync trigger and scheduler invoker"
  description  = "Identity of the Eventarc trigger and of Cloud Scheduler OIDC calls: invokes the cepsync functions only."

  depends_on = [google_project_service.required]
}

resource "google_service_account" "build" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-build"
  display_name = "cepsync function build"
  description  = "Cloud Build identity for building the cepsync function images."

  depends_on = [google_project_service.required]
}

# ---------------------------------------------------------------- runtime: BigQuery

resource "google_project_iam_member" "runtime_bigquery_job_user" {
  project = local.bigquery_job_project
  role    = "roles/bigquery.jobUser"
  member  = "serviceAccount:${google_service_account.runtime.email}"
}

# Read access on the segment datasets only, never project-wide.
resource "google_bigquery_dataset_iam_member" "runtime_segment_reader" {
  for_each = local.bigquery_datasets

  project    = each.value.project
  dataset_id = each.value.dataset_id
  role       = "roles/bigquery.dataViewer"
  member     = "serviceAccount:${google_service_account.runtime.email}"
}

# Storage Read API sessions are created in the job project.
resource "google_project_iam_member" "runtime_bigquery_read_session" {
  count = var.enable_bigquery_storage_read ? 1 : 0

  project = local.bigquery_job_project
  role    = "roles/bigquery.readSessionUser"
  member  = "serviceAccount:${google_service_account.runtime.email}"
}

# ---------------------------------------------------------------- runtime: Firestore

resource "google_project_iam_member" "runtime_firestore_user" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.runtime.email}"

  # Firestore IAM conditions can name a database: this grant covers the state database
  # only, not other databases of the project.
  condition {
    title       = "cepsync-state-database-only"
    description = "Read/write on the cepsync state database only."
    expression  = "resource.name == \"projects/${var.project_id}/databases/${google_firestore_database.state.name}\""
  }
}

# ---------------------------------------------------------------- runtime: secrets

resource "google_secret_manager_secret_iam_member" "runtime_rest_api_key" {
  project   = var.project_id
  secret_id = google_secret_manager_secret.rest_api_key.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.runtime.email}"
}

resource "google_secret_manager_secret_iam_member" "runtime_project_key" {
  project   = var.project_id
  secret_id = google_secret_manager_secret.project_key.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.runtime.email}"
}

# ---------------------------------------------------------------- runtime: continuations

# A run that reaches its time budget checkpoints and publishes a continuation message
# to the sync topic (CEPSYNC_CONTINUATION_TOPIC): publish on that one topic only.
resource "google_pubsub_topic_iam_member" "runtime_continuation_publisher" {
  project = var.project_id
  topic   = google_pubsub_topic.sync.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.runtime.email}"
}

# ---------------------------------------------------------------- invoker

# Eventarc Pub/Sub triggers push as the trigger identity, which must be allowed to
# receive events and to invoke the Cloud Run service behind the function.
resource "google_project_iam_member" "invoker_event_receiver" {
  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = "serviceAccount:${google_service_account.invoker.email}"
}

resource "google_cloud_run_v2_service_iam_member" "invoker_sync" {
  project  = var.project_id
  location = var.region
  # A 2nd gen function runs as the Cloud Run service of the same name.
  name   = google_cloudfunctions2_function.sync.name
  role   = "roles/run.invoker"
  member = "serviceAccount:${google_service_account.invoker.email}"
}

resource "google_cloud_run_v2_service_iam_member" "invoker_sync_http" {
  count = var.enable_http_trigger ? 1 : 0

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.sync_http[0].name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.invoker.email}"
}

# Authenticated push: Pub/Sub mints the OIDC token of the trigger identity. Projects
# whose Pub/Sub service agent was created on or before 2021-04-08 lack this permission
# by default. Bound on the invoker account only, never project-wide.
resource "google_service_account_iam_member" "pubsub_token_creator" {
  count = var.grant_pubsub_token_creator ? 1 : 0

  service_account_id = google_service_account.invoker.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent

  depends_on = [google_pubsub_topic.sync]
}

# ---------------------------------------------------------------- build

# The minimum documented for a user-specified Cloud Functions build account: write build
# logs, push the image to the gcf-artifacts repository, read the staged source.
resource "google_project_iam_member" "build_log_writer" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_project_iam_member" "build_artifact_writer" {
  project = var.project_id
  role    = "roles/artifactregistry.writer"
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_project_iam_member" "build_source_reader" {
  project = var.project_id
  role    = "roles/storage.objectViewer"
  member  = "serviceAccount:${google_service_account.build.email}"

  # Cloud Functions copies the source into its own staging bucket
  # (gcf-v2-sources-<project number>-<region>) before the build reads it; that bucket
  # does not exist before the first deploy, so it cannot be named as a resource here.
  # The condition keeps the grant to that bucket and ours.
  condition {
    title       = "cepsync-function-sources-only"
    description = "Function source buckets only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/gcf-v2-sources-${data.google_project.this.number}\") || resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.source.name}\")"
  }
}
