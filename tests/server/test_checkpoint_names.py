"""One name per checkpoint: the Snapshot ID a job's event gives is the `fine_tuned_model_checkpoint` its
checkpoint list shows, and that name works as a model (GET /v1/models/{id}, chat) while the checkpoint
exists; once it is rotated off disk or deleted the lookup says so and names the checkpoints that exist.

The cause of issue 14's mismatch: the scheduler named each checkpoint as it appeared, the run's last step
included (`...:ckpt-step-573`, announced in an event), then renamed the row of the final model's step to
the model's name when the job succeeded, and deleted the rows of checkpoints rotated off disk. Events kept
names that no longer existed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api, chat_lines, jsonl
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.settings import Settings
from tunery.server.store import Store

SNAPSHOT = re.compile(r"^Checkpoint created at step (\d+) with Snapshot ID: (\S+)$")
HELLO = [{"role": "user", "content": "Hello"}]
FOUR_STEPS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}}


class Adapters:
    """A stand-in inference worker that answers with the adapter directory it was asked to load."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def call(self, request: dict[str, Any], project: str = "") -> dict[str, Any]:
        self.requests.append(request)
        choice = {"index": 0, "text": str(request["adapter"]), "finish_reason": "stop", "logprobs": None}
        return {"choices": [choice], "prompt_tokens": 1, "completion_tokens": 1}

    async def stream(self, request: dict[str, Any], project: str = "") -> AsyncIterator[dict[str, Any]]:
        yield {"event": "done", "result": await self.call(request, project)}

    async def close(self) -> None:
        pass


@pytest.fixture
def api(settings: Settings, keys: dict[str, str]) -> Iterator[Api]:
    app = create_app(settings)
    app.state.tunery.inference = Adapters()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, keys["acme"])


def snapshots(api: Api, job_id: str) -> dict[int, str]:
    """step -> the Snapshot ID of the job's "Checkpoint created" events."""
    found = {}
    for event in api.events(job_id):
        match = SNAPSHOT.match(event["message"])
        if match:
            found[int(match[1])] = match[2]
    return found


def checkpoints(api: Api, job_id: str) -> list[dict[str, Any]]:
    return list(api.get(f"/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"])


def chat(api: Api, model: str) -> Any:
    return api.post("/chat/completions", json={"model": model, "messages": HELLO})


def test_the_event_names_the_checkpoint_the_list_shows_and_chat_loads(api: Api, settings: Settings) -> None:
    job = api.create_job(suffix="names", method=FOUR_STEPS)
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded", done
    model = done["fine_tuned_model"]
    announced = snapshots(api, job["id"])
    listed = checkpoints(api, job["id"])
    # the last step is the model itself, as on OpenAI: no checkpoint name of its own, no event
    assert [(c["step_number"], c["fine_tuned_model_checkpoint"]) for c in listed] == [
        (4, model),
        *[(step, announced[step]) for step in (3, 2, 1)],
    ]
    assert sorted(announced) == [1, 2, 3]
    messages = [e["message"] for e in reversed(api.events(job["id"]))]
    assert messages.index(f"New fine-tuned model created: {model}") > max(
        messages.index(f"Checkpoint created at step {step} with Snapshot ID: {name}")
        for step, name in announced.items()
    )
    assert [m["id"] for m in api.get("/models").json()["data"]][2:] == [model, *map(announced.get, (1, 2, 3))]
    run = settings.jobs_dir / job["id"] / "run"
    for step, name in [(4, model), *announced.items()]:
        assert re.fullmatch(r"ft:tiny-random:acme:names:[A-Za-z0-9]{8}(:ckpt-step-\d+)?", name)
        assert api.get(f"/models/{name}").json()["id"] == name
        r = chat(api, name)
        assert r.status_code == 200, r.text
        adapter = run / "final" if name == model else run / "checkpoints" / f"step-{step}" / "model"
        assert r.json()["choices"][0]["message"]["content"] == str(adapter)
        assert r.json()["model"] == name


