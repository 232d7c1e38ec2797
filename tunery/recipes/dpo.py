"""Direct preference optimisation on comparisons: DPO, conservative DPO, IPO and SimPO.

    tunery train dpo --data examples/feedback/train.jsonl --valid examples/feedback/valid.jsonl \\
        --adapter runs/support/final --out runs/dpo          # DPO on top of the SFT model
    tunery train dpo --loss ipo ... | --loss simpo ... | --label-smoothing 0.1 (conservative DPO)
    tunery train dpo --resume runs/dpo

A step is `batch_size` pairs. Each pair is packed as `prompt | chosen | rejected`: the prompt is computed
once for both answers and both answers go through the model in the same forward pass; pairs are packed
without padding into rows of at most `micro_batch_tokens` tokens. Log-probabilities cover the answer
tokens and their end-of-turn token only, never the prompt.

The reference model costs nothing during training. Before the first step the policy *is* the reference
(LoRA starts at zero; full fine-tuning has not moved yet), so the reference log-probs of every train and
valid pair are computed once up front, without gradients, and cached in DIR/reference_logps.json; a
resumed run reads them back. With `--adapter`, training starts from that fine-tuned model (merged into
the base weights), which is then also the reference: the usual SFT-then-DPO recipe.

Departures from the papers: IPO uses per-token mean log-probs, as its authors advise; SimPO defaults to
beta 2.0 and gamma 1.0; `sft_weight` > 0 adds the chosen answers' per-token NLL (RPO, Pang et al. 2024),
the usual guard against both answers' likelihood falling.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from tunery.data.feedback import TokenizedPair, load_feedback_splits
from tunery.data.packing import examples_seen, pack_pairs, plan_rows, shard
from tunery.losses.dpo import dpo_loss, ipo_loss, simpo_loss
from tunery.models.forward import output_head, sequence_logps
from tunery.recipes.configs import DPOConfig
from tunery.recipes.pairs import reference_logps
from tunery.run import files, lifecycle
from tunery.training import auto, distributed
from tunery.training.rundir import autocast

log = logging.getLogger("tunery")


# --- setup ------------------------------------------------------------------------------------------------


def pair_losses(
    cfg: DPOConfig,
    policy_logps: torch.Tensor,  # (2n,) chosen at even, rejected at odd indices
    counts: torch.Tensor,  # (2n,) answer token counts
    ref: torch.Tensor,  # (n, 2) reference log-probs (chosen, rejected)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (n,) and implicit rewards of the chosen and rejected answers (n,), (n,)."""
    chosen, rejected = policy_logps[0::2], policy_logps[1::2]
    n_chosen, n_rejected = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    beta = cfg.resolved_beta
    if cfg.loss == "dpo":
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref[:, 0], ref[:, 1], beta, cfg.label_smoothing
        )
    elif cfg.loss == "ipo":
        losses, chosen_rewards, rejected_rewards = ipo_loss(
            chosen / n_chosen, rejected / n_rejected, ref[:, 0] / n_chosen, ref[:, 1] / n_rejected, beta
        )
    else:
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen / n_chosen, rejected / n_rejected, beta, cfg.simpo_gamma
        )
    if cfg.sft_weight:
        losses = losses - cfg.sft_weight * chosen / n_chosen
    return losses, chosen_rewards, rejected_rewards


