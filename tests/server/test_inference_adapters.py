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


def test_adapters_of_one_base_share_it_and_answer_as_their_own_copies(
    tmp_path: Path, fp32: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tunery.server.inference as inference

    adapters = [save_adapter("tiny-random", tmp_path / f"a{i}", "all-linear", seed=i) for i in range(3)]
    shared = Worker(io.StringIO(), cache_size=1, adapter_cache=2)
    answers = [ask(shared, "tiny-random", a) for a in adapters[:2]]
    assert list(shared.models) == [("tiny-random", None, None)]  # one copy of the base model
    assert [key[1] for key in shared.adapters] == [str(a) for a in adapters[:2]]
    base = ask(shared, "tiny-random", None)
    assert len({base, *answers}) == 3  # each adapter changes the answer its own way

    with monkeypatch.context() as patch:  # each adapter merged into a copy of its own, as before
        patch.setattr(inference, "beside", lambda model, adapter: "not beside")
        copies = Worker(io.StringIO(), cache_size=3, adapter_cache=2)
        assert [ask(copies, "tiny-random", a) for a in adapters[:2]] == answers
    assert len(copies.models) == 3 and not copies.adapters  # the base, then a copy for each

    ask(shared, "tiny-random", adapters[2])  # the third adapter: the least recently used one goes
    assert [key[1] for key in shared.adapters] == [str(adapters[1]), str(adapters[2])]
    assert ask(shared, "tiny-random", adapters[0]) == answers[0]  # read again when asked for
    assert list(shared.models) == [("tiny-random", None, None)]


def test_an_adapter_the_engine_cannot_apply_gets_a_model_of_its_own(tmp_path: Path, fp32: None) -> None:
    adapter = save_adapter("tiny-random-gemma2", tmp_path / "g", "all-linear", seed=1)
    worker = Worker(io.StringIO(), cache_size=2)
    ask(worker, "tiny-random-gemma2", adapter)
    key = ("tiny-random-gemma2", str(adapter), None)
    assert key in worker.models and not worker.adapters
    assert hasattr(worker.models[key][0], "peft_config")  # the adapter is in that model


def test_requests_go_to_the_worker_with_the_model_else_its_base(tmp_path: Path) -> None:
    from tunery.server.inference_client import InferenceClient
    from tunery.server.settings import Settings

    settings = Settings(data_dir=tmp_path / "service", inference_workers=3, inference_adapters=2)
    client = InferenceClient(settings)  # starts no process until a request is sent
    first, second, third = client.workers

    def pick(model: str, adapter: str | None = None) -> Any:
        return client._pick({"model": model, "adapter": adapter, "base_adapter": None})

    assert pick("base-a", "one") is first  # no one has it: the least busy, the first
    first.in_hand = 1  # busy with it
    assert pick("base-b") is second
    second.in_hand = 1
    first.in_hand = 0
    assert pick("base-a", "two") is first  # another adapter of a base the first worker holds
    assert pick("base-a", "one") is first
    first.in_hand, third.in_hand = 1, 0
    assert pick("base-a", "three") is third  # the first is busier than an idle worker
    assert first.adapters == [("base-a", "two", None), ("base-a", "one", None)]  # two kept, as the worker
    assert first.bases == [("base-a", None)] and third.bases == [("base-a", None)]
    first.in_hand = second.in_hand = third.in_hand = 0
    assert pick("base-b", "four") is second  # all idle: the one holding base-b, not the first
