"""Reinforcement fine-tuning with graders: GRPO, and RLOO as a baseline option.

    tunery train grpo --data examples/rl/train.jsonl --valid examples/rl/valid.jsonl \\
        --grader examples/rl/grader.json --out runs/grpo
    tunery train grpo --baseline rloo ...       # leave-one-out baseline instead of the group mean
    tunery train grpo --resume runs/grpo
    torchrun --nproc_per_node=2 -m tunery train grpo ...   # each process samples and trains its prompts

A step takes `batch_size` prompts, samples `group_size` completions of each with the policy, scores
them with the grader (an OpenAI grader JSON, or `file.py:function` for a plain Python reward function)
and pushes up the completions that beat their group's average. Each prompt and its completions are
packed as one segment, `prompt | completion 1 | ... | completion G`, so the prompt is computed once per
group in the training forward pass, as in sampling (`models/sampling.py` shares its prefill).

Loss: the clipped surrogate per completion token with group-relative advantages, weighted per token
over the whole step (`loss_aggregation: token`, as DAPO; `sequence` is the original GRPO, `fixed` is
Dr. GRPO), plus `beta` x the k3 KL to the reference (the model with its LoRA adapter switched off, or
the frozen start for full fine-tuning). Each completion's end-of-turn token is trained, so the policy
learns when to stop.

Departures from the papers: advantages use the population std (+1e-4); groups whose rewards are all
equal add nothing to the gradient and, when beta is 0, skip the training forward pass altogether; with
`num_iterations` = 1 the importance ratio is exactly 1, so the old-policy forward pass is skipped.
Under torchrun each process takes its share of the step's prompts, samples, grades and trains on them;
token weights, rewards and metrics are summed over processes and DDP averages the gradients, so the loss
is the same as in one process (the samples differ: each process has its own sampling seed).
Evaluation samples one greedy completion per held-out prompt (temperature 0), so `valid_reward_mean` is
not sampling noise; `kl` (policy vs reference on the step's completions) is logged every step when beta
is above 0, and at evaluations otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from tunery.data.packing import Segment, pack_branches, plan_rows, step_indices
from tunery.data.prompts import PromptItem, load_prompt_data
from tunery.errors import TuneryError
from tunery.graders.rewards import RewardFunction, load_reward_function
from tunery.losses.grpo import clipped_surrogate, group_advantages, kl_k3, token_weights
from tunery.losses.logps import token_logps_and_entropy
from tunery.models.forward import final_hidden, output_weight
from tunery.models.load import load_model
from tunery.models.lora import adapter_dir, apply_lora, cast_frozen, merge_adapter
from tunery.models.sampling import Completion, SamplingParams, sample
from tunery.safety.card import write_model_card
from tunery.safety.evals import evaluate_run
from tunery.safety.screen import check_policies, screen_run_data, screened_paths
from tunery.training import auto, distributed
from tunery.training.checkpoint import latest_checkpoint
from tunery.training.common import (
    check_common_fields,
    checkpoint_or_stop,
    resolve_common,
    restore,
    run_summary,
)
from tunery.training.config import build_config
from tunery.training.energy import EnergyMeter
from tunery.training.faults import fault_point
from tunery.training.io import atomic_write_json, atomic_write_yaml
from tunery.training.memory import keep_freed_memory
from tunery.training.progress import StepProgress
from tunery.training.rundir import (
    autocast,
    check_same_data,
    file_digest,
    last_metrics,
    prepare_run_dir,
    resumed_config,
    save_final,
)
from tunery.training.schedule import lr_at
from tunery.training.signals import GracefulStop

log = logging.getLogger("tunery")

BASE_LR_LORA = 2e-5
BASE_LR_FULL = 1e-6


# --- config ----------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    adapter: str | None = None  # start from this fine-tuned adapter (e.g. an SFT run), merged in
    data: str = ""  # prompts, OpenAI reinforcement format: {"messages": [...], <fields for the grader>}
    valid: str | None = None  # held-out prompts
    grader: str = ""  # grader JSON file (OpenAI format) or file.py:function (a reward function)
    out: str = ""  # run directory
    group_size: int = 8  # completions sampled per prompt
    batch_size: int | str = "auto"  # prompts per step; auto: 4
    epochs: int | str = "auto"  # passes over the prompts; auto: 1
    max_steps: int = 0  # stop after this many steps (0: epochs decide)
    shuffle: bool = True  # visit prompts in a seeded random order each epoch; False: file order
    lr: float | None = None  # absolute peak learning rate; overrides learning_rate_multiplier
    learning_rate_multiplier: float | str = "auto"  # times 2e-5 (LoRA) or 1e-6 (full)
    lora_rank: int = 16  # 0 means full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    max_prompt_length: int = 512  # longer prompts are skipped, with a warning naming their lines
    max_new_tokens: int = 128  # completion budget; longer completions are cut ("truncated")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    loss_aggregation: str = "token"  # token (DAPO) | sequence (GRPO) | fixed (Dr. GRPO)
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    baseline: str = "mean"  # mean (GRPO) | rloo (leave-one-out)
    epsilon: float = 0.2  # clip range below 1
    epsilon_high: float | None = None  # clip range above 1 (None: epsilon; DAPO suggests 0.28)
    beta: float = 0.0  # weight of the KL to the reference in the loss
    num_iterations: int = 1  # optimizer updates per sampled batch
    mask_truncated: bool = False  # leave completions cut at max_new_tokens out of the loss
    micro_batch_tokens: int = 4096  # token budget of one packed forward pass
    precision: str = "auto"  # bf16 | fp32 | auto
    seed: int = 0
    warmup_ratio: float = 0.05
    schedule: str = "constant"  # cosine | linear | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # steps; 0 picks ~10 evaluations per run
    eval_examples: int = 200  # held-out prompts per evaluation
    save_every: int = 0  # steps; 0 saves ~5 checkpoints per run
    keep_checkpoints: int = 3
    screen_content: str = "warn"  # data screening (safety/screen.py), offensive lines: warn | block | redact
    screen_pii: str = "block"  # personal data: block | redact (mask it) | warn
    log_samples: int = 4  # held-out completions written to samples.jsonl at each evaluation
    # the run's report: MODEL_CARD.md (safety/card.py) and energy (training/energy.py)
    intended_use: str = "not declared"  # what the model is for, and for whom
    limitations: str = "not declared"  # known weaknesses; uses to avoid
    risk_category: str = "undeclared"  # EU AI Act tier: minimal | limited | high ("unacceptable" is refused)
    # before-vs-after safety, bias, memorisation and diversity evaluations (safety/evals.py) into evals.json
    # and the model card: none | quick (~40 s on the bundled model) | default (~1.5 min) | full
    safety_evals: str = "quick"
    track_energy: bool = True  # codecarbon's kWh and CO2e estimate, in summary.json and the card
    energy_country: str = "WORLD"  # ISO-3 code of the grid (FRA, USA, IND, ...); WORLD: world average
    cpu_power_watts: float | None = None  # the CPU's power in watts, if known, where there is no RAPL

    @property
    def max_length(self) -> int:  # what the shared field checks look at
        return self.max_prompt_length + self.max_new_tokens

    def __post_init__(self) -> None:
        check_common_fields(self)
        check_policies(self.screen_content, self.screen_pii)
        if not self.grader:
            raise TuneryError("no grader: pass --grader grader.json (OpenAI format) or file.py:function")
        if self.group_size < 2:
            raise TuneryError("group_size must be at least 2: advantages compare completions of a prompt")
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
            raise TuneryError("max_new_tokens and max_prompt_length must be positive")
        if self.temperature <= 0:
            raise TuneryError("temperature must be > 0: GRPO needs different completions to compare")
        choices = {
            "loss_aggregation": ("token", "sequence", "fixed"),
            "scale_rewards": ("group", "batch", "none"),
            "baseline": ("mean", "rloo"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TuneryError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise TuneryError("epsilon must be in (0, 1) and epsilon_high > 0")
        if self.beta < 0 or self.num_iterations < 1 or self.max_steps < 0:
            raise TuneryError("beta must be >= 0, num_iterations >= 1 and max_steps >= 0")
        if self.micro_batch_tokens < self.max_prompt_length + self.group_size * (self.max_new_tokens + 1):
            raise TuneryError(
                "micro_batch_tokens must hold one prompt and its group: at least max_prompt_length + "
                "group_size x (max_new_tokens + 1)"
            )


# --- a group of completions ------------------------------------------------------------------------------


@dataclass
class Group:
    """One prompt and its sampled completions, with everything the loss needs."""

    prompt: PromptItem
    completions: list[Completion]
    answers: list[list[int]]  # completion tokens as trained: the text's tokens, then the end-of-turn token
    trained: list[bool]  # False for completions left out of the loss (mask_truncated)
    rewards: list[float]
    advantages: list[float]
    weights: list[float] = field(default_factory=list)  # per completion: each token's weight in the loss
    old_logps: list[torch.Tensor] | None = None  # per completion, when num_iterations > 1
    ref_logps: list[torch.Tensor] | None = None  # per completion, when a KL is needed

    @property
    def n_tokens(self) -> int:
        return len(self.prompt.prompt_ids) + sum(len(a) for a in self.answers)

    def segment(self) -> Segment:
        return (
            self.prompt.prompt_ids,
            [(a, [t] * len(a)) for a, t in zip(self.answers, self.trained, strict=True)],
        )


def packed_logps(
    model: torch.nn.Module,
    lm_head_weight: torch.Tensor,
    groups: list[Group],
    cfg: dict[str, Any],
    device: torch.device,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The row of these groups, and per-token log-probs and entropies of their trained completion tokens
    under the sampling distribution (temperature applied)."""
    precision, temperature = cfg["precision"], cfg["temperature"]
    row = pack_branches([g.segment() for g in groups])
    with autocast(precision, device):
        hidden = final_hidden(model, row)[row.positions]  # (N, H)
        # The policy that sampled is softmax(logits / temperature): (h / T) @ W.T is exactly that.
        logps, entropy = token_logps_and_entropy(hidden / temperature, lm_head_weight, row.targets)
    return row, logps, entropy


