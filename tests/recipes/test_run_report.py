"""What every run reports on itself (MODEL_CARD.md, the energy in summary.json) and early stopping with
best-weight selection, end to end on tiny-random, across a SIGKILL and a resume too."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from tests.conftest import TOPICS, chat_lines, write_jsonl
from tunery.cli import main
from tunery.recipes import dpo, sft
from tunery.run.files import read_metrics

REPO = Path(__file__).resolve().parents[2]


def sft_config(train: Path, valid: Path, out: Path, **extra) -> dict:
    base = {
        "model": "tiny-random",
        "data": str(train),
        "valid": str(valid),
        "out": str(out),
        "epochs": 2,
        "batch_size": 4,
        "lr": 2e-2,
        "lora_rank": 8,
        "seed": 0,
        "precision": "fp32",
        "save_every": 2,
        "eval_every": 3,
        "micro_batch_tokens": 256,
    }
    return base | extra


def adapter(path: Path) -> dict:
    return safetensors.torch.load_file(str(path / "adapter_model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_sft_run_writes_a_model_card_and_its_energy(chat_files, tmp_path: Path, caplog) -> None:
    train, valid = chat_files
    out = tmp_path / "support"
    with caplog.at_level(logging.INFO, logger="tunery"):
        summary = sft.run(None, sft_config(train, valid, out, intended_use="Tests.", energy_country="SWE"))
    # the console says what runs after training, how to skip it, and the headline results
    said = caplog.text
    assert "evaluating the base and tuned models (quick size" in said and "--safety-evals none" in said
    assert "evaluations done in" in said and "safety: refusal_rate " in said and "bias: max_gap " in said

    energy = summary["energy"]
    assert "error" not in energy, energy
    assert energy["kwh"] > 0 and energy["kg_co2e"] > 0 and energy["segments"] == 1
    assert energy["country"] == "SWE" and energy["tracking_mode"] == "process"
    assert energy["method"].startswith(("estimated: CPU", "measured: CPU"))
    assert energy["cpu_power_w"] >= 0 and energy["ram_power_w"] > 0 and energy["duration_s"] > 0
    assert energy["tracker"].startswith("codecarbon 3.")
    assert summary["train_examples"] == 24 and summary["valid_examples"] == 6
    for checkpoint in (out / "checkpoints").iterdir():
        state = json.loads((checkpoint / "state.json").read_text())
        assert "kwh" in state["energy"] and state["early_stopping"]["best_step"] is not None
    assert not (out / "emissions.csv").exists()

    card = (out / "final" / "MODEL_CARD.md").read_text()
    print(card)
    config = (out / "config.yaml").read_text()
    data_sha = next(line.split()[1] for line in config.splitlines() if line.startswith("data_sha256"))
    assert card.startswith("# Model card: support\n")
    sections = [
        "## Intended use",
        "## Limitations",
        "## Risk category",
        "## Training data",
        "### Data screening",
        "## Training",
        "### Results",
        "## Evaluations",
        "## Energy and carbon",
    ]
    for heading in sections:
        assert f"\n{heading}\n" in card, heading
    assert (
        "\nTests.\n" in card and f"`{data_sha}`" in card and f"{summary['trained_tokens']:,} tokens" in card
    )
    assert "| train_loss | " in card and "| valid_loss | " in card
    assert energy["method"] in card and "Sweden's grid" in card
    # the before-vs-after evaluations ran (safety_evals defaults to quick) and the card shows them
    evals = json.loads((out / "evals.json").read_text())
    assert {"safety", "bias", "memorization", "diversity"} <= evals.keys() and summary[
        "safety_flags"
    ] is not None
    assert "\n### Safety\n" in card and "\n### Bias\n" in card and "- **Grounding**: not run" in card

    # `tunery card` regenerates it, e.g. after evaluations.
    safety = {"base": {"refusal_rate": 0.5}, "tuned": {"refusal_rate": 0.1}, "flags": ["worse"]}
    (out / "evals.json").write_text(json.dumps({"safety": safety}))
    assert main(["card", str(out)]) == 0
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "Red flags (1)" in card and "| `refusal_rate` | 0.5 | 0.1 | -0.4 |" in card


@pytest.fixture
def diverging_files(tmp_path: Path) -> tuple[Path, Path]:
    """Training chats in English and held-out answers of digits: once the model has learned the chat format,
    every step towards the English answers makes the digits less likely, so the validation loss turns up."""
    train = write_jsonl(tmp_path / "train.jsonl", chat_lines(24))
    digits = []
    for i, (question, _) in enumerate(TOPICS):
        answer = " ".join(str((i * 7 + k * 3) % 10) for k in range(12))
        digits.append({"messages": [{"role": "user", "content": f"{question} (#{i})"},
                                    {"role": "assistant", "content": answer}]})  # fmt: skip
    return train, write_jsonl(tmp_path / "digits.jsonl", digits)


def early_config(train: Path, valid: Path, out: Path) -> dict:
    return sft_config(train, valid, out, epochs=6, eval_every=2, save_every=1, keep_checkpoints=100,
                      schedule="constant", early_stopping_patience=3, track_energy=False)  # fmt: skip


def test_early_stopping_stops_and_final_holds_the_best_weights(diverging_files, tmp_path: Path) -> None:
    train, valid = diverging_files
    out = tmp_path / "early"
    summary = sft.run(None, early_config(train, valid, out))

    records = read_metrics(out)
    evals = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert summary["stopped_early"] is True and summary["steps"] < 36
    assert (
        summary["best_step"] == best_step == summary["final_step"] and summary["best_valid_loss"] == best_loss
    )
    assert summary["steps"] == best_step + 3 * 2  # three evaluations, two steps apart, without improvement
    assert max(r["step"] for r in records if "train_loss" in r) == summary["steps"]
    final_record = records[-1]
    assert final_record["stopped_early"] is True and final_record["best_step"] == best_step
    # final/ holds the weights the checkpoint of the best step holds, and the full validation (the same
    # six chats as the periodic ones) sees the best step's loss again.
    assert same_weights(adapter(out / "final"), adapter(out / "checkpoints" / f"step-{best_step}" / "model"))
    assert final_record["full_valid_loss"] == pytest.approx(best_loss, rel=1e-6)
    assert sorted(p.name for p in (out / "best").iterdir()) == [f"step-{best_step}"]


def test_early_stopping_resumes_exactly_after_sigkill(diverging_files, tmp_path: Path) -> None:
    train, valid = diverging_files
    ref = sft.run(None, early_config(train, valid, tmp_path / "ref"))

    killed = tmp_path / "killed"
    cfg = early_config(train, valid, killed) | {"track_energy": True}
    kill_at = ref["best_step"] + 3  # after one evaluation without improvement, before the stop
    args = ["train", "sft"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(
        [sys.executable, "-m", "tunery", *args],
        env={**os.environ, "TUNERY_FAULT": f"after_step:{kill_at}"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "best" / f"step-{ref['best_step']}").is_dir()
    assert main(["train", "sft", "--resume", str(killed)]) == 0

    resumed = json.loads((killed / "summary.json").read_text())
    for key in ("steps", "best_step", "best_valid_loss", "stopped_early", "final_step"):
        assert resumed[key] == ref[key], key
    assert same_weights(adapter(killed / "final"), adapter(tmp_path / "ref" / "final"))
    assert resumed["energy"]["segments"] == 2 and resumed["energy"]["kwh"] > 0


def test_dpo_early_stopping_selects_the_best_evaluation(pair_files, tmp_path: Path) -> None:
    """A min_delta no loss can beat makes every evaluation after the first a miss, whatever the curve."""
    train, valid = pair_files
    out = tmp_path / "dpo"
    cfg = {"model": "tiny-random", "data": str(train), "valid": str(valid), "out": str(out), "epochs": 3,
           "batch_size": 4, "lr": 1e-2, "lora_rank": 8, "precision": "fp32", "save_every": 1, "eval_every": 2,
           "keep_checkpoints": 100, "micro_batch_tokens": 512, "max_length": 256,
           "early_stopping_patience": 2, "early_stopping_min_delta": 100.0,
           "track_energy": False}  # fmt: skip
    summary = dpo.run(None, cfg)
    evals = [(r["step"], r["valid_loss"]) for r in read_metrics(out) if "valid_loss" in r]
    assert [s for s, _ in evals] == [2, 4, 6] and summary["steps"] == 6 and summary["stopped_early"]
    best_step = min(evals, key=lambda e: e[1])[0]
    assert summary["final_step"] == best_step
    assert same_weights(adapter(out / "final"), adapter(out / "checkpoints" / f"step-{best_step}" / "model"))
    assert "Early stopping: patience 2 evaluations" in (out / "final" / "MODEL_CARD.md").read_text()
