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

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from tunery.data.feedback import TokenizedPair, load_feedback_data
from tunery.data.packing import examples_seen, pack_pairs, plan_rows, shard, step_indices
from tunery.errors import TuneryError
from tunery.losses.dpo import kto_loss
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

BASE_LR_LORA = 5e-5  # LoRA; full fine-tuning uses 1e-6 (as DPO: small updates move the policy far)
BASE_LR_FULL = 1e-6


# --- config ----------------------------------------------------------------------------------------------


@dataclass
class KTOConfig:
    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    adapter: str | None = None  # start from this fine-tuned adapter (e.g. the SFT run); it is the reference
    data: str = ""  # training ratings ({prompt | messages, completion, label})
    valid: str | None = None  # held-out ratings
    out: str = ""  # run directory
    beta: float = 0.1
    desirable_weight: float = 1.0  # loss weight of thumbs-up examples
    undesirable_weight: float = 1.0  # loss weight of thumbs-down examples
    epochs: int | str = "auto"
    max_steps: int = 0  # stop after this many steps (0: the epochs decide); the schedule ends there
    batch_size: int | str = "auto"  # rated examples per optimizer step
    lr: float | None = None  # absolute peak learning rate; overrides learning_rate_multiplier
    learning_rate_multiplier: float | str = "auto"  # times 5e-5 (LoRA) or 1e-6 (full)
    lora_rank: int = 16  # 0 means full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    max_length: int = 1024  # prompt + completion; longer completions are truncated from the end
    micro_batch_tokens: int = 2048  # token budget of one packed forward pass
    precision: str = "auto"  # bf16 | fp32 | auto
    seed: int = 0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # steps; 0 picks ~10 evaluations per run
    eval_examples: int = 64  # held-out examples in each periodic evaluation (all at the end)
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
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise TuneryError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.micro_batch_tokens < self.max_length:
            raise TuneryError("micro_batch_tokens must be >= max_length (a pair's sequences share one row)")


# --- setup -----------------------------------------------------------------------------------------------


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
def reference_logps(
    model: torch.nn.Module,
    examples: list[TokenizedPair],
    kl_items: list[TokenizedPair],
    cfg: dict[str, Any],
    world: distributed.World,
) -> dict[int, tuple[float, float]]:
    """{line: (matched, mismatched)} summed completion log-probs under the model as it is now (the
    reference): the example's own completion, and its partner's after its prompt."""
    lm_head_weight = output_weight(model)
    was_training = model.training
    model.eval()
    values = [0.0] * (2 * len(examples))  # each process fills its share; the sum across processes is complete
    for column, items in enumerate((examples, kl_items)):
        index = {item.line: i for i, item in enumerate(items)}
        for row_items in plan_rows(shard(items, world.rank, world.size), cfg["micro_batch_tokens"]):
            with autocast(cfg["precision"], world.device):
                summed, _, _ = sequence_logps(model, lm_head_weight, pack_pairs(row_items))
            for k, item in enumerate(row_items):
                values[2 * index[item.line] + column] = summed[2 * k].item()
    values = distributed.all_sum(values, world)
    model.train(was_training)
    return {example.line: (values[2 * i], values[2 * i + 1]) for i, example in enumerate(examples)}


@torch.no_grad()
def kl_estimate(
    model: torch.nn.Module,
    items: list[TokenizedPair],
    ref: dict[int, tuple[float, float]],
    cfg: dict[str, Any],
    world: distributed.World,
) -> torch.Tensor:
    """z0: the mean log-ratio of the mismatched `items` over all processes, clamped at 0 (detached)."""
    lm_head_weight = output_weight(model)
    total, count = 0.0, 0.0
    for row_items in plan_rows(shard(items, world.rank, world.size), cfg["micro_batch_tokens"]):
        with autocast(cfg["precision"], world.device):
            logps, _, _ = sequence_logps(model, lm_head_weight, pack_pairs(row_items))
        ref_logps = torch.tensor([ref[item.line][1] for item in row_items])
        total += float((logps[0::2].float() - ref_logps).sum())
        count += len(row_items)
    total, count = distributed.all_sum([total, count], world)
    return torch.tensor(max(total / max(count, 1.0), 0.0))