def split_by_sequence(values: torch.Tensor, row: Any) -> list[torch.Tensor]:
    counts = torch.bincount(row.sequence, minlength=row.n_sequences).tolist()
    return list(values.split(counts))


@torch.no_grad()
def fill_logps(
    model: torch.nn.Module, groups: list[Group], cfg: dict[str, Any], device: torch.device, reference: bool
) -> None:
    """Old-policy (or, with `reference`, reference-model) log-probs of every completion, no gradient."""
    lm_head_weight = output_weight(model)
    for row_groups in plan_rows(groups, cfg["micro_batch_tokens"]):
        with model.disable_adapter() if reference else contextlib.nullcontext():  # type: ignore[operator]
            row, logps, _ = packed_logps(model, lm_head_weight, row_groups, cfg, device)
        per_answer = split_by_sequence(logps, row)
        for g in row_groups:
            taken, per_answer = per_answer[: len(g.answers)], per_answer[len(g.answers) :]
            if reference:
                g.ref_logps = taken
            else:
                g.old_logps = taken


# --- sampling and grading --------------------------------------------------------------------------------


def sample_groups(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[PromptItem],
    reward_fn: RewardFunction,
    cfg: dict[str, Any],
    seed: int,
    world: distributed.World,
) -> tuple[list[Group], dict[str, float]]:
    """Sample and grade `group_size` completions of each of this process's prompts. Returns the groups
    and sums for the step's record (added over processes by the caller)."""
    n = cfg["group_size"]
    params = SamplingParams(
        max_new_tokens=cfg["max_new_tokens"],
        temperature=cfg["temperature"],
        top_p=cfg["top_p"],
        top_k=cfg["top_k"],
        seed=seed,
    )
    was_training = model.training
    model.eval()
    completions = sample(model, tokenizer, [p.prompt_ids for p in prompts for _ in range(n)], params)
    model.train(was_training)
    scores = reward_fn([c.text for c in completions], [p.item for p in prompts for _ in range(n)])
    rewards = torch.tensor(scores.rewards)
    if cfg["scale_rewards"] == "batch":  # the std of the whole step, over every process
        total, squares, count = distributed.all_sum(
            [float(rewards.sum()), float((rewards**2).sum()), float(len(rewards))], world
        )
        std = max(squares / count - (total / count) ** 2, 0.0) ** 0.5
        advantages = (group_advantages(rewards, n, "none", cfg["baseline"]) / (std + 1e-4)).tolist()
    else:
        advantages = group_advantages(rewards, n, cfg["scale_rewards"], cfg["baseline"]).tolist()
    groups = []
    for k, prompt in enumerate(prompts):
        block = slice(k * n, (k + 1) * n)
        group_completions = completions[block]
        groups.append(
            Group(
                prompt=prompt,
                completions=group_completions,
                answers=[c.trained_ids for c in group_completions],
                trained=[
                    not (cfg["mask_truncated"] and c.finish_reason == "length") for c in group_completions
                ],
                rewards=scores.rewards[block],
                advantages=advantages[block],
            )
        )
    sums = {
        "completions": float(len(completions)),
        "reward": float(rewards.sum()),
        "reward_squares": float((rewards**2).sum()),
        "groups": float(len(groups)),
        "zero_std_groups": float(sum(max(g.rewards) == min(g.rewards) for g in groups)),
        "grader_errors": float(scores.errors),
        "length": float(sum(len(c.token_ids) for c in completions)),
        "truncated": float(sum(c.finish_reason == "length" for c in completions)),
        **{f"grader/{name}": float(sum(scores.by_grader[name])) for name in reward_fn.names},
    }
    return groups, sums


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[PromptItem],
    reward_fn: RewardFunction,
    cfg: dict[str, Any],
    world: distributed.World,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy completions of the held-out prompts (each process takes its share), graded:
    `valid_reward_mean`, per-grader means, lengths; and this process's first completions, to show."""
    mine = prompts[world.rank :: world.size]
    was_training = model.training
    model.eval()
    params = SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=0.0)
    completions: list[Completion] = []
    for start in range(0, len(mine), 32):
        completions += sample(model, tokenizer, [p.prompt_ids for p in mine[start : start + 32]], params)
    model.train(was_training)
    scores = reward_fn([c.text for c in completions], [p.item for p in mine])
    totals = distributed.all_sum(
        [
            float(len(completions)),
            sum(scores.rewards),
            float(scores.errors),
            float(sum(len(c.token_ids) for c in completions)),
            float(sum(c.finish_reason == "length" for c in completions)),
            *[sum(scores.by_grader[name]) for name in reward_fn.names],
        ],
        world,
    )
    count = max(totals[0], 1.0)
    metrics = {
        "valid_reward_mean": totals[1] / count,
        **{f"valid_reward/{name}": v / count for name, v in zip(reward_fn.names, totals[5:], strict=True)},
        "valid_grader_errors": totals[2],
        "valid_completion_length": totals[3] / count,
        "valid_truncated_ratio": totals[4] / count,
    }
    shown = [
        {"line": p.line, "prompt": p.messages[-1]["content"], "completion": c.text, "reward": r}
        for p, c, r in list(zip(mine, completions, scores.rewards, strict=True))[: cfg["log_samples"]]
    ]
    return metrics, shown


