"""Graders and what they grade, from files: errors name the file and the line.

    grader = load_grader("grader.json")                # the grader object, or {"grader": {...}}
    items = read_items("items.jsonl")                  # dataset rows: {{item.*}}
    samples = read_samples("samples.jsonl")            # answers, matched with items line by line
    rows, summary = grade_files(grader, items, samples)

A samples line is the answer as a JSON string, `{"output_text": ...}`, an OpenAI chat completion
(`choices[0].message`), a `tunery generate` line (`completion`), or any of these as `{"sample": ...}`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunery.data.jsonl import read_jsonl
from tunery.errors import TuneryError
from tunery.graders.run import BOOL_ERRORS, Grader, GradeResult, build_grader
from tunery.graders.sandbox import SandboxLimits
from tunery.graders.spec import GraderSpec, parse_grader
from tunery.graders.template import make_sample

BATCH = 64


def read_grader_json(path: str | Path) -> dict[str, Any]:
    """The grader dict in a JSON file; a `{"grader": {...}}` request body is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise TuneryError(f"{path}: no such file; pass a JSON file holding one grader object")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TuneryError(f"{path}: not UTF-8 text; save the grader as a UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise TuneryError(f"{path} line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
    if isinstance(value, dict) and "type" not in value and isinstance(value.get("grader"), dict):
        value = value["grader"]
    if not isinstance(value, dict):
        raise TuneryError(f'{path}: expected a JSON object such as {{"type": "string_check", ...}}')
    return value


def parse_grader_file(path: str | Path, model_map: dict[str, str] | None = None) -> GraderSpec:
    try:
        return parse_grader(read_grader_json(path), model_map=model_map)
    except TuneryError as exc:
        message = str(exc)
        raise TuneryError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def load_grader(
    path: str | Path, model_map: dict[str, str] | None = None, limits: SandboxLimits | None = None
) -> Grader:
    """A ready grader from a JSON file (what an RL recipe's `grader:` config field points at)."""
    return build_grader(parse_grader_file(path, model_map), limits=limits)


def read_items(path: str | Path) -> list[dict[str, Any]]:
    items = []
    for line in read_jsonl(path):
        if line.error is not None:
            raise TuneryError(f"{path} line {line.number}: {line.error}")
        if not isinstance(line.value, dict):
            raise TuneryError(f"{path} line {line.number}: a dataset row must be a JSON object")
        items.append(line.value)
    if not items:
        raise TuneryError(f"{path}: no rows")
    return items


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    samples = []
    for line in read_jsonl(path):
        if line.error is not None:
            raise TuneryError(f"{path} line {line.number}: {line.error}")
        try:
            samples.append(make_sample(line.value))
        except TuneryError as exc:
            raise TuneryError(f"{path} line {line.number}: {exc}") from None
    if not samples:
        raise TuneryError(f"{path}: no samples")
    return samples


def grade_files(
    grader: Grader,
    items: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-line results and a summary (mean reward, per-sub-grader means, error counts, pass rate)."""
    if len(items) != len(samples):
        raise TuneryError(
            f"{len(items)} dataset rows but {len(samples)} samples; they are matched line by line, so "
            "give one sample per row, in the same order"
        )
    results: list[GradeResult] = []
    for start in range(0, len(items), BATCH):
        results += grader.grade_batch(samples[start : start + BATCH], items[start : start + BATCH])
        if on_progress is not None:
            on_progress(len(results), len(items))
    rows = [
        {
            "row": k + 1,
            "reward": r.reward,
            **({"sub_rewards": r.sub_rewards} if r.sub_rewards else {}),
            **({"errors": r.errors, "messages": r.messages} if r.errors else {}),
        }
        for k, r in enumerate(results)
    ]
    return rows, summarize(grader, results)


def summarize(grader: Grader, results: list[GradeResult]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "grader": grader.name,
        "type": grader.type,
        "samples": len(results),
        "mean_reward": statistics.fmean(r.reward for r in results) if results else 0.0,
    }
    if results and results[0].sub_rewards:
        summary["sub_rewards"] = {
            name: statistics.fmean(r.sub_rewards[name] for r in results) for name in results[0].sub_rewards
        }
    counts = {key: sum(bool(r.errors.get(key)) for r in results) for key in BOOL_ERRORS}
    summary["errors"] = {key: n for key, n in counts.items() if n}
    summary["samples_with_errors"] = sum(not r.ok for r in results)
    if grader.pass_threshold is not None:
        summary["pass_rate"] = statistics.fmean(r.reward >= grader.pass_threshold for r in results)
    return summary
