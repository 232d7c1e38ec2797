"""GRPO / RLOO end to end on tiny-random, with a Python reward function and an OpenAI grader JSON."""

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

from tests.conftest import run_torchrun, write_jsonl
from tunery.cli import main
from tunery.recipes import grpo, rollouts
from tunery.run.files import read_metrics

REPO = Path(__file__).resolve().parents[2]

# The tiny model writes random bytes; this reward wants vowels, which it can learn within a few steps.
REWARD = """
def vowels(sample, item):
    text = sample["output_text"]
    return sum(ch in "aeiou" for ch in text) / max(len(text), 1)
"""


@pytest.fixture
def rl_files(tmp_path: Path) -> dict[str, Path]:
    rows = [
        {"messages": [{"role": "user", "content": f"Say something about {w}"}], "answer": w}
        for w in [
            "tea",
            "bikes",
            "rain",
            "maps",
            "bread",
            "snow",
            "jazz",
            "ink",
            "kites",
            "owls",
            "salt",
            "moss",
        ]
    ]
    files = {
        "train": tmp_path / "train.jsonl",
        "valid": tmp_path / "valid.jsonl",
        "reward": tmp_path / "r.py",
    }
    write_jsonl(files["train"], rows)
    write_jsonl(files["valid"], rows[:6])
    files["reward"].write_text(REWARD)
    return files


def config(files: dict[str, Path], out: Path, **extra) -> dict:
    base = {
        "model": "tiny-random",
        "data": str(files["train"]),
        "valid": str(files["valid"]),
        "grader": f"{files['reward']}:vowels",
        "out": str(out),
        "group_size": 4,
        "batch_size": 4,
        "epochs": 4,
        "max_new_tokens": 8,
        "lr": 1e-2,
        "lora_rank": 8,
        "seed": 0,
        "precision": "bf16",
        "save_every": 3,
        "eval_every": 4,
        "micro_batch_tokens": 1024,
    }
    return base | extra


def steps_of(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "train_reward_mean" in r]


def adapter_state(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "final" / "adapter_model.safetensors"))


