"""Reward model from comparisons: a scalar head on the language model, Bradley-Terry loss.

    tunery train rm --data examples/feedback/train.jsonl --valid examples/feedback/valid.jsonl --out runs/rm
    tunery score --rm runs/rm --data answers.jsonl            # score answers; RL loads the same directory

The score of an answer is a linear function of the final hidden state at its end-of-turn token
(models/heads.py). A step is `batch_size` pairs, packed as `prompt | chosen | rejected` so the prompt is
computed once for both answers; the output projection is never computed. Pairs may carry a `margin`
(graded preferences, as in Llama 2): the chosen score must then beat the rejected one by that much.
`center_coef` > 0 adds the centring penalty that keeps scores near zero.

Departures from the papers: the head has no bias (it cancels in every pairwise loss) and is trained in
fp32 at the learning rate of the LoRA weights.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from tunery.data.feedback import TokenizedPair, load_feedback_splits
from tunery.data.packing import examples_seen, pack_pairs, plan_rows, shard
from tunery.losses.reward import length_correlation, reward_loss
from tunery.models.heads import RewardModel
from tunery.recipes.configs import RewardConfig
from tunery.run import files, lifecycle
from tunery.training import auto, distributed
from tunery.training.rundir import autocast

log = logging.getLogger("tunery")


# --- setup ------------------------------------------------------------------------------------------------


def pair_scores(
    model: torch.nn.Module, row_pairs: list[TokenizedPair], center_coef: float, length_coef: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (n,) and the scores of the chosen and rejected answers (n,), (n,). With
    `length_coef`, each pair's loss carries the row's length-correlation penalty (the mean over pairs
    counts it once per row)."""
    scores = model(pack_pairs(row_pairs))  # (2n,)
    chosen, rejected = scores[0::2], scores[1::2]
    margin = torch.tensor([p.margin for p in row_pairs]) if any(p.margin for p in row_pairs) else None
    losses = reward_loss(chosen, rejected, margin, center_coef)
    if length_coef:
        lengths = torch.tensor([float(sum(m)) for p in row_pairs for m in (p.chosen_mask, p.rejected_mask)])
        losses = losses + length_coef * length_correlation(scores, lengths.to(scores.device))
    return losses, chosen, rejected


class PairStats:
    """Sums of the per-pair metrics of a step or an evaluation, averaged over pairs (and processes). Given
    each pair's answer lengths, also the accuracy on the pairs whose chosen answer is the longer one and on
    those where it is the shorter: a reward model that learnt "longer is better" is right on the first and
    wrong on the second."""

    NAMES = ("loss", "accuracy", "margin", "chosen_score", "rejected_score")
    SPLITS = ("accuracy_chosen_longer", "accuracy_chosen_shorter")

    def __init__(self) -> None:
        self.sums = [0.0] * len(self.NAMES)
        self.count = 0.0
        self.split = [0.0] * 4  # right and counted, chosen longer; right and counted, chosen shorter

    def add(
        self,
        losses: torch.Tensor,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        weight: float = 1.0,
        pairs: list[TokenizedPair] | None = None,
    ) -> None:
        chosen, rejected = chosen.detach(), rejected.detach()
        right = chosen > rejected
        values = [losses.detach(), right.float(), chosen - rejected, chosen, rejected]
        for i, v in enumerate(values):
            self.sums[i] += weight * float(v.sum())
        self.count += weight * len(losses)
        for pair, ok in zip(pairs or [], right.tolist(), strict=False):
            difference = sum(pair.chosen_mask) - sum(pair.rejected_mask)
            if difference:
                at = 0 if difference > 0 else 2
                self.split[at] += weight * ok
                self.split[at + 1] += weight

    def averaged(self, world: distributed.World, prefix: str) -> dict[str, float]:
        *sums, count, longer, n_longer, shorter, n_shorter = distributed.all_sum(
            [*self.sums, self.count, *self.split], world
        )
        out = {prefix + name: s / max(count, 1) for name, s in zip(self.NAMES, sums, strict=True)}
        for name, right, n in zip(self.SPLITS, (longer, shorter), (n_longer, n_shorter), strict=True):
            if n:
                out[prefix + name] = right / n
        return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    cfg: RewardConfig,
    precision: str,
    world: distributed.World,
    prefix: str = files.VALID_PREFIX,
) -> dict[str, float]:
    """Held-out loss, accuracy (chosen scored above rejected) and mean margin, named `prefix` + name."""
    was_training = model.training
    model.eval()
    stats = PairStats()
    rows = plan_rows(shard(pairs, world.rank, world.size), cfg.micro_batch_tokens)
    for row_pairs, counted in distributed.even_rows(rows, world, filler=pairs[:1]):
        with autocast(precision, world.device):
            scored = pair_scores(model, row_pairs, cfg.center_coef)  # the loss without the length term
            stats.add(*scored, float(counted), row_pairs)
    model.train(was_training)
    return stats.averaged(world, prefix=prefix)


