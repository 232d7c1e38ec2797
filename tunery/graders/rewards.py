"""What an RL recipe calls to score completions: a grader JSON file or a plain Python reward function.

- `grader.json`: an OpenAI grader (any type, `multi` included); a multi grader's sub-graders are
  reported by name.
- `file.py:function`: a plain callable `function(sample, item) -> float`, where `sample` is
  `{"output_text": ...}` and `item` is the prompt's line. It runs in this process: it is your own code,
  trusted like the rest of your training script (grader JSON `python` graders run sandboxed instead).

Either way a sample that fails to grade scores 0 and is counted in `errors`, as OpenAI's graders do.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.graders.files import load_grader
from tunery.graders.run import Grader, build_grader
from tunery.graders.spec import Multi


@dataclass
class Scores:
    rewards: list[float]  # one per completion
    by_grader: dict[str, list[float]]  # each sub-grader's scores (the grader's own name if it has none)
    errors: int  # completions whose grading failed (scored 0)


class RewardFunction:
    """Scores completion texts against their prompts' lines: `reward_fn(texts, items) -> Scores`."""

    def __init__(self, grader: Grader) -> None:
        self.grader = grader
        # The names scores are reported under: a multi grader's sub-graders, else the grader itself.
        self.names = sorted(grader.spec.graders) if isinstance(grader.spec, Multi) else [grader.name]

    def __call__(self, texts: list[str], items: list[dict[str, Any]]) -> Scores:
        results = self.grader.grade_batch([{"output_text": t} for t in texts], items)
        rewards = [r.reward for r in results]
        if not isinstance(self.grader.spec, Multi):
            return Scores(rewards, {self.grader.name: rewards}, sum(not r.ok for r in results))
        by_grader = {name: [float(r.sub_rewards.get(name, 0.0)) for r in results] for name in self.names}
        return Scores(rewards, by_grader, sum(not r.ok for r in results))


def load_reward_function(spec: str) -> RewardFunction:
    match = re.fullmatch(r"(.+\.py):(\w+)", spec)
    if match:
        return RewardFunction(build_grader(_import_function(Path(match.group(1)), match.group(2))))
    return RewardFunction(load_grader(spec))


def _import_function(path: Path, name: str) -> Any:
    if not path.is_file():
        raise TuneryError(f"reward function file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"tunery_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise TuneryError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's module failed on import: say where
        raise TuneryError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise TuneryError(f"{path} has no function {name!r}; define {name}(sample, item) -> float")
    return function
