"""Reinforcement fine-tuning with graders: GRPO, and RLOO as a baseline option.

    tunery train grpo --data examples/rl/train.jsonl --valid examples/rl/valid.jsonl \\
        --grader examples/rl/grader.json --out runs/grpo
    tunery train grpo --baseline rloo ...       # leave-one-out baseline instead of the group mean
    tunery train grpo --warm-start format.jsonl ...   # a few replies in the grader's format first (SFT)
    tunery train grpo --resume runs/grpo
    torchrun --nproc_per_node=2 -m tunery train grpo ...   # each process samples and trains its prompts
    torchrun --nproc_per_node=2 -m tunery train grpo ... --full --shard --beta 0   # weights split (FSDP2)

A step takes `batch_size` prompts, samples `group_size` completions of each with the policy, scores
them with the grader (an OpenAI grader JSON, or `file.py:function` for a plain Python reward function)
and pushes up the completions that beat their group's average. Each prompt and its completions are
packed as one segment, `prompt | completion 1 | ... | completion G`, so the prompt is computed once per
group in the training forward pass, as in sampling (`models/sampling.py` shares its prefill).

Loss: the clipped surrogate per completion token with group-relative advantages, weighted per token
over the whole step (`loss_aggregation: token`, as DAPO; `sequence` is the original GRPO, `fixed` is
Dr. GRPO), plus `beta` x the k3 KL to the reference (the model with its LoRA adapter switched off; full
fine-tuning keeps no reference copy and takes beta 0). Each completion's end-of-turn token is trained, so
the policy learns when to stop.

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
import logging
import math
import time
from typing import Any

import torch

from tunery.data.packing import plan_rows, step_indices
from tunery.data.prompts import PromptItem
from tunery.errors import TuneryError
from tunery.graders.rewards import RewardFunction, load_reward_function
from tunery.graders.template import TemplateError, render
from tunery.losses.grpo import clipped_surrogate, group_advantages, kl_k3, token_weights
from tunery.models.forward import output_head
from tunery.models.sampling import Completion, SamplingParams
from tunery.recipes.configs import GRPOConfig
from tunery.recipes.rollouts import (
    Group,
    completion_counts,
    grader_digest,
    load_prompt_splits,
    packed_logps,
    per_group,
    sample_groups,
    shown_samples,
)
from tunery.recipes.warm_start import load_warm_start, warm_start
from tunery.run import files, lifecycle
from tunery.training import auto, distributed
from tunery.training.rundir import file_digest

log = logging.getLogger("tunery")


# --- log-probs of the sampled completions -----------------------------------------------------------------


@torch.no_grad()
def fill_logps(
    model: torch.nn.Module,
    groups: list[Group],
    cfg: GRPOConfig,
    precision: str,
    device: torch.device,
    world: distributed.World,
    filler: list[Group],
    reference: bool,
) -> None:
    """Old-policy (or, with `reference`, reference-model) log-probs of every completion, no gradient.
    `filler`: a group of this process's to run in place of none (--shard: `distributed.even_rows`)."""
    head = output_head(model)
    rows = plan_rows(groups, cfg.micro_batch_tokens)
    for row_groups, counted in distributed.even_rows(rows, world, filler=filler):
        with model.disable_adapter() if reference else contextlib.nullcontext():  # type: ignore[operator]
            row, logps, _, _ = packed_logps(model, head, row_groups, cfg.temperature, precision, device)
        if not counted:
            continue
        for g, taken in zip(row_groups, per_group(logps, row, row_groups), strict=True):
            if reference:
                g.ref_logps = taken
            else:
                g.old_logps = taken


# --- sampling and grading ---------------------------------------------------------------------------------


