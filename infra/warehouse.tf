# ---------------------------------------------------------------- warehouse diff state (optional)
#
# Activations with `diff: {mode: warehouse, dataset: ...}` keep their acknowledged
# fingerprints in BigQuery (sync/warehouse/store.py): three tables the function creates
# itself. The dataset is made here, in the segments' location (a query cannot join tables
# of two locations), with no default table expiration: an expired fingerprint table would
# make the next run re-send every profile.

resource "google_bigquery_dataset" "warehouse_state" {
  count = var.warehouse_state_dataset == null ? 0 : 1
  #checkov:skip=CKV_GCP_81:Holds only Custom IDs and 64-bit hashes (no profile values); Google-managed encryption is enough, like the segment datasets it mirrors.

  project     = var.project_id
  dataset_id  = var.warehouse_state_dataset
  location    = var.warehouse_state_location
  description = "cepsync warehouse-diff state: acknowledged fingerprints, their journal and the merge fence."
  labels      = merge(local.labels, { component = "warehouse-state" })

  # Never set default_table_expiration_ms / default_partition_expiration_ms here.
  delete_contents_on_destroy = false

  lifecycle {
    precondition {
      condition     = var.warehouse_state_location != null
      error_message = "warehouse_state_dataset needs warehouse_state_location (the segments' location)."
    }
  }

  depends_on = [google_project_service.required]
}

# Read and write on the state dataset only, never project-wide: the journal load jobs, the
# MERGE and DELETE that fold it, and the creation of the three tables.
resource "google_bigquery_dataset_iam_member" "runtime_state_editor" {
  count = var.warehouse_state_dataset == null ? 0 : 1

  project    = var.project_id
  dataset_id = google_bigquery_dataset.warehouse_state[0].dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = "serviceAccount:${google_service_account.runtime.email}"
}