def test_grpo_writes_the_contract_and_raises_the_reward(rl_files, tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    # Seed 1: with seeds 0-3 this run reaches a reward of 1.0 on 3 of 4 seeds; seed 0 is the slow one
    # (0.27 after 8 steps, 1.0 after 12, or 0.23 after 12 when bf16 rounding sends its samples elsewhere).
    summary = grpo.run(None, config(rl_files, out, seed=1))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples.jsonl", "final/tunery.yaml"):
        assert (out / name).is_file(), name
    records = read_metrics(out)
    start = records[0]
    assert start["step"] == 0 and "valid_reward_mean" in start  # the untrained policy, for comparison
    steps = steps_of(out)
    assert len(steps) == 12
    for key in ("train_reward_mean", "train_reward_std", "train_reward/vowels", "frac_reward_zero_std",
                "entropy", "clip_fraction", "completion_length", "grad_norm", "completions_per_second"):  # fmt: skip
        assert all(math.isfinite(r[key]) for r in steps), key
    evaluated = [r for r in steps if "valid_reward_mean" in r]
    assert len(evaluated) == 3 and all("kl" in r and r["kl"] >= 0 for r in evaluated)
    assert evaluated[-1]["valid_reward_mean"] > start["valid_reward_mean"] + 0.3
    assert steps[-1]["train_reward_mean"] > steps[0]["train_reward_mean"] + 0.3
    assert summary["start_valid_reward_mean"] == start["valid_reward_mean"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 4, 8, 12} and all("completion" in s for s in samples)
    # Every LoRA matrix moved (B starts at zero, A at random values).
    from tunery.models.load import load_model
    from tunery.models.lora import apply_lora

    torch.manual_seed(0)
    fresh = apply_lora(load_model("tiny-random")[0], 8, 16, 0.0, "all-linear")
    initial = {k.replace(".default", ""): v for k, v in fresh.state_dict().items() if "lora_" in k}
    for key, value in adapter_state(out).items():
        assert not torch.allclose(value.float(), initial[key].float()), key


@pytest.mark.parametrize(
    "extra",
    [
        {"baseline": "rloo", "scale_rewards": "none", "loss_aggregation": "sequence"},
        {"beta": 0.05, "num_iterations": 2, "epsilon_high": 0.28, "loss_aggregation": "fixed"},
    ],
)
def test_grpo_variants_train(rl_files, tmp_path: Path, extra: dict) -> None:
    out = tmp_path / "run"
    grpo.run(None, config(rl_files, out, epochs=1, **extra))
    steps = steps_of(out)
    assert len(steps) == 3 and all(math.isfinite(r["train_reward_mean"]) for r in steps)
    if extra.get("beta"):
        assert all("kl" in r for r in steps)  # in the loss: measured every step
        assert any(r["clip_fraction"] > 0 for r in steps)  # the second update is off-policy: clipping acts


def test_grpo_with_an_openai_grader_file(rl_files, tmp_path: Path) -> None:
    grader = {
        "type": "multi",
        "name": "both",
        "graders": {
            "has_e": {
                "type": "string_check",
                "name": "has_e",
                "input": "{{sample.output_text}}",
                "reference": "e",
                "operation": "like",
            },  # fmt: skip
            "topic": {
                "type": "python",
                "name": "topic",
                "source": "def grade(sample, item):\n    return float(item['answer'][0] in sample['output_text'])",
            },  # fmt: skip
        },
        "calculate_output": "0.5 * has_e + 0.5 * topic",
    }
    (tmp_path / "g.json").write_text(json.dumps(grader))
    out = tmp_path / "run"
    grpo.run(None, config(rl_files, out, grader=str(tmp_path / "g.json"), epochs=1))
    steps = steps_of(out)
    assert {"train_reward/has_e", "train_reward/topic"} <= steps[0].keys()
    assert all(r["grader_errors"] == 0 for r in steps)
    for r in steps:
        mixed = 0.5 * r["train_reward/has_e"] + 0.5 * r["train_reward/topic"]
        assert r["train_reward_mean"] == pytest.approx(mixed)


def test_grpo_resume_after_sigkill_is_exact(rl_files, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    grpo.run(None, config(rl_files, ref, epochs=2))
    killed = tmp_path / "killed"
    cfg = config(rl_files, killed, epochs=2)
    args = ["train", "grpo"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "TUNERY_FAULT": "after_step:4"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunery", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert main(["train", "grpo", "--resume", str(killed)]) == 0
    for key, value in adapter_state(ref).items():
        assert torch.equal(value, adapter_state(killed)[key]), key
    assert [r["train_reward_mean"] for r in steps_of(ref)] == [
        r["train_reward_mean"] for r in steps_of(killed)
    ]
    summaries = [json.loads((run / "summary.json").read_text()) for run in (ref, killed)]
    assert summaries[0]["completions"] == summaries[1]["completions"] == 6 * 4 * 4


def test_sampler_log_probs_agree_with_the_training_forward_pass(rl_files) -> None:
    """What the sampler reports for each token is what the loss computes, up to bf16 rounding (the
    sampler runs merged bf16 weights; training runs base + LoRA under autocast); in fp32 they agree to
    1e-4 (tests/unit/test_sampling.py)."""
    from tunery.data.prompts import load_prompt_data
    from tunery.models.forward import output_head
    from tunery.models.load import load_model
    from tunery.models.lora import apply_lora, cast_frozen
    from tunery.models.sampling import SamplingParams, sample

    model, tokenizer = load_model("tiny-random")
    model = apply_lora(model, 8, 16, 0.0, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    cast_frozen(model, torch.bfloat16)
    prompts, _ = load_prompt_data(rl_files["train"], tokenizer)
    completions = sample(
        model, tokenizer, [p.prompt_ids for p in prompts[:3] for _ in range(4)],
        SamplingParams(max_new_tokens=16, temperature=1.0, seed=0),
    )  # fmt: skip
    groups = [
        rollouts.Group(p, completions[4 * k : 4 * k + 4],
                       [c.trained_ids for c in completions[4 * k : 4 * k + 4]], [True] * 4)
        for k, p in enumerate(prompts[:3])
    ]  # fmt: skip
    with torch.no_grad():
        row, logps, _, _ = rollouts.packed_logps(
            model, output_head(model), groups, 1.0, "bf16", torch.device("cpu")
        )
    for c, trained in zip(completions, rollouts.split_by_sequence(logps, row), strict=True):
        reported = torch.tensor(c.logprobs + ([c.stop_logprob] if c.stop_token_id is not None else []))
        assert reported.shape == trained.shape
        assert (reported - trained).abs().mean() < 0.1
        assert (reported - trained).abs().max() < 0.5


@pytest.mark.system
def test_grpo_under_torchrun_splits_each_step_across_processes_and_learns(rl_files, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = [a for k, v in config(rl_files, out).items() for a in ("--set", f"{k}={v}")]
    proc = run_torchrun(["train", "grpo", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["completions"] == 12 * 4 * 4  # 4 prompts x 4, 12 steps
    records = read_metrics(out)
    evaluated = [r for r in records if "valid_reward_mean" in r]
    assert evaluated[-1]["valid_reward_mean"] > evaluated[0]["valid_reward_mean"] + 0.3


@pytest.mark.system
def test_sharded_grpo_matches_unsharded_processes(rl_files, tmp_path: Path) -> None:
    """Full fine-tuning on two processes, sharded (--shard) and not (DDP): each process samples with the
    same seed in both, so the completions, rewards and updates agree; held-out prompts split 3 and 3,
    and a checkpoint and final/ are written from the shards."""
    full = {"lora_rank": 0, "beta": 0.0, "lr": 1e-4, "precision": "fp32", "epochs": 1, "eval_every": 2,
            "save_every": 2, "safety_evals": "none"}  # fmt: skip
    runs = {}
    for how in ("ddp", "shard"):
        out = tmp_path / how
        extra = {**full, "shard": True} if how == "shard" else full
        args = [a for k, v in config(rl_files, out, **extra).items() for a in ("--set", f"{k}={v}")]
        proc = run_torchrun(["train", "grpo", *args])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[how] = read_metrics(out)
    assert len(runs["ddp"]) == len(runs["shard"]) and len(steps_of(tmp_path / "shard")) == 3
    for a, b in zip(runs["ddp"], runs["shard"], strict=True):
        for key in ("train_reward_mean", "completion_length", "valid_reward_mean", "entropy", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert (tmp_path / "shard" / "checkpoints" / "step-2" / "sharded").is_dir()
    assert (tmp_path / "shard" / "final" / "model.safetensors").is_file()


def exact_ok_grader(tmp_path: Path) -> str:
    grader = {"type": "string_check", "name": "ok", "input": "{{sample.output_text}}",
              "reference": "ok", "operation": "eq"}  # fmt: skip
    (tmp_path / "ok.json").write_text(json.dumps(grader))
    return str(tmp_path / "ok.json")


def test_a_warm_start_puts_the_format_within_reach(rl_files, tmp_path: Path) -> None:
    """The random model never replies exactly "ok", so an exact grader gives every completion 0 and GRPO
    has nothing to learn from; a warm start on eight replies of "ok" makes it the policy's answer before
    step 1, and a run killed later resumes without repeating it."""
    warm = tmp_path / "warm.jsonl"
    write_jsonl(warm, [{"messages": [{"role": "user", "content": f"Say something about {w}"},
                                     {"role": "assistant", "content": "ok"}]}
                       for w in ["cats", "boats", "trees", "songs", "glass", "cards", "roads", "fog"]])  # fmt: skip
    grader = exact_ok_grader(tmp_path)
    cold = tmp_path / "cold"
    grpo.run(None, config(rl_files, cold, grader=grader, epochs=1))
    assert read_metrics(cold)[0]["valid_reward_mean"] == 0
    assert all(r["frac_reward_zero_std"] == 1 for r in steps_of(cold))  # no group to learn from

    ref = tmp_path / "ref"
    cfg = config(rl_files, ref, grader=grader, epochs=2, warm_start=str(warm), warm_start_epochs=4)
    grpo.run(None, cfg)
    start = read_metrics(ref)[0]
    assert start["step"] == 0 and start["warm_start_steps"] == 8
    assert start["warm_start_loss"] < start["warm_start_loss_first"] / 2
    assert start["valid_reward_mean"] > 0.5
    config_yaml = (ref / "config.yaml").read_text()
    assert "warm_start_sha256: " in config_yaml and "warm_start_sha256: null" not in config_yaml

    killed = tmp_path / "killed"
    args = ["train", "grpo"] + [
        a for k, v in {**cfg, "out": str(killed)}.items() for a in ("--set", f"{k}={v}")
    ]
    env = {**os.environ, "TUNERY_FAULT": "after_step:4"}
    proc = subprocess.run([sys.executable, "-m", "tunery", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert main(["train", "grpo", "--resume", str(killed)]) == 0
    assert sum("warm_start_loss" in r for r in read_metrics(killed)) == 1
    for key, value in adapter_state(ref).items():
        assert torch.equal(value, adapter_state(killed)[key]), key


def test_a_bad_warm_start_file_is_named_before_training(rl_files, tmp_path: Path, capsys) -> None:
    warm = tmp_path / "warm.jsonl"
    warm.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}]\n')  # fmt: skip
    cfg = config(rl_files, tmp_path / "run", grader=exact_ok_grader(tmp_path), warm_start=str(warm))
    args = ["train", "grpo"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "warm.jsonl" in err and "line 2" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_guide_shows_the_policy_the_reply_it_never_samples(rl_files, tmp_path: Path) -> None:
    """An exact grader on each prompt's word: the random model never writes it, so plain GRPO has no
    group to learn from. `guide` puts the reference in the place of one completion of each group that
    scored below it; the policy learns to write it, and as its own completions match, fewer groups are
    guided (slowly here: the random model's replies are random bytes)."""
    grader = {"type": "string_check", "name": "word", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "eq"}  # fmt: skip
    (tmp_path / "word.json").write_text(json.dumps(grader))
    out = tmp_path / "guided"
    cfg = config(
        rl_files, out, grader=str(tmp_path / "word.json"), guide="{{item.answer}}", epochs=12, temperature=0.3
    )
    grpo.run(None, cfg)
    steps = steps_of(out)
    assert steps[0]["guided_ratio"] == 1 and steps[0]["train_reward_mean"] == 0
    assert steps[0]["frac_reward_zero_std"] == 1  # the policy's own completions: all alike
    late = steps[-8:]  # its own completions match sometimes now, and those groups are not guided
    assert sum(r["train_reward_mean"] for r in late) > 0 and sum(r["guided_ratio"] for r in late) < 8
    # greedy, from 0 of 6 held-out prompts to at least one: how many depends on the CPU's bf16 kernels (two
    # on one machine, one on another with AMX; seeds 1 and 2 peaked at three and two)
    assert max(r.get("valid_reward_mean", 0) for r in read_metrics(out)) > 0


def test_a_guide_naming_a_missing_field_is_an_error_naming_the_line(rl_files, tmp_path: Path, capsys) -> None:
    cfg = config(rl_files, tmp_path / "run", guide="{{item.solution}}")
    assert main(["train", "grpo"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]) != 0
    err = capsys.readouterr().err
    assert "train.jsonl: line 1" in err and "solution" in err and "Traceback" not in err
    cfg["guide"] = "{{sample.output_text}}"
    assert main(["train", "grpo"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]) != 0
    assert "reference reply built from the prompt's fields" in capsys.readouterr().err
