# The sync topic (Scheduler jobs, manual runs and continuations publish here; the
# function's Eventarc trigger subscribes) and the dead-letter topic.
#
# Dead letters: the cloudfunctions2 event_trigger has no dead-letter setting. Eventarc
# creates and owns the push subscription (eventarc-<region>-<trigger>-sub-<n>), with a
# 24 h retention and a 10 s..600 s exponential backoff; a dead-letter topic can only be
# set by updating that subscription. Terraform therefore creates the dead-letter topic,
# a hold subscription that keeps dead letters for inspection, and the grant Pub/Sub
# needs to forward into the topic; the output `attach_dead_letter_commands` prints the
# gcloud commands that attach it to the Eventarc subscription (README: "Dead letters").

resource "google_pubsub_topic" "sync" {
  #checkov:skip=CKV_GCP_83:Messages carry only an activation name and a flag (no personal data, no secret); Google-managed encryption is enough.
  name    = "${var.name_prefix}-sync"
  project = var.project_id

  # Topic retention lets an operator replay the last day of run requests with
  # `gcloud pubsub subscriptions seek` after an incident; it matches the 24 h window in
  # which Eventarc retries a failed delivery.
  message_retention_duration = "86400s"

  depends_on = [google_project_service.required]
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Dead letters are copies of run requests (activation name only); Google-managed encryption is enough.
  name    = "${var.name_prefix}-sync-dead-letter"
  project = var.project_id

  depends_on = [google_project_service.required]
}

# Without a subscription, messages forwarded to the dead-letter topic would be dropped.
resource "google_pubsub_subscription" "dead_letter_hold" {
  name    = "${var.name_prefix}-sync-dead-letter-hold"
  project = var.project_id
  topic   = google_pubsub_topic.dead_letter.id

  message_retention_duration = var.dead_letter_retention
  retain_acked_messages      = false
  ack_deadline_seconds       = 60

  # Never expire for inactivity: dead letters are rare, so the hold may see no traffic
  # for longer than the default 31-day expiry.
  expiration_policy {
    ttl = ""
  }
}

# Pub/Sub forwards dead letters as its service agent; it needs publish on that topic.
resource "google_pubsub_topic_iam_member" "dead_letter_forwarding" {
  project = var.project_id
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_service_agent

  # The agent is provisioned with the Pub/Sub API; the first topic makes sure it exists.
  depends_on = [google_pubsub_topic.sync]
}
