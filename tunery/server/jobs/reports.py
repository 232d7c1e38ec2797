"""What the job's commands leave behind, read: the file check's `--json` report, a failed command's log,
and the run directory (metrics.jsonl, summary.json, checkpoints/) through its typed contract
(tunery/run/files.py). Plain functions of files; the scheduler turns them into statuses and events."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

from tunery.data.formats import PROBLEM_KEY, sniff_format
from tunery.errors import TuneryError
from tunery.run.files import (
    FULL_VALID_ACCURACY,
    FULL_VALID_LOSS,
    METRICS,
    STEP,
    TOTAL_STEPS,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    VALID_ACCURACY,
    VALID_LOSS,
    RunSummary,
    is_finished,
    read_summary,
)
from tunery.server.settings import Settings

# the file format each job type trains on (`tunery data validate --json`'s `format`), and OpenAI's names
FILE_FORMATS = {
    "supervised": "chat",
    "dpo": "preference",
    "reinforcement": "prompts",
    "kto": "unpaired",
    "reward_model": "preference",
}
FORMAT_NAMES = {
    "chat": "fine-tune-chat",
    "preference": "fine-tune-preference",
    "unpaired": "unpaired-feedback",
}
SCREENING_KEYS = ("personal_data", "offensive_content")  # `data validate --screen-*` problems
METRIC_NAMES = {  # metric -> how the event message says it
    TRAIN_LOSS: "training loss",
    VALID_LOSS: "validation loss",
    FULL_VALID_LOSS: "full validation loss",
    "train_reward_mean": "train mean reward",
    "valid_reward_mean": "validation mean reward",
    TRAIN_ACCURACY: "training accuracy",
}
CHECKPOINT_METRICS = (  # the metrics a checkpoint object carries
    TRAIN_LOSS,
    TRAIN_ACCURACY,
    VALID_LOSS,
    VALID_ACCURACY,
    FULL_VALID_LOSS,
    FULL_VALID_ACCURACY,
    "train_reward_mean",
    "valid_reward_mean",
)

# --- the file check ---------------------------------------------------------------------------------------


def validation_error(
    report: dict[str, Any], param: str, file_id: str, kind: str, foreign: str | None = None
) -> dict[str, Any] | None:
    """The job's `error` for a `tunery data validate --json` report, or None when the file is usable.
    `foreign` is `foreign_format`'s message for a file in a format Tunery does not read."""
    label = "training" if param == "training_file" else "validation"
    expected = FILE_FORMATS[kind]
    found = report.get("format")
    problems = report.get("problems", [])
    if foreign is None:  # the check's own message, should the file have gone since
        foreign = next(
            (f"line {p['line']}: {p['message']}" for p in problems if p.get("key") == PROBLEM_KEY), None
        )
    if foreign is not None:
        return {
            "code": f"invalid_{label}_file",
            "message": f"The job failed due to an invalid {label} file. Input file {file_id}, {foreign}",
            "param": param,
        }
    if found != expected and expected != "prompts":
        return {
            "code": f"invalid_{label}_file",
            "message": (
                f"The job failed due to an invalid {label} file. Input file {file_id} is in the "
                f"{FORMAT_NAMES.get(str(found), str(found))} format, but the specified fine-tuning job is not "
                f"using '{_method_for(str(found))}' as the training method (provided method={kind})."
            ),
            "param": param,
        }
    errors = [p for p in report.get("problems", []) if p.get("severity") == "error"]
    if not errors:
        return None
    if all(p.get("key") in SCREENING_KEYS for p in errors):
        found = "; ".join(str(p["message"]) for p in errors)
        return {
            "code": f"invalid_{label}_file",
            "message": (
                f"The job failed due to an invalid {label} file. This {label} file was blocked by data "
                f"screening: {found}. Remove those lines or mask the personal data (`tunery data screen "
                "FILE --pii redact` writes a masked copy), then upload the file again."
            ),
            "param": param,
        }
    if all(p.get("key") == "invalid_n_examples" for p in errors):
        message = errors[0]["message"]
        return {
            "code": "invalid_n_examples",
            "message": f"{label.capitalize()} file has {message}",
            "param": param,
        }
    shown = "; ".join(
        (f"line {p['line']}: " if p.get("line") else "") + f"{p['message']} [{p['key']}]" for p in errors[:5]
    )
    more = f" (and {len(errors) - 5} more errors)" if len(errors) > 5 else ""
    return {
        "code": f"invalid_{label}_file",
        "message": f"The job failed due to an invalid {label} file. Invalid file format. {shown}{more}",
        "param": param,
    }


def read_check_report(path: Path) -> dict[str, Any] | None:
    """The file check's `--json` report, or None when it wrote none (it was killed, or crashed)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def unreported_check_error(log_path: Path, exit_code: int, offset: int, param: str) -> dict[str, Any]:
    """The job's `error` for a file check that ended without its report: what its log says."""
    label = "training" if param == "training_file" else "validation"
    message = tail_error(log_path, exit_code, offset, process="The file check")
    return {
        "code": f"invalid_{label}_file",
        "message": f"The job failed due to an invalid {label} file. {message}",
        "param": param,
    }


def screening_warnings(report: dict[str, Any], param: str, file_id: str, settings: Settings) -> list[str]:
    """Job event messages for what data screening found but let through (policy warn or redact)."""
    label = "Training" if param == "training_file" else "Validation"
    outcomes = {
        ("personal_data", "redact"): "it is masked in the copy the job trains on",
        ("offensive_content", "redact"): "those lines are left out of the copy the job trains on",
    }
    messages = []
    for p in report.get("problems", []):
        if p.get("key") in SCREENING_KEYS and p.get("severity") == "warning":
            policy = settings.screen_pii if p["key"] == "personal_data" else settings.screen_content
            outcome = outcomes.get((p["key"], policy), "the job continues")
            messages.append(f"{label} file {file_id}: data screening found {p['message']}; {outcome}")
    return messages


