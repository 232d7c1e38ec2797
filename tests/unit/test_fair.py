"""Sharing between projects: admission caps and round-robin queues (tunery/server/fair.py)."""

from __future__ import annotations

import threading

import pytest

from tunery.server import fair
from tunery.server.fair import Admission, FairQueue, TooBusy


def test_admission_caps_a_project_and_the_total() -> None:
    admission = Admission("runs", total=3, per_project=2)
    admission.acquire("a")
    admission.acquire("a")
    with pytest.raises(TooBusy, match="for this project \\(2, the limit is 2\\)"):
        admission.acquire("a")
    admission.acquire("b")
    with pytest.raises(TooBusy, match="busy with 3 runs"):
        admission.acquire("c")
    admission.release("a")
    admission.acquire("c")
    assert (admission.in_flight(), admission.in_flight("a"), admission.in_flight("c")) == (3, 1, 1)


def test_a_backlog_delays_another_project_by_one_item_at_most() -> None:
    queue: FairQueue[str] = FairQueue()
    for k in range(5):
        queue.put("flood", f"f{k}")
    queue.put("quiet", "q0")
    queue.put("quiet", "q1")
    order = []
    for _ in range(7):
        got = queue.get()
        assert got is not None
        order.append(got[1])
        queue.done(got[0])
    assert order == ["f0", "q0", "f1", "q1", "f2", "f3", "f4"]


def test_running_per_key_leaves_a_worker_for_other_projects() -> None:
    queue: FairQueue[str] = FairQueue(running_per_key=1)
    queue.put("flood", "f0")
    queue.put("flood", "f1")
    assert queue.get() == ("flood", "f0")  # one worker busy with the flood
    queue.put("quiet", "q0")
    assert queue.get() == ("quiet", "q0")  # the next worker skips f1: flood already holds one
    taken: list[tuple[str, str] | None] = []
    waiter = threading.Thread(target=lambda: taken.append(queue.get()))
    waiter.start()
    waiter.join(0.2)
    assert taken == []  # f1 waits for flood's running item
    queue.done("flood")
    waiter.join(5)
    assert taken == [("flood", "f1")]


def test_close_hands_out_what_is_left_then_none() -> None:
    queue: FairQueue[int] = FairQueue()
    queue.put("a", 1)
    queue.close()
    assert queue.get() == ("a", 1)
    assert queue.get() is None


def test_a_rate_limit_allows_a_burst_then_refills_at_its_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(fair.time, "monotonic", lambda: clock[0])
    limit = fair.RateLimit("grader runs", per_minute=60)  # one a second
    for _ in range(60):
        limit.take("acme")
    with pytest.raises(fair.TooBusy, match=r"at most 60 a minute; retry in 1\.0 s"):
        limit.take("acme")
    limit.take("globex")  # each project has its own
    clock[0] += 0.5
    with pytest.raises(fair.TooBusy, match=r"retry in 0\.5 s"):
        limit.take("acme")
    clock[0] += 0.5
    limit.take("acme")
    clock[0] += 3600  # refills up to the burst, no further
    for _ in range(60):
        limit.take("acme")
    with pytest.raises(fair.TooBusy):
        limit.take("acme")
    fair.RateLimit("grader runs", per_minute=0).take("acme")  # 0: no limit
