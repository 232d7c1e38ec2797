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

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from tunery.data.feedback import TokenizedPair, load_feedback_data
from tunery.data.packing import examples_seen, pack_pairs, plan_rows, shard, step_indices
from tunery.errors import TuneryError
from tunery.losses.dpo import dpo_loss, ipo_loss, simpo_loss
from tunery.models.forward import output_weight, sequence_logps
from tunery.models.load import load_model
from tunery.models.lora import adapter_dir, apply_lora, cast_frozen, merge_adapter
from tunery.safety.card import write_model_card
from tunery.safety.evals import evaluate_run
from tunery.safety.screen import check_policies, screen_run_data, screened_paths
from tunery.training import auto, distributed
from tunery.training.common import (
    check_common_fields,
    checkpoint_or_stop,
    resolve_common,
    restore,
    run_summary,
)
from tunery.training.config import build_config
from tunery.training.early_stopping import restore_best, resume_early_stopping, save_best
from tunery.training.energy import EnergyMeter
from tunery.training.faults import fault_point
from tunery.training.io import atomic_write_json, atomic_write_yaml
from tunery.training.memory import keep_freed_memory
from tunery.training.progress import StepProgress
from tunery.training.rundir import (
    autocast,
    check_same_data,
    last_metrics,
    prepare_run_dir,
    resumed_config,
    save_final,
)
from tunery.training.schedule import lr_at
from tunery.training.signals import GracefulStop

log = logging.getLogger("tunery")

LOSSES = ("dpo", "ipo", "simpo")
BASE_LR_LORA = 5e-5  # LoRA; full fine-tuning uses 1e-6 (DPO moves far with small updates)
BASE_LR_FULL = 1e-6


# --- config ----------------------------------------------------------------------------------------------


@dataclass
class DPOConfig:
    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    adapter: str | None = None  # start from this fine-tuned adapter (e.g. the SFT run); it is the reference
    data: str = ""  # training pairs (OpenAI DPO format or {prompt, chosen, rejected})
    valid: str | None = None  # held-out pairs
    out: str = ""  # run directory
    loss: str = "dpo"  # dpo | ipo | simpo
    beta: float | None = None  # None: 0.1 for dpo and ipo, 2.0 for simpo
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
    simpo_gamma: float = 1.0  # SimPO's target reward margin
    sft_weight: float = 0.0  # weight of the chosen answers' NLL added to the loss (RPO)
    epochs: int | str = "auto"
    max_steps: int = 0  # stop after this many steps (0: the epochs decide); the schedule ends there
    batch_size: int | str = "auto"  # pairs per optimizer step
    lr: float | None = None  # absolute peak learning rate; overrides learning_rate_multiplier
    learning_rate_multiplier: float | str = "auto"  # times 5e-5 (LoRA) or 1e-6 (full)
    lora_rank: int = 16  # 0 means full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    max_length: int = 1024  # prompt + answer; longer answers are truncated from the end
    micro_batch_tokens: int = 2048  # token budget of one packed forward pass
    precision: str = "auto"  # bf16 | fp32 | auto
    seed: int = 0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # steps; 0 picks ~10 evaluations per run
    eval_examples: int = 64  # held-out pairs in each periodic evaluation (all at the end)
    save_every: int = 0  # steps; 0 saves ~5 checkpoints per run
    keep_checkpoints: int = 3
    early_stopping_patience: int = 0  # stop after this many evaluations without a lower valid_loss; 0: never
    early_stopping_min_delta: float = 0.0  # a valid_loss must be lower by more than this to count
    select_best: bool = True  # final/ from the evaluation with the lowest valid_loss (when there is --valid)
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
    screen_content: str = "warn"  # data screening (safety/screen.py), offensive lines: warn | block | redact
    screen_pii: str = "block"  # personal data: block | redact (mask it) | warn

    def __post_init__(self) -> None:
        check_common_fields(self)
        check_policies(self.screen_content, self.screen_pii)
        if self.loss not in LOSSES:
            raise TuneryError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.beta is not None and self.beta <= 0:
            raise TuneryError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise TuneryError("label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.loss != "dpo":
            raise TuneryError("label_smoothing (conservative DPO) applies to loss dpo only")
        if self.micro_batch_tokens < self.max_length:
            raise TuneryError("micro_batch_tokens must be >= max_length (a pair's sequences share one row)")


# --- setup -----------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, pairs: list[TokenizedPair], cfg: dict[str, Any], world: distributed.World
) -> dict[int, tuple[float, float]]:
    """{line: (chosen, rejected)} summed log-probs under the model as it is now (the reference)."""
    lm_head_weight = output_weight(model)
    was_training = model.training
    model.eval()
    index = {pair.line: i for i, pair in enumerate(pairs)}
    values = [0.0] * (2 * len(pairs))  # each process fills its share; the sum across processes is complete
    for row_pairs in plan_rows(shard(pairs, world.rank, world.size), cfg["micro_batch_tokens"]):
        with autocast(cfg["precision"], world.device):
            summed, _, _ = sequence_logps(model, lm_head_weight, pack_pairs(row_pairs))
        for k, pair in enumerate(row_pairs):
            values[2 * index[pair.line]] = summed[2 * k].item()
            values[2 * index[pair.line] + 1] = summed[2 * k + 1].item()
    values = distributed.all_sum(values, world)
    model.train(was_training)
    return {pair.line: (values[2 * i], values[2 * i + 1]) for i, pair in enumerate(pairs)}


