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


def start_server(
    data_dir: Path, log_name: str = "serve.log", flags: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (data_dir.parent / log_name).open("ab")
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
            "20",
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            assert proc.poll() is None, (data_dir.parent / log_name).read_text()
            time.sleep(0.2)
    raise AssertionError("tunery serve did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()  # uvicorn shuts down: running jobs get SIGTERM and checkpoint
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path_factory.mktemp("live") / "service"
    proc, url = start_server(data_dir, flags=("--header-seconds", str(HEADER_SECONDS)))
    yield url, data_dir
    stop_server(proc)


HEADER_SECONDS = (
    2.0  # the live server's (10 by default): how long test_a_connection_that_sends_no_headers waits
)


def wait_for(client: openai.OpenAI, job_id: str, until, timeout: float = 240):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def metric_steps(client: openai.OpenAI, job_id: str) -> list[int]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return [int(e.data["step"]) for e in reversed(events) if e.type == "metrics"]


LONG = {
    "type": "supervised",
    "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 1}},
}  # 300 steps


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


@pytest.mark.system  # the real recipe for 300 steps
def test_pause_and_resume_with_the_real_recipe(server: tuple[str, Path], tmp_path: Path) -> None:
    url, data_dir = server
    client = openai.OpenAI(base_url=url, api_key=new_key(data_dir, "pauser"), max_retries=0)
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(chat_lines(10)))
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=LONG)
    wait_for(client, job.id, lambda j: j.status == "running" and metric_steps(client, j.id))
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    wait_for(
        client,
        job.id,
        lambda j: "Job paused" in client.fine_tuning.jobs.list_events(j.id, limit=1).data[0].message,
    )
    paused_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert 0 < paused_at < 300
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert metric_steps(client, job.id) == list(range(1, 301))  # every step once, none lost or repeated


@pytest.mark.system  # two services one after the other, 300 real steps
def test_a_restart_resumes_the_running_job(tmp_path: Path) -> None:
    data_dir = tmp_path / "service"
    key = new_key(data_dir, "acme")
    proc, url = start_server(data_dir)
    try:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        train = tmp_path / "train.jsonl"
        train.write_bytes(jsonl(chat_lines(10)))
        file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=LONG)
        queued = client.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=LONG)
        wait_for(client, job.id, lambda j: j.status == "running" and metric_steps(client, j.id))
    finally:
        stop_server(proc)
    proc, url = start_server(data_dir)
    try:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any(
            m.startswith("The service restarted; the job will resume from the checkpoint at step")
            for m in messages
        )
        assert client.fine_tuning.jobs.retrieve(queued.id).status in ("validating_files", "queued")
        client.fine_tuning.jobs.cancel(queued.id)
        done = wait_for(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        assert metric_steps(client, job.id) == list(range(1, 301))
    finally:
        stop_server(proc)


def test_a_connection_that_sends_no_headers_is_closed(server: tuple[str, Path]) -> None:
    """uvicorn waits forever for a request's headers: 20,400 idle connections (no key needed) used up the
    server's descriptors. `tunery serve` hangs up after --header-seconds without them."""
    url, _ = server
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as idle:
        idle.sendall(b"GET /v1/mod")  # half a request line, then nothing
        idle.settimeout(HEADER_SECONDS * 4)  # a socket.timeout here: the server kept it open
        started = time.monotonic()
        assert idle.recv(100) == b""  # closed by the server
        assert time.monotonic() - started > HEADER_SECONDS / 2  # by the timer, not at once