def sample_and_grade(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[PromptItem],
    reward_fn: RewardFunction,
    cfg: GRPOConfig,
    seed: int,
    world: distributed.World,
) -> tuple[list[Group], dict[str, float]]:
    """Sample and grade `group_size` completions of each of this process's prompts. Returns the groups
    and sums for the step's record (added over processes by the caller)."""
    n = cfg.group_size
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=seed,
    )
    groups = sample_groups(
        model, tokenizer, prompts, n, params, batch=None, mask_truncated=cfg.mask_truncated
    )
    completions = [c for g in groups for c in g.completions]
    scores = reward_fn([c.text for c in completions], [p.item for p in prompts for _ in range(n)])
    rewards = torch.tensor(scores.rewards)  # the policy's own completions: the step's record
    trained = list(scores.rewards)  # what the advantages compare: with a guide, its reply stands in
    guided = guide_groups(groups, trained, tokenizer, reward_fn, cfg) if cfg.guide else 0
    scored = torch.tensor(trained)
    if cfg.scale_rewards == "batch":  # the std of the whole step, over every process
        total, squares, count = distributed.all_sum(
            [float(scored.sum()), float((scored**2).sum()), float(len(scored))], world
        )
        std = max(squares / count - (total / count) ** 2, 0.0) ** 0.5
        advantages = (group_advantages(scored, n, "none", cfg.baseline) / (std + 1e-4)).tolist()
    else:
        advantages = group_advantages(scored, n, cfg.scale_rewards, cfg.baseline).tolist()
    for k, g in enumerate(groups):
        block = slice(k * n, (k + 1) * n)
        g.scores, g.advantages = trained[block], advantages[block]
    sums = {
        "guided_groups": float(guided),
        "completions": float(len(completions)),
        "reward": float(rewards.sum()),
        "reward_squares": float((rewards**2).sum()),
        "groups": float(len(groups)),
        "zero_std_groups": float(sum(bool(b.max() == b.min()) for b in rewards.split(n))),  # its own
        "grader_errors": float(scores.errors),
        "length": float(sum(len(c.token_ids) for c in completions)),
        "truncated": float(sum(c.finish_reason == "length" for c in completions)),
        **{f"grader/{name}": float(sum(scores.by_grader[name])) for name in reward_fn.names},
    }
    return groups, sums


def guide_groups(
    groups: list[Group], rewards: list[float], tokenizer: Any, reward_fn: RewardFunction, cfg: GRPOConfig
) -> int:
    """Off-policy guidance (`--guide "{{item.answer}}"`): where every sampled completion of a prompt
    scored below the reference reply rendered from its fields, the reference takes the group's last
    completion's place (graded like the others, trained as if sampled). RL cannot reinforce a reply the
    policy never samples; the guide shows it one, and fades by itself: once the policy finds replies as
    good, no group is guided. `rewards` (flat, group by group) is updated in place; returns how many
    groups were guided."""
    n = cfg.group_size
    texts = [render(cfg.guide, {}, g.prompt.item) for g in groups]
    guide_scores = reward_fn(texts, [g.prompt.item for g in groups]).rewards
    guided = 0
    for k, (g, text, score) in enumerate(zip(groups, texts, guide_scores, strict=True)):
        if score <= max(rewards[k * n : (k + 1) * n]):
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        stop = next((c.stop_token_id for c in g.completions if c.stop_token_id is not None), None)
        stop = stop if stop is not None else tokenizer.eos_token_id
        cut = len(ids) > cfg.max_new_tokens
        reply = Completion(ids[: cfg.max_new_tokens], text, [], "length" if cut else "stop",
                           None if cut else stop)  # fmt: skip
        g.completions[-1], g.answers[-1], g.trained[-1] = reply, reply.trained_ids, True
        rewards[k * n + n - 1] = score
        guided += 1
    return guided


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[PromptItem],
    reward_fn: RewardFunction,
    cfg: GRPOConfig,
    world: distributed.World,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy completions of the held-out prompts (each process takes its share), graded:
    `valid_reward_mean`, per-grader means, lengths; and this process's first completions, to show."""
    mine = prompts[world.rank :: world.size]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    completions = [g.completions[0] for g in sample_groups(model, tokenizer, mine, 1, params)]
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
    return metrics, shown_samples(mine, completions, scores.rewards, "reward", cfg.log_samples)


# --- the policy update ------------------------------------------------------------------------------------