def example_losses(
    cfg: dict[str, Any], logps: torch.Tensor, row_items: list[TokenizedPair],
    ref: dict[int, tuple[float, float]], kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-example losses (n,), rewards (n,), policy log-probs (n,) and labels (n,) of a packed row."""
    policy = logps[0::2]  # odd indices: the empty second branch of unpaired examples
    ref_logps = torch.tensor([ref[item.line][0] for item in row_items], dtype=policy.dtype)
    desirable = torch.tensor([bool(item.label) for item in row_items])
    losses, rewards = kto_loss(
        policy, ref_logps, desirable, kl.to(policy.dtype), cfg["beta"],
        cfg["desirable_weight"], cfg["undesirable_weight"],
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
    cfg: dict[str, Any],
    world: distributed.World,
) -> dict[str, float]:
    """Held-out loss, rewards, KL estimate and reward-sign accuracy (named `valid_<metric>`)."""
    lm_head_weight = output_weight(model)
    was_training = model.training
    model.eval()
    kl = kl_estimate(model, kl_items, ref, cfg, world)
    stats = RatingStats()
    for row_items in plan_rows(shard(examples, world.rank, world.size), cfg["micro_batch_tokens"]):
        with autocast(cfg["precision"], world.device):
            logps, _, _ = sequence_logps(model, lm_head_weight, pack_pairs(row_items))
        stats.add(*example_losses(cfg, logps, row_items, ref, kl))
    model.train(was_training)
    return {**stats.averaged(world, prefix="valid_"), "valid_kl": float(kl)}


# --- train -----------------------------------------------------------------------------------------------


def train(cfg: KTOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
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
    train_examples = load_feedback_data(paths["train"], tokenizer, cfg.max_length, expect="unpaired")
    valid_examples = (
        load_feedback_data(paths["valid"], tokenizer, cfg.max_length, expect="unpaired", min_examples=1)
        if cfg.valid
        else []
    )
    train_kl = mismatched(train_examples, cfg.seed, cfg.max_length)  # train_kl[i] goes with train_examples[i]
    valid_kl = mismatched(valid_examples, cfg.seed, cfg.max_length)
    resolved = resolve_common(
        cfg,
        len(train_examples),
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
    torch.nn.Module.to(model, world.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=resolved["lr"], weight_decay=cfg.weight_decay)
    ddp_model: torch.nn.Module = DistributedDataParallel(model) if world.distributed else model
    lm_head_weight = output_weight(model)

    # Reference log-probs {line: (matched, mismatched)}: computed before any update, or read back.
    ref_path = run_dir / "reference_logps.json"
    ref_train: dict[int, tuple[float, float]] = {}
    ref_valid: dict[int, tuple[float, float]] = {}
    if resume and ref_path.is_file():
        saved = json.loads(ref_path.read_text())
        ref_train = {int(k): tuple(v) for k, v in saved["train"].items()}  # type: ignore[misc]
        ref_valid = {int(k): tuple(v) for k, v in saved["valid"].items()}  # type: ignore[misc]
    elif resume:
        raise TuneryError(f"cannot resume {run_dir}: reference_logps.json is missing; start a new run")
    else:
        t0 = time.monotonic()
        ref_train = reference_logps(model, train_examples, train_kl, resolved, world)
        ref_valid = reference_logps(model, valid_examples, valid_kl, resolved, world)
        if world.is_main:
            atomic_write_json(ref_path, {"train": ref_train, "valid": ref_valid})
            log.info("reference log-probs of %d examples and their mismatched pairs in %.0f s",
                     len(train_examples) + len(valid_examples), time.monotonic() - t0)  # fmt: skip

    start_step, tokens_seen, train_seconds, metrics = restore(run_dir, model, optimizer, resume, world)
    early = resume_early_stopping(run_dir, cfg, resume, world)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    warnings: list[str] = []
    balance = class_balance_warning(train_examples, cfg)
    if balance:
        warnings.append(balance)
    if world.is_main:
        log.info(
            "kto: %d training examples (%d thumbs up), %d validation; %d steps of %d examples; beta %g; "
            "%s trainable parameters; %s",
            len(train_examples), sum(bool(e.label) for e in train_examples), len(valid_examples),
            total_steps, batch_size, cfg.beta, f"{sum(p.numel() for p in trainable):,}",
            resolved["precision"],
        )  # fmt: skip
        if balance:
            log.warning("warning: %s", balance)

    wall_start = time.monotonic()
    step = start_step
    with (
        GracefulStop() as stop,
        StepProgress(total_steps, start_step, "kto", enabled=world.is_main) as progress,
        energy,
    ):
        while step < total_steps:
            t0 = time.monotonic()
            indices = step_indices(step, len(train_examples), batch_size, cfg.seed)
            examples = [train_examples[i] for i in indices]
            step_examples = len(examples)
            # z0 from this step's mismatched pairs: the plain module (no DDP bookkeeping), no gradients.
            kl = kl_estimate(model, [train_kl[i] for i in indices], ref_train, resolved, world)
            mine, weight = shard(examples, world.rank, world.size), 1.0
            if not mine:  # a short last batch: this process still joins the gradient all-reduce, weightless
                mine, weight = examples[:1], 0.0
            rows = plan_rows(mine, cfg.micro_batch_tokens)
            stats, tokens = RatingStats(), 0.0
            for k, row_items in enumerate(rows):
                row = pack_pairs(row_items)
                sync = k == len(rows) - 1 or not world.distributed
                with contextlib.nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
                    with autocast(resolved["precision"], world.device):
                        logps, _, _ = sequence_logps(ddp_model, lm_head_weight, row)
                    losses, rewards, policy, desirable = example_losses(
                        resolved, logps, row_items, ref_train, kl
                    )
                    # The step's loss is the mean over its examples, however they are split into rows and
                    # processes (DDP averages gradients over processes, hence the world size factor).
                    (losses.sum() * (weight * world.size / step_examples)).backward()
                stats.add(losses, rewards, policy, desirable, weight)
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
            averaged.pop("accuracy")
            record: dict[str, Any] = {
                "step": step,
                "total_steps": total_steps,
                "train_loss": averaged.pop("loss"),
                **averaged,
                "kl": float(kl),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens_seen,
                "tokens_per_second": tokens / step_seconds,
                "examples_per_second": step_examples / step_seconds,
            }
            if valid_examples and (step % resolved["eval_every"] == 0 or step == total_steps):
                n_eval = cfg.eval_examples
                record.update(
                    evaluate(
                        ddp_model, valid_examples[:n_eval], valid_kl[:n_eval], ref_valid, resolved, world
                    )
                )
                if early.update(step, record["valid_loss"]) and cfg.select_best and world.is_main:
                    save_best(run_dir, model, step)
            if metrics is not None:
                metrics.write(record)
            progress.update(
                step,
                f"loss {record['train_loss']:.3f} kl {record['kl']:.3f} "
                + (f"valid acc {record['valid_accuracy']:.2f} " if "valid_loss" in record else "")
                + f"{record['examples_per_second']:.2f} examples/s",
            )
            fault_point("after_step", step)
            counters = {"tokens": tokens_seen, "train_seconds": train_seconds,
                        "early_stopping": early.state(), "energy": energy.so_far()}  # fmt: skip
            checkpoint_or_stop(run_dir, step, resolved, model, optimizer, counters, stop, world, "kto")
            if early.should_stop:
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    final_step = restore_best(run_dir, model, early, step, world) if cfg.select_best else step
    selection = early.summary(final_step, step, total_steps)
    final: dict[str, Any] = {}
    if valid_examples:
        final = {
            "full_" + k: v
            for k, v in evaluate(ddp_model, valid_examples, valid_kl, ref_valid, resolved, world).items()
        }
    summary: dict[str, Any] = {}
    if world.is_main:
        assert metrics is not None
        if final:
            metrics.write({"step": step, **final, **selection})
        metrics.close()
        base_adapter = adapter_dir(cfg.adapter) if cfg.adapter and isinstance(model, PeftModel) else None
        meta = {"base_model": cfg.model, "method": "kto", "adapter": cfg.adapter, "config": resolved}
        save_final(run_dir, model, tokenizer, meta, base_adapter=str(base_adapter) if base_adapter else None)
        n_examples = examples_seen(step, len(train_examples), resolved["batch_size"])
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
            "kto",
            cfg,
            run_dir,
            step,
            tokens_seen,
            wall_start,
            train_seconds,
            world,
            {
                **last_metrics(run_dir, ("train_", "valid_", "rewards/", "logps/", "kl")),
                **final,
            },
            examples=n_examples,
            examples_per_second=round(n_examples / max(train_seconds, 1e-9), 3),
            warnings=warnings,
            train_examples=len(train_examples),
            valid_examples=len(valid_examples),
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
    """Entry point of `tunery train kto`: builds the config (YAML, then flags) and trains."""
    if resume_dir:
        return train(resumed_config(KTOConfig, resume_dir), resume=True)
    return train(build_config(KTOConfig, config_path, overrides), overwrite=overwrite)