# --- train ------------------------------------------------------------------------------------------------


def train(cfg: RewardConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    opened = lifecycle.open_run(cfg, resume, overwrite)
    train_pairs, valid_pairs = load_feedback_splits(
        opened.train_path, opened.valid_path, opened.tokenizer, cfg.max_length, expect="preference"
    )
    plan = lifecycle.resolve_run(cfg, len(train_pairs), opened.world, auto.pair_batch)
    lm = lifecycle.with_lora(opened.model, cfg, plan)
    run = lifecycle.start_run(
        opened, cfg, plan, RewardModel(lm, lm.config.hidden_size, seed=cfg.seed), method="rm"
    )
    world, model = run.world, run.ddp_model

    def held_out(pairs: list[TokenizedPair], prefix: str = files.VALID_PREFIX) -> dict[str, float]:
        return evaluate(model, pairs, cfg, plan.precision, world, prefix)

    lifecycle.announce(
        run, "reward model: %d training pairs, %d validation; %d steps of %d pairs", len(train_pairs),
        len(valid_pairs), plan.total_steps, plan.batch_size,
    )  # fmt: skip

    step = run.start_step
    with run.stop, run.progress, run.energy:
        while step < plan.total_steps:
            t0 = time.monotonic()
            batch = lifecycle.step_batch(run, train_pairs, step, cfg.seed, cfg.micro_batch_tokens)
            step_pairs = len(batch.items)
            stats, tokens = PairStats(), 0.0
            for row_pairs, share, synced in batch.rows:
                with synced:
                    with autocast(plan.precision, world.device):
                        losses, chosen, rejected = pair_scores(
                            model, row_pairs, cfg.center_coef, cfg.length_coef
                        )
                    distributed.backward_share(losses.sum(), share, world, step_pairs)
                stats.add(losses, chosen, rejected, share)
                tokens += share * sum(p.n_tokens for p in row_pairs)
            lr, grad_norm = lifecycle.optimizer_step(run, step, cfg.grad_clip, cfg.schedule)
            step += 1

            record, seconds = lifecycle.step_record(run, step, lr, grad_norm, tokens, t0)
            record |= {
                **stats.averaged(world, prefix=files.TRAIN_PREFIX),
                "pairs_per_second": step_pairs / seconds,
            }
            if valid_pairs and lifecycle.evaluates_after(run, step):
                record.update(held_out(valid_pairs[: cfg.eval_examples]))
            shown = ("loss {train_loss:.3f} acc {train_accuracy:.2f}", "valid acc {valid_accuracy:.2f}",
                     "{pairs_per_second:.2f} pairs/s")  # fmt: skip
            if lifecycle.end_step(run, record, "rm", shown):
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    n_pairs = examples_seen(step, len(train_pairs), plan.batch_size)
    return lifecycle.finish_run(
        run, cfg, step, method="rm",
        final_eval=(lambda: held_out(valid_pairs, files.FULL_VALID_PREFIX)) if valid_pairs else None,
        metric_prefixes=(files.TRAIN_PREFIX, files.VALID_PREFIX),
        counts={"pairs": n_pairs, "pairs_per_second": lifecycle.per_second(n_pairs, run.train_seconds),
                "train_examples": len(train_pairs), "valid_examples": len(valid_pairs)},
    )  # fmt: skip


# the entry point of `tunery train`: the config from YAML then flags (or the resumed run's), then train()
run = lifecycle.entry_point(RewardConfig, train)
