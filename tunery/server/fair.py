"""Sharing the service's slow resources between projects: caps on work in flight, and queues that serve
projects in turn. Used by the API process (python graders, inference requests) and by the inference
worker (its request queues); standard library only.

    admission = Admission("python grader runs", total=16, per_project=4)
    admission.acquire(project)          # or raise TooBusy, which a route turns into OpenAI's 429
    ...; admission.release(project)

    queue = FairQueue(running_per_key=1)
    queue.put(project, item); key, item = queue.get(); ...; queue.done(key)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


def _count_down(counts: dict[str, int], key: str) -> None:
    """One fewer for `key`; a key that reaches zero is dropped, so `counts` holds only keys in use."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class TooBusy(Exception):
    """A cap is reached: the caller should retry later (HTTP 429)."""


class Admission:
    """At most `total` items in flight across projects and `per_project` for any one; thread-safe."""

    def __init__(self, what: str, total: int, per_project: int) -> None:
        self.what, self.total, self.per_project = what, max(1, total), max(1, per_project)
        self._lock = threading.Lock()
        self._by_project: dict[str, int] = {}
        self._count = 0

    def acquire(self, project: str) -> None:
        with self._lock:
            mine = self._by_project.get(project, 0)
            if mine >= self.per_project:
                raise TooBusy(
                    f"Too many {self.what} in flight for this project ({mine}, the limit is "
                    f"{self.per_project}); retry when one has finished."
                )
            if self._count >= self.total:
                raise TooBusy(f"The server is busy with {self._count} {self.what}; retry in a moment.")
            self._by_project[project] = mine + 1
            self._count += 1

    def release(self, project: str) -> None:
        with self._lock:
            _count_down(self._by_project, project)
            self._count = max(0, self._count - 1)

    def in_flight(self, project: str | None = None) -> int:
        with self._lock:
            return self._count if project is None else self._by_project.get(project, 0)


class RateLimit:
    """At most `per_minute` events of a project in any minute on average, in bursts of up to that many (a
    token bucket refilled at per_minute / 60 a second); 0: no limit. Thread-safe. For requests that cost the
    service little time each but leave something behind, such as an audit record."""

    def __init__(self, what: str, per_minute: int) -> None:
        self.what, self.per_minute = what, per_minute
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # project -> (tokens left, when counted)

    def take(self, project: str) -> None:
        """Count one event of `project`, or raise TooBusy with how long until the next is allowed."""
        if self.per_minute <= 0:
            return
        now, rate = time.monotonic(), self.per_minute / 60.0
        with self._lock:
            tokens, then = self._buckets.get(project, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[project] = (tokens, now)
                raise TooBusy(
                    f"Too many {self.what} for this project: at most {self.per_minute:,} a minute; retry in "
                    f"{(1.0 - tokens) / rate:.1f} s."
                )
            self._buckets[project] = (tokens - 1.0, now)


class FairQueue(Generic[T]):
    """Items of several keys (projects) handed out round-robin: a project with a long backlog delays
    another project's next item by at most one item of its own. With `running_per_key`, a key whose
    items are being worked on that many times is skipped until `done(key)`: with several workers, one
    project cannot take them all. Thread-safe; `get` blocks until an item is ready or the queue closes."""

    def __init__(self, running_per_key: int | None = None) -> None:
        self.running_per_key = running_per_key
        self._ready = threading.Condition()
        self._items: OrderedDict[str, deque[T]] = OrderedDict()  # rotation order: next key first
        self._running: dict[str, int] = {}
        self._closed = False

    def put(self, key: str, item: T) -> None:
        with self._ready:
            self._items.setdefault(key, deque()).append(item)
            self._ready.notify()

    def get(self) -> tuple[str, T] | None:
        """The next key's oldest item, or None once the queue is closed and empty."""
        with self._ready:
            while True:
                for key in self._items:
                    if self.running_per_key is None or self._running.get(key, 0) < self.running_per_key:
                        items = self._items.pop(key)
                        item = items.popleft()
                        if items:
                            self._items[key] = items  # to the back of the rotation
                        self._running[key] = self._running.get(key, 0) + 1
                        return key, item
                if self._closed and not self._items:
                    return None
                self._ready.wait()

    def done(self, key: str) -> None:
        with self._ready:
            _count_down(self._running, key)
            self._ready.notify_all()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