class PairStats:
    """Sums of the per-pair metrics of a step or an evaluation, averaged over pairs (and processes). Also
    tracks how far the chosen answers' log-prob moved from the reference, per token."""

    NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")  # fmt: skip

    def __init__(self) -> None:
        self.sums = [0.0] * len(self.NAMES)
        self.count = 0.0
        self.chosen_shift = self.chosen_tokens = 0.0

    def add(self, losses: torch.Tensor, chosen_r: torch.Tensor, rejected_r: torch.Tensor, logps: torch.Tensor,
            counts: torch.Tensor, ref: torch.Tensor, weight: float = 1.0) -> None:  # fmt: skip
        logps = logps.detach()
        values = [
            losses.detach(), chosen_r, rejected_r, (chosen_r > rejected_r).float(), chosen_r - rejected_r,
            logps[0::2], logps[1::2],
        ]  # fmt: skip
        for i, v in enumerate(values):
            self.sums[i] += weight * float(v.sum())
        self.count += weight * len(losses)
        self.chosen_shift += weight * float((logps[0::2] - ref[:, 0]).sum())
        self.chosen_tokens += weight * float(counts[0::2].sum())

    def averaged(self, world: distributed.World, prefix: str = "") -> dict[str, float]:
        *sums, count = distributed.all_sum([*self.sums, self.count], world)
        return {prefix + name: s / max(count, 1) for name, s in zip(self.NAMES, sums, strict=True)}

    def chosen_shift_per_token(self, world: distributed.World) -> float:
        """Mean change of the chosen answers' log-prob since the reference, in nats per token."""
        shift, tokens = distributed.all_sum([self.chosen_shift, self.chosen_tokens], world)
        return shift / max(tokens, 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    ref: dict[int, tuple[float, float]],
    cfg: DPOConfig,
    precision: str,
    world: distributed.World,
    prefix: str = files.VALID_PREFIX,
) -> tuple[dict[str, float], float]:
    """Held-out loss, implicit-reward accuracy and margins (named `prefix` + metric), and the held-out
    chosen answers' log-prob shift per token since the reference."""
    head = output_head(model)
    was_training = model.training
    model.eval()
    stats = PairStats()
    rows = plan_rows(shard(pairs, world.rank, world.size), cfg.micro_batch_tokens)
    for row_pairs, counted in distributed.even_rows(rows, world, filler=pairs[:1]):
        with autocast(precision, world.device):
            logps, counts, _ = sequence_logps(model, head, pack_pairs(row_pairs))
        ref_logps = torch.tensor([ref.get(p.line, (0.0, 0.0)) for p in row_pairs])  # (n, 2)
        stats.add(*pair_losses(cfg, logps, counts, ref_logps), logps, counts, ref_logps, float(counted))
    model.train(was_training)
    return stats.averaged(world, prefix=prefix), stats.chosen_shift_per_token(world)


def chosen_logps_falling(shifts: list[float], tolerance: float = 0.05) -> bool:
    """DPO can widen the margin by lowering both answers, the chosen one more slowly: a known failure.
    `shifts` are successive measurements of the chosen answers' log-prob change since the reference, in
    nats per token (held-out evaluations, or averages over windows of steps). Flag when the last three
    fall one after another and the chosen answers have lost more than `tolerance` nats per token."""
    return len(shifts) >= 3 and shifts[-3] > shifts[-2] > shifts[-1] and shifts[-1] < -tolerance


# --- train ------------------------------------------------------------------------------------------------


