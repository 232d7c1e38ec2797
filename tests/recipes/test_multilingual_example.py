"""examples/support-multilingual/per_language.py: per-language held-out loss, win rate and answer
language of a tuned model against its base (here a two-step run on tiny-random)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from tests.conftest import example_module, tunery_here

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "support-multilingual"


def per_language() -> ModuleType:
    return example_module(EXAMPLE / "per_language.py")


def test_the_language_check_reads_every_reference_answer_right() -> None:
    module = per_language()
    rows = [json.loads(line) for line in (EXAMPLE / "valid.jsonl").read_text().splitlines()]
    assert [module.language_of(r["messages"][-1]["content"]) for r in rows] == [r["language"] for r in rows]
    assert module.language_of("ok") is None  # too few words to tell


def test_per_language_results_of_a_tuned_model(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    tunery_here(["train", "sft", "--model", "tiny-random", "--data", str(EXAMPLE / "train.jsonl"),
                 "--out", str(run), "--max-steps", "2", "--safety-evals", "none"])  # fmt: skip
    out = tmp_path / "per_language.json"
    assert per_language().main(["--adapter", str(run), "--max-tokens", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["languages"]) == ["en", "es", "fr", "de", "pt"]
    for lang, r in result["languages"].items():
        assert r["prompts"] == 10
        assert r["valid_loss"]["base"] > 0 and r["valid_loss"]["tuned"] > 0
        low, high = r["win_rate_interval"]
        assert 0 <= low <= r["win_rate"] <= high <= 1, lang
    assert len(result["answers"]) == 50
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("lang") and "wrote" in printed
