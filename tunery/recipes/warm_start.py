"""A short supervised warm start before reinforcement learning (`tunery train grpo --warm-start FILE`).

RL only reinforces what the policy already samples. When the grader asks for a format the model never
writes (a bare number where it always writes "8 + 4 = 12"), every completion of a group scores the same,
the advantages are zero, and no number of steps teaches the format: examples/rl/README.md measured 0%
bare answers after 150 steps, with shaped rewards too. A few worked examples in that format (OpenAI chat
JSONL, the same as `tunery train sft` takes; a few dozen are enough) trained on before the first RL step
put the format within the policy's reach; RL then learns the task in it.

The warm start trains the run's own adapter (or weights, with --full) with the run's optimizer at the run's
learning rate, for `warm_start_epochs` passes of `WARM_BATCH` examples a step, then clears the optimizer's
moments so RL starts fresh. It happens once, before step 1: a resumed run restores the checkpoint, which
holds its result. Every process trains on every example (they are few), so the weights stay the same
everywhere; under DDP or --shard the gradient averaging changes nothing.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

from tunery.data.packing import pack, plan_rows
from tunery.data.template import TokenizedChat
from tunery.data.validate import load_chat_data
from tunery.models.forward import output_head
from tunery.run import lifecycle
from tunery.training.rundir import autocast

log = logging.getLogger("tunery")

WARM_BATCH = 4  # examples per warm-start step


def load_warm_start(path: str, tokenizer: Any, max_length: int) -> list[TokenizedChat]:
    """The warm start's examples, checked before the run starts (a bad line names its file and line)."""
    return load_chat_data(path, tokenizer, max_length, min_examples=1) if path else []


def warm_start(
    run: lifecycle.Run, chats: list[TokenizedChat], epochs: int, micro_batch_tokens: int, seed: int
) -> dict[str, float]:
    """Train on `chats` for `epochs` passes; returns the first and last steps' mean token loss
    (`warm_start_loss_first`, `warm_start_loss`) and the number of steps, for the run's record."""
    from tunery.recipes.sft import forward_loss

    model, world = run.ddp_model, run.world
    head = output_head(run.model)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(chats) / WARM_BATCH)
    losses: list[float] = []
    for group in run.optimizer.param_groups:
        group["lr"] = run.plan.lr * group.get("lr_ratio", 1.0)
    for _ in range(epochs):
        order = list(range(len(chats)))
        rng.shuffle(order)
        for k in range(steps_per_epoch):
            batch = [chats[i] for i in order[k * WARM_BATCH : (k + 1) * WARM_BATCH]]
            trained = sum(c.n_trained for c in batch)
            nll = 0.0
            for row_chats in plan_rows(batch, micro_batch_tokens):
                row = pack(row_chats)
                with autocast(run.plan.precision, world.device):
                    nll_sum, _ = forward_loss(model, head, row)
                (nll_sum / trained).backward()
                nll += nll_sum.item()
            lifecycle.update(run, grad_clip=1.0)
            losses.append(nll / trained)
    run.optimizer.state.clear()  # RL's updates start with fresh moments
    if world.is_main:
        log.info(
            "warm start: %d examples, %d steps of %d; loss %.3f -> %.3f",
            len(chats), len(losses), WARM_BATCH, losses[0], losses[-1],
        )  # fmt: skip
    return {
        "warm_start_loss_first": losses[0],
        "warm_start_loss": losses[-1],
        "warm_start_steps": len(losses),
    }
