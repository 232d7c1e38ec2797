"""Offensive-content scores from alt-profanity-check's offline classifier (a linear model on word and
character n-grams, 0.9 MB, shipped in the wheel: no model hub, no network).

It scores one thing, how likely a text is offensive or abusive (profanity, insults, hate). It does not
understand self-harm, violence, illegal instructions or sexual content as topics; callers that report
categories must say so rather than imply coverage it does not have.

>>> scores = offensive_probability(["Thank you, that helped!", "You are a complete idiot."])
>>> scores[0] < 0.1 < 0.9 < scores[1]
True
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

# alt-profanity-check's own decision rule is p >= 0.5; screening uses it as the default.
OFFENSIVE_THRESHOLD = 0.5
CLASSIFIER = "alt-profanity-check 1.9 (offline linear classifier)"


@functools.cache
def _predict_prob() -> Callable[[Sequence[str]], Any]:
    from profanity_check import predict_prob  # sklearn import, ~1.5 s: only when first needed

    return predict_prob  # type: ignore[no-any-return]


_worker: subprocess.Popen[bytes] | None = None


def start_worker() -> None:
    """Load the classifier in a child process now, so that its import (sklearn and scipy, ~1 s) runs on
    another core while the caller sets up (a training run imports torch and loads its model meanwhile).
    `offensive_probability` then scores there. If the child cannot start or fails, scoring falls back to
    this process: the scores are the same either way."""
    global _worker
    if _worker is None and "profanity_check" not in sys.modules:
        try:
            _worker = subprocess.Popen(
                [sys.executable, "-m", "tunery.safety.content"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError:  # e.g. a sandbox that allows no new process
            _worker = None


def stop_worker() -> None:
    """End the child, if one was started. It holds nothing to save, so it is killed rather than left to
    its interpreter's shutdown (~0.2 s the caller would wait for)."""
    global _worker
    worker, _worker = _worker, None
    if worker is not None:
        worker.kill()
        worker.wait()
        for stream in (worker.stdin, worker.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a dead child's pipe: what was left unsent stays unsent
                    stream.close()


def _worker_scores(texts: list[str]) -> list[float] | None:
    worker = _worker
    if worker is None or worker.stdin is None or worker.stdout is None:
        return None
    try:
        worker.stdin.write(json.dumps(texts).encode() + b"\n")
        worker.stdin.flush()
        scores = json.loads(worker.stdout.readline())
    except (OSError, ValueError):
        scores = None
    if not isinstance(scores, list) or len(scores) != len(texts):
        stop_worker()
        return None
    return [float(p) for p in scores]


def offensive_probability(texts: Sequence[str]) -> list[float]:
    """P(offensive) for each text, in order. Batched: ~70k short texts per second on 2 cores."""
    if not texts:
        return []
    scores = _worker_scores(list(texts))
    return scores if scores is not None else [float(p) for p in _predict_prob()(list(texts))]


def _serve() -> None:
    """The child of `start_worker`: one JSON list of texts per line in, one JSON list of scores out."""
    predict = _predict_prob()
    for line in sys.stdin.buffer:
        texts = json.loads(line)
        sys.stdout.write(json.dumps([float(p) for p in predict(texts)]) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
