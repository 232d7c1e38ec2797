"""Service settings: where the data lives, what it listens on, how many jobs run at once.

Every field has a default; `tunery serve` flags and `TUNERY_*` environment variables override them, and
`tunery keys` reads the same ones so both commands find the same database.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Base models the service offers (API name -> the name `tunery train --model` takes). `--base-model`
# adds more, e.g. `gpt-4o-mini-2024-07-18=smollm2-135m-instruct` for clients that name OpenAI models.
DEFAULT_BASE_MODELS = {"smollm2-135m-instruct": "smollm2-135m-instruct", "tiny-random": "tiny-random"}


def tunery_home() -> Path:
    return Path(os.environ.get("TUNERY_HOME", Path.home() / ".cache" / "tunery"))


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: tunery_home() / "service")  # files/, jobs/, logs/
    database_url: str = ""  # default: sqlite:///DATA_DIR/tunery.db
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 512 * 2**20  # OpenAI's per-file limit
    # where training runs: "local" (processes here) or "ray" (Ray jobs on the cluster at `ray_address`,
    # its dashboard's address, http://HEAD:8265; jobs/executors.py)
    executor: str = "local"
    ray_address: str = ""
    # training processes at once: locally 1 (one saturates a small CPU); on Ray 0, as many as the cluster
    # holds (Ray places them where their resources are free)
    max_running_jobs: int = 1
    # what each training process asks of a Ray node, unless the job's `resources` field says: CPUs, GPUs,
    # and memory in GB (None: by method, jobs/executors.DEFAULT_MEMORY_GB)
    job_cpus: float = 1.0
    job_gpus: float = 0.0
    job_memory_gb: float | None = None
    # the most a job's `resources` field may ask for (more is a 400 naming the limit)
    job_max_cpus: float = 16.0
    job_max_gpus: float = 8.0
    job_max_memory_gb: float = 256.0
    # per project: training processes at once (0: no limit beyond max_running_jobs; projects take turns),
    # and jobs waiting (validating or queued) beyond which a new job or a resume gets a 429
    project_running_jobs: int = 0
    project_queued_jobs: int = 20
    # several `tunery serve` on one database: one schedules at a time, holding a lease it renews; when
    # its holder dies, another takes it over after this many seconds
    scheduler_lease_seconds: float = 10.0
    stop_grace_seconds: float = 30.0  # after SIGTERM, how long a job may take to checkpoint before SIGKILL
    poll_seconds: float = 0.5  # how often the scheduler looks at processes, metrics and checkpoints
    base_models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_BASE_MODELS))
    train_overrides: list[str] = field(default_factory=list)  # `--set KEY=VALUE` added to every job
    python: str = sys.executable
    cli: list[str] = field(default_factory=lambda: ["-m", "tunery"])  # worker command after `python`
    inference_cache: int = 2  # base models each inference worker keeps loaded
    # LoRA adapters each inference worker keeps beside their base models (a few MB each, no copy of the
    # base); 0: each adapter merged into a copy of its base of its own (faster decoding, a model's memory)
    inference_adapters: int = 16
    inference_workers: int = 1  # inference worker processes answering chat completions and model graders
    # with executor "ray": this many inference replicas on the cluster instead (0: workers here), each
    # asking for these resources of a node
    inference_replicas: int = 0
    inference_cpus: float = 1.0
    inference_memory_gb: float | None = 2.0
    default_max_tokens: int = 256  # chat completions without max_tokens
    max_completion_tokens: int = 4096
    grader_timeout: float = 120.0  # seconds a grader run request may take (python graders, multi sub-graders)
    # grader runs a project may start a minute (in bursts of up to that many): a fast grader costs
    # milliseconds, its audit record stays (0: no limit)
    grader_runs_per_minute: int = 600
    # requests' CPU-bound work in this process (python graders, moderation) runs on threads of its own
    # (never the API's), `work_threads` at once; beyond the caps a request gets OpenAI's 429 (workers.py)
    work_threads: int = 2  # runs at once (a python grader's is a sandboxed process)
    work_in_flight: int = 16  # runs running or waiting, all projects together
    work_per_project: int = 4  # ... of one project
    inference_in_flight: int = 64  # chat and model-grader requests at the inference worker, all projects
    inference_per_project: int = 8  # ... of one project (the worker serves projects in turn)
    generating_queues_per_project: int = 2  # feedback queues writing answers at once; others wait
    max_request_bytes: int = 8 * 2**20  # JSON request bodies (uploads have max_upload_bytes)
    header_seconds: float = (
        10.0  # a connection's request line and headers arrive within this, or it is closed
    )
    max_job_retries: int = 2  # a training process that dies is restarted from its checkpoint this often
    # a running job gives its slot to another project's waiting job after this long (it checkpoints and
    # continues when its turn comes); 0: jobs run to their end in queue order
    job_turn_minutes: float = 30.0
    # data screening of every job's files at validation (tunery/safety/screen.py): warn | block | redact
    screen_content: str = "warn"  # offensive lines
    screen_pii: str = "block"  # personal data
    moderate_completions: bool = False  # withhold chat completions the classifier flags (content_filter)
    # audit log (tunery/safety/audit.py): DATA_DIR/audit/<project>.jsonl
    audit: bool = True  # record every chat request and response, and every job, file and model event
    audit_redact: bool = False  # personal data in recorded text goes through tunery.safety.pii.redact
    audit_fsync: bool = False  # sync each record to disk (survives power loss; ~0.3 ms more per record)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'tunery.db'}"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then TUNERY_DATA_DIR / TUNERY_DATABASE_URL, then `overrides` that are not None."""
        values: dict[str, object] = {}
        if os.environ.get("TUNERY_DATA_DIR"):
            values["data_dir"] = Path(os.environ["TUNERY_DATA_DIR"])
        if os.environ.get("TUNERY_DATABASE_URL"):
            values["database_url"] = os.environ["TUNERY_DATABASE_URL"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def audit_dir(self) -> Path:
        return self.data_dir / "audit"