def policy_update(
    run: lifecycle.Run, groups: list[Group], cfg: GRPOConfig, need_kl: bool
) -> dict[str, float]:
    """`num_iterations` optimizer updates on this process's groups (DDP averages the gradients).
    Returns sums for the step's record."""
    model, ddp_model, world, precision = run.model, run.ddp_model, run.world, run.plan.precision
    beta, device = cfg.beta, world.device
    head = output_head(model)
    # Each token's weight in the step's loss, normalised over every process's completions.
    lengths = torch.tensor(
        [len(a) if t else 0 for g in groups for a, t in zip(g.answers, g.trained, strict=True)]
    )
    n_total, tokens_total = distributed.all_sum([float(len(lengths)), float(lengths.sum())], world)
    weights = token_weights(lengths, cfg.loss_aggregation, cfg.max_new_tokens + 1)
    scale = (
        tokens_total / max(float(lengths.sum()), 1.0)
        if cfg.loss_aggregation == "token"
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
        fill_logps(model, groups, cfg, precision, device, world, groups[:1], reference=True)
    if cfg.num_iterations > 1 or need_kl:  # old-policy log-probs: reuse, or the idle KL (every process
        fill_logps(  # calls, with groups or none: with --shard each forward pass runs on all of them)
            model,
            (active if cfg.num_iterations > 1 else []) + (idle if need_kl else []),
            cfg,
            precision,
            device,
            world,
            groups[:1],
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
        for policy_logps, ref_logps in zip(g.old_logps, g.ref_logps, strict=True):
            sums["kl"] += float(kl_k3(policy_logps, ref_logps).sum())
            sums["kl_tokens"] += policy_logps.numel()

    # Every process joins each iteration's gradient all-reduce, with a weightless row if it has nothing.
    any_active = distributed.all_sum([float(len(active))], world)[0] > 0
    grad_norm = 0.0
    for _ in range(cfg.num_iterations if any_active else 0):
        rows = distributed.even_rows(plan_rows(active or groups[:1], cfg.micro_batch_tokens), world)
        for k, (row_groups, counted) in enumerate(rows):
            with distributed.grads_sync(ddp_model, world, last_row=k == len(rows) - 1):
                row, logps, entropy, _ = packed_logps(
                    ddp_model, head, row_groups, cfg.temperature, precision, device
                )
                assert entropy is not None
                answers = [(g, j) for g in row_groups for j in range(len(g.answers))]
                adv = torch.tensor([g.advantages[j] for g, j in answers])[row.sequence]
                counts = float(bool(active) and counted)  # 0: a row that only joins the others' passes
                w = torch.tensor([g.weights[j] for g, j in answers])[row.sequence] * counts
                old = logps.detach()
                if cfg.num_iterations > 1 and active:
                    old = torch.cat([g.old_logps[j] for g, j in answers if g.old_logps]).to(logps)
                per_token, clipped = clipped_surrogate(
                    logps, old, adv, cfg.epsilon, cfg.resolved_epsilon_high
                )
                if active and (beta > 0 or need_kl):
                    ref = torch.cat([g.ref_logps[j] for g, j in answers if g.ref_logps]).to(logps)
                    kl = kl_k3(logps, ref)
                    per_token = per_token + beta * kl if beta > 0 else per_token
                    sums["kl"] += float(kl.detach().sum())
                    sums["kl_tokens"] += kl.numel()
                (per_token * w).sum().backward()
            if active and counted:
                sums["clipped"] += float(clipped.sum())
                sums["trained_tokens"] += logps.numel()
                sums["entropy"] += float(entropy.sum())
                sums["row_tokens"] += row.data_tokens
        grad_norm = lifecycle.update(run, cfg.grad_clip)
    sums["grad_norm"] = grad_norm / world.size  # (the same on every process after the all-reduce)
    return sums


# --- train ------------------------------------------------------------------------------------------------


def check_guide(cfg: GRPOConfig, prompts: list[PromptItem]) -> None:
    """Every training prompt has the fields `--guide` reads (before the run starts, naming the line)."""
    for p in prompts if cfg.guide else []:
        try:
            render(cfg.guide, {}, p.item)
        except TemplateError as exc:
            raise TuneryError(f"{cfg.data}: line {p.line}: --guide {cfg.guide}: {exc}") from None


def train(cfg: GRPOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    reward_fn = load_reward_function(cfg.grader)
    opened = lifecycle.open_run(cfg, resume, overwrite)
    tokenizer = opened.tokenizer
    train_prompts, valid_prompts = load_prompt_splits(opened, cfg.max_prompt_length)
    warm_chats = load_warm_start(cfg.warm_start, tokenizer, cfg.max_prompt_length + cfg.max_new_tokens)
    check_guide(cfg, train_prompts)
    plan = lifecycle.resolve_run(
        cfg, len(train_prompts), opened.world, auto.fixed_batch(4, "4 prompts per step")
    )
    run = lifecycle.start_run(opened, cfg, plan, lifecycle.with_lora(opened.model, cfg, plan), method="grpo",
                    config_extra={"epsilon_high": cfg.resolved_epsilon_high,
                                  "grader_sha256": grader_digest(cfg.grader),
                                  "warm_start_sha256": file_digest(cfg.warm_start or None)})  # fmt: skip
    world, model, batch_size = run.world, run.model, plan.batch_size
    lifecycle.announce(
        run, "grpo: %d prompts (%d held out); %d steps of %d prompts x %d completions", len(train_prompts),
        len(valid_prompts), plan.total_steps, batch_size, cfg.group_size,
    )  # fmt: skip
    eval_prompts = valid_prompts[: cfg.eval_examples]

    def run_eval(step: int) -> dict[str, float]:
        valid_metrics, shown = evaluate(model, tokenizer, eval_prompts, reward_fn, cfg, world)
        lifecycle.log_samples(run, step, shown)
        return valid_metrics

    if run.start_step == 0:  # the starting point (after the warm start), to compare later evaluations with
        start: dict[str, Any] = {}
        if warm_chats:
            start |= warm_start(run, warm_chats, cfg.warm_start_epochs, cfg.micro_batch_tokens, cfg.seed)
        if eval_prompts:
            start |= run_eval(0)
        if start:
            lifecycle.log_metrics(run, {files.STEP: 0, files.TOTAL_STEPS: plan.total_steps, **start})
    step, completions_done = run.start_step, int(run.resumed_state.get("completions", 0))
    with run.stop, run.progress, run.energy:
        while step < plan.total_steps:
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
            groups, sums = sample_and_grade(model, tokenizer, mine, reward_fn, cfg, seed, world)
            sample_seconds = time.monotonic() - t0
            lr = lifecycle.set_lr(run, step, cfg.schedule)
            evaluating = bool(eval_prompts) and lifecycle.evaluates_after(run, step + 1)
            need_kl = cfg.beta > 0 or (evaluating and cfg.lora_rank > 0)
            sums |= policy_update(run, groups, cfg, need_kl)
            step += 1

            names = sorted(sums)
            totals = dict(zip(names, distributed.all_sum([sums[k] for k in names], world), strict=True))
            longest = distributed.all_max(
                [float(max(len(c.token_ids) for g in groups for c in g.completions))], world
            )[0]
            step_seconds = time.monotonic() - t0
            run.train_seconds += step_seconds
            run.tokens_seen += int(totals["row_tokens"])
            completions_done += int(totals["completions"])
            n = totals["completions"]
            mean = totals["reward"] / n
            record: dict[str, Any] = {
                files.STEP: step,
                files.TOTAL_STEPS: plan.total_steps,
                "train_reward_mean": mean,
                "train_reward_std": max(totals["reward_squares"] / n - mean**2, 0.0) ** 0.5,
                **{f"train_reward/{name}": totals[f"grader/{name}"] / n for name in reward_fn.names},
                "frac_reward_zero_std": totals["zero_std_groups"] / totals["groups"],
                **({"guided_ratio": totals["guided_groups"] / totals["groups"]} if cfg.guide else {}),
                "grader_errors": totals["grader_errors"],
                "completion_length": totals["length"] / n,
                "completion_length_max": longest,
                "truncated_ratio": totals["truncated"] / n,
                "entropy": totals["entropy"] / max(totals["trained_tokens"], 1),
                "clip_fraction": totals["clipped"] / max(totals["trained_tokens"], 1),
                "lr": lr,
                "grad_norm": totals["grad_norm"],
                "tokens": run.tokens_seen,
                "completions_per_second": n / step_seconds,
                "sample_seconds": sample_seconds,
                "step_seconds": step_seconds,
            }
            if totals["kl_tokens"]:
                record["kl"] = totals["kl"] / totals["kl_tokens"]
            if evaluating:
                record.update(run_eval(step))
            shown = ("reward {train_reward_mean:.3f}", "valid {valid_reward_mean:.3f}",
                     "len {completion_length:.0f} {completions_per_second:.1f} compl/s")  # fmt: skip
            lifecycle.end_step(run, record, "grpo", shown, completions=completions_done)

    # --- finish: final weights, summary, model card -------------------------------------------------------
    return lifecycle.finish_run(
        run, cfg, step, method="grpo",
        metric_prefixes=(files.TRAIN_PREFIX, files.VALID_PREFIX, "kl", "entropy", "completion_length"),
        counts=completion_counts(run, completions_done, "valid_reward_mean", len(train_prompts),
                                 len(valid_prompts)),
    )  # fmt: skip


# the entry point of `tunery train`: the config from YAML then flags (or the resumed run's), then train()
run = lifecycle.entry_point(GRPOConfig, train)