# --- the policy update -----------------------------------------------------------------------------------


def policy_update(
    model: torch.nn.Module,
    ddp_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: list[Group],
    cfg: dict[str, Any],
    world: distributed.World,
    need_kl: bool,
) -> dict[str, float]:
    """`num_iterations` optimizer updates on this process's groups (DDP averages the gradients).
    Returns sums for the step's record."""
    beta, device = cfg["beta"], world.device
    lm_head_weight = output_weight(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Each token's weight in the step's loss, normalised over every process's completions.
    lengths = torch.tensor(
        [len(a) if t else 0 for g in groups for a, t in zip(g.answers, g.trained, strict=True)]
    )
    n_total, tokens_total = distributed.all_sum([float(len(lengths)), float(lengths.sum())], world)
    weights = token_weights(lengths, cfg["loss_aggregation"], cfg["max_new_tokens"] + 1)
    scale = (
        tokens_total / max(float(lengths.sum()), 1.0)
        if cfg["loss_aggregation"] == "token"
        else n_total / len(lengths)
    )
    per_completion = (weights / scale * world.size).tolist()  # x world size: DDP averages processes
    for g, start in zip(
        groups, itertools.accumulate([len(g.answers) for g in groups], initial=0), strict=False
    ):
        g.weights = per_completion[start : start + len(g.answers)]

    # Groups whose rewards are all equal have zero advantage: without a KL term they add nothing.
    active = [g for g in groups if beta > 0 or any(a != 0 for a in g.advantages)]
    idle = [g for g in groups if all(g is not a for a in active)]
    if need_kl:
        fill_logps(model, groups, cfg, device, reference=True)
    if cfg["num_iterations"] > 1 or (need_kl and idle):  # old-policy log-probs: reuse, or the idle KL
        fill_logps(
            model,
            (active if cfg["num_iterations"] > 1 else []) + (idle if need_kl else []),
            cfg,
            device,
            reference=False,
        )
    sums = {
        "clipped": 0.0,
        "trained_tokens": 0.0,
        "entropy": 0.0,
        "kl": 0.0,
        "kl_tokens": 0.0,
        "row_tokens": 0.0,
    }
    for g in idle if need_kl else []:
        for policy_logps, ref_logps in zip(g.old_logps or [], g.ref_logps or [], strict=True):
            sums["kl"] += float(kl_k3(policy_logps, ref_logps).sum())
            sums["kl_tokens"] += policy_logps.numel()

    # Every process joins each iteration's gradient all-reduce, with a weightless row if it has nothing.
    any_active = distributed.all_sum([float(len(active))], world)[0] > 0
    grad_norm = 0.0
    for _ in range(cfg["num_iterations"] if any_active else 0):
        rows = plan_rows(active or groups[:1], cfg["micro_batch_tokens"])
        for k, row_groups in enumerate(rows):
            sync = k == len(rows) - 1 or not world.distributed
            with contextlib.nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
                row, logps, entropy = packed_logps(ddp_model, lm_head_weight, row_groups, cfg, device)
                answers = [(g, j) for g in row_groups for j in range(len(g.answers))]
                adv = torch.tensor([g.advantages[j] for g, j in answers])[row.sequence]
                w = torch.tensor([g.weights[j] for g, j in answers])[row.sequence] * float(bool(active))
                old = logps.detach()
                if cfg["num_iterations"] > 1 and active:
                    old = torch.cat([g.old_logps[j] for g, j in answers if g.old_logps is not None]).to(logps)
                per_token, clipped = clipped_surrogate(logps, old, adv, cfg["epsilon"], cfg["epsilon_high"])
                if active and (beta > 0 or need_kl):
                    ref = torch.cat([g.ref_logps[j] for g, j in answers if g.ref_logps is not None]).to(logps)
                    kl = kl_k3(logps, ref)
                    per_token = per_token + beta * kl if beta > 0 else per_token
                    sums["kl"] += float(kl.detach().sum())
                    sums["kl_tokens"] += kl.numel()
                (per_token * w).sum().backward()
            if active:
                sums["clipped"] += float(clipped.sum())
                sums["trained_tokens"] += logps.numel()
                sums["entropy"] += float(entropy.sum())
                sums["row_tokens"] += row.n_tokens
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"] if cfg["grad_clip"] > 0 else math.inf)
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = grad_norm / world.size  # (the same on every process after the all-reduce)
    return sums


# --- train -----------------------------------------------------------------------------------------------


def train(cfg: GRPOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    keep_freed_memory()
    world = distributed.setup()
    run_dir = Path(cfg.out)
    energy = EnergyMeter.for_run(cfg, run_dir, world, resume)  # probes the hardware while the run sets up
    if world.is_main:
        prepare_run_dir(run_dir, resume, overwrite)
        if not resume:  # a resumed run trains on the data screened at its start
            screen_run_data(
                {"train": cfg.data, "valid": cfg.valid}, cfg.screen_content, cfg.screen_pii, run_dir
            )
    distributed.barrier(world)
    paths = screened_paths(run_dir, {"train": cfg.data, "valid": cfg.valid})
    if resume:
        check_same_data(run_dir, cfg)
    reward_fn = load_reward_function(cfg.grader)
    model: torch.nn.Module
    model, tokenizer = load_model(cfg.model)
    if cfg.adapter:
        model = merge_adapter(model, cfg.adapter)  # type: ignore[arg-type]
    train_prompts, too_long = load_prompt_data(paths["train"], tokenizer, cfg.max_prompt_length)
    valid_prompts = load_prompt_data(paths["valid"], tokenizer, cfg.max_prompt_length)[0] if cfg.valid else []
    if too_long and world.is_main:
        log.warning("skipped %d prompts longer than max_prompt_length=%d (lines %s)", len(too_long),
                    cfg.max_prompt_length, ", ".join(map(str, too_long[:10])))  # fmt: skip
    resolved = resolve_common(
        cfg,
        len(train_prompts),
        world,
        BASE_LR_LORA if cfg.lora_rank else BASE_LR_FULL,
        auto.fixed_batch(4, "4 prompts per step"),
    )
    epochs = 1 if cfg.epochs == "auto" else int(cfg.epochs)
    total_steps = epochs * math.ceil(len(train_prompts) / resolved["batch_size"])
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    resolved.update(
        epochs=epochs,
        total_steps=total_steps,
        eval_every=cfg.eval_every or max(1, total_steps // 10),
        save_every=cfg.save_every or max(1, math.ceil(total_steps / 5)),
        epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon,
        grader_sha256=_grader_digest(cfg.grader),
    )
    if world.is_main and not resume:
        atomic_write_yaml(run_dir / "config.yaml", resolved)
        tokenizer.save_pretrained(run_dir / "tokenizer")
    batch_size = resolved["batch_size"]

    torch.manual_seed(cfg.seed)  # LoRA initialisation
    if cfg.lora_rank:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)  # type: ignore[arg-type]
        if resolved["precision"] == "bf16":
            cast_frozen(model, torch.bfloat16)
    elif cfg.beta > 0:
        raise TuneryError("beta > 0 with full fine-tuning needs a reference copy; use LoRA (lora_rank > 0)")
    torch.nn.Module.to(model, world.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=resolved["lr"], weight_decay=cfg.weight_decay)
    ddp_model: torch.nn.Module = DistributedDataParallel(model) if world.distributed else model
    start_step, tokens_seen, train_seconds, metrics = restore(run_dir, model, optimizer, resume, world)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    if world.is_main:
        log.info(
            "grpo: %d prompts (%d held out); %d steps of %d prompts x %d completions; %s trainable parameters; %s",
            len(train_prompts), len(valid_prompts), total_steps, batch_size, cfg.group_size,
            f"{sum(p.numel() for p in trainable):,}", resolved["precision"],
        )  # fmt: skip
    eval_prompts = valid_prompts[: cfg.eval_examples]

    def run_eval(step: int) -> dict[str, float]:
        valid_metrics, shown = evaluate(model, tokenizer, eval_prompts, reward_fn, resolved, world)
        if world.is_main:
            with (run_dir / "samples.jsonl").open("a") as fh:
                fh.writelines(json.dumps({"step": step, **s}) + "\n" for s in shown)
        return valid_metrics

    wall_start = time.monotonic()
    if eval_prompts and start_step == 0:  # the starting point, to compare every later evaluation with
        record0 = {"step": 0, "total_steps": total_steps, **run_eval(0)}
        if metrics is not None:
            metrics.write(record0)
    step, completions_done = start_step, 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:  # the completions counted before the run stopped
        completions_done = int(json.loads((checkpoint / "state.json").read_text()).get("completions", 0))
    with (
        GracefulStop() as stop,
        StepProgress(total_steps, start_step, "grpo", enabled=world.is_main) as progress,
        energy,
    ):
        while step < total_steps:
            t0 = time.monotonic()
            if cfg.shuffle:
                order = step_indices(step, len(train_prompts), batch_size, cfg.seed)
            else:
                within = step % math.ceil(len(train_prompts) / batch_size)
                order = list(range(within * batch_size, min(len(train_prompts), (within + 1) * batch_size)))
            # This process's share; a short last batch with fewer prompts than processes repeats some.
            order = (order * world.size)[: max(len(order), world.size)]
            mine = [train_prompts[i] for i in order[world.rank :: world.size]]
            seed = cfg.seed * 1_000_003 + step * 1_009 + world.rank
            groups, sums = sample_groups(model, tokenizer, mine, reward_fn, resolved, seed, world)
            sample_seconds = time.monotonic() - t0
            lr = lr_at(step, total_steps, resolved["lr"], warmup_steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            evaluating = bool(eval_prompts) and (
                (step + 1) % resolved["eval_every"] == 0 or step + 1 == total_steps
            )
            need_kl = cfg.beta > 0 or (evaluating and cfg.lora_rank > 0)
            sums |= policy_update(model, ddp_model, optimizer, groups, resolved, world, need_kl)
            step += 1

            names = sorted(sums)
            totals = dict(zip(names, distributed.all_sum([sums[k] for k in names], world), strict=True))
            longest = distributed.all_max(
                [float(max(len(c.token_ids) for g in groups for c in g.completions))], world
            )[0]
            step_seconds = time.monotonic() - t0
            train_seconds += step_seconds
            tokens_seen += int(totals["row_tokens"])
            completions_done += int(totals["completions"])
            n = totals["completions"]
            mean = totals["reward"] / n
            record: dict[str, Any] = {
                "step": step,
                "total_steps": total_steps,
                "train_reward_mean": mean,
                "train_reward_std": max(totals["reward_squares"] / n - mean**2, 0.0) ** 0.5,
                **{f"train_reward/{name}": totals[f"grader/{name}"] / n for name in reward_fn.names},
                "frac_reward_zero_std": totals["zero_std_groups"] / totals["groups"],
                "grader_errors": totals["grader_errors"],
                "completion_length": totals["length"] / n,
                "completion_length_max": longest,
                "truncated_ratio": totals["truncated"] / n,
                "entropy": totals["entropy"] / max(totals["trained_tokens"], 1),
                "clip_fraction": totals["clipped"] / max(totals["trained_tokens"], 1),
                "lr": lr,
                "grad_norm": totals["grad_norm"],
                "tokens": tokens_seen,
                "completions_per_second": n / step_seconds,
                "sample_seconds": sample_seconds,
                "step_seconds": step_seconds,
            }
            if totals["kl_tokens"]:
                record["kl"] = totals["kl"] / totals["kl_tokens"]
            if evaluating:
                record.update(run_eval(step))
            if metrics is not None:
                metrics.write(record)
            progress.update(
                step,
                f"reward {record['train_reward_mean']:.3f}"
                + (f" valid {record['valid_reward_mean']:.3f}" if "valid_reward_mean" in record else "")
                + f" len {record['completion_length']:.0f} {record['completions_per_second']:.1f} compl/s",
            )
            fault_point("after_step", step)
            counters = {
                "tokens": tokens_seen,
                "train_seconds": train_seconds,
                "completions": completions_done,
                "energy": energy.so_far(),
            }
            checkpoint_or_stop(run_dir, step, resolved, model, optimizer, counters, stop, world, "grpo")

    # --- finish: final weights, summary, model card --------------------------------------------------------
    summary: dict[str, Any] = {}
    if world.is_main:
        assert metrics is not None
        metrics.close()
        base_adapter = adapter_dir(cfg.adapter) if cfg.adapter and isinstance(model, PeftModel) else None
        meta = {"base_model": cfg.model, "method": "grpo", "adapter": cfg.adapter, "config": resolved}
        save_final(run_dir, model, tokenizer, meta, base_adapter=str(base_adapter) if base_adapter else None)
        safety_flags = evaluate_run(
            model,
            tokenizer,
            size=cfg.safety_evals,
            run_dir=run_dir,
            base_name=cfg.model,
            adapter=cfg.adapter,
            train_path=None,
            seed=cfg.seed,
        )
        summary = run_summary(
            "grpo",
            cfg,
            run_dir,
            total_steps,
            tokens_seen,
            wall_start,
            train_seconds,
            world,
            last_metrics(run_dir, ("train_", "valid_", "kl", "entropy", "completion_length")),
            completions=completions_done,
            completions_per_second=round(completions_done / max(train_seconds, 1e-9), 3),
            start_valid_reward_mean=_first_eval(run_dir),
            train_examples=len(train_prompts),
            valid_examples=len(valid_prompts),
            energy=energy.record(),
            safety_flags=safety_flags,
        )
        atomic_write_json(run_dir / "summary.json", summary)
        write_model_card(run_dir)
    distributed.barrier(world)
    distributed.teardown(world)
    return summary


def _first_eval(run_dir: Path) -> float | None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 0 and "valid_reward_mean" in record:
            return float(record["valid_reward_mean"])
    return None


def _grader_digest(grader: str) -> str | None:
    """The grader file's digest (a resumed run must grade the same way)."""
    match = re.fullmatch(r"(.+\.py):\w+", grader)
    return file_digest(match.group(1) if match else grader)


def run(
    config_path: str | None, overrides: dict[str, Any], resume_dir: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Entry point of `tunery train grpo`: builds the config (YAML, then flags) and trains."""
    if resume_dir:
        return train(resumed_config(GRPOConfig, resume_dir), resume=True)
    return train(build_config(GRPOConfig, config_path, overrides), overwrite=overwrite)
