"""Data screening in the recipes' setup: personal data stops every recipe before a model loads, `redact`
trains on a masked copy recorded in screening.json, and a resumed run reuses that copy."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import chat_lines, write_jsonl
from tunery.cli import main
from tunery.errors import TuneryError
from tunery.recipes import sft

REQUIRED = {  # fields a recipe refuses to start without
    "sft": {},
    "dpo": {},
    "kto": {},
    "reward_model": {},
    "grpo": {"grader": str(Path(__file__).parents[2] / "examples/rl/grader.json")},  # read before screening
    "ppo": {"reward_model": "runs/rm"},
}


def chats_with_email(path: Path, n: int = 12) -> Path:
    lines = chat_lines(n)
    lines[1]["messages"][1]["content"] += " mail me at jane.doe@gmail.com"
    return write_jsonl(path, lines)


@pytest.mark.parametrize("recipe", list(REQUIRED))
def test_personal_data_stops_every_recipe_before_it_loads_a_model(recipe: str, tmp_path: Path) -> None:
    module = importlib.import_module(f"tunery.recipes.{recipe}")
    data, out = chats_with_email(tmp_path / "train.jsonl"), tmp_path / "run"
    overrides = {"model": "no-such-model", "data": str(data), "out": str(out), **REQUIRED[recipe]}
    with pytest.raises(TuneryError, match=r"(?s)train.jsonl is blocked.*personal data \(email\) on line 2"):
        module.run(None, overrides)
    assert [p.name for p in out.iterdir()] == [".lock"]  # the run's lock only: nothing that blocks a rerun
    with pytest.raises(TuneryError, match="screen_pii must be warn, block or redact"):
        module.run(None, overrides | {"screen_pii": "off"})


def test_redact_trains_on_a_masked_copy_and_resume_reuses_it(tmp_path: Path) -> None:
    data, out = chats_with_email(tmp_path / "train.jsonl"), tmp_path / "run"
    fields = {"model": "tiny-random", "data": data, "out": out, "epochs": 1, "batch_size": 4, "lora_rank": 4,
              "precision": "fp32", "micro_batch_tokens": 256, "save_every": 1, "screen_pii": "redact"}  # fmt: skip
    argv = [sys.executable, "-m", "tunery", "train", "sft"]
    argv += [a for k, v in fields.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "TUNERY_FAULT": "after_step:1:SIGTERM", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 2 and "stopped at step 1/3" in stopped.stderr, stopped.stderr

    report = json.loads((out / "screening.json").read_text())
    train = report["files"]["train"]
    copy = out / "screened" / "train.jsonl"
    assert (train["action"], train["redacted_path"], train["by_category"]) == (
        "redacted",
        str(copy),
        {"email": 1},
    )
    assert "jane.doe" not in copy.read_text() and "[EMAIL]" in copy.read_text()
    assert "jane.doe@gmail.com" in data.read_text()  # the original is untouched
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["data"], config["screen_pii"]) == (str(data), "redact")

    written = (out / "screening.json").stat().st_mtime_ns
    copy.unlink()
    with pytest.raises(TuneryError, match="redacted copy .* is missing"):
        sft.run(None, {}, resume_dir=str(out))
    copy.write_text(data.read_text().replace("jane.doe@gmail.com", "[EMAIL]"))
    assert main(["train", "sft", "--resume", str(out)]) == 0
    assert (out / "screening.json").stat().st_mtime_ns == written  # not screened again
    assert (out / "final").is_dir()
