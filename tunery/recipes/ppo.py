"""RLHF with PPO: a reward model scores sampled answers, a value head on the policy is the critic.

    tunery train rm --data examples/feedback/train.jsonl --valid examples/feedback/valid.jsonl --out runs/rm
    tunery train ppo --data examples/feedback/train_prompts.jsonl --valid examples/feedback/prompts.jsonl \\
        --reward-model runs/rm --adapter runs/support/final --out runs/ppo
    tunery train ppo --resume runs/ppo

The classic pipeline (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022). A step samples
`completions_per_prompt` answers to each of `batch_size` prompts and scores them with a Tunery reward
model (a separate, frozen model trained by `tunery train rm`). Every completion token earns
-kl_coef x log(pi / pi_ref), its log-ratio to the reference (the starting model: the LoRA adapter switched
off), and the last token earns the score as well. A value head on the policy's final hidden states
(models/heads.py) predicts the return from the state before each token; GAE turns rewards and values
into advantages, whitened over the batch. Then `ppo_epochs` passes over the batch in `num_minibatches`
shuffled minibatches, one optimizer step each, on the clipped surrogate plus vf_coef x the clipped value
loss (losses/ppo.py). An adaptive KL coefficient (Ziegler et al.) is on when `kl_target` is set.

A prompt and its completions are packed as one segment, `prompt | completion 1 | ...`, as in GRPO, and
each completion's end-of-turn token is trained. The reward model scores each completion's text as the
answer to its prompt, through its own tokenizer and chat template, so it reads the score at the
end-of-turn token as in its training (whatever its base model); a completion cut at max_new_tokens is
scored as if it ended there, minus `missing_eos_penalty`.

Departures from the papers: the value head shares the policy's trunk (one forward pass gives log-probs and
values, and the value loss trains the LoRA weights too), as in the value-head-on-policy setups; it starts
at zero and learns at `value_lr_ratio` x lr, as the separate critics of other setups learn ~10x faster
than the actor. Whitening uses the population variance. LoRA only: the reference is the adapter switched
off. Evaluation answers held-out prompts greedily: `valid_score_mean` is their reward-model score and
`valid_kl` the exact KL(policy || reference) of the next-token distributions summed along them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from tunery.data.feedback import FeedbackExample, tokenize_feedback
from tunery.data.packing import pack_branches, plan_rows, step_indices
from tunery.data.prompts import PromptItem
from tunery.losses.grpo import clipped_surrogate
from tunery.losses.ppo import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_penalty_rewards,
    value_loss,
    whiten,
)
from tunery.models.forward import final_hidden, output_head
from tunery.models.heads import PolicyWithValue, RewardModel, load_reward_model, score_pairs
from tunery.models.lora import cast_frozen
from tunery.models.sampling import SamplingParams
from tunery.recipes.configs import PPOConfig
from tunery.recipes.rollouts import (
    Group,
    completion_counts,
    load_prompt_splits,
    packed_logps,
    per_group,
    reward_model_digest,
    sample_groups,
    shown_samples,
)
from tunery.run import files, lifecycle
from tunery.training import auto
from tunery.training.rundir import autocast

log = logging.getLogger("tunery")


# --- rollouts: sample, score, evaluate under the policy and the reference ---------------------------------


def packed_forward(
    policy: PolicyWithValue,
    groups: list[Group],
    cfg: PPOConfig,
    precision: str,
    device: torch.device,
    reference: bool = False,
    with_entropy: bool = False,
) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The row of these groups, and per trained completion token: log-probs under the sampling
    distribution (temperature applied), entropies (with `with_entropy`) and values, each (N,)."""
    lm = policy.lm
    with lm.disable_adapter() if reference else contextlib.nullcontext():  # type: ignore[operator]
        row, logps, entropy, hidden = packed_logps(
            lm, output_head(lm), groups, cfg.temperature, precision, device, with_entropy
        )
    return row, logps, entropy, policy.values(hidden)


def score_groups(
    reward_model: RewardModel, rm_tokenizer: Any, groups: list[Group], cfg: PPOConfig, precision: str
) -> None:
    """The reward model's score of every completion: its text as the answer to the prompt, through the
    reward model's own tokenizer and chat template, so the score is read at the end-of-turn token as in
    its training (a completion cut at max_new_tokens is scored as if it ended there)."""
    pairs = [
        tokenize_feedback(rm_tokenizer, FeedbackExample(g.prompt.line, g.prompt.messages, [
            {"role": "assistant", "content": c.text}]))[0]
        for g in groups for c in g.completions
    ]  # fmt: skip
    scores = [s for s, _ in score_pairs(reward_model, pairs, cfg.micro_batch_tokens, precision == "bf16")]
    for g in groups:
        g.scores, scores = scores[: len(g.answers)], scores[len(g.answers) :]


