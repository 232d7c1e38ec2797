"""`--report-to tensorboard,mlflow,wandb`: each tracker holds the same metrics as metrics.jsonl (read back
from what it wrote: TensorBoard's event files, MLflow's store, W&B's offline run file), the config and the
summary; a resumed run continues the same tracker runs without duplicate steps."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.recipes.test_sft import config, run_with_fault
from tunery.errors import TuneryError
from tunery.recipes import sft
from tunery.run import trackers
from tunery.run.files import read_metrics


def losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): r["train_loss"] for r in read_metrics(run) if "train_loss" in r}


def tensorboard_series(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def mlflow_run(run: Path) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "trackers.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=ids["uri"]), ids["run_id"]


def wandb_records(run: Path) -> list[Any]:
    """The records of W&B's offline run file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    found = []
    # one file per process: a resumed run adds one with the same run id (`wandb sync` joins them)
    for path in sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))):
        found += _records(Path(path).read_bytes(), wandb_internal_pb2.Record)
    return found


def _records(data: bytes, message: Any) -> list[Any]:
    assert data[:4] == b":W&B"
    pos, pending, found = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = message()
            record.ParseFromString(pending)
            found.append(record)
    return found


def wandb_history(run: Path, key: str) -> dict[int, float]:
    history = {}
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            if key in items:
                history[int(items["_step"])] = float(items[key])
    return history


def wandb_summary_keys(run: Path) -> set[str]:
    keys = set()
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "summary":
            keys |= {u.key or "/".join(u.nested_key) for u in record.summary.update}
    return keys


def test_every_tracker_holds_what_metrics_jsonl_holds(chat_files, tmp_path: Path) -> None:
    train, valid = chat_files
    out = tmp_path / "runs" / "sft"
    sft.run(
        None,
        config(
            train,
            valid,
            out,
            epochs=1,
            report_to="tensorboard,mlflow,wandb",
            tracking_tags="a,b",
            wandb_run_id="ftjob-run-1",  # the service's: the job's id
        ),
    )
    expected = losses(out)
    assert len(expected) == 6
    # TensorBoard: the same series, step by step
    assert {s: pytest.approx(v) for s, v in tensorboard_series(out, "train_loss")} == expected
    # MLflow: the local store beside the run directory, the config as params, the summary as metrics
    client, run_id = mlflow_run(out)
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert history == pytest.approx(expected)
    mlflow = client.get_run(run_id)
    assert mlflow.info.status == "FINISHED" and mlflow.info.run_name == "sft"
    assert mlflow.data.params["lr"] == "0.02" and mlflow.data.params["model"] == "tiny-random"
    assert mlflow.data.metrics["summary.steps"] == 6 and {"a", "b"} <= set(mlflow.data.tags)
    # W&B, offline: the history and the summary in its run file
    assert wandb_history(out, "train_loss") == pytest.approx(expected)
    assert {"summary.steps", "summary.tokens_per_second"} <= wandb_summary_keys(out)
    runs = {r.run.run_id for r in wandb_records(out) if r.WhichOneof("record_type") == "run"}
    assert runs == {"ftjob-run-1"}


def test_a_resumed_run_continues_the_same_tracker_runs(
    chat_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # W&B shares its service with child processes through WANDB_SERVICE; the killed run must have its own,
    # as a run started from a shell has (else this process's service still holds the killed run's id)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    train, valid = chat_files
    out = tmp_path / "run"
    cfg = config(train, valid, out, report_to="tensorboard,mlflow,wandb")
    run_with_fault(cfg, "after_step:3", returncode=-9)  # killed after step 3; the checkpoint is at step 2
    first = json.loads((out / "trackers.json").read_text())
    from tunery.cli import main

    assert main(["train", "sft", "--resume", str(out)]) == 0
    assert json.loads((out / "trackers.json").read_text()) == first
    expected = losses(out)
    steps = [s for s, _ in tensorboard_series(out, "train_loss")]
    assert steps == sorted(expected)  # step 3's first attempt was purged, not doubled
    client, run_id = mlflow_run(out)
    history = client.get_metric_history(run_id, "train_loss")
    assert {m.step for m in history} == set(expected) and client.get_run(run_id).info.status == "FINISHED"
    # W&B writes from a process of its own, so a SIGKILL may lose what it had not written yet; metrics.jsonl
    # keeps it. What is there matches, and the resumed steps are all there.
    history = wandb_history(out, "train_loss")
    assert history == pytest.approx({s: expected[s] for s in history}) and set(range(3, 13)) <= set(history)
    assert len({r.run.run_id for r in wandb_records(out) if r.WhichOneof("record_type") == "run"}) == 1


def test_report_to_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TuneryError, match="unknown tracker comet"):
        trackers.check_report_to("tensorboard,comet")
    trackers.check_report_to("none")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(TuneryError, match=r"pip install 'tunery\[mlflow\]'"):
        trackers.check_report_to("mlflow")


def test_wandb_stays_offline_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert trackers.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert trackers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trackers.wandb_mode() == "offline"


def test_the_flag_on_the_command_line(chat_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunery.cli import main

    train, valid = chat_files
    out = tmp_path / "run"
    argv = ["train", "dpo", "--model", "tiny-random", "--data", str(train), "--out", str(out)]
    assert main([*argv, "--report-to", "tensorbord"]) != 0
    assert "unknown tracker tensorbord" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_other_recipes_report_too(method: str, tmp_path: Path) -> None:
    """The trackers live in the run lifecycle, so every recipe has them: DPO and the reward model here."""
    from tests.conftest import write_jsonl
    from tunery.cli import main

    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"Question {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": "A clear answer."}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }
        for i in range(12)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / method
    argv = [
        "train",
        method,
        "--model",
        "tiny-random",
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        "2",
    ]
    argv += ["--report-to", "tensorboard", "--batch-size", "4"]
    if method == "dpo":
        argv += ["--safety-evals", "none"]
    assert main(argv) == 0
    metric = "train_loss"
    assert [s for s, _ in tensorboard_series(out, metric)] == sorted(
        int(r["step"]) for r in read_metrics(out) if metric in r
    )


def test_a_failing_tracker_does_not_stop_the_run(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def log(self, step: int, values: Any) -> None:
            raise OSError("disk full")

        def finish(self, summary: Any) -> None:
            raise AssertionError("dropped trackers get nothing more")

    class Kept:
        seen: list[int] = []

        def log(self, step: int, values: Any) -> None:
            self.seen.append(step)

        def finish(self, summary: Any) -> None:
            self.seen.append(-1)

    both = trackers.Trackers([Broken(), Kept()])
    both.log({"step": 1, "train_loss": 1.0})
    both.log({"step": 2, "train_loss": 0.5})
    both.finish({"steps": 2})
    assert Kept.seen == [1, 2, -1] and "Broken failed to log a step (disk full)" in caplog.text
