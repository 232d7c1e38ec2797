"""Supervised fine-tuning (LoRA or full) on OpenAI chat JSONL.

    tunery train sft --model smollm2-135m-instruct --data train.jsonl --valid valid.jsonl --out runs/sft
    tunery train sft --resume runs/sft                               # continue a killed run exactly
    torchrun --nproc_per_node=2 -m tunery train sft ...              # DDP; same global batch, same losses

A step is `batch_size` conversations (OpenAI's meaning of batch size). They are packed without padding
into rows of at most `micro_batch_tokens` tokens, one row per forward pass, gradients accumulated over
the rows, and the loss is the mean over every trained token of the step, whatever the split into rows
or processes. Only assistant turns (with weight 1) and their end-of-turn tokens are trained.

Speed (CPU): frozen weights are stored in bf16 and LoRA weights in fp32 under bf16 autocast; the output
projection runs fused with the loss at trained positions only (losses/sft.py); packed rows attend per
conversation (models/attention.py) instead of through a dense block mask; glibc keeps freed memory
(training/memory.py). Ctrl-C or SIGTERM checkpoints at the next step boundary and stops.
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

from tunery.data.packing import IGNORE, PackedRow, pack, plan_rows, shard, step_indices
from tunery.data.template import TokenizedChat
from tunery.data.validate import load_chat_data
from tunery.losses.sft import sft_loss
from tunery.models.forward import output_weight
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


# --- config ----------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    data: str = ""  # training JSONL (OpenAI chat format)
    valid: str | None = None  # validation JSONL
    adapter: str | None = (
        None  # continue from this fine-tuned adapter: merged into the base, a new one trains
    )
    out: str = ""  # run directory
    epochs: int | str = "auto"  # or an int; auto follows OpenAI's heuristic
    max_steps: int = 0  # stop after this many steps (0: the epochs decide); the schedule ends there
    batch_size: int | str = "auto"  # conversations per optimizer step
    lr: float | None = None  # absolute peak learning rate; overrides learning_rate_multiplier
    learning_rate_multiplier: float | str = "auto"  # times 2e-4 (LoRA) or 2e-5 (full)
    lora_rank: int = 16  # 0 means full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # or comma-separated module names, e.g. q_proj,v_proj
    max_length: int = 1024  # longer conversations are truncated from the end
    micro_batch_tokens: int = 1024  # token budget of one packed forward pass
    precision: str = "auto"  # bf16 | fp32 | auto (bf16 where the hardware runs it fast)
    seed: int = 0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_every: int = 0  # steps; 0 picks ~10 evaluations per run
    eval_examples: int = 64  # validation conversations in each periodic evaluation (all at the end)
    save_every: int = 0  # steps; 0 saves ~5 checkpoints per run
    keep_checkpoints: int = 3  # most recent checkpoints kept on disk
    screen_content: str = "warn"  # data screening (safety/screen.py), offensive lines: warn | block | redact
    screen_pii: str = "block"  # personal data: block | redact (mask it) | warn
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

    def __post_init__(self) -> None:
        check_common_fields(self)
        check_policies(self.screen_content, self.screen_pii)


# --- setup -----------------------------------------------------------------------------------------------


def forward_loss(
    model: torch.nn.Module, lm_head_weight: torch.Tensor, row: PackedRow
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and correct-token count of one packed row.

    The model runs without its output layer (`logits_to_keep` is empty); the loss applies it to the final
    hidden states at trained positions only, in chunks, so no (tokens x vocabulary) tensor is ever built.
    """
    keep = (row.targets != IGNORE).nonzero().squeeze(1)  # (N,)
    out = model(
        input_ids=row.input_ids,
        position_ids=row.position_ids,
        cu_seq_lens_q=row.cu_seq_lens,
        cu_seq_lens_k=row.cu_seq_lens,
        logits_to_keep=keep[:0],
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = out.hidden_states[-1][0, keep]  # (N, H), after the final norm
    return sft_loss(hidden, lm_head_weight, row.targets[keep])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, chats: list[TokenizedChat], cfg: dict[str, Any], world: distributed.World
) -> tuple[float, float]:
    """Mean token loss and accuracy over `chats` (split across processes)."""
    lm_head_weight = output_weight(model)
    was_training = model.training
    model.eval()
    nll = correct = count = 0.0
    for row_chats in plan_rows(shard(chats, world.rank, world.size), cfg["micro_batch_tokens"]):
        row = pack(row_chats)
        with autocast(cfg["precision"], world.device):
            nll_sum, n_correct = forward_loss(model, lm_head_weight, row)
        nll, correct, count = nll + nll_sum.item(), correct + n_correct.item(), count + row.n_trained
    nll, correct, count = distributed.all_sum([nll, correct, count], world)
    model.train(was_training)
    return nll / max(count, 1), correct / max(count, 1)


# --- train -----------------------------------------------------------------------------------------------