def pair_losses(
    cfg: dict[str, Any],
    policy_logps: torch.Tensor,  # (2n,) chosen at even, rejected at odd indices
    counts: torch.Tensor,  # (2n,) answer token counts
    ref: torch.Tensor,  # (n, 2) reference log-probs (chosen, rejected)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (n,) and implicit rewards of the chosen and rejected answers (n,), (n,)."""
    chosen, rejected = policy_logps[0::2], policy_logps[1::2]
    n_chosen, n_rejected = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    beta = cfg["beta"]
    if cfg["loss"] == "dpo":
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref[:, 0], ref[:, 1], beta, cfg["label_smoothing"]
        )
    elif cfg["loss"] == "ipo":
        losses, chosen_rewards, rejected_rewards = ipo_loss(
            chosen / n_chosen, rejected / n_rejected, ref[:, 0] / n_chosen, ref[:, 1] / n_rejected, beta
        )
    else:
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen / n_chosen, rejected / n_rejected, beta, cfg["simpo_gamma"]
        )
    if cfg["sft_weight"]:
        losses = losses - cfg["sft_weight"] * chosen / n_chosen
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
    cfg: dict[str, Any],
    world: distributed.World,
) -> tuple[dict[str, float], float]:
    """Held-out loss, implicit-reward accuracy and margins (named `valid_<metric>`), and the held-out
    chosen answers' log-prob shift per token since the reference."""
    lm_head_weight = output_weight(model)
    was_training = model.training
    model.eval()
    stats = PairStats()
    for row_pairs in plan_rows(shard(pairs, world.rank, world.size), cfg["micro_batch_tokens"]):
        with autocast(cfg["precision"], world.device):
            logps, counts, _ = sequence_logps(model, lm_head_weight, pack_pairs(row_pairs))
        ref_logps = torch.tensor([ref.get(p.line, (0.0, 0.0)) for p in row_pairs])  # (n, 2)
        stats.add(*pair_losses(cfg, logps, counts, ref_logps), logps, counts, ref_logps)
    model.train(was_training)
    return stats.averaged(world, prefix="valid_"), stats.chosen_shift_per_token(world)


def chosen_logps_falling(shifts: list[float], tolerance: float = 0.05) -> bool:
    """DPO can widen the margin by lowering both answers, the chosen one more slowly: a known failure.
    `shifts` are successive measurements of the chosen answers' log-prob change since the reference, in
    nats per token (held-out evaluations, or averages over windows of steps). Flag when the last three
    fall one after another and the chosen answers have lost more than `tolerance` nats per token."""
    return len(shifts) >= 3 and shifts[-3] > shifts[-2] > shifts[-1] and shifts[-1] < -tolerance


# --- train -----------------------------------------------------------------------------------------------