@torch.no_grad()
def fill_rollout(
    policy: PolicyWithValue, groups: list[Group], cfg: PPOConfig, precision: str, device: torch.device
) -> None:
    """Log-probs and values of every completion token under the policy that sampled them, and the
    reference model's log-probs; no gradient."""
    for row_groups in plan_rows(groups, cfg.micro_batch_tokens):
        row, logps, _, values = packed_forward(policy, row_groups, cfg, precision, device)
        _, ref_logps, _, _ = packed_forward(policy, row_groups, cfg, precision, device, reference=True)
        split = zip(per_group(logps, row, row_groups), per_group(values, row, row_groups),
                    per_group(ref_logps, row, row_groups), strict=True)  # fmt: skip
        for g, (old, old_values, ref) in zip(row_groups, split, strict=True):
            g.old_logps, g.old_values, g.ref_logps = old, old_values, ref


def fill_advantages(groups: list[Group], kl_coef: float, cfg: PPOConfig) -> None:
    """Per-token KL-penalty rewards with the score at the end, GAE, and whitening over the batch."""
    completions = [(g, j) for g in groups for j in range(len(g.answers))]
    rewards = []
    for g, j in completions:
        score = g.scores[j] - (cfg.missing_eos_penalty if g.completions[j].finish_reason == "length" else 0)
        rewards.append(kl_penalty_rewards(g.old_logps[j], g.ref_logps[j], score, kl_coef))
    lengths = [len(r) for r in rewards]
    advantages, returns = gae(  # zero-padded: the padding leaves every completion's values unchanged
        pad_sequence(rewards, batch_first=True),
        pad_sequence([g.old_values[j] for g, j in completions], batch_first=True),
        cfg.gamma,
        cfg.lam,
    )  # (B, T)
    flat_advantages = torch.cat([a[:n] for a, n in zip(advantages, lengths, strict=True)])
    if cfg.whiten_advantages:
        flat_advantages = whiten(flat_advantages)
    per_answer_advantages = list(flat_advantages.split(lengths))
    for k, (g, _) in enumerate(completions):
        g.token_advantages.append(per_answer_advantages[k])
        g.returns.append(returns[k, : lengths[k]])


def minibatch_backward(
    policy: PolicyWithValue,
    groups: list[Group],
    cfg: PPOConfig,
    precision: str,
    device: torch.device,
    sums: dict[str, float],
) -> None:
    """Gradients of one minibatch's loss: the clipped surrogate + vf_coef x the clipped value loss, each a
    mean over the minibatch's tokens (however they are split into packed rows)."""
    n_tokens = sum(len(a) for g in groups for a in g.answers)
    for row_groups in plan_rows(groups, cfg.micro_batch_tokens):
        row, logps, entropy, values = packed_forward(
            policy, row_groups, cfg, precision, device, with_entropy=True
        )
        assert entropy is not None
        old_logps, old_values, advantages, returns = (
            torch.cat([t for g in row_groups for t in getattr(g, name)]).to(logps)
            for name in ("old_logps", "old_values", "token_advantages", "returns")
        )
        policy_losses, clipped = clipped_surrogate(logps, old_logps, advantages, cfg.cliprange, cfg.cliprange)
        value_losses, value_clipped = value_loss(values, old_values, returns, cfg.cliprange_value)
        ((policy_losses.sum() + cfg.vf_coef * value_losses.sum()) / n_tokens).backward()
        log_ratio = logps.detach() - old_logps
        for name, value in (("policy_loss", policy_losses), ("value_loss", value_losses), ("clipped", clipped),
                            ("value_clipped", value_clipped), ("approx_kl", 0.5 * log_ratio**2),
                            ("entropy", entropy)):  # fmt: skip
            sums[name] = sums.get(name, 0.0) + float(value.detach().float().sum())
        sums["tokens"] = sums.get("tokens", 0.0) + len(logps)
        sums["row_tokens"] = sums.get("row_tokens", 0.0) + row.data_tokens


