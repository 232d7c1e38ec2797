"""Fine-tuning jobs through the scheduler, on the fake CLI (fake_tunery.py): create, every status
transition, events, checkpoints, pagination, errors, and recovery across a restart."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api, chat_lines, fake_settings, jsonl, pair_lines
from tunery.server.app import create_app


def argv(settings, job_id: str) -> list[list[str]]:
    path = settings.jobs_dir / job_id / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_supervised_job_to_succeeded(api: Api, settings) -> None:
    job = api.create_job(
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}},
        suffix="support",
        metadata={"team": "a"},
        seed=7,
    )
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert (job["status"], job["fine_tuned_model"], job["error"], job["seed"]) == (
        "validating_files",
        None,
        None,
        7,
    )
    assert job["hyperparameters"] == {"batch_size": 5, "learning_rate_multiplier": "auto", "n_epochs": 2}
    assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2 and job["metadata"] == {
        "team": "a"
    }
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded", done
    assert re.fullmatch(r"ft:tiny-random:acme:support:[A-Za-z0-9]{8}", done["fine_tuned_model"])
    assert (
        done["trained_tokens"] == 4000
        and done["finished_at"] >= done["created_at"]
        and done["estimated_finish"] is None
    )
    assert done["hyperparameters"] == {"batch_size": 5, "learning_rate_multiplier": 1.0, "n_epochs": 2}
    [command] = argv(settings, job["id"])
    assert command[0] == "sft" and command[command.index("--epochs") : command.index("--epochs") + 2] == [
        "--epochs",
        "2",
    ]
    assert (
        "--seed" in command
        and command[command.index("--seed") + 1] == "7"
        and "--lr-multiplier" not in command
    )

    events = api.events(job["id"])
    messages = [e["message"] for e in reversed(events)]
    assert messages[0] == f"Created fine-tuning job: {job['id']}"
    assert messages[1].startswith("Validating training file: file-")
    assert "Files validated, moving job to queued state" in messages and "Fine-tuning job started" in messages
    assert messages[-3] == f"New fine-tuned model created: {done['fine_tuned_model']}"
    assert messages[-2].startswith("Energy: ") and messages[-1] == "The job has successfully completed"
    metrics = [e for e in reversed(events) if e["type"] == "metrics"]
    assert [m["data"]["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["data"]["train_loss"] == 2.0 and metrics[0]["message"].startswith(
        "Step 1/4: training loss=2.0000"
    )
    assert all(e["object"] == "fine_tuning.job.event" and e["id"].startswith("ftevent-") for e in events)
    page = api.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 3}).json()
    assert page["has_more"] is True and [e["id"] for e in page["data"]] == [e["id"] for e in events[:3]]
    rest = api.get(f"/fine_tuning/jobs/{job['id']}/events", params={"after": page["data"][-1]["id"]}).json()
    assert rest["data"][0]["id"] == events[3]["id"]

    ckpts = api.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert [c["step_number"] for c in ckpts["data"]] == [4, 3, 2, 1]
    final = ckpts["data"][0]
    assert final["fine_tuned_model_checkpoint"] == done["fine_tuned_model"] and final["id"].startswith(
        "ftckpt_"
    )
    assert final["metrics"]["step"] == 4.0 and final["object"] == "fine_tuning.job.checkpoint"
    for c in ckpts["data"][1:]:
        assert re.fullmatch(
            rf"ft:tiny-random:acme:support:[A-Za-z0-9]{{8}}:ckpt-step-{c['step_number']}",
            c["fine_tuned_model_checkpoint"],
        )
        assert c["metrics"]["train_loss"] == pytest.approx(2.0 / c["step_number"])
    assert ckpts["first_id"] == final["id"]
    second = api.get(
        f"/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 2, "after": ckpts["data"][1]["id"]}
    ).json()
    assert [c["step_number"] for c in second["data"]] == [2, 1] and second["has_more"] is False

    [result] = done["result_files"]
    meta = api.get(f"/files/{result}").json()
    assert meta["purpose"] == "fine-tune-results"
    csv = base64.b64decode(api.get(f"/files/{result}/content").content).decode()
    assert csv.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert csv.splitlines()[1].startswith("1,2,0.1,,")


def test_validation_failures_name_the_file_and_line(api: Api) -> None:
    bad = jsonl(
        chat_lines(11)[:2]
        + ["{broken", {"messages": [{"role": "user", "content": "hi"}]}]
        + chat_lines(11)[2:]
    )
    job = api.wait_status(api.create_job(bad)["id"], *TERMINAL)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_training_file"
    assert job["error"]["param"] == "training_file"
    assert "line 3" in job["error"]["message"] and "line 4" in job["error"]["message"]
    few = api.wait_status(api.create_job(jsonl(chat_lines(7)))["id"], *TERMINAL)
    assert few["error"]["code"] == "invalid_n_examples" and "7 examples" in few["error"]["message"]
    training = api.upload(jsonl(chat_lines(10)))
    validation = api.upload(b"nope\n")
    both = api.wait_status(
        api.create_job(training_file=training, validation_file=validation)["id"], *TERMINAL
    )
    assert both["error"]["param"] == "validation_file" and both["error"]["code"] == "invalid_validation_file"
    assert api.events(both["id"])[0]["level"] == "error"
    dpo = api.wait_status(api.create_job(method={"type": "dpo"})["id"], *TERMINAL)
    assert (
        "fine-tune-chat format" in dpo["error"]["message"]
        and "provided method=dpo" in dpo["error"]["message"]
    )


def test_create_errors_are_400_with_param(api: Api) -> None:
    file_id = api.upload(jsonl(chat_lines(10)))
    cases = [
        ({"model": "gpt-9", "training_file": file_id}, "model"),
        ({"model": "tiny-random", "training_file": "file-missing"}, "training_file"),
        (
            {"model": "tiny-random", "training_file": file_id, "validation_file": "file-missing"},
            "validation_file",
        ),
        ({"model": "tiny-random", "training_file": file_id, "method": {"type": "rl"}}, "method.type"),
        (
            {
                "model": "tiny-random",
                "training_file": file_id,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
            },
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {
                "model": "tiny-random",
                "training_file": file_id,
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}},
            },
            "method.dpo.hyperparameters.beta",
        ),
        (
            {"model": "tiny-random", "training_file": file_id, "method": {"type": "reinforcement"}},
            "method.reinforcement.grader",
        ),
        ({"model": "tiny-random", "training_file": file_id, "suffix": "a:b"}, "suffix"),
        ({"model": "tiny-random", "training_file": file_id, "seed": -1}, "seed"),
        (
            {"model": "tiny-random", "training_file": file_id, "metadata": {str(i): "x" for i in range(17)}},
            "metadata",
        ),
        (
            {"model": "tiny-random", "training_file": file_id, "hyperparameters": {"batch_size": 1000}},
            "hyperparameters.batch_size",
        ),
    ]
    for body, param in cases:
        r = api.post("/fine_tuning/jobs", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    results = api.upload(b"{}\n", name="x.jsonl", purpose="batch")
    r = api.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": results})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_purpose"


def test_legacy_hyperparameters_and_auto(api: Api, settings) -> None:
    job = api.create_job(
        hyperparameters={"n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": 0.5}
    )
    assert job["method"] == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"batch_size": "auto", "learning_rate_multiplier": 0.5, "n_epochs": 1}
        },
    }
    api.wait_status(job["id"], "succeeded")
    [command] = argv(settings, job["id"])
    assert "--batch-size" not in command and command[command.index("--lr-multiplier") + 1] == "0.5"


def test_dpo_and_reinforcement_commands(api: Api, settings) -> None:
    dpo = api.create_job(
        jsonl(pair_lines(10)), method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    )
    assert api.wait_status(dpo["id"], *TERMINAL)["status"] == "succeeded"
    [command] = argv(settings, dpo["id"])
    assert command[0] == "dpo" and command[command.index("--beta") + 1] == "0.2"
    grader = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    prompts = jsonl(
        [{"messages": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1)} for i in range(10)]
    )
    rl = api.create_job(
        prompts,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {"eval_interval": 2}},
        },
    )
    assert rl["method"]["reinforcement"]["grader"] == grader
    assert api.wait_status(rl["id"], *TERMINAL)["status"] == "succeeded"
    [command] = argv(settings, rl["id"])
    assert command[0] == "grpo" and command[command.index("--eval-every") + 1] == "2"
    assert json.loads(Path(command[command.index("--grader") + 1]).read_text()) == grader
    bad = {
        "type": "string_check",
        "name": "x",
        "input": "{{sample.output_text}}",
        "reference": "a",
        "operation": "contains",
    }
    r = api.post(
        "/fine_tuning/jobs",
        json={
            "model": "tiny-random",
            "training_file": rl["training_file"],
            "method": {"type": "reinforcement", "reinforcement": {"grader": bad}},
        },
    )
    assert r.status_code == 400 and "operation" in r.json()["error"]["message"]
    judge = {
        "type": "score_model",
        "name": "j",
        "input": [{"role": "user", "content": "rate"}],
        "model": "gpt-4o-2024-08-06",
    }
    r = api.post(
        "/fine_tuning/jobs",
        json={
            "model": "tiny-random",
            "training_file": rl["training_file"],
            "method": {"type": "reinforcement", "reinforcement": {"grader": judge}},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.reinforcement.grader.model"


def test_continued_training_from_a_fine_tuned_model(api: Api, settings) -> None:
    sft = api.wait_status(api.create_job()["id"], "succeeded")
    # supervised again on top of it (OpenAI's continued fine-tuning): a new adapter over the merged one
    more = api.create_job(model=sft["fine_tuned_model"], training_file=sft["training_file"])
    assert api.wait_status(more["id"], *TERMINAL)["status"] == "succeeded"
    [command] = argv(settings, more["id"])
    assert command[0] == "sft" and command[command.index("--adapter") + 1].endswith(f"{sft['id']}/run/final")
    dpo = api.create_job(jsonl(pair_lines(10)), model=sft["fine_tuned_model"], method={"type": "dpo"})
    done = api.wait_status(dpo["id"], *TERMINAL)
    assert done["status"] == "succeeded" and done["fine_tuned_model"].startswith("ft:tiny-random:acme::")
    [command] = argv(settings, dpo["id"])
    assert command[command.index("--adapter") + 1] == str(settings.jobs_dir / sft["id"] / "run" / "final")


def test_list_jobs_pagination_and_metadata(api: Api) -> None:
    ids = [
        api.create_job(metadata={"n": str(i), "team": "a" if i % 2 else "b"} if i else None)["id"]
        for i in range(4)
    ]
    page = api.get("/fine_tuning/jobs", params={"limit": 3}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:3] and page["has_more"] is True
    rest = api.get("/fine_tuning/jobs", params={"after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    team_a = api.get("/fine_tuning/jobs", params={"metadata[team]": "a"}).json()["data"]
    assert [j["id"] for j in team_a] == [ids[3], ids[1]]
    assert [j["id"] for j in api.get("/fine_tuning/jobs?metadata=null").json()["data"]] == [ids[0]]
    assert api.get("/fine_tuning/jobs", params={"after": "ftjob-nope"}).status_code == 404


def test_cancel(api: Api, settings, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.5")
    job = api.create_job(
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20, "batch_size": 5}}}
    )
    api.wait(job["id"], lambda j: j["status"] == "running" and j["estimated_finish"] is not None)
    r = api.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    scheduler = api.client.app.state.tunery.scheduler
    api.wait(job["id"], lambda j: (job["id"], "train") not in scheduler.procs, timeout=10)
    later = api.get(f"/fine_tuning/jobs/{job['id']}").json()
    assert later["status"] == "cancelled" and later["fine_tuned_model"] is None and later["finished_at"]
    r = api.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 400 and r.json()["error"]["code"] == "job_not_cancellable"
    queued = api.create_job()
    assert api.post(f"/fine_tuning/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"


def test_pause_and_resume(api: Api, settings, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.2")
    job = api.create_job(
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 5}}}
    )
    api.wait(
        job["id"],
        lambda j: j["status"] == "running" and any(e["type"] == "metrics" for e in api.events(j["id"])),
    )
    r = api.post(f"/fine_tuning/jobs/{job['id']}/pause")
    assert r.status_code == 200 and r.json()["status"] == "paused"
    api.wait(
        job["id"],
        lambda j: any(
            e["message"].startswith("Job paused; it will resume from step") for e in api.events(j["id"])
        ),
    )
    assert api.get(f"/fine_tuning/jobs/{job['id']}").json()["status"] == "paused"
    assert api.post(f"/fine_tuning/jobs/{job['id']}/pause").status_code == 400
    r = api.post(f"/fine_tuning/jobs/{job['id']}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued"
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded"
    first, second = argv(settings, job["id"])
    assert "--resume" not in first and second[second.index("--resume") + 1] == str(
        settings.jobs_dir / job["id"] / "run"
    )
    steps = [e["data"]["step"] for e in reversed(api.events(job["id"])) if e["type"] == "metrics"]
    assert steps == list(range(1, 9))  # each step reported once, none lost across the pause
    assert api.post(f"/fine_tuning/jobs/{job['id']}/resume").status_code == 400
    assert api.post(f"/fine_tuning/jobs/{job['id']}/pause").status_code == 400


def test_one_job_at_a_time_in_queue_order(api: Api, settings, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    ids = [api.create_job()["id"] for _ in range(3)]
    paused = api.post(f"/fine_tuning/jobs/{ids[2]}/pause").json()
    assert paused["status"] == "paused"
    started: list[str] = []

    def watch(_job: dict) -> bool:
        statuses = {j: api.get(f"/fine_tuning/jobs/{j}").json()["status"] for j in ids}
        running = [j for j, s in statuses.items() if s == "running"]
        assert len(running) <= 1, statuses
        started.extend(j for j in running if j not in started)
        if statuses[ids[2]] == "paused":  # held back until the others are done
            assert ids[2] not in started
            if statuses[ids[0]] == statuses[ids[1]] == "succeeded":
                api.post(f"/fine_tuning/jobs/{ids[2]}/resume")
        return all(s in TERMINAL for s in statuses.values())

    api.wait(ids[0], watch)
    assert started == ids


def test_training_failure(api: Api) -> None:
    lines = chat_lines(10)
    lines[0]["messages"][1]["content"] = "FAIL_TRAINING"
    job = api.wait_status(api.create_job(jsonl(lines))["id"], *TERMINAL)
    assert job["status"] == "failed" and job["error"]["code"] == "training_failed"
    assert (
        "the loss is NaN at step 2" in job["error"]["message"]
        and "/" not in job["error"]["message"].split("NaN")[0][-30:]
    )


def test_restart_resumes_running_jobs_and_keeps_the_queue(tmp_path: Path, keys, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.2")
    settings = fake_settings(tmp_path / "service")
    from tunery.server.auth import create_key
    from tunery.server.store import Store

    key = create_key(Store(settings.database_url), "acme")[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, key)
        running = api.create_job(
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 5}}}
        )
        queued = api.create_job()
        api.wait(
            running["id"],
            lambda j: j["status"] == "running" and any(e["type"] == "metrics" for e in api.events(j["id"])),
        )
    # the server stopped: the running job checkpointed and is still `running` in the database
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, key)
        assert any(
            "The service restarted; the job will resume from the checkpoint at step" in e["message"]
            for e in api.events(running["id"])
        )
        done = api.wait_status(running["id"], *TERMINAL)
        assert done["status"] == "succeeded"
        assert api.wait_status(queued["id"], *TERMINAL)["status"] == "succeeded"
        first, second = argv(settings, running["id"])
        assert "--resume" in second
        steps = [e["data"]["step"] for e in reversed(api.events(running["id"])) if e["type"] == "metrics"]
        assert steps == list(range(1, 9))


def test_energy_and_safety_flags_become_events(api: Api, monkeypatch) -> None:
    flag = "safety: refusal rate fell by 25 points (72% -> 47%)"
    monkeypatch.setenv("FAKE_SAFETY_FLAGS", json.dumps([flag]))
    job = api.create_job()
    assert api.wait_status(job["id"], *TERMINAL)["status"] == "succeeded"
    events = api.events(job["id"])
    [warning] = [e for e in events if e["message"].startswith("Safety evaluation")]
    assert warning["level"] == "warn" and warning["message"] == f"Safety evaluation: {flag}"
    [energy] = [e for e in events if e["message"].startswith("Energy")]
    assert energy["message"] == "Energy: 0.0021 kWh, 0.001 kg CO2e (estimated (fake); grid: WORLD)"


def test_the_final_checkpoint_is_the_step_final_holds(api: Api, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_FINAL_STEP", "2")
    job = api.create_job(
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}}
    )
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded"
    checkpoints = api.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    [final] = [c for c in checkpoints if c["fine_tuned_model_checkpoint"] == done["fine_tuned_model"]]
    assert final["step_number"] == 2
    messages = [e["message"] for e in api.events(job["id"])]
    assert (
        "The model holds the weights of step 2, its lowest validation loss (1.2500); the job trained to step 4"
        in messages
    )


def test_wandb_integration_reports_the_run_to_weights_and_biases(api: Api, settings) -> None:
    """OpenAI's `integrations` field: the run gets `--report-to wandb` with the project, name, entity and
    tags (OpenAI's own three first); a malformed integration is a 400 naming the field."""
    integration = {"type": "wandb", "wandb": {"project": "support bot", "entity": "acme", "tags": ["v1"]}}
    job = api.create_job(integrations=[integration])
    # as OpenAI's: the W&B run's id is the job's
    assert job["integrations"] == [{**integration, "wandb": {**integration["wandb"], "run_id": job["id"]}}]
    assert api.wait_status(job["id"], *TERMINAL)["status"] == "succeeded"
    [command] = argv(settings, job["id"])
    assert command[command.index("--report-to") + 1] == "wandb"
    sets = [command[i + 1] for i, flag in enumerate(command) if flag == "--set"]
    assert 'tracking_project="support bot"' in sets and 'wandb_entity="acme"' in sets
    assert f'tracking_run_name="{job["id"]}"' in sets and f'wandb_run_id="{job["id"]}"' in sets
    assert f'tracking_tags="tunery/finetune,tunery/tiny-random,tunery/{job["id"]}' + ',v1"' in sets
    events = [e["message"] for e in api.get(f"/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert any("Weights & Biases project support bot" in m for m in events)
    training = job["training_file"]
    for bad, param in (
        ({"type": "mlflow", "mlflow": {}}, "integrations.0.type"),
        ({"type": "wandb", "wandb": {}}, "integrations.0.wandb.project"),
        ({"type": "wandb", "wandb": {"project": "p", "tags": ["a,b"]}}, "integrations.0.wandb.tags.0"),
    ):
        r = api.post(
            "/fine_tuning/jobs",
            json={"model": "tiny-random", "training_file": training, "integrations": [bad]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.json())
