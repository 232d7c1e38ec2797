"""`metrics.jsonl`: one JSON object per optimizer step, appended and flushed as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunery.training.io import atomic_write_text


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        """Open for appending. On resume, drop records past the checkpoint step (they will be redone)."""
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            atomic_write_text(self.path, "")
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", float("inf")))
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # a torn last line from a killed run: drop it


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