def train(cfg: DPOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
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
    model: torch.nn.Module
    model, tokenizer = load_model(cfg.model)
    if cfg.adapter:
        model = merge_adapter(model, cfg.adapter)  # type: ignore[arg-type]
    train_pairs = load_feedback_data(paths["train"], tokenizer, cfg.max_length, expect="preference")
    valid_pairs = (
        load_feedback_data(paths["valid"], tokenizer, cfg.max_length, expect="preference", min_examples=1)
        if cfg.valid
        else []
    )
    resolved = resolve_common(
        cfg,
        len(train_pairs),
        world,
        BASE_LR_LORA if cfg.lora_rank else BASE_LR_FULL,
        auto.pair_batch,
    )
    resolved["beta"] = cfg.beta if cfg.beta is not None else (2.0 if cfg.loss == "simpo" else 0.1)
    if world.is_main and not resume:
        atomic_write_yaml(run_dir / "config.yaml", resolved)
        tokenizer.save_pretrained(run_dir / "tokenizer")
    total_steps, batch_size = resolved["total_steps"], resolved["batch_size"]

    torch.manual_seed(cfg.seed)  # LoRA initialisation
    if cfg.lora_rank:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)  # type: ignore[arg-type]
        if resolved["precision"] == "bf16":
            cast_frozen(model, torch.bfloat16)
    torch.nn.Module.to(model, world.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=resolved["lr"], weight_decay=cfg.weight_decay)
    ddp_model: torch.nn.Module = DistributedDataParallel(model) if world.distributed else model
    lm_head_weight = output_weight(model)

    # Reference log-probs: computed before any update (the policy is the reference then), or read back.
    ref_path = run_dir / "reference_logps.json"
    ref_train: dict[int, tuple[float, float]] = {}
    ref_valid: dict[int, tuple[float, float]] = {}
    reference_seconds = 0.0
    if cfg.loss != "simpo":
        if resume and ref_path.is_file():
            saved = json.loads(ref_path.read_text())
            ref_train = {int(k): tuple(v) for k, v in saved["train"].items()}  # type: ignore[misc]
            ref_valid = {int(k): tuple(v) for k, v in saved["valid"].items()}  # type: ignore[misc]
        elif resume:
            raise TuneryError(f"cannot resume {run_dir}: reference_logps.json is missing; start a new run")
        else:
            t0 = time.monotonic()
            ref_train = reference_logps(model, train_pairs, resolved, world)
            ref_valid = reference_logps(model, valid_pairs, resolved, world)
            reference_seconds = time.monotonic() - t0
            if world.is_main:
                atomic_write_json(ref_path, {"train": ref_train, "valid": ref_valid})
                log.info("reference log-probs of %d pairs in %.0f s", len(train_pairs) + len(valid_pairs),
                         time.monotonic() - t0)  # fmt: skip

    start_step, tokens_seen, train_seconds, metrics = restore(run_dir, model, optimizer, resume, world)
    early = resume_early_stopping(run_dir, cfg, resume, world)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    if world.is_main:
        log.info(
            "%s: %d training pairs, %d validation; %d steps of %d pairs; beta %g; %s trainable parameters; %s",
            cfg.loss, len(train_pairs), len(valid_pairs), total_steps, batch_size, resolved["beta"],
            f"{sum(p.numel() for p in trainable):,}", resolved["precision"],
        )  # fmt: skip

    wall_start = time.monotonic()
    step_shifts: list[float] = []  # chosen log-prob change per token, per step
    shifts: list[float] = []  # the same, per evaluation (or per 5 steps without validation data)
    warnings: list[str] = []
    step = start_step
    with (
        GracefulStop() as stop,
        StepProgress(total_steps, start_step, cfg.loss, enabled=world.is_main) as progress,
        energy,
    ):
        while step < total_steps:
            t0 = time.monotonic()
            pairs = [train_pairs[i] for i in step_indices(step, len(train_pairs), batch_size, cfg.seed)]
            step_pairs = len(pairs)
            mine, weight = shard(pairs, world.rank, world.size), 1.0
            if not mine:  # a short last batch: this process still joins the gradient all-reduce, weightless
                mine, weight = pairs[:1], 0.0
            rows = plan_rows(mine, cfg.micro_batch_tokens)
            stats, tokens = PairStats(), 0.0
            for k, row_pairs in enumerate(rows):
                row = pack_pairs(row_pairs)
                sync = k == len(rows) - 1 or not world.distributed
                with contextlib.nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
                    with autocast(resolved["precision"], world.device):
                        logps, counts, _ = sequence_logps(ddp_model, lm_head_weight, row)
                    ref = torch.tensor([ref_train.get(p.line, (0.0, 0.0)) for p in row_pairs])  # (n, 2)
                    losses, chosen_r, rejected_r = pair_losses(resolved, logps, counts, ref)
                    # The step's loss is the mean over its pairs, however they are split into rows and
                    # processes (DDP averages gradients over processes, hence the world size factor).
                    (losses.sum() * (weight * world.size / step_pairs)).backward()
                stats.add(losses, chosen_r, rejected_r, logps, counts, ref, weight)
                tokens += weight * row.n_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            lr = lr_at(step, total_steps, resolved["lr"], warmup_steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            tokens = distributed.all_sum([tokens], world)[0]
            step_seconds = time.monotonic() - t0
            tokens_seen += int(tokens)
            train_seconds += step_seconds
            averaged = stats.averaged(world)
            record: dict[str, Any] = {
                "step": step,
                "total_steps": total_steps,
                "train_loss": averaged.pop("loss"),
                **averaged,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens_seen,
                "tokens_per_second": tokens / step_seconds,
                "pairs_per_second": step_pairs / step_seconds,
            }
            step_shifts.append(stats.chosen_shift_per_token(world))
            evaluating = valid_pairs and (step % resolved["eval_every"] == 0 or step == total_steps)
            if evaluating:
                valid_metrics, shift = evaluate(
                    ddp_model, valid_pairs[: cfg.eval_examples], ref_valid, resolved, world
                )
                record.update(valid_metrics)
                shifts.append(shift)
                if early.update(step, valid_metrics["valid_loss"]) and cfg.select_best and world.is_main:
                    save_best(run_dir, model, step)
            elif not valid_pairs and step % 5 == 0:
                shifts.append(sum(step_shifts[-5:]) / 5)
            if cfg.loss != "simpo" and not warnings and chosen_logps_falling(shifts):
                where = "held-out" if valid_pairs else "training"
                warnings.append(
                    f"step {step}: the {where} chosen answers' log-prob keeps falling ({shifts[-1]:+.3f} nats "
                    "per token since the start): DPO is lowering both answers. Consider a lower lr, fewer "
                    "epochs, or sft_weight > 0."
                )
                progress.print("warning: " + warnings[-1])
            if metrics is not None:
                metrics.write(record)
            progress.update(
                step,
                f"loss {record['train_loss']:.3f} acc {record['rewards/accuracies']:.2f} "
                + (f"valid acc {record['valid_rewards/accuracies']:.2f} " if "valid_loss" in record else "")
                + f"{record['pairs_per_second']:.2f} pairs/s",
            )
            fault_point("after_step", step)
            counters = {"tokens": tokens_seen, "train_seconds": train_seconds,
                        "early_stopping": early.state(), "energy": energy.so_far()}  # fmt: skip
            checkpoint_or_stop(run_dir, step, resolved, model, optimizer, counters, stop, world, "dpo")
            if early.should_stop:
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    final_step = restore_best(run_dir, model, early, step, world) if cfg.select_best else step
    selection = early.summary(final_step, step, total_steps)
    final: dict[str, Any] = {}
    if valid_pairs:
        final = {
            "full_" + k: v for k, v in evaluate(ddp_model, valid_pairs, ref_valid, resolved, world)[0].items()
        }
    summary: dict[str, Any] = {}
    if world.is_main:
        assert metrics is not None
        if final:
            metrics.write({"step": step, **final, **selection})
        metrics.close()
        base_adapter = adapter_dir(cfg.adapter) if cfg.adapter and isinstance(model, PeftModel) else None
        meta = {"base_model": cfg.model, "method": cfg.loss, "adapter": cfg.adapter, "config": resolved}
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
            cfg.loss,
            cfg,
            run_dir,
            step,
            tokens_seen,
            wall_start,
            train_seconds,
            world,
            {**last_metrics(run_dir, ("train_", "valid_", "rewards/", "logps/")), **final},
            pairs=examples_seen(step, len(train_pairs), resolved["batch_size"]),
            reference_seconds=round(reference_seconds, 2),
            pairs_per_second=round(
                examples_seen(step, len(train_pairs), resolved["batch_size"]) / max(train_seconds, 1e-9), 3
            ),
            warnings=warnings,
            train_examples=len(train_pairs),
            valid_examples=len(valid_pairs),
            energy=energy.record(),
            safety_flags=safety_flags,
            **selection,
        )
        atomic_write_json(run_dir / "summary.json", summary)
        write_model_card(run_dir)
    distributed.barrier(world)
    distributed.teardown(world)
    return summary


def run(
    config_path: str | None, overrides: dict[str, Any], resume_dir: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Entry point of `tunery train dpo`: builds the config (YAML, then flags) and trains."""
    if resume_dir:
        return train(resumed_config(DPOConfig, resume_dir), resume=True)
    return train(build_config(DPOConfig, config_path, overrides), overwrite=overwrite)
