# The bucket that holds the function source zip built by `make package`.

resource "google_storage_bucket" "source" {
  #checkov:skip=CKV_GCP_62:Holds only build artifacts (the source zip); reads and writes are already in Cloud Audit Logs, and a usage-log bucket would need its own log bucket (the same finding again).
  name     = coalesce(var.source_bucket_name, "${var.project_id}-${var.name_prefix}-source")
  project  = var.project_id
  location = var.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # Keep the bucket (and the history it holds) when the stack is destroyed by mistake.
  force_destroy = false

  versioning {
    enabled = true
  }

  # Each deploy uploads a new object (its name carries the zip's hash) and Terraform
  # deletes the previous one, which versioning keeps as a noncurrent version: that is
  # the rollback window. Noncurrent versions go after 30 days; the live object never
  # expires (a redeploy with unchanged source still needs it).
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.required]
}

resource "google_storage_bucket_object" "source" {
  # The object name carries the zip's MD5, so a changed package is a new object and the
  # function redeploys; an unchanged one (package.py builds byte-identical zips) does not.
  name   = "function-source-${filemd5(local.source_zip_path)}.zip"
  bucket = google_storage_bucket.source.name
  source = local.source_zip_path
}
