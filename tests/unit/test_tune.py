"""`tunery tune`: the search space, the study's results, pruning, a stopped search resuming its trials
from their checkpoints, a dead worker's trial tried again, parallel trials (a fake trainer with the same
flags and run directory, tests/unit/fake_trainer.py), and one real search on tiny-random."""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tunery import tuning
from tunery.cli import main
from tunery.errors import TuneryError
from tunery.recipes.configs import CONFIGS
from tunery.run.config import build_config, field_types
from tunery.tuning import Search, parse_space, report, run_search

FAKE = (sys.executable, str(Path(__file__).parent / "fake_trainer.py"))
FIELDS = field_types(CONFIGS["sft"])


def test_space_kinds() -> None:
    space = parse_space(
        ["lr=loguniform(1e-5,1e-3)", "lora-rank=choice(8,16,32)", "epochs=int(1,4)", "warmup_ratio=uniform(0,0.2)",
         "schedule=choice(cosine,linear)"],
        FIELDS,
    )  # fmt: skip
    assert [(d.name, d.kind) for d in space] == [
        ("lr", "loguniform"), ("lora_rank", "choice"), ("epochs", "int"), ("warmup_ratio", "uniform"),
        ("schedule", "choice"),
    ]  # fmt: skip
    assert (
        space[0].low == 1e-5 and space[1].choices == (8, 16, 32) and space[4].choices == ("cosine", "linear")
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lr", "expected NAME=KIND(ARGS)"),
        ("lrr=loguniform(1e-5,1e-3)", "did you mean lr?"),
        ("lr=gaussian(0,1)", "not one of"),
        ("lr=loguniform(0,1e-3)", "positive low"),
        ("lr=uniform(1e-3,1e-5)", "low must be below high"),
        ("epochs=int(1,2.5)", "whole numbers"),
        ("lr=uniform(1e-3)", "two numbers"),
        ("lora_rank=choice()", "one or more plain values"),
    ],
)
def test_space_errors_say_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(TuneryError, match=re.escape(message)):
        parse_space([spec], FIELDS)


def search(out: Path, trials: int, space: list[str], **changes) -> Search:  # type: ignore[no-untyped-def]
    values = {
        "method": "sft",
        "base_config": None,
        "base_values": {"model": "tiny-random", "data": "d.jsonl", "valid": "v.jsonl"},
        "sets": [],
        "space": parse_space(space, FIELDS),
        "out": out,
        "trials": trials,
        "metric": "valid_loss",
        "direction": "minimize",
        "parallel": 1,
        "storage": f"sqlite:///{out / 'study.db'}",
        "study_name": "s",
        "pruner": "none",
        "sampler": "random",
        "seed": 0,
        "launcher": FAKE,
    }
    out.mkdir(parents=True, exist_ok=True)
    return Search(**(values | changes))


def calls(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]


def test_the_best_trial_its_config_and_the_importance_plot(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    s = search(tmp_path, 5, ["lr=loguniform(1e-5,1e-1)", "lora_rank=choice(4,8)"])
    study = run_search(s)
    report(study, s)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    best = min(trials, key=lambda t: t.value)
    assert study.best_trial.number == best.number
    # the fake's loss is |log10(lr) + 3| + 1/step: the best trial's lr is the closest to 1e-3 on a log scale
    distance = [abs(math.log10(t.params["lr"]) + 3) for t in trials]
    assert distance[best.number] == min(distance)
    saved = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert saved["lr"] == best.params["lr"] and saved["model"] == "tiny-random" and "out" not in saved
    rows = (tmp_path / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,full_valid_loss,lr,lora_rank") and len(rows) == 6
    assert (tmp_path / "importance.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert f"best: trial {best.number}" in printed
    # each trial ran the trainer with its own values, in its own run directory
    ran = calls(tmp_path)
    assert sorted(c["run"] for c in ran) == [f"trial-{i:03d}" for i in range(5)]
    assert all(float(c["sets"]["lr"]) == study.trials[int(c["run"][-3:])].params["lr"] for c in ran)
    # again: the study has its 5 trials, nothing more runs
    run_search(s)
    assert len(calls(tmp_path)) == 5


def test_the_pruner_stops_a_trial_behind_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "POLL_SECONDS", 0.1)
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.3")
    s = search(tmp_path, 3, ["lr=choice(0.001,0.1)"], pruner="median")
    study = tuning.make_study(s)
    for lr in (0.001, 0.001, 0.1):
        study.enqueue_trial({"lr": lr})
    study = run_search(s)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = study.trials[2]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "trial-002" / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) < 6 and not (tmp_path / "trial-002" / "summary.json").exists()  # SIGTERM, not the end
    assert pruned.user_attrs["pruned_at_step"] == pruned.last_step


def test_a_stopped_search_resumes_its_trial_from_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuning, "POLL_SECONDS", 0.1)
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.3")
    s = search(tmp_path, 2, ["lr=loguniform(1e-4,1e-2)"])
    threading.Timer(0.8, lambda: signal.raise_signal(signal.SIGINT)).start()  # Ctrl-C mid-trial
    with pytest.raises(TuneryError, match="continue with the same command"):
        run_search(s)
    first = optuna.load_study(study_name="s", storage=s.storage).trials[0]
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    done = len(list((tmp_path / "trial-000" / "checkpoints").iterdir()))
    assert 0 < done < 6
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.02")
    study = run_search(s)
    finished = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(finished) == 2
    retry = next(t for t in finished if t.user_attrs.get("resume_of") == 0)
    assert retry.params == first.params and retry.user_attrs["run_dir"] == str(tmp_path / "trial-000")
    assert [c["resume"] for c in calls(tmp_path) if c["run"] == "trial-000"] == [False, True]
    assert (tmp_path / "trial-000" / "summary.json").exists()