def train(cfg: SFTConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
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
    train_chats = load_chat_data(paths["train"], tokenizer, cfg.max_length)
    valid_chats = (
        load_chat_data(paths["valid"], tokenizer, cfg.max_length, min_examples=1) if cfg.valid else []
    )
    mean_tokens = sum(c.n_tokens for c in train_chats) / max(len(train_chats), 1)
    resolved = resolve_common(
        cfg,
        len(train_chats),
        world,
        auto.BASE_LR_LORA if cfg.lora_rank else auto.BASE_LR_FULL,
        auto.chat_batch(mean_tokens, cfg.micro_batch_tokens),
    )
    if world.is_main and not resume:
        atomic_write_yaml(run_dir / "config.yaml", resolved)
        tokenizer.save_pretrained(run_dir / "tokenizer")
    total_steps, batch_size = resolved["total_steps"], resolved["batch_size"]

    torch.manual_seed(cfg.seed)  # LoRA initialisation
    if cfg.lora_rank:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        if resolved["precision"] == "bf16":
            cast_frozen(model, torch.bfloat16)
    torch.nn.Module.to(model, world.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=resolved["lr"], weight_decay=cfg.weight_decay)
    ddp_model: torch.nn.Module = DistributedDataParallel(model) if world.distributed else model
    lm_head_weight = output_weight(model)

    start_step, tokens_seen, train_seconds, metrics = restore(run_dir, model, optimizer, resume, world)
    early = resume_early_stopping(run_dir, cfg, resume, world)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    if world.is_main:
        n_trainable = sum(p.numel() for p in trainable)
        log.info(
            "%d training conversations, %d validation; %d steps of %d conversations; %s trainable parameters; %s",
            len(train_chats),
            len(valid_chats),
            total_steps,
            batch_size,
            f"{n_trainable:,}",
            resolved["precision"],
        )

    wall_start = time.monotonic()
    step = start_step
    with (
        GracefulStop() as stop,
        StepProgress(total_steps, start_step, "sft", enabled=world.is_main) as progress,
        energy,
    ):
        while step < total_steps:
            t0 = time.monotonic()
            chats = [train_chats[i] for i in step_indices(step, len(train_chats), batch_size, cfg.seed)]
            step_trained = sum(c.n_trained for c in chats)  # the same on every process
            mine, weight = shard(chats, world.rank, world.size), 1.0
            if not mine:  # a short last batch: this process still joins the gradient all-reduce, weightless
                mine, weight = chats[:1], 0.0
            rows = plan_rows(mine, cfg.micro_batch_tokens)
            nll = correct = tokens = 0.0
            for k, row_chats in enumerate(rows):
                row = pack(row_chats)
                sync = k == len(rows) - 1 or not world.distributed
                with contextlib.nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
                    with autocast(resolved["precision"], world.device):
                        nll_sum, n_correct = forward_loss(ddp_model, lm_head_weight, row)
                    # DDP averages gradients over processes, hence the world size factor.
                    (nll_sum * (weight * world.size / step_trained)).backward()
                nll += weight * nll_sum.item()
                correct += weight * n_correct.item()
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

            nll, correct, tokens = distributed.all_sum([nll, correct, tokens], world)
            step_seconds = time.monotonic() - t0
            tokens_seen += int(tokens)
            train_seconds += step_seconds
            record: dict[str, Any] = {
                "step": step,
                "total_steps": total_steps,
                "train_loss": nll / step_trained,
                "train_mean_token_accuracy": correct / step_trained,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens_seen,
                "tokens_per_second": tokens / step_seconds,
            }
            if valid_chats and (step % resolved["eval_every"] == 0 or step == total_steps):
                valid_loss, valid_acc = evaluate(ddp_model, valid_chats[: cfg.eval_examples], resolved, world)
                record.update(valid_loss=valid_loss, valid_mean_token_accuracy=valid_acc)
                if early.update(step, valid_loss) and cfg.select_best and world.is_main:
                    save_best(run_dir, model, step)
            if metrics is not None:
                metrics.write(record)
            progress.update(
                step,
                f"loss {record['train_loss']:.3f} "
                + (f"valid {record['valid_loss']:.3f} " if "valid_loss" in record else "")
                + f"{record['tokens_per_second']:.0f} tok/s",
            )
            fault_point("after_step", step)
            counters = {"tokens": tokens_seen, "train_seconds": train_seconds,
                        "early_stopping": early.state(), "energy": energy.so_far()}  # fmt: skip
            checkpoint_or_stop(run_dir, step, resolved, model, optimizer, counters, stop, world, "sft")
            if early.should_stop:
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    final_step = restore_best(run_dir, model, early, step, world) if cfg.select_best else step
    selection = early.summary(final_step, step, total_steps)
    final: dict[str, Any] = {}
    if valid_chats:
        final["full_valid_loss"], final["full_valid_mean_token_accuracy"] = evaluate(
            ddp_model, valid_chats, resolved, world
        )
    summary: dict[str, Any] = {}
    if world.is_main:
        assert metrics is not None
        if final:
            metrics.write({"step": step, **final, **selection})
        metrics.close()
        base_adapter = adapter_dir(cfg.adapter) if cfg.adapter and isinstance(model, PeftModel) else None
        meta = {"base_model": cfg.model, "method": "sft", "adapter": cfg.adapter, "config": resolved}
        save_final(run_dir, model, tokenizer, meta, base_adapter=str(base_adapter) if base_adapter else None)
        last = last_metrics(run_dir, ("train_", "valid_"))
        safety_flags = evaluate_run(
            model,
            tokenizer,
            size=cfg.safety_evals,
            run_dir=run_dir,
            base_name=cfg.model,
            adapter=cfg.adapter,
            train_path=paths["train"],
            seed=cfg.seed,
        )
        summary = run_summary(
            "sft", cfg, run_dir, step, tokens_seen, wall_start, train_seconds, world, {**last, **final},
            train_examples=len(train_chats), valid_examples=len(valid_chats), energy=energy.record(), safety_flags=safety_flags,
            **selection,
        )  # fmt: skip
        atomic_write_json(run_dir / "summary.json", summary)
        write_model_card(run_dir)
    distributed.barrier(world)
    distributed.teardown(world)
    return summary


def run(
    config_path: str | None, overrides: dict[str, Any], resume_dir: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Entry point of `tunery train sft`: builds the config (YAML, then flags) and trains."""
    if resume_dir:
        return train(resumed_config(SFTConfig, resume_dir), resume=True)
    cfg = build_config(SFTConfig, config_path, overrides)
    return train(cfg, overwrite=overwrite)
