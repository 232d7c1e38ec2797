"""End to end: the official `openai` client, unchanged, against a live `tunery serve` on 127.0.0.1 with
the real CLI training tiny-random: upload, a supervised job to `succeeded`, events, checkpoints, chat
with the fine-tuned model (plain and streaming), delete it; a second project's key sees none of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.server.conftest import chat_lines, jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key(data_dir: Path, project: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tunery", "keys", "create", "--project", project, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path_factory.mktemp("live") / "service"
    port = free_port()
    log = (data_dir.parent / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunery",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--stop-grace",
            "10",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, (data_dir.parent / "serve.log").read_text()
            time.sleep(0.2)
    yield url, data_dir
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


def test_openai_client_end_to_end(server: tuple[str, Path], tmp_path: Path) -> None:
    url, data_dir = server
    client = openai.OpenAI(base_url=url, api_key=new_key(data_dir, "acme"), max_retries=0)
    outsider = openai.OpenAI(base_url=url, api_key=new_key(data_dir, "globex"), max_retries=0)
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(chat_lines(10)))

    uploaded = client.files.create(file=train.open("rb"), purpose="fine-tune")
    assert uploaded.status == "processed" and uploaded.bytes == train.stat().st_size
    assert client.files.content(uploaded.id).read() == train.read_bytes()
    job = client.fine_tuning.jobs.create(
        model="tiny-random",
        training_file=uploaded.id,
        suffix="e2e",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}},
    )
    assert job.status == "validating_files"
    deadline = time.monotonic() + 240
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-random:acme:e2e:")
    assert job.trained_tokens and job.trained_tokens > 0 and job.hyperparameters.n_epochs == 2

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # pages through every event
    assert events[0].message == "The job has successfully completed"
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in reversed(metrics)] == [1, 2, 3, 4] and "train_loss" in metrics[0].data
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert checkpoints[0].step_number == 4 and checkpoints[0].metrics.train_loss is not None
    assert checkpoints[1].fine_tuned_model_checkpoint.endswith(":ckpt-step-3")
    assert job.fine_tuned_model in [m.id for m in client.models.list()]

    messages = [{"role": "user", "content": "Where is my order?"}]
    answer = client.chat.completions.create(
        model=job.fine_tuned_model, messages=messages, max_tokens=8, temperature=0
    )
    text = answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0 and text is not None
    stream = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    checkpoint_answer = client.chat.completions.create(
        model=checkpoints[1].fine_tuned_model_checkpoint, messages=messages, max_tokens=4
    )
    assert checkpoint_answer.choices[0].finish_reason in ("stop", "length")

    # the other project sees none of it
    assert outsider.files.list().data == [] and outsider.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        outsider.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        outsider.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        outsider.models.retrieve(job.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        outsider.chat.completions.create(model=job.fine_tuned_model, messages=messages)
    assert job.fine_tuned_model not in [m.id for m in outsider.models.list()]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()

    deleted = client.models.delete(job.fine_tuned_model)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(job.fine_tuned_model)
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="tiny-random", training_file="file-nope")
    assert bad.value.body["param"] == "training_file"
    assert client.files.delete(uploaded.id).deleted is True
