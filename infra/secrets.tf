# The two Batch secrets. Terraform creates the secrets only: their VALUES are added
# with `gcloud secrets versions add` (README: "Add the secret versions"), so they never
# pass through Terraform variables, plan files or state. The function reads the pinned
# versions rest_api_key_secret_version / project_key_secret_version.

resource "google_secret_manager_secret" "rest_api_key" {
  project   = var.project_id
  secret_id = "${var.name_prefix}-batch-rest-api-key"

  replication {
    dynamic "auto" {
      for_each = length(var.secret_replica_locations) == 0 ? [true] : []
      content {}
    }
    dynamic "user_managed" {
      for_each = length(var.secret_replica_locations) > 0 ? [true] : []
      content {
        dynamic "replicas" {
          for_each = var.secret_replica_locations
          content {
            location = replicas.value
          }
        }
      }
    }
  }

  depends_on = [google_project_service.required]
}

resource "google_secret_manager_secret" "project_key" {
  project   = var.project_id
  secret_id = "${var.name_prefix}-batch-project-key"

  replication {
    dynamic "auto" {
      for_each = length(var.secret_replica_locations) == 0 ? [true] : []
      content {}
    }
    dynamic "user_managed" {
      for_each = length(var.secret_replica_locations) > 0 ? [true] : []
      content {
        dynamic "replicas" {
          for_each = var.secret_replica_locations
          content {
            location = replicas.value
          }
        }
      }
    }
  }

  depends_on = [google_project_service.required]
}
