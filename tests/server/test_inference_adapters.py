"""The inference worker serves many adapters of one base model with one copy of it: each adapter's LoRA
factors beside the shared weights, answering as a merged copy would; adapters the engine cannot apply
that way get a copy of their own, as before."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_shared_base_adapters import save_adapter
from tunery.server.inference import Worker

HELLO = [{"role": "user", "content": "Hello, what can you do?"}]


def ask(worker: Worker, model: str, adapter: Path | None, request_id: int = 1) -> str:
    request: dict[str, Any] = {
        "project": "proj_a",
        "op": "chat",
        "model": model,
        "adapter": str(adapter) if adapter else None,
        "base_adapter": None,
        "messages": HELLO,
        "n": 1,
        "params": {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None},
    }
    return str(worker.chat(request_id, request)["choices"][0]["text"])


@pytest.fixture
def fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model in fp32, so a merged copy and the factors beside the base give the same tokens."""
    import tunery.models.lora as lora

    monkeypatch.setattr(lora, "bf16_is_fast", lambda device: False)


def test_adapters_of_one_base_share_it_and_answer_as_their_own_copies(tmp_path: Path, fp32: None) -> None:
    adapters = [save_adapter("tiny-random", tmp_path / f"a{i}", "all-linear", seed=i) for i in range(3)]
    shared = Worker(io.StringIO(), cache_size=1, adapter_cache=2)
    answers = [ask(shared, "tiny-random", a) for a in adapters[:2]]
    assert list(shared.models) == [("tiny-random", None, None)]  # one copy of the base model
    assert [key[1] for key in shared.adapters] == [str(a) for a in adapters[:2]]
    base = ask(shared, "tiny-random", None)
    assert len({base, *answers}) == 3  # each adapter changes the answer its own way

    copies = Worker(io.StringIO(), cache_size=3, adapter_cache=0)  # each merged into a copy, as before
    assert [ask(copies, "tiny-random", a) for a in adapters[:2]] == answers
    assert [key[1] for key in copies.models] == [str(a) for a in adapters[:2]] and not copies.adapters

    ask(shared, "tiny-random", adapters[2])  # the third adapter: the least recently used one goes
    assert [key[1] for key in shared.adapters] == [str(adapters[1]), str(adapters[2])]
    assert ask(shared, "tiny-random", adapters[0]) == answers[0]  # read again when asked for
    assert list(shared.models) == [("tiny-random", None, None)]


def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Every model the worker loads from here on, as (model, adapter)."""
    import tunery.models.load as load

    made: list[tuple[str, str | None]] = []
    real = load.load_for_inference

    def counted(name: str, adapter: str | None = None, precision: str = "auto") -> Any:
        made.append((name, adapter))
        return real(name, adapter, precision)

    monkeypatch.setattr(load, "load_for_inference", counted)
    return made


def test_an_adapter_the_engine_cannot_apply_gets_a_merged_copy_and_only_that(
    tmp_path: Path, fp32: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma's adapters (an architecture the engine does not run): the base is loaded once to find out, and
    not kept; from then on each adapter of that base is loaded straight into its copy."""
    first, second = (save_adapter("tiny-random-gemma2", tmp_path / n, "all-linear", seed=1) for n in "gh")
    made = loads(monkeypatch)
    worker = Worker(io.StringIO(), cache_size=2)
    for adapter in (first, second, first, second):
        ask(worker, "tiny-random-gemma2", adapter)
    model = "tiny-random-gemma2"
    assert made == [(model, None), (model, str(first)), (model, str(second))]
    assert list(worker.models) == [(model, str(first), None), (model, str(second), None)]
    assert not worker.adapters and hasattr(worker.models[(model, str(first), None)][0], "peft_config")
    assert "does not run this model" in worker.no_engine[(model, None, None)]


