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

import contextlib
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
from tunery.losses.reward import reward_loss
from tunery.models.heads import RewardModel
from tunery.models.load import load_model
from tunery.models.lora import adapter_dir, apply_lora, cast_frozen, merge_adapter
from tunery.safety.card import write_model_card
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

BASE_LR_LORA = 1e-4  # LoRA and the score head; full fine-tuning uses 1e-5
BASE_LR_FULL = 1e-5


# --- config ----------------------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    adapter: str | None = None  # start from this fine-tuned adapter (e.g. the SFT run), merged in
    data: str = ""  # training pairs (OpenAI DPO format or {prompt, chosen, rejected}, optional margin)
    valid: str | None = None  # held-out pairs
    out: str = ""  # run directory
    center_coef: float = 0.0  # weight of the centring penalty (r_chosen + r_rejected)^2
    epochs: int | str = "auto"
    max_steps: int = 0  # stop after this many steps (0: the epochs decide); the schedule ends there
    batch_size: int | str = "auto"  # pairs per optimizer step
    lr: float | None = None  # absolute peak learning rate; overrides learning_rate_multiplier
    learning_rate_multiplier: float | str = "auto"  # times 1e-4 (LoRA) or 1e-5 (full)
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
    track_energy: bool = True  # codecarbon's kWh and CO2e estimate, in summary.json and the card
    energy_country: str = "WORLD"  # ISO-3 code of the grid (FRA, USA, IND, ...); WORLD: world average
    cpu_power_watts: float | None = None  # the CPU's power in watts, if known, where there is no RAPL
    screen_content: str = "warn"  # data screening (safety/screen.py), offensive lines: warn | block | redact
    screen_pii: str = "block"  # personal data: block | redact (mask it) | warn

    def __post_init__(self) -> None:
        check_common_fields(self)
        check_policies(self.screen_content, self.screen_pii)
        if self.center_coef < 0:
            raise TuneryError(f"center_coef must be >= 0, got {self.center_coef}")
        if self.micro_batch_tokens < self.max_length:
            raise TuneryError("micro_batch_tokens must be >= max_length (a pair's sequences share one row)")


# --- setup -----------------------------------------------------------------------------------------------