def test_a_dead_workers_trial_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial left RUNNING by a process that died: its heartbeat stops, another run of the search fails
    it and tries its values again in its run directory, from the checkpoint."""
    monkeypatch.setattr(tuning, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(tuning, "HEARTBEAT_GRACE", 2)
    s = search(tmp_path, 1, ["lr=loguniform(1e-4,1e-2)"])
    study = tuning.make_study(s)
    trial = study.ask()
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    trial.set_user_attr("run_dir", str(tmp_path / "trial-000"))
    study._storage.record_heartbeat(trial._trial_id)  # as optimize's heartbeat thread does
    run = tmp_path / "trial-000"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"lr": repr(lr)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "valid_loss": 1.0}) + "\n")
    time.sleep(3)  # past the grace period: the worker is taken for dead
    study = run_search(s)
    trials = study.get_trials()
    assert trials[0].state.name == "FAIL" and trials[1].state.name == "COMPLETE"
    assert trials[1].params == {"lr": lr} and calls(tmp_path) == [
        {"run": "trial-000", "resume": True, "sets": {}}
    ]


def test_parallel_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    s = search(tmp_path, 4, ["lr=loguniform(1e-4,1e-2)"], parallel=2)
    started = time.monotonic()
    study = run_search(s)
    assert [t.state.name for t in study.get_trials()].count("COMPLETE") == 4
    assert time.monotonic() - started < 4 * 6 * 0.1 + 8  # (not a speed claim: two at a time finish)


@pytest.mark.system  # two trials as processes of their own, ~17 s
def test_tune_on_tiny_random(chat_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command end to end: real trials of `tunery train sft`, normal run directories, a best config
    that `tunery train` takes as it is."""
    train, valid = chat_files
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump({"model": "tiny-random", "data": str(train), "valid": str(valid), "epochs": 1,
                        "batch_size": 8, "safety_evals": "none", "precision": "fp32"})
    )  # fmt: skip
    out = tmp_path / "tune"
    argv = ["tune", "--config", str(base), "--trials", "2", "--space", "lr=loguniform(1e-3,5e-2)",
            "lora_rank=choice(4,8)", "--out", str(out), "--pruner", "none"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best: trial" in printed and (out / "trial-000" / "summary.json").is_file()
    best = yaml.safe_load((out / "best.yaml").read_text())
    config = build_config(CONFIGS["sft"], out / "best.yaml", {"out": str(tmp_path / "again")})
    assert config.lr == best["lr"] and config.lora_rank in (4, 8)


def test_tune_refuses_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": "tiny-random", "data": "train.jsonl"}))
    out = str(tmp_path / "t")
    assert (
        main(
            [
                "tune",
                "--config",
                str(base),
                "--trials",
                "2",
                "--space",
                "lr=loguniform(1e-4,1e-2)",
                "--out",
                out,
            ]
        )
        != 0
    )
    assert "give the base config a `valid` file" in capsys.readouterr().err
    assert (
        main(["tune", "--config", str(base), "--trials", "2", "--space", "data=choice(a,b)", "--out", out])
        != 0
    )
    assert "not a hyperparameter" in capsys.readouterr().err
