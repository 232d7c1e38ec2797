"""Kahneman-Tversky optimisation (KTO, Ethayarajh et al. 2024) on unpaired thumbs up/down ratings.

    tunery train kto --data ratings.jsonl --valid ratings-valid.jsonl --adapter runs/support/final \\
        --out runs/kto                                      # KTO on top of the SFT model
    tunery train kto --desirable-weight 3 ...               # fewer thumbs up than down
    tunery train kto --resume runs/kto

A step is `batch_size` rated examples ({prompt, completion, label}), packed as `prompt | completion` as in
dpo.py. Each completion's log-ratio r = log pi(y|x) - log ref(y|x) is compared with z0, an estimate of
KL(policy || reference) from mismatched pairs: the example's prompt with another example's completion
(the paper's eq. 8 and its implementation). Each example has a FIXED partner (the next one in a seeded
shuffle), so the reference log-probs of matched and mismatched pairs, train and valid, are computed once
before the first step (the policy is the reference then) and cached in DIR/reference_logps.json. Each
step runs its mismatched pairs through the policy without gradients; z0 is their mean log-ratio over
all processes, clamped at 0. The run warns when desirable_weight * n_up / (undesirable_weight * n_down)
is outside the paper's recommended [1, 4/3]. A step holding one class only has no `rewards/` or `logps/`
key for the other class, nor `rewards/margins`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from tunery.data.feedback import TokenizedPair, load_feedback_splits
from tunery.data.packing import examples_seen, pack_pairs, plan_rows, shard, step_indices
from tunery.losses.dpo import kto_loss
from tunery.models.forward import output_head, sequence_logps
from tunery.recipes.configs import KTOConfig
from tunery.recipes.pairs import reference_logps
from tunery.run import files, lifecycle
from tunery.training import auto, distributed
from tunery.training.rundir import autocast

log = logging.getLogger("tunery")


# --- setup ------------------------------------------------------------------------------------------------


def mismatched(examples: list[TokenizedPair], seed: int, max_length: int) -> list[TokenizedPair]:
    """mismatched[i]: example i's prompt with its fixed partner's completion (cut to max_length). The
    prompt ids end with the assistant header, so any completion's ids can follow them."""
    n = len(examples)
    order = np.random.default_rng([seed, 7919]).permutation(n)
    out: list[TokenizedPair] = list(examples)
    for i, index in enumerate(order):
        example, partner = examples[index], examples[order[(i + 1) % n]]
        room = max_length - len(example.prompt_ids)  # >= 1: a loaded example has a completion token
        out[index] = TokenizedPair(
            line=example.line,
            prompt_ids=example.prompt_ids,
            chosen_ids=partner.chosen_ids[:room],
            chosen_mask=partner.chosen_mask[:room],
        )
    return out


def class_balance_warning(examples: list[TokenizedPair], cfg: KTOConfig) -> str | None:
    """The KTO paper recommends desirable_weight * n_up / (undesirable_weight * n_down) in [1, 4/3]."""
    n_up = sum(bool(e.label) for e in examples)
    n_down = len(examples) - n_up
    if not n_up or not n_down:
        return f"all {len(examples)} ratings are thumbs {'up' if n_up else 'down'}; KTO learns best from both"
    ratio = cfg.desirable_weight * n_up / (cfg.undesirable_weight * n_down)
    if 1 <= ratio <= 4 / 3:
        return None
    low = cfg.undesirable_weight * n_down / n_up
    return (
        f"{n_up} thumbs up, {n_down} down: desirable_weight * n_up / (undesirable_weight * n_down) is "
        f"{ratio:.2f}, outside the KTO paper's recommended [1, 4/3]; with undesirable_weight "
        f"{cfg.undesirable_weight:g}, set desirable_weight between {low:.3g} and {4 / 3 * low:.3g}"
    )


@torch.no_grad()
def kl_estimate(
    model: torch.nn.Module,
    items: list[TokenizedPair],
    ref: dict[int, tuple[float, float]],
    micro_batch_tokens: int,
    precision: str,
    world: distributed.World,
) -> torch.Tensor:
    """z0: the mean log-ratio of the mismatched `items` over all processes, clamped at 0 (detached)."""
    head = output_head(model)
    total, count = 0.0, 0.0
    rows = plan_rows(shard(items, world.rank, world.size), micro_batch_tokens)
    for row_items, counted in distributed.even_rows(rows, world, filler=items[:1]):
        with autocast(precision, world.device):
            logps, _, _ = sequence_logps(model, head, pack_pairs(row_items))
        ref_logps = torch.tensor([ref[item.line][1] for item in row_items])
        total += counted * float((logps[0::2].float() - ref_logps).sum())
        count += counted * len(row_items)
    total, count = distributed.all_sum([total, count], world)
    return torch.tensor(max(total / max(count, 1.0), 0.0))


