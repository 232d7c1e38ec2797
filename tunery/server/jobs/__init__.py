"""Fine-tuning jobs: a scheduler thread in the server process that runs each job through the CLI a user
types, and turns what the run directory says into job statuses, events and checkpoints.

    validating_files   `python -m tunery data validate FILE --json ...` per file (one at a time), with
                       the data screen (personal data, offensive content) under the service's policies
    queued             waiting for a training slot (`max_running_jobs`, 1 by default), in queue order
    running            `python -m tunery train sft|dpo|grpo ... --out JOB/run` (or `--resume JOB/run`)
    succeeded | failed | cancelled | paused

Each job has a directory, JOB = DATA_DIR/jobs/<job id>: `training.jsonl` (and `validation.jsonl`,
`grader.json`) linked from the uploaded files when the job is created, so deleting a file never breaks
a job; `run/`, the recipe's run directory; `train.log` and `validate.log`.

Cancel sends SIGTERM, then SIGKILL after `stop_grace_seconds`. Pause sends SIGTERM: the recipe saves a
checkpoint at the next step boundary and exits; resume queues the job again and it continues with
`--resume JOB/run`. On shutdown running jobs get the same SIGTERM and stay `running` in the database;
on start, jobs found `running` (their process is stopped first if it outlived the server) go back to
the queue ahead of the others and resume from their last checkpoint.

No job is lost to a process death. A run with final/ and a readable summary.json has finished, whatever
its exit status. A training process killed by a signal the service did not send (the out-of-memory
killer's SIGKILL, a segfault, a stray SIGTERM), or found gone at start-up, is retried from its last
checkpoint, at most `max_job_retries` times; then the job fails with the cause and can be resumed by
hand. An ordinary error exit is deterministic and fails the job at once. Each retry is an event that
carries its cause (`data.cause`), so the count survives a restart.

    create.py      create_job (both job-creating routes), the starting model, add_event
    command.py     the command lines; the table from a job's hyperparameters to the recipe's config fields
    reports.py     the file check's report, a failed command's log, the run directory (tunery/run/files.py)
    processes.py   starting the commands, signalling them
    scheduler.py   the scheduler thread: the queue, training slots and turns, the API's cancel / pause / resume
    outcomes.py    what a run makes of its job: events, checkpoints; success, a retry or failure at its end
    audit.py       the audit log's and the serve console's record of every committed change
"""

from tunery.server.jobs.audit import audit_job_changes, log_job_changes
from tunery.server.jobs.command import (
    HYPERPARAMETERS,
    MIN_TRAINING_EXAMPLES,
    RECIPES,
    train_command,
    validate_command,
)
from tunery.server.jobs.create import (
    TERMINAL,
    add_event,
    check_queue_quota,
    create_job,
    link_or_copy,
    starting_point,
)
from tunery.server.jobs.outcomes import DIED
from tunery.server.jobs.reports import (
    death_cause,
    energy_message,
    foreign_format,
    screening_warnings,
    stop_cause,
    tail_error,
    validation_error,
)
from tunery.server.jobs.scheduler import Scheduler

__all__ = [
    "DIED",
    "HYPERPARAMETERS",
    "MIN_TRAINING_EXAMPLES",
    "RECIPES",
    "TERMINAL",
    "Scheduler",
    "add_event",
    "check_queue_quota",
    "audit_job_changes",
    "create_job",
    "death_cause",
    "energy_message",
    "foreign_format",
    "link_or_copy",
    "log_job_changes",
    "screening_warnings",
    "starting_point",
    "stop_cause",
    "tail_error",
    "train_command",
    "validate_command",
    "validation_error",
]
