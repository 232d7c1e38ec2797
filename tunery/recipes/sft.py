"""Supervised fine-tuning (LoRA or full) on OpenAI chat JSONL.

    tunery train sft --model smollm2-135m-instruct --data train.jsonl --valid valid.jsonl --out runs/sft
    tunery train sft --resume runs/sft                               # continue a killed run exactly
    torchrun --nproc_per_node=2 -m tunery train sft ...              # DDP; same global batch, same losses
    torchrun --nproc_per_node=2 -m tunery train sft --full --shard ... # FSDP2: weights split across them

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

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from tunery.data.packing import IGNORE, PackedRow, pack, plan_rows, shard
from tunery.data.template import TokenizedChat
from tunery.data.validate import load_chat_data
from tunery.losses.logps import OutputHead
from tunery.losses.sft import sft_loss
from tunery.models.forward import output_head
from tunery.recipes.configs import SFTConfig
from tunery.run import files, lifecycle
from tunery.training import auto, distributed
from tunery.training.rundir import autocast

log = logging.getLogger("tunery")


# --- setup ------------------------------------------------------------------------------------------------


def forward_loss(
    model: torch.nn.Module, head: OutputHead, row: PackedRow
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and correct-token count of one packed row.

    The model runs without its output layer (`logits_to_keep` is empty); the loss applies it to the final
    hidden states at trained positions only, in chunks, so no (tokens x vocabulary) tensor is ever built.
    """
    keep = (row.targets != IGNORE).nonzero().squeeze(1)  # (N,)
    out = model(**row.model_kwargs(), logits_to_keep=keep[:0], output_hidden_states=True)
    hidden = out.hidden_states[-1][0, keep]  # (N, H), after the final norm
    return sft_loss(hidden, head, row.targets[keep])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    chats: list[TokenizedChat],
    micro_batch_tokens: int,
    precision: str,
    world: distributed.World,
) -> tuple[float, float]:
    """Mean token loss and accuracy over `chats` (split across processes)."""
    head = output_head(model)
    was_training = model.training
    model.eval()
    nll = correct = count = 0.0
    rows = plan_rows(shard(chats, world.rank, world.size), micro_batch_tokens)
    for row_chats, counts in distributed.even_rows(rows, world, filler=chats[:1]):
        row = pack(row_chats)
        with autocast(precision, world.device):
            nll_sum, n_correct = forward_loss(model, head, row)
        if counts:
            nll, correct, count = nll + nll_sum.item(), correct + n_correct.item(), count + row.n_trained
    nll, correct, count = distributed.all_sum([nll, correct, count], world)
    model.train(was_training)
    return nll / max(count, 1), correct / max(count, 1)


def train_step(
    run: lifecycle.Run,
    train_chats: list[TokenizedChat],
    step: int,
    cfg: SFTConfig,
    head: OutputHead,
    before_update: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Optimizer step `step` (from 0) over its conversations, packed into rows with gradients accumulated;
    returns the step's record. A federated site's local steps are this function too (`before_update`
    adds FedProx's proximal gradient)."""
    t0 = time.monotonic()
    world, model = run.world, run.ddp_model
    batch = lifecycle.step_batch(run, train_chats, step, cfg.seed, cfg.micro_batch_tokens)
    step_trained = sum(c.n_trained for c in batch.items)  # the same on every process
    nll = correct = tokens = 0.0
    for row_chats, share, synced in batch.rows:
        row = pack(row_chats)
        with synced:
            with autocast(run.plan.precision, world.device):
                nll_sum, n_correct = forward_loss(model, head, row)
            distributed.backward_share(nll_sum, share, world, step_trained)
        nll += share * nll_sum.item()
        correct += share * n_correct.item()
        tokens += share * row.data_tokens  # a shared prefix counted once per conversation, as in the data
    if before_update is not None:
        before_update()
    lr, grad_norm = lifecycle.optimizer_step(run, step, cfg.grad_clip, cfg.schedule)
    nll, correct = distributed.all_sum([nll, correct], world)
    record, _ = lifecycle.step_record(run, step + 1, lr, grad_norm, tokens, t0)
    return record | {files.TRAIN_LOSS: nll / step_trained, files.TRAIN_ACCURACY: correct / step_trained}


# --- train ------------------------------------------------------------------------------------------------


def train(cfg: SFTConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    opened = lifecycle.open_run(cfg, resume, overwrite)
    train_chats = load_chat_data(opened.train_path, opened.tokenizer, cfg.max_length)
    valid_chats = (
        load_chat_data(opened.valid_path, opened.tokenizer, cfg.max_length, min_examples=1)
        if opened.valid_path
        else []
    )
    mean_tokens = sum(c.n_tokens for c in train_chats) / max(len(train_chats), 1)
    plan = lifecycle.resolve_run(
        cfg, len(train_chats), opened.world, auto.chat_batch(mean_tokens, cfg.micro_batch_tokens)
    )
    run = lifecycle.start_run(opened, cfg, plan, lifecycle.with_lora(opened.model, cfg, plan), method="sft")
    world, model = run.world, run.ddp_model
    head = output_head(run.model)

    def held_out(chats: list[TokenizedChat], full: bool = False) -> dict[str, float]:
        loss, accuracy = evaluate(model, chats, cfg.micro_batch_tokens, plan.precision, world)
        if full:
            return {files.FULL_VALID_LOSS: loss, files.FULL_VALID_ACCURACY: accuracy}
        return {files.VALID_LOSS: loss, files.VALID_ACCURACY: accuracy}

    lifecycle.announce(
        run, "%d training conversations, %d validation; %d steps of %d conversations", len(train_chats),
        len(valid_chats), plan.total_steps, plan.batch_size,
    )  # fmt: skip

    step = run.start_step
    with run.stop, run.progress, run.energy:
        while step < plan.total_steps:
            record = train_step(run, train_chats, step, cfg, head)
            step += 1
            if valid_chats and lifecycle.evaluates_after(run, step):
                record.update(held_out(valid_chats[: cfg.eval_examples]))
            shown = ("loss {train_loss:.3f}", "valid {valid_loss:.3f}", "{tokens_per_second:.0f} tok/s")
            if lifecycle.end_step(run, record, "sft", shown):
                break

    # --- finish: final weights (the best evaluation's), full validation, summary, model card --------------
    return lifecycle.finish_run(
        run, cfg, step, method="sft", metric_prefixes=(files.TRAIN_PREFIX, files.VALID_PREFIX),
        final_eval=(lambda: held_out(valid_chats, full=True)) if valid_chats else None,
        eval_train_path=run.train_path,
        counts={"train_examples": len(train_chats), "valid_examples": len(valid_chats)},
    )  # fmt: skip


# the entry point of `tunery train`: the config from YAML then flags (or the resumed run's), then train()
run = lifecycle.entry_point(SFTConfig, train)
