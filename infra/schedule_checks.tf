# What a deploy checks in each activation's `schedule` before it creates a Cloud Scheduler
# job: the same rules as sync.config.ScheduleConfig, as far as Terraform can express them.
#
# * cron: five unix-cron fields; each field is numbers, `*`, ranges, steps and lists
#   (the CRON_FIELD pattern of sync/config.py), numbers inside each field's range,
#   names only three-letter months (field 4) and days (field 5).
# * time_zone: the shape of an IANA name. Terraform has no time zone database, so the
#   lookup itself (Mars/Olympus is refused) is done by `make package`, which validates
#   every activation with sync.config before zipping the directory deployed here.

locals {
  cron_atom       = "(\\*|[0-9]+|[A-Za-z]{3})"
  cron_range      = "${local.cron_atom}(-${local.cron_atom})?(/[0-9]+)?"
  cron_field      = "^${local.cron_range}(,${local.cron_range})*$"
  cron_fields     = ["minute", "hour", "day-of-month", "month", "day-of-week"]
  cron_min        = [0, 0, 1, 1, 0]
  cron_max        = [59, 23, 31, 12, 7]
  cron_months     = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
  cron_days       = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
  cron_names      = [[], [], [], local.cron_months, local.cron_days]
  time_zone_shape = "^[A-Z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}$"

  # activation name => the problems of its schedule (empty when it may be deployed).
  schedule_problems = {
    for name, schedule in local.scheduled_activations : name => concat(
      length(split(" ", trimspace(replace(schedule.cron, "/\\s+/", " ")))) == 5 ? [
        for index, field in split(" ", trimspace(replace(schedule.cron, "/\\s+/", " "))) :
        "schedule.cron: ${local.cron_fields[index]} field '${field}' is not valid"
        if !(
          can(regex(local.cron_field, field)) &&
          alltrue([
            for number in regexall("[0-9]+", replace(field, "/\\/[0-9]+/", "")) :
            tonumber(number) >= local.cron_min[index] && tonumber(number) <= local.cron_max[index]
          ]) &&
          alltrue([for word in regexall("[A-Za-z]+", field) : contains(local.cron_names[index], lower(word))])
        )
      ] : ["schedule.cron: '${schedule.cron}' must have five fields (minute hour day-of-month month day-of-week)"],
      can(regex(local.time_zone_shape, schedule.time_zone)) ? [] : [
        "schedule.time_zone: '${schedule.time_zone}' is not an IANA time zone name such as Europe/Paris"
      ],
    )
  }
}
