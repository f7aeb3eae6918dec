# Every input of the deployment. Values that can be wrong have a validation so that
# `terraform plan` stops with a readable message instead of a half-applied deploy.

# ---------------------------------------------------------------- project and naming

variable "project_id" {
  description = "Google Cloud project that hosts the function, Pub/Sub, Scheduler, Firestore and the secrets."
  type        = string

  validation {
    # Project ids: 6-30 characters, lowercase letters, digits and hyphens, starting with a letter.
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project id (6-30 characters: a-z, 0-9, -; starts with a letter)."
  }
}

variable "region" {
  description = "Region of the function, its Eventarc trigger, the Scheduler jobs and the source bucket, e.g. europe-west1."
  type        = string

  validation {
    # Region names are <area>-<direction><digit>: europe-west1, us-central1, northamerica-northeast2.
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]{1,2}$", var.region))
    error_message = "region must be a Google Cloud region such as europe-west1 or us-central1 (not a zone, not a multi-region)."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (functions, topics, service accounts, secrets, Scheduler jobs)."
  type        = string
  default     = "cepsync"

  validation {
    # Service account ids stop at 30 characters and the longest suffix added here is
    # "-runtime"; 16 characters leaves room and keeps job and topic names readable.
    condition     = can(regex("^[a-z][a-z0-9-]{1,14}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3-16 characters of a-z, 0-9 and -, starting with a letter and not ending with -."
  }
}

variable "labels" {
  description = "Extra labels put on every labelled resource (the function, topics, bucket, secrets)."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([
      for key, value in var.labels :
      can(regex("^[a-z][a-z0-9_-]{0,62}$", key)) && can(regex("^[a-z0-9_-]{0,63}$", value))
    ])
    error_message = "Label keys must match [a-z][a-z0-9_-]{0,62} and values [a-z0-9_-]{0,63}."
  }
}

variable "enable_apis" {
  description = "Enable the required Google APIs with google_project_service (set false when a platform team manages APIs)."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------- source and activations

variable "source_zip" {
  description = "Path of the function source zip built by `make package` (infra/package.py), relative to this directory or absolute."
  type        = string
  default     = "../dist/function-source.zip"

  validation {
    condition     = endswith(var.source_zip, ".zip")
    error_message = "source_zip must point to the .zip built by `make package`."
  }
}

variable "activations_dir" {
  description = "Directory of activation YAML files, relative to this directory or absolute. Must be the directory packaged into the zip: every file with a `schedule` gets one Cloud Scheduler job."
  type        = string
  default     = "../activations"

  validation {
    condition     = length(trimspace(var.activations_dir)) > 0
    error_message = "activations_dir must not be empty."
  }
}

variable "source_bucket_name" {
  description = "Name of the bucket that stores the function source zip (default: <project_id>-<name_prefix>-source)."
  type        = string
  default     = null

  validation {
    condition     = var.source_bucket_name == null || can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", coalesce(var.source_bucket_name, "x")))
    error_message = "source_bucket_name must be a valid bucket name: 3-63 characters of a-z, 0-9, ., _ and -."
  }
}

# ---------------------------------------------------------------- function sizing

variable "runtime" {
  description = "Cloud Functions Python runtime. python311 matches the interpreter requirements.lock was resolved on."
  type        = string
  default     = "python311"

  validation {
    condition     = contains(["python311", "python312"], var.runtime)
    error_message = "runtime must be python311 or python312 (the versions the lock file is tested on)."
  }
}

variable "max_instance_count" {
  description = "Upper bound on concurrently running instances of the event function (one run per instance)."
  type        = number
  default     = 3

  validation {
    # A small cap bounds the BigQuery and Batch load a burst of messages can cause;
    # it is NOT what keeps two runs of one activation apart (the engine's lease is).
    condition     = var.max_instance_count >= 1 && var.max_instance_count <= 10 && floor(var.max_instance_count) == var.max_instance_count
    error_message = "max_instance_count must be a whole number from 1 to 10."
  }
}

variable "timeout_seconds" {
  description = "Execution timeout of the Pub/Sub-triggered function, in seconds. Event-driven functions are capped at 540 s."
  type        = number
  default     = 540

  validation {
    # Cloud Functions (2nd gen): event-driven functions time out after at most 9 minutes.
    condition     = var.timeout_seconds >= 60 && var.timeout_seconds <= 540 && floor(var.timeout_seconds) == var.timeout_seconds
    error_message = "timeout_seconds must be a whole number from 60 to 540 (the event-driven function limit)."
  }
}

variable "time_budget_seconds" {
  description = "CEPSYNC_TIME_BUDGET_SECONDS for the event function: the engine checkpoints and hands over to a continuation message before this. Must stay below timeout_seconds."
  type        = number
  default     = 480

  validation {
    condition     = var.time_budget_seconds >= 30 && var.time_budget_seconds <= 530 && floor(var.time_budget_seconds) == var.time_budget_seconds
    error_message = "time_budget_seconds must be a whole number from 30 to 530 (and below timeout_seconds)."
  }
}

variable "available_memory" {
  description = "Memory of one function instance, e.g. 1Gi or 2Gi (units: M, Mi, G, Gi)."
  type        = string
  default     = "2Gi"

  validation {
    condition     = can(regex("^[1-9][0-9]*(M|Mi|G|Gi)$", var.available_memory))
    error_message = "available_memory must be a whole number followed by M, Mi, G or Gi, e.g. 512Mi or 2Gi."
  }
}

variable "available_cpu" {
  description = "vCPUs of one function instance, e.g. \"1\" or \"2\". Cloud Run ties CPU to memory: above 4 GiB it needs at least 2 vCPUs."
  type        = string
  default     = "1"

  validation {
    condition     = can(regex("^(0\\.[0-9]+|[1-8])$", var.available_cpu))
    error_message = "available_cpu must be a fraction below 1 (e.g. 0.5) or a whole number from 1 to 8."
  }
}

# ---------------------------------------------------------------- Firestore state

variable "firestore_location" {
  description = "Firestore database location: a multi-region (eur3, nam5) or a region (europe-west1). Cannot be changed later."
  type        = string

  validation {
    condition     = can(regex("^[a-z]+[0-9]+$|^[a-z]+-[a-z]+[0-9]{1,2}$", var.firestore_location))
    error_message = "firestore_location must be a Firestore location such as eur3, nam5 or europe-west1."
  }
}

variable "firestore_database_name" {
  description = "Firestore database id (CEPSYNC_FIRESTORE_DATABASE). A named database avoids colliding with a project's existing (default) database."
  type        = string
  default     = "cepsync"

  validation {
    condition     = var.firestore_database_name == "(default)" || can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore_database_name))
    error_message = "firestore_database_name must be (default) or 4-63 characters of a-z, 0-9 and -, starting with a letter."
  }
}

