"""Experiment trackers: `--report-to tensorboard,mlflow,wandb` on every recipe.

metrics.jsonl stays the source of truth; a tracker gets a copy of each record as it is written (the same
metric names, the same steps), the run's config at the start, and the summary at the end:

- TensorBoard: event files in DIR/tensorboard (`tensorboard --logdir runs`); a resumed run drops the events
  past its checkpoint, as metrics.jsonl does.
- MLflow: `--mlflow-tracking-uri`, else MLFLOW_TRACKING_URI, else MLflow's own local store, a SQLite file
  `mlflow.db` beside the run directory (MLflow 3 refuses new `./mlruns` file stores). Experiment =
  `--tracking-project`; params = the config; a resumed run continues the same MLflow run.
- Weights & Biases: offline (files in DIR/wandb, `wandb sync` uploads them) unless WANDB_API_KEY is set and
  WANDB_MODE is not `offline`. Project = `--tracking-project`, entity = `--wandb-entity`.

Each is an optional extra (`pip install 'tunery[tensorboard]'`, `[mlflow]`, `[wandb]`; `make install` has
them all); asking for one that is not installed is an error naming the extra, before the model loads. Their
telemetry and error reporting are switched off (MLFLOW_DISABLE_TELEMETRY, WANDB_ERROR_REPORTING) unless the
user set those variables. The run's ids live in DIR/trackers.json, so `--resume` continues the same runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tunery.errors import TuneryError

log = logging.getLogger("tunery")

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module to import
IDS = "trackers.json"


def parse_report_to(value: str) -> list[str]:
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TuneryError(
            f"--report-to {value}: unknown tracker {', '.join(unknown)}; choose from "
            f"{', '.join(TRACKERS)} (comma-separated) or none"
        )
    return list(dict.fromkeys(names))


def check_report_to(value: str) -> None:
    """Known names, and each one's package installed (the message names the extra)."""
    for name in parse_report_to(value):
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise TuneryError(
                f"--report-to {name}: {name} is not installed; install it with pip install 'tunery[{name}]' "
                f"(or make install, which has every tracker)"
            )


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def finish(self, summary: Mapping[str, Any]) -> None: ...


def numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's finite numbers (not the step, not flags or text)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class Trackers:
    """The trackers a run reports to, fed where metrics.jsonl is written (lifecycle.log_metrics). A tracker
    that fails (a store gone, a disk full) is dropped with a warning: the run and metrics.jsonl go on."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def _each(self, action: str, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 (whatever the tracker's library raises)
                log.warning("--report-to: %s failed to %s (%s); it gets nothing more from this run",
                            type(tracker).__name__, action, exc)  # fmt: skip
                self.trackers.remove(tracker)

    def log(self, record: Mapping[str, Any]) -> None:
        step = record.get("step")
        values = numbers(record)
        if not isinstance(step, int | float) or not values:
            return
        self._each("log a step", lambda tracker: tracker.log(int(step), values))

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._each("take the summary", lambda tracker: tracker.finish(summary))


def open_trackers(
    run_dir: Path,
    report_to: str,
    config: Mapping[str, Any],
    resume_step: int | None,
    *,
    project: str = "tunery",
    run_name: str | None = None,
    tags: str = "",
    mlflow_tracking_uri: str | None = None,
    wandb_entity: str | None = None,
    wandb_run_id: str | None = None,
) -> Trackers:
    names = parse_report_to(report_to)
    if not names:
        return Trackers([])
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    ids_path = run_dir / IDS
    ids: dict[str, Any] = {}
    if resume_step is not None and ids_path.is_file():
        ids = json.loads(ids_path.read_text(encoding="utf-8"))
    name = run_name or run_dir.resolve().name
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    info = RunInfo(run_dir, config, project, name, tag_list)
    opened: list[Tracker] = []
    for tracker in names:
        if tracker == "tensorboard":
            opened.append(TensorBoardTracker(run_dir, config, resume_step))
        elif tracker == "mlflow":
            mlflow = MlflowTracker(info, ids.get("mlflow"), mlflow_tracking_uri)
            ids["mlflow"] = mlflow.ids
            opened.append(mlflow)
        elif tracker == "wandb":
            wandb = WandbTracker(
                info, ids.get("wandb") or ({"id": wandb_run_id} if wandb_run_id else None), wandb_entity
            )
            ids["wandb"] = wandb.ids
            opened.append(wandb)
    if ids:
        from tunery.training.io import atomic_write_json

        atomic_write_json(ids_path, ids)
    return Trackers(opened)


# --- TensorBoard ------------------------------------------------------------------------------------------


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at and past it (written before the checkpoint's resume) are dropped
        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"),
            purge_step=resume_step + 1 if resume_step is not None else None,
        )
        if resume_step is None:
            self.writer.add_text("config", _markdown_table(config), 0)
        self.last_step = 0

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.last_step = step
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any]) -> None:
        self.writer.add_text("summary", _markdown_table(_flat(summary)), self.last_step)
        self.writer.close()


# --- MLflow -----------------------------------------------------------------------------------------------


def default_mlflow_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


@dataclass(frozen=True)
class RunInfo:
    """What every tracker is told of the run when it opens."""

    run_dir: Path
    config: Mapping[str, Any]
    project: str
    name: str
    tags: list[str]


class MlflowTracker:
    def __init__(self, info: RunInfo, ids: dict[str, str] | None, uri: str | None) -> None:
        run_dir, config, project, name, tags = info.run_dir, info.config, info.project, info.name, info.tags
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # table creation and migrations announced at INFO (after import:
            logging.getLogger(noisy).setLevel(logging.WARNING)  # mlflow sets its level when imported)

        self.uri = (ids or {}).get("uri") or uri or default_mlflow_uri(run_dir)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            if ids and ids.get("run_id"):
                self.run_id = ids["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment = self._experiment(project)
                run_tags = {"tunery.run_dir": str(run_dir.resolve()), **{t: "" for t in tags}}
                self.run_id = self.client.create_run(experiment, run_name=name, tags=run_tags).info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                    self.client.log_batch(self.run_id, params=params[i : i + 100])
                self.client.log_batch(
                    self.run_id, tags=[RunTag("mlflow.note.content", f"Tunery run {run_dir}")]
                )
        except Exception as exc:  # noqa: BLE001 (a store that cannot be reached or read)
            raise TuneryError(f"--report-to mlflow: could not open MLflow at {self.uri}: {exc}") from exc
        self.ids = {"uri": self.uri, "run_id": self.run_id}

    def _experiment(self, project: str) -> str:
        found = self.client.get_experiment_by_name(project)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(project))
        except Exception:  # noqa: BLE001 (another process, e.g. a parallel trial, created it first)
            found = self.client.get_experiment_by_name(project)
            if found is None:
                raise
            return str(found.experiment_id)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        flat = _flat(summary)
        final = [
            Metric(f"summary.{k}", v, now, int(summary.get("steps", 0) or 0))
            for k, v in numbers(flat).items()
        ]
        for i in range(0, len(final), 500):
            self.client.log_batch(self.run_id, metrics=final[i : i + 500])
        flags = ", ".join(summary.get("safety_flags") or []) or "none"
        self.client.log_batch(self.run_id, tags=[RunTag("tunery.safety_flags", flags[:5000])])
        self.client.set_terminated(self.run_id, status="FINISHED")


# --- Weights & Biases -------------------------------------------------------------------------------------


def wandb_mode() -> str:
    """Offline unless the user has a key and has not asked for offline: no network is assumed."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline" if os.environ["WANDB_MODE"] == "dryrun" else os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker:
    def __init__(self, info: RunInfo, ids: dict[str, str] | None, entity: str | None) -> None:
        run_dir, config, project, name, tags = info.run_dir, info.config, info.project, info.name, info.tags
        import wandb

        run_id = (ids or {}).get("id") or secrets.token_hex(6)  # W&B run ids: [a-z0-9]
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=dict(config),
            tags=tags or None,
            mode=wandb_mode(),  # type: ignore[arg-type]
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.ids = {"id": run_id}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        self.run.summary.update({f"summary.{k}": v for k, v in numbers(_flat(summary)).items()})
        self.run.finish()


# --- helpers ----------------------------------------------------------------------------------------------


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _markdown_table(values: Mapping[str, Any]) -> str:
    rows = [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in _flat(values).items()]
    return "\n".join(["| field | value |", "|---|---|", *rows])
