"""Offensive-content scores from alt-profanity-check's offline classifier (a linear model on word and
character n-grams, 0.9 MB, shipped in the wheel: no model hub, no network).

It scores one thing, how likely a text is offensive or abusive (profanity, insults, hate). It does not
understand self-harm, violence, illegal instructions or sexual content as topics; callers that report
categories must say so rather than imply coverage it does not have.

It was trained on English. On other languages its scores are noise both ways ("Was kostet die professionelle
Montage?" 0.95, a Spanish string of insults 0.03), so `other_languages` names the texts that are clearly in
another language (py3langid's offline model, shipped in its wheel), and screening reports those as not
scored rather than trusting a score.

>>> scores = offensive_probability(["Thank you, that helped!", "You are a complete idiot."])
>>> scores[0] < 0.1 < 0.9 < scores[1]
True
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

# alt-profanity-check's own decision rule is p >= 0.5; screening uses it as the default.
OFFENSIVE_THRESHOLD = 0.5
CLASSIFIER = "alt-profanity-check 1.9 (offline linear classifier)"
LANGUAGE_ID = "py3langid 0.4 (offline)"
# A text counts as in another language when it is this long and P(English) is below this: measured on
# Tunery's English example data and red-team prompts (2,915 strings), no English text of 20 characters or
# more was under 0.01 but JSON (py3langid's "zxx", no language, which stays scored); 455 of the 596
# strings of examples/support-multilingual were.
MIN_LANGUAGE_CHARS, MAX_ENGLISH_PROBABILITY = 20, 0.01


@functools.cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # its model unpacks in ~1 s

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _languages(texts: Sequence[str]) -> list[str | None]:
    return [_language(text) for text in texts]


# sentences, split after their end; a text in another language with one English sentence stays scored
_SENTENCE_END = re.compile(r"(?<=[.!?。！？\n])\s+")


def _language(text: str) -> str | None:
    """The language `text` is clearly in when that is not English, checked on the whole text and on each
    of its sentences long enough to tell: English abuse padded with another language's text stays
    scored."""
    language = _foreign(text)
    if language is None:
        return None
    sentences = [s for s in _SENTENCE_END.split(text) if len(s.strip()) >= MIN_LANGUAGE_CHARS]
    if len(sentences) > 1 and any(_foreign(s) is None for s in sentences):
        return None
    return language


def _foreign(text: str) -> str | None:
    if len(text.strip()) < MIN_LANGUAGE_CHARS:
        return None
    ranked = _identifier().rank(text)
    top, english = ranked[0][0], dict(ranked).get("en", 0.0)
    return str(top) if top not in ("en", "zxx") and english < MAX_ENGLISH_PROBABILITY else None


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


def _ask_worker(question: str, texts: list[str]) -> list[Any] | None:
    worker = _worker
    if worker is None or worker.stdin is None or worker.stdout is None:
        return None
    try:
        worker.stdin.write(json.dumps({"question": question, "texts": texts}).encode() + b"\n")
        worker.stdin.flush()
        answers = json.loads(worker.stdout.readline())
    except (OSError, ValueError):
        answers = None
    if not isinstance(answers, list) or len(answers) != len(texts):
        stop_worker()
        return None
    return answers


def offensive_probability(texts: Sequence[str]) -> list[float]:
    """P(offensive) for each text, in order. Batched: ~70k short texts per second on 2 cores."""
    if not texts:
        return []
    scores = _ask_worker("scores", list(texts))
    return [float(p) for p in (scores if scores is not None else _predict_prob()(list(texts)))]


def other_languages(texts: Sequence[str]) -> list[str | None]:
    """For each text, the language it is clearly written in when that is not English (an ISO 639-1 code,
    e.g. "de"), else None: English, too short to tell (under MIN_LANGUAGE_CHARS), or no language (JSON).

    >>> other_languages(["Was kostet die professionelle Montage bei Ihnen?", "Where is my order?", "ok"])
    ['de', None, None]
    """
    if not texts:
        return []
    languages = _ask_worker("languages", list(texts))
    return languages if languages is not None else _languages(texts)


def _serve() -> None:
    """The child of `start_worker`: one JSON object {"question": "scores" | "languages", "texts": [...]} per
    line in, one JSON list of answers out."""
    predict, _ = _predict_prob(), _identifier()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        texts = request["texts"]
        if request["question"] == "languages":
            answers: list[Any] = _languages(texts)
        else:
            answers = [float(p) for p in predict(texts)]
        sys.stdout.write(json.dumps(answers) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