def train(cfg: DPOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    opened = lifecycle.open_run(cfg, resume, overwrite)
    train_pairs, valid_pairs = load_feedback_splits(
        opened.train_path, opened.valid_path, opened.tokenizer, cfg.max_length, expect="preference"
    )
    plan = lifecycle.resolve_run(cfg, len(train_pairs), opened.world, auto.pair_batch)
    run = lifecycle.start_run(opened, cfg, plan, lifecycle.with_lora(opened.model, cfg, plan), method=cfg.loss,
                    config_extra={"beta": cfg.resolved_beta})  # fmt: skip
    world, model = run.world, run.ddp_model
    head = output_head(run.model)

    ref_train: dict[int, tuple[float, float]] = {}
    ref_valid: dict[int, tuple[float, float]] = {}
    reference_seconds = 0.0
    if cfg.loss != "simpo":  # SimPO has no reference

        def reference(pairs: list[TokenizedPair]) -> dict[int, tuple[float, float]]:
            return reference_logps(run.model, pairs, cfg.micro_batch_tokens, plan.precision, world)

        ref_train, ref_valid, reference_seconds = lifecycle.cached_reference(
            run,
            lambda: (reference(train_pairs), reference(valid_pairs)),
            f"{len(train_pairs) + len(valid_pairs)} pairs",
        )

    def held_out(
        pairs: list[TokenizedPair], prefix: str = files.VALID_PREFIX
    ) -> tuple[dict[str, float], float]:
        return evaluate(model, pairs, ref_valid, cfg, plan.precision, world, prefix)

    lifecycle.announce(
        run, "%s: %d training pairs, %d validation; %d steps of %d pairs; beta %g", cfg.loss, len(train_pairs),
        len(valid_pairs), plan.total_steps, plan.batch_size, cfg.resolved_beta,
    )  # fmt: skip

    step_shifts: list[float] = []  # chosen log-prob change per token, per step
    shifts: list[float] = []  # the same, per evaluation (or per 5 steps without validation data)
    warnings: list[str] = []
    step = run.start_step
    with run.stop, run.progress, run.energy:
        while step < plan.total_steps:
            t0 = time.monotonic()
            batch = lifecycle.step_batch(run, train_pairs, step, cfg.seed, cfg.micro_batch_tokens)
            step_pairs = len(batch.items)
            stats, tokens = PairStats(), 0.0
            for row_pairs, share, synced in batch.rows:
                row = pack_pairs(row_pairs)
                with synced:
                    with autocast(plan.precision, world.device):
                        logps, counts, _ = sequence_logps(model, head, row)
                    ref = torch.tensor([ref_train.get(p.line, (0.0, 0.0)) for p in row_pairs])  # (n, 2)
                    losses, chosen_r, rejected_r = pair_losses(cfg, logps, counts, ref)
                    distributed.backward_share(losses.sum(), share, world, step_pairs)
                stats.add(losses, chosen_r, rejected_r, logps, counts, ref, share)
                tokens += share * row.data_tokens
            lr, grad_norm = lifecycle.optimizer_step(run, step, cfg.grad_clip, cfg.schedule)
            step += 1

            record, seconds = lifecycle.step_record(run, step, lr, grad_norm, tokens, t0)
            averaged = stats.averaged(world)
            record |= {
                files.TRAIN_LOSS: averaged.pop("loss"),
                **averaged,
                "pairs_per_second": step_pairs / seconds,
            }
            step_shifts.append(stats.chosen_shift_per_token(world))
            if valid_pairs and lifecycle.evaluates_after(run, step):
                valid_metrics, shift = held_out(valid_pairs[: cfg.eval_examples])
                record.update(valid_metrics)
                shifts.append(shift)
            elif not valid_pairs and step % 5 == 0:
                shifts.append(sum(step_shifts[-5:]) / 5)
            if cfg.loss != "simpo" and not warnings and chosen_logps_falling(shifts):
                where = "held-out" if valid_pairs else "training"
                warnings.append(
                    f"step {step}: the {where} chosen answers' log-prob keeps falling ({shifts[-1]:+.3f} nats "
                    "per token since the start): DPO is lowering both answers. Consider a lower lr, fewer "
                    "epochs, or sft_weight > 0."
                )
                run.progress.print("warning: " + warnings[-1])
            shown = ("loss {train_loss:.3f} acc {rewards/accuracies:.2f}", "valid acc {valid_rewards/accuracies:.2f}",
                     "{pairs_per_second:.2f} pairs/s")  # fmt: skip
            if lifecycle.end_step(run, record, "dpo", shown):
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    n_pairs = examples_seen(step, len(train_pairs), plan.batch_size)
    return lifecycle.finish_run(
        run, cfg, step, method=cfg.loss, warnings=warnings,
        final_eval=(lambda: held_out(valid_pairs, files.FULL_VALID_PREFIX)[0]) if valid_pairs else None,
        metric_prefixes=(files.TRAIN_PREFIX, files.VALID_PREFIX, "rewards/", "logps/"),
        counts={"pairs": n_pairs, "reference_seconds": round(reference_seconds, 2),
                "pairs_per_second": lifecycle.per_second(n_pairs, run.train_seconds),
                "train_examples": len(train_pairs), "valid_examples": len(valid_pairs)},
    )  # fmt: skip


# the entry point of `tunery train`: the config from YAML then flags (or the resumed run's), then train()
run = lifecycle.entry_point(DPOConfig, train)
