"""DPO (and IPO, SimPO, conservative DPO) and reward models end to end on tiny-random."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import TOPICS, chat_lines, pair_lines, run_torchrun, write_jsonl
from tunery.cli import main
from tunery.data.feedback import load_feedback_data
from tunery.models.heads import load_reward_model, score_pairs
from tunery.models.load import load_model
from tunery.models.lora import load_adapter, merge_adapter
from tunery.recipes import dpo, reward_model, sft
from tunery.run.files import read_metrics

REPO = Path(__file__).resolve().parents[2]


def config(train: Path, valid: Path, out: Path, **extra) -> dict:
    base = {
        "model": "tiny-random",
        "data": str(train),
        "valid": str(valid),
        "out": str(out),
        "epochs": 3,
        "batch_size": 4,
        "lr": 1e-2,
        "lora_rank": 8,
        "seed": 0,
        "precision": "fp32",
        "save_every": 2,
        "eval_every": 3,
        "micro_batch_tokens": 512,
        "max_length": 256,
    }
    return base | extra


def steps_of(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "train_loss" in r]


def adapter_state(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "final" / "adapter_model.safetensors"))


def test_dpo_writes_the_contract_and_learns(pair_files, tmp_path: Path) -> None:
    train, valid = pair_files
    out = tmp_path / "dpo"
    summary = dpo.run(None, config(train, valid, out))
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "reference_logps.json",
        "final/adapter_config.json",
    ):
        assert (out / name).is_file(), name
    steps = steps_of(out)
    assert [r["step"] for r in steps] == list(range(1, 19))
    first, last = steps[0], steps[-1]
    # Before the first update the policy is the reference: every implicit reward is 0 (up to the rounding
    # of matmuls over rows packed differently in the reference pass).
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/margins", "logps/chosen", "logps/rejected", "lr", "grad_norm", "pairs_per_second"):
        assert key in first
    assert last["train_loss"] < 0.5 * first["train_loss"] and last["rewards/accuracies"] == 1.0
    final = read_metrics(out)[-1]
    assert final["full_valid_rewards/accuracies"] == 1.0 and final["full_valid_rewards/margins"] > 0
    assert summary["final_metrics"]["full_valid_loss"] == final["full_valid_loss"]
    # every LoRA matrix moved (B starts at zero)
    assert all(value.abs().sum() > 0 for key, value in adapter_state(out).items() if "lora_B" in key)


@pytest.mark.parametrize(
    "extra", [{"loss": "ipo"}, {"loss": "simpo"}, {"label_smoothing": 0.2}, {"sft_weight": 1.0}]
)
def test_dpo_family_trains(pair_files, tmp_path: Path, extra: dict) -> None:
    train, valid = pair_files
    out = tmp_path / "run"
    dpo.run(None, config(train, valid, out, epochs=2, lr=3e-3, **extra))
    steps = steps_of(out)
    assert all(math.isfinite(r["train_loss"]) for r in steps)
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert (out / "reference_logps.json").exists() == (extra.get("loss") != "simpo")


def test_dpo_on_top_of_an_sft_adapter(pair_files, chat_files, tmp_path: Path) -> None:
    sft_run = tmp_path / "sft"
    sft.run(None, config(*chat_files, sft_run, epochs=1, lr=2e-2) | {"max_length": 256})
    train, valid = pair_files
    out = tmp_path / "dpo"
    dpo.run(None, config(train, valid, out, epochs=1, adapter=str(sft_run)))
    # The SFT model is the reference, so the first step still starts from zero rewards.
    assert steps_of(out)[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (out / "final" / "base_adapter" / "adapter_config.json").is_file()
    base, tokenizer = load_model("tiny-random")
    ids = torch.tensor([tokenizer("Where is my order?")["input_ids"]])
    sft_model = merge_adapter(load_model("tiny-random")[0], sft_run)
    tuned = load_adapter(base, out)  # merges the bundled SFT adapter first
    with torch.no_grad():
        sft_logits, tuned_logits = sft_model(input_ids=ids).logits, tuned(input_ids=ids).logits
        with tuned.disable_adapter():
            reference_logits = tuned(input_ids=ids).logits
    assert torch.allclose(reference_logits, sft_logits, atol=1e-4)
    assert not torch.allclose(tuned_logits, sft_logits, atol=1e-4)


def test_dpo_resume_after_sigkill_is_exact(pair_files, tmp_path: Path) -> None:
    train, valid = pair_files
    ref = tmp_path / "ref"
    dpo.run(None, config(train, valid, ref, lora_dropout=0.1))
    killed = tmp_path / "killed"
    args = ["train", "dpo"] + [
        a for k, v in config(train, valid, killed, lora_dropout=0.1).items() for a in ("--set", f"{k}={v}")
    ]
    env = {**os.environ, "TUNERY_FAULT": "after_step:5"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunery", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert main(["train", "dpo", "--resume", str(killed)]) == 0
    for key, value in adapter_state(ref).items():
        assert torch.equal(value, adapter_state(killed)[key]), key
    assert [r["train_loss"] for r in steps_of(ref)] == [r["train_loss"] for r in steps_of(killed)]


@pytest.mark.system
@pytest.mark.parametrize(("method", "how"), [("dpo", "ddp"), ("dpo", "shard"), ("rm", "shard")])
def test_two_processes_match_one(method: str, how: str, tmp_path: Path) -> None:
    """DDP with LoRA, and sharded full fine-tuning (--shard): the same losses as one process; a sharded
    reward model's final/ scores as the run measured. Sharded DPO starts from an SFT adapter, which only
    the main process reads and merges: the other receives its shards of the merged weights."""
    train = write_jsonl(tmp_path / "train.jsonl", pair_lines(13))  # the last step of 4 has one pair
    valid = write_jsonl(tmp_path / "valid.jsonl", pair_lines(18)[13:])  # 5: the processes get 3 and 2
    full: dict = {"lora_rank": 0, "lr": 1e-4, "safety_evals": "none"} if how == "shard" else {}
    if method == "rm":
        full = {"lora_rank": 0, "lr": 1e-3}
    elif how == "shard":
        chats = write_jsonl(tmp_path / "chats.jsonl", chat_lines(10))
        sft.run(None, config(chats, chats, tmp_path / "sft", epochs=1, lr=2e-2, safety_evals="none"))
        full["adapter"] = str(tmp_path / "sft")
    recipe = {"dpo": dpo, "rm": reward_model}[method]
    single = tmp_path / "single"
    recipe.run(None, config(train, valid, single, epochs=1, **full))
    double = tmp_path / how
    extra = {**full, "shard": True} if how == "shard" else {}
    args = [
        a for k, v in config(train, valid, double, epochs=1, **extra).items() for a in ("--set", f"{k}={v}")
    ]
    proc = run_torchrun(["train", method, *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = steps_of(single), steps_of(double)
    assert len(one) == len(two) == 4
    keys = ("train_loss", "rewards/margins", "logps/chosen", "valid_loss", "train_margin", "valid_accuracy")
    for a, b in zip(one, two, strict=True):
        for key in keys:
            if key in a:
                # a margin is a small difference of log-probability sums (~1e-2 of ~1e2): its fp32 rounding
                # in another reduction order is ~1e-6 (1.05e-6 on one CPU, under 1e-6 on another)
                tolerance = 1e-5 if key == "rewards/margins" else 1e-6
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=tolerance), key
    if method == "rm":  # final/ was gathered from the shards: it scores as the run's last evaluation
        model, tokenizer, _ = load_reward_model(double)
        pairs = load_feedback_data(valid, tokenizer, 256, expect="preference", min_examples=1)
        margin = sum(c - r for c, r in score_pairs(model, pairs)) / len(pairs)
        assert margin == pytest.approx(read_metrics(double)[-1]["full_valid_margin"], rel=1e-4)


def test_reward_model_learns_and_reloads_for_scoring(pair_files, tmp_path: Path, capsys) -> None:
    train, valid = pair_files
    out = tmp_path / "rm"
    reward_model.run(None, config(train, valid, out, lr=5e-3, center_coef=0.01))
    assert (out / "final" / "score.safetensors").is_file()
    steps = steps_of(out)
    for key in ("train_accuracy", "train_margin", "valid_loss", "valid_accuracy", "valid_margin"):
        assert any(key in r for r in steps), key
    assert steps[-1]["train_loss"] < 0.5 * steps[0]["train_loss"]
    final = read_metrics(out)[-1]
    assert final["full_valid_accuracy"] == 1.0

    # The saved model scores the held-out pairs as it did at the end of training.
    model, tokenizer, meta = load_reward_model(out)
    assert meta["method"] == "rm"
    pairs = load_feedback_data(valid, tokenizer, 256, expect="preference", min_examples=1)
    scores = score_pairs(model, pairs)
    margin = sum(c - r for c, r in scores) / len(scores)
    assert margin == pytest.approx(final["full_valid_margin"], rel=1e-4)

    assert main(["score", "--rm", str(out), "--data", str(valid)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.err.strip().splitlines()[-1])
    assert summary["accuracy"] == 1.0
    split = {k: v for k, v in summary.items() if "chosen_" in k}
    assert split and all(v == 1.0 for k, v in split.items() if k.startswith("accuracy_"))
    assert 0 < sum(v for k, v in split.items() if k.startswith("pairs_")) <= 6
    assert len(captured.out.strip().splitlines()) == 6
    assert {"full_valid_accuracy_chosen_longer", "full_valid_accuracy_chosen_shorter"} & final.keys()


def test_reward_accuracy_is_split_by_which_answer_is_longer() -> None:
    """A length-biased judge shows as a gap between the two accuracies (worked by hand)."""
    from tunery.data.feedback import TokenizedPair
    from tunery.recipes.reward_model import PairStats
    from tunery.training.distributed import World

    def pair(chosen: int, rejected: int) -> TokenizedPair:
        return TokenizedPair(0, [1], [2] * chosen, [True] * chosen, [3] * rejected, [True] * rejected)

    pairs = [pair(5, 2), pair(6, 1), pair(2, 7), pair(3, 3)]  # longer, longer, shorter, same length
    chosen, rejected = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    stats = PairStats()
    stats.add(torch.zeros(4), chosen, rejected, 1.0, pairs)
    metrics = stats.averaged(World(), "valid_")
    assert metrics["valid_accuracy"] == 0.5  # right on pairs 1 and 3
    assert metrics["valid_accuracy_chosen_longer"] == 0.5 and metrics["valid_accuracy_chosen_shorter"] == 1.0


def test_full_fine_tuned_reward_model_reloads(pair_files, tmp_path: Path) -> None:
    train, valid = pair_files
    out = tmp_path / "rm-full"
    reward_model.run(None, config(train, valid, out, epochs=1, lora_rank=0, lr=1e-3))
    model, tokenizer, _ = load_reward_model(out)
    pairs = load_feedback_data(valid, tokenizer, 256, expect="preference", min_examples=1)
    margin = sum(c - r for c, r in score_pairs(model, pairs)) / len(pairs)
    assert margin == pytest.approx(read_metrics(out)[-1]["full_valid_margin"], rel=1e-4)


def test_preference_recipes_reject_bad_input(pair_files, chat_files, tmp_path: Path, capsys) -> None:
    train, valid = pair_files
    chats, _ = chat_files
    assert (
        main(["train", "dpo", "--model", "tiny-random", "--data", str(chats), "--out", str(tmp_path / "a")])
        == 2
    )
    assert "line 1: [data_type]" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", pair_lines(12) + [{"prompt": "q", "chosen": "a"}])
    assert (
        main(["train", "rm", "--model", "tiny-random", "--data", str(bad), "--out", str(tmp_path / "b")]) == 2
    )
    assert "line 13: [missing_field] 'rejected' is missing" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "dpo",
                "--model",
                "tiny-random",
                "--data",
                str(train),
                "--out",
                str(tmp_path / "c"),
                "--loss",
                "ipo",
                "--set",
                "label_smoothing=0.1",
            ]
        )
        == 2
    )
    assert "label_smoothing" in capsys.readouterr().err
    assert main(["score", "--rm", str(tmp_path / "nothing"), "--data", str(valid)]) == 2
    assert "nothing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["score", "--rm", str(tmp_path / "empty"), "--data", str(valid)]) == 2
    assert "not a Tunery reward model" in capsys.readouterr().err


def test_eval_compare_judges_two_models_with_a_reward_model(pair_files, tmp_path: Path, capsys) -> None:
    train, valid = pair_files
    rm, policy = tmp_path / "rm", tmp_path / "dpo"
    reward_model.run(None, config(train, valid, rm, epochs=1))
    dpo.run(None, config(train, valid, policy, epochs=1))
    out = tmp_path / "comparison.jsonl"
    args = ["eval", "compare", "--rm", str(rm), "--model", "tiny-random", "--prompts", str(valid)]
    assert main([*args, "--adapter", str(policy), "--max-tokens", "6", "--out", str(out)]) == 0
    assert "win rate" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(
        {"candidate", "baseline", "candidate_score", "baseline_score"} <= r.keys() for r in rows
    )
    # A model compared with itself ties on every prompt: a win rate of exactly one half.
    assert main([*args, "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "win rate 50.0%" in printed
    assert "length-controlled win rate 50.0%" in printed  # equal lengths: nothing to take out


def test_length_coef_decorrelates_scores_from_length(tmp_path: Path) -> None:
    """Training data where the preferred answer is always the longer one: length is a perfect shortcut.
    With `length_coef` the reward model's scores of held-out answers follow length less."""
    from tunery.losses.reward import length_correlation

    def lines(start: int, n: int) -> list[dict]:
        out = []
        for i in range(start, start + n):
            q, good = TOPICS[i % len(TOPICS)]
            short = good.split()[0]  # "Yes," / "You" ...: a shorter, worse answer
            prompt = [{"role": "user", "content": f"{q} (#{i})"}]
            out.append({"input": {"messages": prompt},
                        "preferred_output": [{"role": "assistant", "content": good}],
                        "non_preferred_output": [{"role": "assistant", "content": short}]})  # fmt: skip
        return out

    train = write_jsonl(tmp_path / "train.jsonl", lines(0, 32))
    valid = write_jsonl(tmp_path / "valid.jsonl", lines(32, 8))
    correlation = {}
    for coef in (0.0, 20.0):
        out = tmp_path / f"rm-{coef}"
        reward_model.run(None, config(train, valid, out, lr=5e-3, length_coef=coef))
        model, tokenizer, _ = load_reward_model(out)
        pairs = load_feedback_data(valid, tokenizer, 256, expect="preference", min_examples=1)
        scores = torch.tensor([s for pair in score_pairs(model, pairs) for s in pair])
        lengths = torch.tensor([float(sum(m)) for p in pairs for m in (p.chosen_mask, p.rejected_mask)])
        correlation[coef] = float(length_correlation(scores, lengths))
    assert correlation[20.0] < correlation[0.0] - 0.2, correlation