def test_a_final_model_of_an_earlier_step_renames_nothing(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # with a validation set final/ holds the best step's weights (here step 2): that checkpoint keeps the
    # name its event gave, the model is listed at step 2 under its own name, and step 4 is announced too
    monkeypatch.setenv("FAKE_FINAL_STEP", "2")
    job = api.create_job(method=FOUR_STEPS)
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded", done
    announced = snapshots(api, job["id"])
    assert sorted(announced) == [1, 2, 3, 4]
    listed = {(c["step_number"], c["fine_tuned_model_checkpoint"]) for c in checkpoints(api, job["id"])}
    assert listed == {(2, done["fine_tuned_model"]), *announced.items()}
    for name in [done["fine_tuned_model"], *announced.values()]:
        assert chat(api, name).status_code == 200, name


def test_a_rotated_checkpoint_says_it_was_removed(
    api: Api, settings: Settings, monkeypatch: pytest.MonkeyPatch, client: Any, keys: dict[str, str]
) -> None:
    # the recipe keeps its newest few checkpoints on disk: here step 1's goes while step 3's is written
    monkeypatch.setenv("FAKE_FAULT", "checkpoint:3:hang")
    job = api.create_job(suffix="rot", method=FOUR_STEPS)
    api.wait(job["id"], lambda _: 3 in snapshots(api, job["id"]))
    announced = snapshots(api, job["id"])
    shutil.rmtree(settings.jobs_dir / job["id"] / "run" / "checkpoints" / "step-1")
    r = api.get(f"/models/{announced[1]}")  # at once, before the scheduler has looked again
    assert r.status_code == 404 and "has been removed" in r.json()["error"]["message"]
    api.wait(job["id"], lambda _: [c["step_number"] for c in checkpoints(api, job["id"])] == [3, 2])

    for r in (api.get(f"/models/{announced[1]}"), chat(api, announced[1])):
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert error["message"] == (
            f"The checkpoint '{announced[1]}' (step 1 of job {job['id']}) has been removed: deleted, or "
            "rotated off disk (a job keeps its final model and its newest checkpoints only). The checkpoints "
            f"of job {job['id']} that exist: {announced[3]} (step 3), {announced[2]} (step 2)."
        )
    assert announced[1] not in [m["id"] for m in api.get("/models").json()["data"]]
    assert chat(api, announced[2]).status_code == 200
    other = Api(client, keys["globex"])  # another project learns nothing of acme's job or checkpoints
    for name in (announced[1], announced[2]):
        r = other.get(f"/models/{name}")
        assert r.status_code == 404 and job["id"] not in r.text and "removed" not in r.text, r.text
    r = api.get("/models/ft:tiny-random:acme:rot:nope")  # a name that never existed is a plain 404
    assert r.json()["error"]["message"].startswith("The model 'ft:tiny-random:acme:rot:nope' does not exist")

    api.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    api.wait_status(job["id"], "cancelled")


def test_a_deleted_model_says_it_was_deleted(api: Api) -> None:
    done = api.wait_status(api.create_job(method=FOUR_STEPS)["id"], *TERMINAL)
    model, announced = done["fine_tuned_model"], snapshots(api, done["id"])
    assert api.delete(f"/models/{model}").status_code == 200
    assert api.delete(f"/models/{announced[3]}").status_code == 200
    r = chat(api, model)
    assert r.status_code == 404
    assert r.json()["error"]["message"] == (
        f"The model '{model}' of job {done['id']} has been deleted. The checkpoints of job {done['id']} "
        f"that exist: {announced[2]} (step 2), {announced[1]} (step 1)."
    )
    assert "has been removed" in api.get(f"/models/{announced[3]}").json()["error"]["message"]


# --- the real CLI and inference worker -------------------------------------------------------------------


@pytest.fixture
def real_api(tmp_path: Path) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path / "service")
    key = create_key(Store(settings.database_url), "acme")[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(client, key)


@pytest.mark.system  # the service, a training process and the inference worker, ~20 s
def test_every_announced_name_chats_on_the_real_cli(real_api: Api) -> None:
    """tiny-random trained by `tunery train sft` (4 steps, a checkpoint each, the newest 3 kept) and the
    names its events give, asked of the real inference worker."""
    api = real_api
    job = api.create_job(jsonl(chat_lines(10)), suffix="real", method=FOUR_STEPS)
    done = api.wait_status(job["id"], *TERMINAL, timeout=300)
    assert done["status"] == "succeeded", done
    announced = snapshots(api, job["id"])
    listed = {c["fine_tuned_model_checkpoint"] for c in checkpoints(api, job["id"])}
    assert 4 not in announced and 3 in announced and 2 in announced  # 1 may be gone before it is seen
    for name in [done["fine_tuned_model"], *announced.values()]:
        r = api.post(
            "/chat/completions", json={"model": name, "messages": HELLO, "max_tokens": 2, "temperature": 0}
        )
        if name in listed:
            assert r.status_code == 200, r.text
            assert api.get(f"/models/{name}").status_code == 200
        else:  # rotated off disk: the newest 3 of steps 1-4 are kept, and step 4 is the model
            assert r.status_code == 404 and "has been removed" in r.json()["error"]["message"], r.text
    assert listed == {done["fine_tuned_model"], announced[3], announced[2]}