variable "firestore_prefix" {
  description = "CEPSYNC_FIRESTORE_PREFIX: the state store keeps its documents under <prefix>_activations/..."
  type        = string
  default     = "cepsync"

  validation {
    condition     = can(regex("^[A-Za-z0-9_]{1,40}$", var.firestore_prefix))
    error_message = "firestore_prefix must be 1-40 characters of letters, digits and _."
  }
}

variable "firestore_point_in_time_recovery" {
  description = "Keep 7 days of point-in-time recovery on the state database (lets an operator read fingerprints as they were before a bad run)."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------- BigQuery access

variable "bigquery_datasets" {
  description = "Datasets the segments read, as \"project.dataset\". The runtime identity gets roles/bigquery.dataViewer on these datasets only."
  type        = list(string)

  validation {
    condition     = length(var.bigquery_datasets) > 0
    error_message = "bigquery_datasets needs at least one \"project.dataset\": the function cannot read a segment otherwise."
  }

  validation {
    condition     = alltrue([for d in var.bigquery_datasets : can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]\\.[A-Za-z0-9_]{1,1024}$", d))])
    error_message = "Each bigquery_datasets entry must look like my-project.my_dataset."
  }
}

variable "bigquery_job_project" {
  description = "Project in which the function runs BigQuery query jobs (roles/bigquery.jobUser there). Default: project_id. Must match the activations' source.project."
  type        = string
  default     = null

  validation {
    condition     = var.bigquery_job_project == null || can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", coalesce(var.bigquery_job_project, "invalid")))
    error_message = "bigquery_job_project must be a Google Cloud project id."
  }
}

variable "enable_bigquery_storage_read" {
  description = "Grant roles/bigquery.readSessionUser so segments stream through the BigQuery Storage Read API (source.use_storage_api, on by default)."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------- Batch secrets

variable "rest_api_key_env" {
  description = "Environment variable that receives the Batch REST API key; must equal the activations' destination.api_key_env."
  type        = string
  default     = "BATCH_REST_API_KEY"

  validation {
    condition     = can(regex("^[A-Za-z_][A-Za-z0-9_]*$", var.rest_api_key_env)) && !startswith(var.rest_api_key_env, "X_GOOGLE_")
    error_message = "rest_api_key_env must be an environment variable name (letters, digits, _; not X_GOOGLE_*)."
  }
}

variable "project_key_env" {
  description = "Environment variable that receives the Batch project key; must equal the activations' destination.project_key_env."
  type        = string
  default     = "BATCH_PROJECT_KEY"

  validation {
    condition     = can(regex("^[A-Za-z_][A-Za-z0-9_]*$", var.project_key_env)) && !startswith(var.project_key_env, "X_GOOGLE_")
    error_message = "project_key_env must be an environment variable name (letters, digits, _; not X_GOOGLE_*)."
  }
}

variable "rest_api_key_secret_version" {
  description = "Secret Manager version number of the Batch REST API key that the function reads (from `gcloud secrets versions add`). Pinned: rotating means adding a version and changing this."
  type        = string

  validation {
    # "latest" is refused on purpose: a new version would reach only the instances that
    # start after it, so two instances could send with different keys.
    condition     = can(regex("^[1-9][0-9]*$", var.rest_api_key_secret_version))
    error_message = "rest_api_key_secret_version must be a version number such as \"1\" (\"latest\" is not allowed)."
  }
}

variable "project_key_secret_version" {
  description = "Secret Manager version number of the Batch project key that the function reads. Pinned like rest_api_key_secret_version."
  type        = string

  validation {
    condition     = can(regex("^[1-9][0-9]*$", var.project_key_secret_version))
    error_message = "project_key_secret_version must be a version number such as \"1\" (\"latest\" is not allowed)."
  }
}

variable "secret_replica_locations" {
  description = "Regions that hold the Batch secrets (user-managed replication, e.g. [\"europe-west1\", \"europe-west4\"] for EU residency). Empty: automatic replication."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for l in var.secret_replica_locations : can(regex("^[a-z]+-[a-z]+[0-9]{1,2}$", l))])
    error_message = "Each secret replica location must be a region such as europe-west1."
  }
}

