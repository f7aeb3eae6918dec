output "function_name" {
  description = "Name of the Pub/Sub-triggered function (also its Cloud Run service name, used in log filters)."
  value       = google_cloudfunctions2_function.sync.name
}

output "function_region" {
  description = "Region of the functions and Scheduler jobs."
  value       = var.region
}

output "sync_topic" {
  description = "Full name of the sync topic: publish {\"activation\": NAME} here to run an activation by hand."
  value       = google_pubsub_topic.sync.id
}

output "manual_run_command" {
  description = "Command that starts one run of an activation (replace NAME)."
  value       = "gcloud pubsub topics publish ${google_pubsub_topic.sync.id} --message='{\"activation\":\"NAME\"}'"
}

output "dead_letter_topic" {
  description = "Full name of the dead-letter topic."
  value       = google_pubsub_topic.dead_letter.id
}

output "dead_letter_subscription" {
  description = "Subscription holding dead letters for inspection (gcloud pubsub subscriptions pull --auto-ack)."
  value       = google_pubsub_subscription.dead_letter_hold.id
}

output "eventarc_trigger" {
  description = "Eventarc trigger created for the function; its transport subscription is where the dead-letter policy goes."
  value       = google_cloudfunctions2_function.sync.event_trigger[0].trigger
}

output "attach_dead_letter_commands" {
  description = "One-time commands (re-run after a change recreates the trigger) that attach the dead-letter topic to the Eventarc subscription."
  value       = <<-EOT
    SUBSCRIPTION="$(gcloud eventarc triggers describe ${google_cloudfunctions2_function.sync.event_trigger[0].trigger} --format='value(transport.pubsub.subscription)')"
    gcloud pubsub subscriptions update "$SUBSCRIPTION" --dead-letter-topic=${google_pubsub_topic.dead_letter.id} --max-delivery-attempts=${var.dead_letter_max_delivery_attempts}
    gcloud pubsub subscriptions add-iam-policy-binding "$SUBSCRIPTION" --member=${local.pubsub_service_agent} --role=roles/pubsub.subscriber
  EOT
}

output "runtime_service_account" {
  description = "Email of the functions' runtime identity."
  value       = google_service_account.runtime.email
}

output "invoker_service_account" {
  description = "Email of the Eventarc trigger / Cloud Scheduler OIDC identity."
  value       = google_service_account.invoker.email
}

output "firestore_database" {
  description = "Firestore database id holding the state (pass it to `cepsync history --state firestore`)."
  value       = google_firestore_database.state.name
}

output "firestore_prefix" {
  description = "Collection prefix of the state documents."
  value       = var.firestore_prefix
}

output "secret_ids" {
  description = "Secret Manager secret ids to add versions to (gcloud secrets versions add ID --data-file=-)."
  value = {
    rest_api_key = google_secret_manager_secret.rest_api_key.secret_id
    project_key  = google_secret_manager_secret.project_key.secret_id
  }
}

output "source_bucket" {
  description = "Bucket holding the function source zips."
  value       = google_storage_bucket.source.name
}

output "scheduler_jobs" {
  description = "Scheduler job per scheduled activation: activation name -> job name."
  value = merge(
    { for name, job in google_cloud_scheduler_job.activation : name => job.name },
    { for name, job in google_cloud_scheduler_job.activation_http : name => job.name },
  )
}

output "unscheduled_activations" {
  description = "Activations found in activations_dir without a schedule (run by hand only)."
  value       = sort(tolist(setsubtract(keys(local.activations), keys(local.scheduled_activations))))
}

output "http_function_uri" {
  description = "URL of the optional HTTP function (null when enable_http_trigger is false); calls need an OIDC token of the invoker identity."
  value       = var.enable_http_trigger ? google_cloudfunctions2_function.sync_http[0].service_config[0].uri : null
}

output "history_command" {
  description = "Command that lists an activation's recent runs from the deployed state (replace NAME; needs Application Default Credentials with datastore read access)."
  value       = "cepsync history NAME --state 'firestore://${var.project_id}/${google_firestore_database.state.name}?prefix=${var.firestore_prefix}'"
}

output "logs_filter" {
  description = "Logs Explorer filter for the event function's runs."
  value       = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=\"${google_cloudfunctions2_function.sync.name}\""
}

output "results_dataset" {
  description = "The results dataset (project.dataset) to name in activations' results.dataset, or null when none was made."
  value       = var.results_dataset == null ? null : "${var.project_id}.${google_bigquery_dataset.results[0].dataset_id}"
}
