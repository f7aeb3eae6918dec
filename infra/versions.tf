terraform {
  # 1.5 is the oldest release with every feature used here (preconditions, optional
  # object attributes, the `startswith` function); newer 1.x releases work unchanged.
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 7.x is the current major line. Every resource here is GA, so google-beta is
      # not needed. `~> 7.0` takes minor/patch fixes and refuses the next breaking major.
      version = "~> 7.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region

  default_labels = local.labels
}