# ---------------------------------------------------------------- delivery

variable "grant_pubsub_token_creator" {
  description = "Let the Pub/Sub service agent mint tokens for the trigger identity (authenticated push). Required for projects whose Pub/Sub service agent dates from 2021-04-08 or before; harmless elsewhere (bound on that one service account only)."
  type        = bool
  default     = true
}

variable "dead_letter_retention" {
  description = "How long messages that exhausted their deliveries stay in the dead-letter hold subscription, e.g. 604800s (7 days, the Pub/Sub maximum)."
  type        = string
  default     = "604800s"

  validation {
    condition     = can(regex("^[0-9]+s$", var.dead_letter_retention)) && try(tonumber(trimsuffix(var.dead_letter_retention, "s")) >= 600 && tonumber(trimsuffix(var.dead_letter_retention, "s")) <= 604800, false)
    error_message = "dead_letter_retention must be between 600s and 604800s, written in seconds with an s suffix."
  }
}

variable "dead_letter_max_delivery_attempts" {
  description = "Deliveries of one message before Pub/Sub moves it to the dead-letter topic (used in the attach command this module outputs)."
  type        = number
  default     = 10

  validation {
    # Pub/Sub accepts 5 to 100 delivery attempts for a dead-letter policy.
    condition     = var.dead_letter_max_delivery_attempts >= 5 && var.dead_letter_max_delivery_attempts <= 100
    error_message = "dead_letter_max_delivery_attempts must be from 5 to 100 (the Pub/Sub limits)."
  }
}

variable "max_delivery_attempts" {
  description = "Pub/Sub deliveries of one message before the function records the run as failed_permanently and acknowledges it (CEPSYNC_MAX_DELIVERY_ATTEMPTS)."
  type        = number
  default     = 5

  # Keep it below dead_letter_max_delivery_attempts, so the function (which records why)
  # gives up first. (A validation may only refer to its own variable before Terraform 1.9.)
  validation {
    condition     = var.max_delivery_attempts >= 1 && var.max_delivery_attempts <= 100 && floor(var.max_delivery_attempts) == var.max_delivery_attempts
    error_message = "max_delivery_attempts must be a whole number from 1 to 100 (the function's own limits)."
  }
}

# ---------------------------------------------------------------- optional HTTP entry point

variable "enable_http_trigger" {
  description = "Also deploy the HTTP entry point http_sync (60-minute limit instead of 9), invokable only with an OIDC token of the invoker identity."
  type        = bool
  default     = false
}

variable "http_trigger_activations" {
  description = "Scheduled activations whose Cloud Scheduler job calls the HTTP function (OIDC) instead of publishing to Pub/Sub. Only with enable_http_trigger."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for name in var.http_trigger_activations : can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", name))])
    error_message = "http_trigger_activations must hold activation names ([a-z0-9][a-z0-9_-]*)."
  }
}

variable "http_timeout_seconds" {
  description = "Execution timeout of the HTTP function, in seconds (HTTP functions allow up to 3600 s)."
  type        = number
  default     = 3600

  validation {
    condition     = var.http_timeout_seconds >= 60 && var.http_timeout_seconds <= 3600 && floor(var.http_timeout_seconds) == var.http_timeout_seconds
    error_message = "http_timeout_seconds must be a whole number from 60 to 3600."
  }
}