def example_losses(
    cfg: KTOConfig, logps: torch.Tensor, row_items: list[TokenizedPair],
    ref: dict[int, tuple[float, float]], kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-example losses (n,), rewards (n,), policy log-probs (n,) and labels (n,) of a packed row."""
    policy = logps[0::2]  # odd indices: the empty second branch of unpaired examples
    ref_logps = torch.tensor([ref[item.line][0] for item in row_items], dtype=policy.dtype)
    desirable = torch.tensor([bool(item.label) for item in row_items])
    losses, rewards = kto_loss(
        policy, ref_logps, desirable, kl.to(policy.dtype), cfg.beta,
        cfg.desirable_weight, cfg.undesirable_weight,
    )  # fmt: skip
    return losses, rewards, policy.detach(), desirable


class RatingStats:
    """Sums of the per-example metrics of a step or an evaluation, averaged over examples (and processes);
    each class over its own count, and a class absent from them gets no key."""

    NAMES = ("loss", "accuracy", "count", "up", "down", "rewards/chosen", "rewards/rejected",
             "logps/chosen", "logps/rejected")  # fmt: skip

    def __init__(self) -> None:
        self.sums = [0.0] * len(self.NAMES)

    def add(self, losses: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor,
            desirable: torch.Tensor, weight: float = 1.0) -> None:  # fmt: skip
        up, down = desirable.float(), (~desirable).float()
        correct = torch.where(desirable, rewards > 0, rewards < 0).float()  # the reward's sign is the label
        values = [losses.detach(), correct, torch.ones_like(up), up, down, rewards * up, rewards * down,
                  logps * up, logps * down]  # fmt: skip
        for i, v in enumerate(values):
            self.sums[i] += weight * float(v.sum())

    def averaged(self, world: distributed.World, prefix: str = "") -> dict[str, float]:
        s = dict(zip(self.NAMES, distributed.all_sum(self.sums, world), strict=True))
        out = {"loss": s["loss"] / max(s["count"], 1), "accuracy": s["accuracy"] / max(s["count"], 1)}
        for kind in ("rewards", "logps"):
            for name, n in (("chosen", s["up"]), ("rejected", s["down"])):
                if n > 0:
                    out[f"{kind}/{name}"] = s[f"{kind}/{name}"] / n
            if kind == "rewards" and s["up"] > 0 and s["down"] > 0:
                out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return {prefix + name: value for name, value in out.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[TokenizedPair],
    kl_items: list[TokenizedPair],
    ref: dict[int, tuple[float, float]],
    cfg: KTOConfig,
    precision: str,
    world: distributed.World,
    prefix: str = files.VALID_PREFIX,
) -> dict[str, float]:
    """Held-out loss, rewards, KL estimate and reward-sign accuracy (named `prefix` + metric)."""
    head = output_head(model)
    was_training = model.training
    model.eval()
    kl = kl_estimate(model, kl_items, ref, cfg.micro_batch_tokens, precision, world)
    stats = RatingStats()
    rows = plan_rows(shard(examples, world.rank, world.size), cfg.micro_batch_tokens)
    for row_items, counted in distributed.even_rows(rows, world, filler=examples[:1]):
        with autocast(precision, world.device):
            logps, _, _ = sequence_logps(model, head, pack_pairs(row_items))
        stats.add(*example_losses(cfg, logps, row_items, ref, kl), float(counted))
    model.train(was_training)
    return {**stats.averaged(world, prefix=prefix), prefix + "kl": float(kl)}


# --- train ------------------------------------------------------------------------------------------------


def train(cfg: KTOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    opened = lifecycle.open_run(cfg, resume, overwrite)
    train_examples, valid_examples = load_feedback_splits(
        opened.train_path, opened.valid_path, opened.tokenizer, cfg.max_length, expect="unpaired"
    )
    train_kl = mismatched(train_examples, cfg.seed, cfg.max_length)  # train_kl[i] goes with train_examples[i]
    valid_kl = mismatched(valid_examples, cfg.seed, cfg.max_length)
    plan = lifecycle.resolve_run(cfg, len(train_examples), opened.world, auto.pair_batch)
    run = lifecycle.start_run(opened, cfg, plan, lifecycle.with_lora(opened.model, cfg, plan), method="kto")
    world, model = run.world, run.ddp_model
    head = output_head(run.model)

    # Reference log-probs {line: (matched, mismatched)}: computed before any update, or read back. An
    # example and its mismatched pair share a line; each is unpaired, its completion the first answer.
    def reference(
        examples: list[TokenizedPair], kl_items: list[TokenizedPair]
    ) -> dict[int, tuple[float, float]]:
        matched = reference_logps(run.model, examples, cfg.micro_batch_tokens, plan.precision, world)
        mismatched = reference_logps(run.model, kl_items, cfg.micro_batch_tokens, plan.precision, world)
        return {line: (matched[line][0], mismatched[line][0]) for line in matched}

    ref_train, ref_valid, _ = lifecycle.cached_reference(
        run,
        lambda: (reference(train_examples, train_kl), reference(valid_examples, valid_kl)),
        f"{len(train_examples) + len(valid_examples)} examples and their mismatched pairs",
    )

    def held_out(n: int, prefix: str = files.VALID_PREFIX) -> dict[str, float]:
        """The first `n` held-out examples (and their mismatched pairs for the KL estimate)."""
        return evaluate(
            model, valid_examples[:n], valid_kl[:n], ref_valid, cfg, plan.precision, world, prefix
        )

    warnings: list[str] = []
    balance = class_balance_warning(train_examples, cfg)
    if balance:
        warnings.append(balance)
    lifecycle.announce(
        run, "kto: %d training examples (%d thumbs up), %d validation; %d steps of %d examples; beta %g",
        len(train_examples), sum(bool(e.label) for e in train_examples), len(valid_examples),
        plan.total_steps, plan.batch_size, cfg.beta,
    )  # fmt: skip
    if balance and world.is_main:
        log.warning("warning: %s", balance)

    step = run.start_step
    with run.stop, run.progress, run.energy:
        while step < plan.total_steps:
            t0 = time.monotonic()
            indices = step_indices(step, len(train_examples), plan.batch_size, cfg.seed)
            batch = lifecycle.step_batch(run, train_examples, step, cfg.seed, cfg.micro_batch_tokens)
            step_examples = len(batch.items)
            # z0 from this step's mismatched pairs: the plain module (no DDP bookkeeping), no gradients.
            kl = kl_estimate(run.model, [train_kl[i] for i in indices], ref_train, cfg.micro_batch_tokens,
                             plan.precision, world)  # fmt: skip
            stats, tokens = RatingStats(), 0.0
            for row_items, share, synced in batch.rows:
                row = pack_pairs(row_items)
                with synced:
                    with autocast(plan.precision, world.device):
                        logps, _, _ = sequence_logps(model, head, row)
                    losses, rewards, policy, desirable = example_losses(cfg, logps, row_items, ref_train, kl)
                    distributed.backward_share(losses.sum(), share, world, step_examples)
                stats.add(losses, rewards, policy, desirable, share)
                tokens += share * row.data_tokens
            lr, grad_norm = lifecycle.optimizer_step(run, step, cfg.grad_clip, cfg.schedule)
            step += 1

            record, seconds = lifecycle.step_record(run, step, lr, grad_norm, tokens, t0)
            averaged = stats.averaged(world)
            averaged.pop("accuracy")
            record |= {files.TRAIN_LOSS: averaged.pop("loss"), **averaged, "kl": float(kl),
                       "examples_per_second": step_examples / seconds}  # fmt: skip
            if valid_examples and lifecycle.evaluates_after(run, step):
                record.update(held_out(cfg.eval_examples))
            shown = ("loss {train_loss:.3f} kl {kl:.3f}", "valid acc {valid_accuracy:.2f}",
                     "{examples_per_second:.2f} examples/s")  # fmt: skip
            if lifecycle.end_step(run, record, "kto", shown):
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    n_examples = examples_seen(step, len(train_examples), plan.batch_size)
    return lifecycle.finish_run(
        run, cfg, step, method="kto", warnings=warnings,
        final_eval=(lambda: held_out(len(valid_examples), files.FULL_VALID_PREFIX)) if valid_examples else None,
        metric_prefixes=(files.TRAIN_PREFIX, files.VALID_PREFIX, "rewards/", "logps/", "kl"),
        counts={"examples": n_examples, "examples_per_second": lifecycle.per_second(n_examples, run.train_seconds),
                "train_examples": len(train_examples), "valid_examples": len(valid_examples)},
    )  # fmt: skip


# the entry point of `tunery train`: the config from YAML then flags (or the resumed run's), then train()
run = lifecycle.entry_point(KTOConfig, train)
