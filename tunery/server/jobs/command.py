"""The command lines a job runs: `tunery data validate` for each of its files, then `tunery train`.

HYPERPARAMETERS is the one table from a job's hyperparameters (OpenAI's names, and Tunery's own for its
extra methods) to the recipe's config fields they set; the command line is built from it, and the values
a run resolved from `auto` are read back through it (from the run's config.yaml) to show on the job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.run.files import CONFIG, SavedConfig, read_config
from tunery.server.catalog import job_dir
from tunery.server.settings import Settings
from tunery.server.store import Job

# the recipe each job type trains with: `tunery train <recipe>`. kto and reward_model are Tunery's own
# method types: the feedback studio creates them (routes/feedback_exports.py, routes/ratings.py)
RECIPES = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo", "kto": "kto", "reward_model": "rm"}
MIN_TRAINING_EXAMPLES = 10
# OpenAI's job object has the three of every method at its top level too (`hyperparameters`, deprecated)
TOP_LEVEL = ("batch_size", "learning_rate_multiplier", "n_epochs")


@dataclass(frozen=True)
class Hyperparameter:
    """One of a job's hyperparameters and the config field of the recipe it sets."""

    name: str  # in the job's `method.<type>.hyperparameters`
    field: str  # the recipe's config field: its key in config.yaml, and its `--set` name
    flag: str | None  # the `tunery train` flag that sets it; None: `--set field=value`
    methods: tuple[str, ...] = tuple(RECIPES)  # the job types that take it
    shown: bool = False  # once the run has resolved `auto`, the job shows the value it resolved to
    default: Any = None  # ... or this, when the run's config.yaml has no value for it


# reinforcement's reasoning_effort and compute_multiplier are accepted (and shown on the job) but set
# nothing: the recipe has no counterpart
HYPERPARAMETERS = (
    Hyperparameter("n_epochs", "epochs", "--epochs", shown=True),
    Hyperparameter("batch_size", "batch_size", "--batch-size", shown=True),
    Hyperparameter("learning_rate_multiplier", "learning_rate_multiplier", "--lr-multiplier", shown=True),
    Hyperparameter("beta", "beta", "--beta", ("dpo", "kto"), shown=True, default=0.1),
    Hyperparameter("eval_interval", "eval_every", "--eval-every", ("reinforcement",)),
    Hyperparameter("eval_samples", "eval_examples", None, ("reinforcement",)),
)


def train_command(settings: Settings, job: Job) -> list[str]:
    """The `tunery train` command of a job: a fresh start, or `--resume` once the run has a config."""
    kind = job.method["type"]
    directory = job_dir(settings, job.id)
    run_dir = directory / "run"
    command = [settings.python, *settings.cli, "train", RECIPES[kind]]
    if (run_dir / CONFIG).is_file():
        return command + ["--resume", str(run_dir)]
    command += ["--model", job.local_model, "--data", str(directory / "training.jsonl")]
    command += ["--out", str(run_dir), "--overwrite", "--seed", str(job.seed)]
    if job.validation_file:
        command += ["--valid", str(directory / "validation.jsonl")]
    if job.parent_adapter:
        command += ["--adapter", job.parent_adapter]
    if kind == "reinforcement":
        command += ["--grader", str(directory / "grader.json")]
    given = job.method.get(kind, {}).get("hyperparameters") or {}
    for hp in HYPERPARAMETERS:
        value = given.get(hp.name, "auto")
        if kind in hp.methods and value != "auto":
            command += [hp.flag, str(value)] if hp.flag else ["--set", f"{hp.field}={value}"]
    command += integration_flags(job)
    # the recipe screens again (and writes the redacted copy under `redact`) with the service's policies
    for name in ("screen_content", "screen_pii"):
        command += ["--set", f"{name}={getattr(settings, name)}"]
    for pair in settings.train_overrides:  # last: the operator's settings win
        command += ["--set", pair]
    return command


def integration_flags(job: Job) -> list[str]:
    """OpenAI's `integrations` (Weights & Biases) as the run's tracker settings. Tags as OpenAI's: the service,
    the base model and the job, then the user's."""
    for integration in job.integrations or []:
        if integration.get("type") != "wandb":
            continue
        wandb = integration["wandb"]
        tags = ["tunery/finetune", f"tunery/{job.model}", f"tunery/{job.id}", *(wandb.get("tags") or [])]
        values = {
            "tracking_project": wandb["project"],
            "tracking_run_name": wandb.get("name") or job.id,
            "tracking_tags": ",".join(t.replace(",", " ") for t in tags),
            **({"wandb_entity": wandb["entity"]} if wandb.get("entity") else {}),
            "wandb_run_id": job.id,  # as OpenAI's: the job's id, echoed in the job object
        }
        flags = ["--report-to", "wandb"]
        for field, value in values.items():  # --set reads YAML: a JSON string stays a string
            flags += ["--set", f"{field}={json.dumps(value)}"]
        return flags  # one W&B run per job
    return []


def validate_command(settings: Settings, job: Job, path: Path, param: str) -> list[str]:
    """`tunery data validate` of one of the job's files, as its method reads it, under the service's
    screening policies and size limit."""
    kind = job.method["type"]
    minimum = MIN_TRAINING_EXAMPLES if param == "training_file" else 1
    command = [settings.python, *settings.cli, "data", "validate", str(path), "--json"]
    # chat and preference files are detected, so a file of the wrong kind gets OpenAI's format message
    file_format = "prompts" if kind == "reinforcement" else "auto"
    command += ["--model", job.local_model, "--format", file_format, "--min-examples", str(minimum)]
    max_length = override(settings, "max_length")
    if max_length is not None:
        command += ["--max-length", str(max_length)]
    command += ["--screen-content", settings.screen_content, "--screen-pii", settings.screen_pii]
    return command + ["--max-bytes", str(settings.max_upload_bytes)]


def override(settings: Settings, name: str) -> str | None:
    """The value the operator's `train_overrides` (`--set` pairs) give config field `name`, if any."""
    for pair in settings.train_overrides:
        key, _, value = pair.partition("=")
        if key.strip().replace("-", "_") == name:
            return value.strip()
    return None


def resolved_hyperparameters(kind: str, config: SavedConfig) -> dict[str, Any]:
    """The job's shown hyperparameters as the run resolved them (config.yaml), `auto` no more."""
    values = {}
    for hp in HYPERPARAMETERS:
        if hp.shown and kind in hp.methods:
            value = config.fields.get(hp.field)
            values[hp.name] = value if hp.default is None else value or hp.default
    return values


def resolve_hyperparameters(job: Job, run_dir: Path) -> None:
    """Once the run has written its config.yaml, the job shows what its `auto` hyperparameters became, and
    its number of steps."""
    config = read_config(run_dir)
    if config is None or config.total_steps is None:
        return
    kind = job.method["type"]
    resolved = resolved_hyperparameters(kind, config)
    method = json.loads(json.dumps(job.method))  # a new object: the JSON column is seen to change
    given = method.setdefault(kind, {}).get("hyperparameters") or {}
    method[kind]["hyperparameters"] = given | resolved
    job.method, job.hyperparameters = method, {name: resolved[name] for name in TOP_LEVEL}
    job.total_steps = config.total_steps