def foreign_format(report: dict[str, Any], path: Path, filename: str, kind: str) -> str | None:
    """For a file the check found in a foreign format (a CSV, a JSON array, legacy prompt/completion...):
    what it looks like, what the job's method reads, and the convert command naming the uploaded file."""
    if not any(p.get("key") == PROBLEM_KEY for p in report.get("problems", [])):
        return None
    try:
        found = sniff_format(path, name=filename)
    except TuneryError:
        return None
    return None if found is None else f"line {found.line}: {found.message(FILE_FORMATS[kind])}"


def _method_for(file_format: str) -> str:
    return {"chat": "supervised", "preference": "dpo", "unpaired": "kto"}.get(file_format, file_format)


# --- a command's end --------------------------------------------------------------------------------------


def tail_error(log_path: Path, exit_code: int, offset: int = 0, process: str = "the training process") -> str:
    """What went wrong, from a finished command's log: the CLI's `tunery: error:` message, else the last
    line (an exception's one-line summary), never a whole traceback. The log is appended to by every
    attempt: only what this one wrote, from `offset` on, is read."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        text = ""
    marker = "tunery: error: "
    if marker in text:
        return text.rsplit(marker, 1)[1].strip()[:2000]
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip()[:500] if lines else "no output"
    how = death_cause(exit_code) or f"exited with status {exit_code}"
    return f"{process} {how}: {last}"


def death_cause(exit_code: int) -> str | None:
    """How a process was killed, from its exit status (negative from Popen, 128 + N from a shell), or None
    for an ordinary exit. SIGKILL from nobody we know of is most often the out-of-memory killer."""
    number = -exit_code if exit_code < 0 else exit_code - 128
    if not 0 < number < signal.NSIG:
        return None
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"was killed by {name}" + (" (out of memory?)" if number == signal.SIGKILL else "")


def stop_cause(error: str) -> str | None:
    """The recipes catch SIGTERM and SIGINT, save a checkpoint and exit with `stopped at step N/M (SIGTERM);
    continue with: ...` (training/common.py): when the service did not send it, the run was stopped by
    someone else (a system shutdown, an eviction) and continues like a killed one."""
    found = re.match(r"stopped at step \d+/\d+ \((\w+)\)", error)
    return f"was stopped by {found[1]} (not sent by the service)" if found else None


# --- the run directory ------------------------------------------------------------------------------------


def finished_summary(run_dir: Path) -> RunSummary | None:
    """The summary of a run that has finished, or None. A recipe writes final/ (atomically) and then
    summary.json at its very end, so with both the model is complete whatever the exit status (a kill
    during the model card or exit); a summary.json that does not parse is not an end."""
    return read_summary(run_dir) if is_finished(run_dir) else None


def checkpoint_steps(run_dir: Path) -> set[int]:
    """The steps of the run's complete checkpoints (checkpoints/step-N/ with its state.json)."""
    root = run_dir / "checkpoints"
    steps: set[int] = set()
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("step-") and (path / "state.json").is_file():
                try:
                    steps.add(int(path.name.removeprefix("step-")))
                except ValueError:
                    continue
    return steps


def resume_point(run_dir: Path) -> str:
    """Where a job continues: "the checkpoint at step 40", or "the start (no checkpoint was saved)"."""
    steps = checkpoint_steps(run_dir)
    return f"the checkpoint at step {max(steps)}" if steps else "the start (no checkpoint was saved)"


class MetricsReader:
    """Reads the records a running recipe appends to metrics.jsonl, each once: from where the last read
    stopped, complete lines only (the line being written is read next time). A resumed run rewrites the
    file, so a shorter file starts the reading over; the caller skips the steps it has reported."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS
        self.offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        records = []
        for line in chunk[: end + 1].splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
        return records


def metrics_message(record: dict[str, Any]) -> str:
    step, total = record.get(STEP), record.get(TOTAL_STEPS)
    head = f"Step {step}/{total}" if total else f"Step {step}"
    parts = [
        f"{label}={record[key]:.4f}"
        for key, label in METRIC_NAMES.items()
        if isinstance(record.get(key), float | int)
    ]
    return head + (": " + ", ".join(parts) if parts else "")


def energy_message(energy: Any) -> str | None:
    """The run's energy as an event: its numbers are estimates on most machines, so the method goes along."""
    if not isinstance(energy, dict):
        return None  # tracking was off
    if "kwh" not in energy:
        return f"Energy not measured: {energy.get('error', 'no reading')}"
    kwh, kg = energy["kwh"], energy["kg_co2e"]
    amount = f"{kwh:.2g} kWh" if kwh >= 1e-3 else f"{kwh * 1e3:.2g} Wh"  # a short job uses a few Wh
    amount += f", {kg:.2g} kg CO2e" if kg >= 1e-3 else f", {kg * 1e3:.2g} g CO2e"
    where = energy.get("country", "?")
    return f"Energy: {amount} ({energy.get('method', 'method not recorded')}; grid: {where})"


def results_csv(records: list[dict[str, Any]]) -> str:
    """The job's result file (step_metrics.csv), one row per step with a loss or an accuracy."""
    columns = (TRAIN_LOSS, TRAIN_ACCURACY, VALID_LOSS, VALID_ACCURACY)
    lines = ["step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"]
    for r in records:
        values = [r.get(name) for name in columns]
        if all(v is None for v in values):
            continue
        lines.append(",".join([str(r.get(STEP, ""))] + ["" if v is None else f"{v:.6g}" for v in values]))
    return "\n".join(lines) + "\n"
