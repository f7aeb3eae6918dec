# The state database: leases, run records, checkpoints and packed fingerprint shards.

resource "google_firestore_database" "state" {
  project     = var.project_id
  name        = var.firestore_database_name
  location_id = var.firestore_location
  type        = "FIRESTORE_NATIVE"

  concurrency_mode            = "OPTIMISTIC"
  app_engine_integration_mode = "DISABLED"
  point_in_time_recovery_enablement = (
    var.firestore_point_in_time_recovery ? "POINT_IN_TIME_RECOVERY_ENABLED" : "POINT_IN_TIME_RECOVERY_DISABLED"
  )

  # The fingerprints are what make delta runs correct: losing them means a full resend
  # (and, in mirror mode, forgetting what may be cleared). Deleting the database takes
  # two deliberate steps: turn protection off, then destroy with deletion_policy DELETE.
  delete_protection_state = "DELETE_PROTECTION_ENABLED"
  deletion_policy         = "ABANDON"

  depends_on = [google_project_service.required]
}

# Single-field index exemptions: the same list as sync.state.firestore.index_exemptions()
# (tests/infra/test_terraform.py compares the two). Firestore indexes every field by
# default and indexes a bytes or string value up to its first 1,500 bytes: for the
# packed fingerprint blobs and the JSON fields that is pure write cost (index entries,
# index storage, slower commits) for fields that are never queried. An exemption on a
# collection id covers every collection with that id, at any depth, so one exemption
# serves every activation.
locals {
  firestore_index_exemptions = {
    for exemption in [
      { collection = "fp_shards", field = "blob" },
      { collection = "fp_journal", field = "blob" },
      { collection = "intent_shards", field = "blob" },
      { collection = "intent_journal", field = "blob" },
      { collection = "member_shards", field = "blob" },
      { collection = "member_journal", field = "blob" },
      { collection = "member_intent_shards", field = "blob" },
      { collection = "member_intent_journal", field = "blob" },
      { collection = "${var.firestore_prefix}_activations", field = "meta_json" },
      { collection = "${var.firestore_prefix}_runs", field = "record_json" },
    ] : "${exemption.collection}/${exemption.field}" => exemption
  }
}

resource "google_firestore_field" "index_exemption" {
  for_each = local.firestore_index_exemptions

  project    = var.project_id
  database   = google_firestore_database.state.name
  collection = each.value.collection
  field      = each.value.field

  # An empty index_config disables every single-field index on the field.
  index_config {}
}

# Delivery counts (the function's bound on Pub/Sub redeliveries, see README "bounded
# redeliveries"): Firestore deletes a count once its expire_at has passed, 31 days after the
# message's last delivery, longer than Pub/Sub keeps any message.
resource "google_firestore_field" "delivery_ttl" {
  project    = var.project_id
  database   = google_firestore_database.state.name
  collection = "${var.firestore_prefix}_deliveries"
  field      = "expire_at"

  ttl_config {}
}