def test_factors_that_would_cost_more_than_a_copy_get_a_copy(
    tmp_path: Path, fp32: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter trained on top of another on top of another ...: its ranks add up. Past a share of the
    model's own weights (FACTORS_SHARE) it is merged into a copy instead, and that is remembered."""
    import tunery.server.inference as inference

    adapter = save_adapter("tiny-random", tmp_path / "a", "all-linear", seed=1)
    made = loads(monkeypatch)
    monkeypatch.setattr(inference, "FACTORS_SHARE", 10**6)
    worker = Worker(io.StringIO(), cache_size=1)
    merged = ask(worker, "tiny-random", adapter)
    key = ("tiny-random", str(adapter), None)
    assert list(worker.models) == [key] and "of the model's weights" in worker.own_copies[key]
    monkeypatch.setattr(inference, "FACTORS_SHARE", 4)
    beside = Worker(io.StringIO(), cache_size=1)
    assert ask(beside, "tiny-random", adapter) == merged and list(beside.adapters) == [key]
    assert made == [("tiny-random", None), ("tiny-random", str(adapter)), ("tiny-random", None)]


def test_requests_go_to_the_worker_with_the_model_else_its_base(tmp_path: Path) -> None:
    from tunery.server.inference_client import InferenceClient
    from tunery.server.settings import Settings

    settings = Settings(data_dir=tmp_path / "service", inference_workers=3, inference_adapters=2)
    client = InferenceClient(settings)  # starts no process until a request is sent
    first, second, third = client.workers

    def pick(model: str, adapter: str | None = None) -> Any:
        return client._pick({"model": model, "adapter": adapter, "base_adapter": None})

    assert pick("base-a", "one") is first  # no one has it: the least busy, the first
    first.in_hand = 1
    assert pick("base-b") is second
    first.in_hand, second.in_hand = 0, 0
    assert pick("base-b", "two") is second  # all idle: the one holding base-b, not the first
    assert pick("base-a", "one") is first
    first.in_hand = 1
    assert pick("base-a", "three") is second  # the first is busier than an idle worker
    for adapter in ("four", "five", "six"):
        first.in_hand = 0
        assert pick("base-a", adapter) is first
    assert first.adapters == [("base-a", "five", None), ("base-a", "six", None)]  # two, as the worker keeps
    assert first.bases == [("base-a", None)] and second.bases == [("base-b", None), ("base-a", None)]


def test_with_merged_copies_a_base_is_no_reason_to_go_to_a_worker(tmp_path: Path) -> None:
    from tunery.server.inference_client import InferenceClient
    from tunery.server.settings import Settings

    settings = Settings(data_dir=tmp_path / "service", inference_workers=2, inference_adapters=0)
    client = InferenceClient(settings)
    first, second = client.workers
    client._pick({"model": "base-a", "adapter": None, "base_adapter": None})
    first.in_hand = 1
    assert client._pick({"model": "base-a", "adapter": "one", "base_adapter": None}) is second
    assert second.bases == [("base-a", "one", None)] and not second.adapters  # its own copy
    first.in_hand = 0
    assert client._pick({"model": "base-a", "adapter": "one", "base_adapter": None}) is second


def test_what_a_starting_worker_will_load_is_not_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tunery.server.inference_client import InferenceClient, _Worker
    from tunery.server.settings import Settings

    class Pipe:
        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            pass

        def close(self) -> None:
            pass

    async def started(self: Any, name: str) -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(b'{"event": "ready", "pid": 1}\n')
        return reader, Pipe()

    monkeypatch.setattr(_Worker, "_start_process", started)
    client = InferenceClient(Settings(data_dir=tmp_path / "service", inference_workers=2))
    request = {"model": "base-a", "adapter": "one", "base_adapter": None}

    async def scenario() -> None:
        worker = client._pick(request)
        await worker._ensure_started()  # what stream() does first, the model already noted
        assert worker.serves(("base-a", "one", None))

    asyncio.run(scenario())