def pair_scores(
    model: torch.nn.Module, row_pairs: list[TokenizedPair], center_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (n,) and the scores of the chosen and rejected answers (n,), (n,)."""
    scores = model(pack_pairs(row_pairs))  # (2n,)
    chosen, rejected = scores[0::2], scores[1::2]
    margin = torch.tensor([p.margin for p in row_pairs]) if any(p.margin for p in row_pairs) else None
    return reward_loss(chosen, rejected, margin, center_coef), chosen, rejected


class PairStats:
    """Sums of the per-pair metrics of a step or an evaluation, averaged over pairs (and processes)."""

    NAMES = ("loss", "accuracy", "margin", "chosen_score", "rejected_score")

    def __init__(self) -> None:
        self.sums = [0.0] * len(self.NAMES)
        self.count = 0.0

    def add(
        self, losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, weight: float = 1.0
    ) -> None:
        chosen, rejected = chosen.detach(), rejected.detach()
        values = [losses.detach(), (chosen > rejected).float(), chosen - rejected, chosen, rejected]
        for i, v in enumerate(values):
            self.sums[i] += weight * float(v.sum())
        self.count += weight * len(losses)

    def averaged(self, world: distributed.World, prefix: str) -> dict[str, float]:
        *sums, count = distributed.all_sum([*self.sums, self.count], world)
        return {prefix + name: s / max(count, 1) for name, s in zip(self.NAMES, sums, strict=True)}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, pairs: list[TokenizedPair], cfg: dict[str, Any], world: distributed.World
) -> dict[str, float]:
    """Held-out loss, accuracy (chosen scored above rejected) and mean margin."""
    was_training = model.training
    model.eval()
    stats = PairStats()
    for row_pairs in plan_rows(shard(pairs, world.rank, world.size), cfg["micro_batch_tokens"]):
        with autocast(cfg["precision"], world.device):
            stats.add(*pair_scores(model, row_pairs, cfg["center_coef"]))
    model.train(was_training)
    return stats.averaged(world, prefix="valid_")


# --- train -----------------------------------------------------------------------------------------------


def train(cfg: RewardConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
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
    if world.is_main and not resume:
        atomic_write_yaml(run_dir / "config.yaml", resolved)
        tokenizer.save_pretrained(run_dir / "tokenizer")
    total_steps, batch_size = resolved["total_steps"], resolved["batch_size"]

    torch.manual_seed(cfg.seed)  # LoRA initialisation
    if cfg.lora_rank:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)  # type: ignore[arg-type]
        if resolved["precision"] == "bf16":
            cast_frozen(model, torch.bfloat16)
    model = RewardModel(model, model.config.hidden_size, seed=cfg.seed)  # type: ignore[arg-type]
    torch.nn.Module.to(model, world.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=resolved["lr"], weight_decay=cfg.weight_decay)
    ddp_model: torch.nn.Module = DistributedDataParallel(model) if world.distributed else model

    start_step, tokens_seen, train_seconds, metrics = restore(run_dir, model, optimizer, resume, world)
    early = resume_early_stopping(run_dir, cfg, resume, world)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    if world.is_main:
        log.info(
            "reward model: %d training pairs, %d validation; %d steps of %d pairs; %s trainable parameters; %s",
            len(train_pairs), len(valid_pairs), total_steps, batch_size,
            f"{sum(p.numel() for p in trainable):,}", resolved["precision"],
        )  # fmt: skip

    wall_start = time.monotonic()
    step = start_step
    with (
        GracefulStop() as stop,
        StepProgress(total_steps, start_step, "rm", enabled=world.is_main) as progress,
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
                sync = k == len(rows) - 1 or not world.distributed
                with contextlib.nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
                    with autocast(resolved["precision"], world.device):
                        losses, chosen, rejected = pair_scores(ddp_model, row_pairs, cfg.center_coef)
                    # The step's loss is the mean over its pairs, however they are split into rows and
                    # processes (DDP averages gradients over processes, hence the world size factor).
                    (losses.sum() * (weight * world.size / step_pairs)).backward()
                stats.add(losses, chosen, rejected, weight)
                tokens += weight * sum(p.n_tokens for p in row_pairs)
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
            record: dict[str, Any] = {
                "step": step,
                "total_steps": total_steps,
                **stats.averaged(world, prefix="train_"),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens_seen,
                "tokens_per_second": tokens / step_seconds,
                "pairs_per_second": step_pairs / step_seconds,
            }
            if valid_pairs and (step % resolved["eval_every"] == 0 or step == total_steps):
                record.update(evaluate(ddp_model, valid_pairs[: cfg.eval_examples], resolved, world))
                if early.update(step, record["valid_loss"]) and cfg.select_best and world.is_main:
                    save_best(run_dir, model, step)
            if metrics is not None:
                metrics.write(record)
            progress.update(
                step,
                f"loss {record['train_loss']:.3f} acc {record['train_accuracy']:.2f} "
                + (f"valid acc {record['valid_accuracy']:.2f} " if "valid_loss" in record else "")
                + f"{record['pairs_per_second']:.2f} pairs/s",
            )
            fault_point("after_step", step)
            counters = {"tokens": tokens_seen, "train_seconds": train_seconds,
                        "early_stopping": early.state(), "energy": energy.so_far()}  # fmt: skip
            checkpoint_or_stop(run_dir, step, resolved, model, optimizer, counters, stop, world, "rm")
            if early.should_stop:
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    final_step = restore_best(run_dir, model, early, step, world) if cfg.select_best else step
    selection = early.summary(final_step, step, total_steps)
    final: dict[str, Any] = {}
    if valid_pairs:
        final = {"full_" + k: v for k, v in evaluate(ddp_model, valid_pairs, resolved, world).items()}
    summary: dict[str, Any] = {}
    if world.is_main:
        assert metrics is not None
        if final:
            metrics.write({"step": step, **final, **selection})
        metrics.close()
        base_adapter = adapter_dir(cfg.adapter) if cfg.adapter and isinstance(model.lm, PeftModel) else None
        meta = {"base_model": cfg.model, "method": "rm", "adapter": cfg.adapter, "config": resolved}
        save_final(run_dir, model, tokenizer, meta, base_adapter=str(base_adapter) if base_adapter else None)
        summary = run_summary(
            "rm",
            cfg,
            run_dir,
            step,
            tokens_seen,
            wall_start,
            train_seconds,
            world,
            {**last_metrics(run_dir, ("train_", "valid_")), **final},
            pairs=examples_seen(step, len(train_pairs), resolved["batch_size"]),
            pairs_per_second=round(
                examples_seen(step, len(train_pairs), resolved["batch_size"]) / max(train_seconds, 1e-9), 3
            ),
            train_examples=len(train_pairs),
            valid_examples=len(valid_pairs),
            energy=energy.record(),
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
    """Entry point of `tunery train rm`: builds the config (YAML, then flags) and trains."""
    if resume_dir:
        return train(resumed_config(RewardConfig, resume_dir), resume=True)
    return train(build_config(RewardConfig, config_path, overrides), overwrite=overwrite)
