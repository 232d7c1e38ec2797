"""The run directory's files as types: one writer and one reader each, used by the recipes, the CLI, the
service, the web app's endpoints, the model card and the tests. Torch-free.

    DIR/config.yaml     the method's config with every `auto` filled in       write_config / read_config
    DIR/metrics.jsonl   one record per optimizer step, then the final one      MetricsLog / read_metrics
    DIR/summary.json    what the run did: speed, memory, energy, results       write_summary / read_summary
    DIR/evals.json      base vs tuned safety, bias, memorisation, diversity    write_evals / read_evals
    DIR/final/          the model (tunery.yaml says what it is)                is_finished

A reader returns None for a file that is missing or does not parse (a run killed mid-write, an old run):
every caller has something sensible to do without it, and none should crash on a user's directory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunery.training.io import atomic_write_json, atomic_write_text, atomic_write_yaml

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVALS = "evals.json"
FINAL = "final"

# --- metric names -----------------------------------------------------------------------------------------
# The names every recipe logs in metrics.jsonl that others read (the service's events and checkpoints, the
# web app's charts, the model card). A method adds its own (`rewards/margins`, `kl`, ...) beside them.

STEP = "step"
TOTAL_STEPS = "total_steps"
TRAIN_LOSS = "train_loss"
VALID_LOSS = "valid_loss"
TRAIN_ACCURACY = "train_mean_token_accuracy"
VALID_ACCURACY = "valid_mean_token_accuracy"
FULL_VALID_LOSS = "full_valid_loss"
FULL_VALID_ACCURACY = "full_valid_mean_token_accuracy"
VALID_PREFIX = "valid_"  # a periodic held-out evaluation
FULL_VALID_PREFIX = "full_valid_"  # the final evaluation on every held-out example
TRAIN_PREFIX = "train_"


def is_held_out(name: str) -> bool:
    """A metric measured on held-out data (periodic or final)."""
    return name.startswith((VALID_PREFIX, FULL_VALID_PREFIX))


class MetricsLog:
    """The writer of DIR/metrics.jsonl: one JSON object per line, appended and flushed as training goes."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        """Open for appending. On resume, drop records past the checkpoint step (they will be redone);
        a new run starts an empty file."""
        self.path = Path(run_dir) / METRICS
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            atomic_write_text(self.path, "")
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get(STEP, float("inf")))
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # a torn last line from a killed run: drop it


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of DIR/metrics.jsonl, oldest first (a torn last line is skipped)."""
    try:
        text = (Path(run_dir) / METRICS).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def last_metrics(run_dir: Path, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The most recent value of every metric whose name starts with one of `prefixes`."""
    last: dict[str, Any] = {}
    for record in read_metrics(run_dir):
        last.update({k: v for k, v in record.items() if k.startswith(prefixes)})
    return last


# --- config.yaml ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedConfig:
    """DIR/config.yaml: the config fields the run was started with, `auto` values resolved. `fields` holds
    them all by name (a method's own included); the ones every run has are typed below."""

    fields: dict[str, Any]
    model: str
    data: str
    valid: str | None
    epochs: int | None
    batch_size: int | None
    learning_rate_multiplier: float | None
    total_steps: int | None  # None: the run is older than resolved configs, or never resolved
    data_sha256: str | None
    valid_sha256: str | None


def write_config(run_dir: Path, values: Mapping[str, Any]) -> None:
    atomic_write_yaml(Path(run_dir) / CONFIG, dict(values))


def read_config(run_dir: Path) -> SavedConfig | None:
    try:
        values = yaml.safe_load((Path(run_dir) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(values, dict):
        return None

    def typed(name: str, kind: type) -> Any:
        value = values.get(name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return SavedConfig(
        fields=values,
        model=str(values.get("model", "")),
        data=str(values.get("data", "")),
        valid=typed("valid", str),
        epochs=typed("epochs", int),
        batch_size=typed("batch_size", int),
        learning_rate_multiplier=typed("learning_rate_multiplier", (int, float)),  # type: ignore[arg-type]
        total_steps=typed("total_steps", int),
        data_sha256=typed("data_sha256", str),
        valid_sha256=typed("valid_sha256", str),
    )


# --- summary.json -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """DIR/summary.json, the last thing a run writes before its model card. `extra` holds what a method adds
    (pairs/s, completions, reference time, early-stopping selection, ...)."""

    method: str
    model: str
    run_dir: str
    steps: int
    trained_tokens: int
    wall_seconds: float
    train_seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    final_metrics: dict[str, Any]
    world_size: int
    pid: int
    energy: dict[str, Any] | None = None  # None: tracking was off
    safety_flags: list[str] = field(default_factory=list)  # evaluations where the tuned model got worse
    warnings: list[str] = field(default_factory=list)  # what the run noticed about its own training
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**values, **self.extra}


_SUMMARY_FIELDS = {f.name for f in dataclasses.fields(RunSummary)} - {"extra"}


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    atomic_write_json(Path(run_dir) / SUMMARY, summary.to_json())


def read_summary_json(run_dir: Path) -> dict[str, Any] | None:
    """summary.json as it is on disk (for the endpoints that show it whole), None when absent or torn."""
    try:
        value = json.loads((Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_summary(run_dir: Path) -> RunSummary | None:
    raw = read_summary_json(run_dir)
    if raw is None:
        return None

    def number(name: str) -> float:
        value = raw.get(name)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

    def strings(name: str) -> list[str]:
        value = raw.get(name)
        return [str(v) for v in value] if isinstance(value, list) else []

    energy = raw.get("energy")
    final_metrics = raw.get("final_metrics")
    return RunSummary(
        method=str(raw.get("method", "")),
        model=str(raw.get("model", "")),
        run_dir=str(raw.get("run_dir", "")),
        steps=int(number("steps")),
        trained_tokens=int(number("trained_tokens")),
        wall_seconds=number("wall_seconds"),
        train_seconds=number("train_seconds"),
        tokens_per_second=number("tokens_per_second"),
        peak_memory_mb=number("peak_memory_mb"),
        final_metrics=final_metrics if isinstance(final_metrics, dict) else {},
        world_size=int(number("world_size")) or 1,
        pid=int(number("pid")),
        energy=energy if isinstance(energy, dict) else None,
        safety_flags=strings("safety_flags"),
        warnings=strings("warnings"),
        extra={k: v for k, v in raw.items() if k not in _SUMMARY_FIELDS},
    )


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its final/ and summary.json are written (the last two things it writes)."""
    return (Path(run_dir) / FINAL).is_dir() and (Path(run_dir) / SUMMARY).is_file()


# --- evals.json -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSection:
    """One evaluation of evals.json: base and tuned metrics (name -> number), the red flags in words (the
    tuned model worse than its base beyond a threshold) and the details a reader may want to look at."""

    description: str
    base: dict[str, Any]
    tuned: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    details: Any = None

    def to_json(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies `details`, and fails on a defaultdict in it
        return {"description": self.description, "base": self.base, "tuned": self.tuned, "flags": self.flags,
                "details": self.details}  # fmt: skip


@dataclass(frozen=True)
class EvalsReport:
    """DIR/evals.json: sections by name, in the order they ran, and `config` (what was run, how long)."""

    sections: dict[str, EvalSection]
    config: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> list[str]:
        return [flag for section in self.sections.values() for flag in section.flags]

    def to_json(self) -> dict[str, Any]:
        return {**{name: s.to_json() for name, s in self.sections.items()}, "config": self.config}


def write_evals(path: Path, report: EvalsReport) -> None:
    atomic_write_text(path, json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")


def read_evals(path: Path) -> EvalsReport | None:
    """evals.json (a run's, or one `tunery eval all --out` wrote), None when absent or not a report."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return evals_from_json(raw) if isinstance(raw, dict) else None


def evals_from_json(raw: dict[str, Any]) -> EvalsReport:
    """An evals.json object as a report (what does not fit the shape is left out)."""
    sections = {}
    for name, value in raw.items():
        if name == "config" or not isinstance(value, dict):
            continue
        base, tuned = value.get("base"), value.get("tuned")
        sections[name] = EvalSection(
            description=str(value.get("description", "")),
            base=base if isinstance(base, dict) else {},
            tuned=tuned if isinstance(tuned, dict) else {},
            flags=[str(f) for f in value.get("flags") or [] if isinstance(f, str)],
            details=value.get("details"),
        )
    config = raw.get("config")
    return EvalsReport(sections=sections, config=config if isinstance(config, dict) else {})