@torch.no_grad()
def sequence_kl(
    policy: PolicyWithValue, groups: list[Group], cfg: PPOConfig, precision: str, device: torch.device
) -> list[float]:
    """Exact KL(policy || reference) of the next-token distributions, summed over each completion's tokens
    (every vocabulary entry, not a sampled estimate: greedy answers are not samples of the policy)."""
    out: list[float] = []
    head = output_head(policy.lm).at(cfg.temperature)
    for row_groups in plan_rows(groups, cfg.micro_batch_tokens):
        row = pack_branches([g.segment() for g in row_groups])
        with autocast(precision, device):
            hidden = final_hidden(policy.lm, row)[row.positions]
            with policy.lm.disable_adapter():  # type: ignore[operator]
                ref_hidden = final_hidden(policy.lm, row)[row.positions]
        per_token = torch.cat([
            F.kl_div(  # sum_v p_v (log p_v - log q_v), with the reference q as `input`
                F.log_softmax(head.logits(r), -1),
                F.log_softmax(head.logits(h), -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            for h, r in zip(hidden.split(256), ref_hidden.split(256), strict=True)
        ])  # fmt: skip
        sums = torch.zeros(row.n_sequences).index_add(0, row.sequence, per_token.cpu())
        out += sums.tolist()
    return out


@torch.no_grad()
def evaluate(
    policy: PolicyWithValue,
    reward_model: RewardModel,
    rm_tokenizer: Any,
    tokenizer: Any,
    prompts: list[PromptItem],
    cfg: PPOConfig,
    precision: str,
    device: torch.device,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to held-out prompts: their mean reward-model score, KL to the reference, length."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    groups = sample_groups(policy.lm, tokenizer, prompts, 1, params)
    score_groups(reward_model, rm_tokenizer, groups, cfg, precision)
    kls = sequence_kl(policy, groups, cfg, precision, device)
    completions = [g.completions[0] for g in groups]
    scores = [g.scores[0] for g in groups]
    metrics = {
        "valid_score_mean": sum(scores) / len(scores),
        "valid_kl": sum(kls) / len(kls),
        "valid_completion_length": sum(len(c.token_ids) for c in completions) / len(completions),
        "valid_truncated_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }
    return metrics, shown_samples(prompts, completions, scores, "score", cfg.log_samples)


# --- train ------------------------------------------------------------------------------------------------


def train(cfg: PPOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    opened = lifecycle.open_run(cfg, resume, overwrite, single_process=True)
    tokenizer, device = opened.tokenizer, opened.world.device
    reward_model, rm_tokenizer, _ = load_reward_model(cfg.reward_model)
    train_prompts, valid_prompts = load_prompt_splits(opened, cfg.max_prompt_length)
    plan = lifecycle.resolve_run(
        cfg, len(train_prompts), opened.world, auto.fixed_batch(8, "8 prompts per step")
    )
    lm = lifecycle.with_lora(opened.model, cfg, plan)
    reward_model.requires_grad_(False)
    if plan.precision == "bf16":
        cast_frozen(reward_model.lm, torch.bfloat16)
    policy = PolicyWithValue(lm, lm.config.hidden_size)
    torch.nn.Module.to(reward_model, device)
    reward_model.eval()
    lora_params = [p for p in lm.parameters() if p.requires_grad]
    param_groups = [{"params": lora_params, "lr_ratio": 1.0},
                    {"params": list(policy.value_head.parameters()), "lr_ratio": cfg.value_lr_ratio}]  # fmt: skip
    run = lifecycle.start_run(opened, cfg, plan, policy, method="ppo", param_groups=param_groups,
                    config_extra={"reward_model_sha256": reward_model_digest(cfg.reward_model)})  # fmt: skip
    # The KL coefficient adapts when kl_target is set: checkpoints keep it, and the completions count.
    kl_coef = float(run.resumed_state.get("kl_coef", cfg.kl_coef))
    completions_done = int(run.resumed_state.get("completions", 0))
    lifecycle.announce(
        run, "ppo: %d prompts (%d held out); %d steps of %d prompts x %d completions, %d epochs x %d minibatches",
        len(train_prompts), len(valid_prompts), plan.total_steps, plan.batch_size, cfg.completions_per_prompt,
        cfg.ppo_epochs, cfg.num_minibatches,
    )  # fmt: skip
    eval_prompts = valid_prompts[: cfg.eval_examples]

    def run_eval(step: int) -> dict[str, float]:
        valid_metrics, shown = evaluate(
            policy, reward_model, rm_tokenizer, tokenizer, eval_prompts, cfg, plan.precision, device
        )
        lifecycle.log_samples(run, step, shown)
        return valid_metrics

    if eval_prompts and run.start_step == 0:  # the starting point, to compare every later evaluation with
        lifecycle.log_metrics(run, {files.STEP: 0, files.TOTAL_STEPS: plan.total_steps, **run_eval(0)})
    step = run.start_step
    with run.stop, run.progress, run.energy:
        while step < plan.total_steps:
            t0 = time.monotonic()
            prompts = [
                train_prompts[i] for i in step_indices(step, len(train_prompts), plan.batch_size, cfg.seed)
            ]
            seed = cfg.seed * 1_000_003 + step
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
            groups = sample_groups(policy.lm, tokenizer, prompts, cfg.completions_per_prompt, params)
            sample_seconds = time.monotonic() - t0
            score_groups(reward_model, rm_tokenizer, groups, cfg, plan.precision)
            fill_rollout(policy, groups, cfg, plan.precision, device)
            fill_advantages(groups, kl_coef, cfg)

            lr = lifecycle.set_lr(run, step, cfg.schedule)
            sums: dict[str, float] = {}
            grad_norm = 0.0
            minibatch_size = math.ceil(len(groups) / cfg.num_minibatches)
            for epoch in range(cfg.ppo_epochs):
                shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_000 + epoch)
                order = torch.randperm(len(groups), generator=shuffle).tolist()
                for start in range(0, len(groups), minibatch_size):
                    minibatch = [groups[i] for i in order[start : start + minibatch_size]]
                    minibatch_backward(policy, minibatch, cfg, plan.precision, device, sums)
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(
                            run.trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                        )
                    )
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds = time.monotonic() - t0
            run.train_seconds += step_seconds
            run.tokens_seen += int(sums["row_tokens"])
            completions = [c for g in groups for c in g.completions]
            completions_done += len(completions)

            scores = torch.tensor([s for g in groups for s in g.scores])
            penalties = torch.tensor(
                [cfg.missing_eos_penalty * (c.finish_reason == "length") for c in completions]
            )
            kls = torch.tensor(
                [float((o - r).sum()) for g in groups for o, r in zip(g.old_logps, g.ref_logps, strict=True)]
            )
            old_values = torch.cat([v for g in groups for v in g.old_values])
            returns = torch.cat([r for g in groups for r in g.returns])
            n = sums["tokens"]
            record: dict[str, Any] = {
                files.STEP: step,
                files.TOTAL_STEPS: plan.total_steps,
                "train_score_mean": float(scores.mean()),
                "train_score_std": float(scores.std(unbiased=False)),
                "kl": float(kls.mean()),  # summed per completion (k1), mean over completions
                "non_score_reward": float(-kl_coef * kls.mean()),
                "train_reward_mean": float((scores - penalties - kl_coef * kls).mean()),
                "kl_coef": kl_coef,
                "policy_loss": sums["policy_loss"] / n,
                "value_loss": sums["value_loss"] / n,
                "clip_fraction": sums["clipped"] / n,
                "value_clip_fraction": sums["value_clipped"] / n,
                "approx_kl": sums["approx_kl"] / n,
                "entropy": sums["entropy"] / n,
                "explained_variance": explained_variance(old_values, returns),
                "value_mean": float(old_values.mean()),
                "completion_length": sum(len(c.token_ids) for c in completions) / len(completions),
                "truncated_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": run.tokens_seen,
                "completions_per_second": len(completions) / step_seconds,
                "sample_seconds": sample_seconds,
                "step_seconds": step_seconds,
            }
            if cfg.kl_target is not None:
                kl_coef = adaptive_kl_coef(
                    kl_coef, record["kl"], cfg.kl_target, len(completions), cfg.kl_horizon
                )
            if eval_prompts and lifecycle.evaluates_after(run, step):
                record.update(run_eval(step))
            shown = ("score {train_score_mean:.3f} kl {kl:.2f}", "valid {valid_score_mean:.3f}",
                     "len {completion_length:.0f} {completions_per_second:.2f} compl/s")  # fmt: skip
            lifecycle.end_step(run, record, "ppo", shown, kl_coef=kl_coef, completions=completions_done)

    # --- finish: final weights, summary, model card -------------------------------------------------------
    return lifecycle.finish_run(
        run, cfg, step, method="ppo",
        metric_prefixes=(files.TRAIN_PREFIX, files.VALID_PREFIX, "kl", "non_score_reward", "completion_length"),
        counts=completion_counts(run, completions_done, "valid_score_mean", len(train_prompts),
                                 len(valid_prompts)),
    )  # fmt: skip


# the entry point of `tunery train`: the config from YAML then flags (or the resumed run's), then train()
run = lifecycle.entry_point(PPOConfig, train)
