# ---------------------------------------------------------------- results tables (optional)
#
# Activations with `results: {dataset: ...}` write one row per run to `cepsync_runs` and one
# row per rejected profile to `cepsync_rejections` with load jobs (docs/results.md). The
# function creates the two tables itself (partitioned by day on the run's start, clustered
# by activation); the dataset is made here. Rejections name Custom IDs, and the rejected
# values too for an activation that sets `results.include_values`: partitions expire after
# `results_retention_days` (null keeps them).

resource "google_bigquery_dataset" "results" {
  count = var.results_dataset == null ? 0 : 1
  #checkov:skip=CKV_GCP_81:Run facts and Custom IDs of the sync's own rejections, kept for results_retention_days; Google-managed encryption at rest, like the warehouse state dataset.

  project     = var.project_id
  dataset_id  = var.results_dataset
  location    = var.results_location
  description = "cepsync results: one row per run (cepsync_runs) and per rejected profile (cepsync_rejections)."
  labels      = merge(local.labels, { component = "results" })

  default_partition_expiration_ms = var.results_retention_days == null ? null : var.results_retention_days * 86400000
  delete_contents_on_destroy      = false

  lifecycle {
    precondition {
      condition     = var.results_location != null
      error_message = "results_dataset needs results_location (EU, US or a region)."
    }
  }

  depends_on = [google_project_service.required]
}

# Write on the results dataset only, never project-wide: the two tables' creation and the
# load jobs that append to them (the jobs themselves run under roles/bigquery.jobUser).
resource "google_bigquery_dataset_iam_member" "runtime_results_editor" {
  count = var.results_dataset == null ? 0 : 1

  project    = var.project_id
  dataset_id = google_bigquery_dataset.results[0].dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = "serviceAccount:${google_service_account.runtime.email}"
}