variable "http_time_budget_seconds" {
  description = "CEPSYNC_TIME_BUDGET_SECONDS for the HTTP function; must stay below http_timeout_seconds."
  type        = number
  default     = 3300

  validation {
    condition     = var.http_time_budget_seconds >= 30 && var.http_time_budget_seconds <= 3590 && floor(var.http_time_budget_seconds) == var.http_time_budget_seconds
    error_message = "http_time_budget_seconds must be a whole number from 30 to 3590 (and below http_timeout_seconds)."
  }
}

# ---------------------------------------------------------------- monitoring (monitoring.tf)

variable "notification_channels" {
  description = "Cloud Monitoring notification channels the alerts go to, as projects/PROJECT/notificationChannels/ID (create an e-mail channel in the console or with gcloud). Empty: alerts only show in the console."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.notification_channels : can(regex("^projects/[^/]+/notificationChannels/[^/]+$", c))])
    error_message = "Each notification channel must look like projects/PROJECT/notificationChannels/ID."
  }
}

variable "alert_run_period_seconds" {
  description = "How often the activations are scheduled to run, in seconds (the cron's period, e.g. 3600 for hourly). Sets the windows of the failure and no-success alerts."
  type        = number
  default     = 3600

  validation {
    condition     = var.alert_run_period_seconds >= 300 && floor(var.alert_run_period_seconds) == var.alert_run_period_seconds
    error_message = "alert_run_period_seconds must be a whole number of seconds, at least 300."
  }
}

variable "alert_missed_periods" {
  description = "Alert when no run succeeded for this many run periods (the sync has stopped or fails every time)."
  type        = number
  default     = 3

  validation {
    condition     = var.alert_missed_periods >= 2 && var.alert_missed_periods <= 48 && floor(var.alert_missed_periods) == var.alert_missed_periods
    error_message = "alert_missed_periods must be a whole number from 2 to 48."
  }
}

variable "alert_rejected_share" {
  description = "Alert when one run rejects at least this share of its rows (ours and Batch's refusals), e.g. 0.2 for 20 %: usually an upstream schema change."
  type        = number
  default     = 0.2

  validation {
    condition     = var.alert_rejected_share > 0 && var.alert_rejected_share <= 1
    error_message = "alert_rejected_share must be a share above 0 and at most 1."
  }
}

variable "warehouse_state_dataset" {
  description = "Dataset (in project_id) for activations with diff.mode warehouse; null creates none. The runtime identity gets roles/bigquery.dataEditor on it only."
  type        = string
  default     = null

  validation {
    condition     = var.warehouse_state_dataset == null || can(regex("^[A-Za-z_][A-Za-z0-9_]{0,1023}$", coalesce(var.warehouse_state_dataset, "x")))
    error_message = "warehouse_state_dataset must be a BigQuery dataset id (letters, digits, underscores)."
  }
}

variable "warehouse_state_location" {
  description = "Location of warehouse_state_dataset (EU, US or a region): the segments' location, or the diff query cannot join them. Required with warehouse_state_dataset."
  type        = string
  default     = null

  validation {
    condition     = var.warehouse_state_location == null || can(regex("^[A-Za-z]+(-[a-z]+[0-9]{1,2})?$", coalesce(var.warehouse_state_location, "x")))
    error_message = "warehouse_state_location must be EU, US or a region such as europe-west1."
  }
}

variable "results_dataset" {
  description = "Dataset (in project_id) for the results tables of activations with results.dataset (docs/results.md); null creates none. The runtime identity gets roles/bigquery.dataEditor on it only."
  type        = string
  default     = null

  validation {
    condition     = var.results_dataset == null || can(regex("^[A-Za-z_][A-Za-z0-9_]{0,1023}$", coalesce(var.results_dataset, "x")))
    error_message = "results_dataset must be a BigQuery dataset id (letters, digits, underscores)."
  }
}

variable "results_location" {
  description = "Location of results_dataset (EU, US or a region), where its load jobs run. Required with results_dataset."
  type        = string
  default     = null

  validation {
    condition     = var.results_location == null || can(regex("^[A-Za-z]+(-[a-z]+[0-9]{1,2})?$", coalesce(var.results_location, "x")))
    error_message = "results_location must be EU, US or a region such as europe-west1."
  }
}

variable "results_retention_days" {
  description = "Days a day's partition of the results tables is kept (rejections name Custom IDs, and values with results.include_values); null keeps them."
  type        = number
  default     = 400

  validation {
    condition     = var.results_retention_days == null || (floor(coalesce(var.results_retention_days, 1)) == coalesce(var.results_retention_days, 1) && coalesce(var.results_retention_days, 1) >= 1)
    error_message = "results_retention_days must be a whole number of days, at least 1, or null."
  }
}
