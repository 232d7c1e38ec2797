"""What the two recipes that learn from sampled answers (grpo.py, ppo.py) share: a prompt's group of
completions, sampling it, packing it for the training forward pass, the prompt data, the samples and
counts a run reports, and the digest of what scored the completions.

A group is packed as one segment, `prompt | completion 1 | ... | completion G`, so the prompt is computed
once per group in the training forward pass, as in sampling (`models/sampling.py` shares its prefill).
Each completion's end-of-turn token is trained with it, so the policy learns when to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunery.data.packing import BranchRow, Segment, pack_branches
from tunery.data.prompts import PromptItem, load_prompt_data
from tunery.losses.logps import OutputHead, token_logps, token_logps_and_entropy
from tunery.models.forward import final_hidden
from tunery.models.sampling import Completion, SamplingParams, sample
from tunery.run import lifecycle
from tunery.training import sharding
from tunery.training.rundir import autocast, file_digest

# --- a group of completions -------------------------------------------------------------------------------


@dataclass
class Group:
    """One prompt and its sampled completions; the recipe fills in, per completion, what its loss needs
    (per-token tensors are (T,), T the completion's trained tokens)."""

    prompt: PromptItem
    completions: list[Completion]
    answers: list[list[int]]  # completion tokens as trained: the text's tokens, then the end-of-turn token
    trained: list[bool]  # False for completions left out of the loss (GRPO's mask_truncated)
    scores: list[float] = field(default_factory=list)  # the grader's reward (GRPO), the reward model's (PPO)
    old_logps: list[torch.Tensor] = field(default_factory=list)  # under the policy that sampled them
    ref_logps: list[torch.Tensor] = field(default_factory=list)  # under the reference model
    # GRPO: one advantage per completion, and the weight of each of its tokens in the step's loss
    advantages: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    # PPO: per token, the value head's estimates when sampled, GAE advantages and returns
    old_values: list[torch.Tensor] = field(default_factory=list)
    token_advantages: list[torch.Tensor] = field(default_factory=list)
    returns: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt.prompt_ids) + sum(len(a) for a in self.answers)

    def segment(self) -> Segment:
        return (
            self.prompt.prompt_ids,
            [(a, [t] * len(a)) for a, t in zip(self.answers, self.trained, strict=True)],
        )


def sample_groups(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[PromptItem],
    n: int,
    params: SamplingParams,
    batch: int | None = 32,
    mask_truncated: bool = False,
) -> list[Group]:
    """`n` completions of each prompt, sampled in eval mode, `batch` sequences per call of the sampler
    (None: all in one call). With `mask_truncated`, completions cut at max_new_tokens are not trained."""
    ids = [p.prompt_ids for p in prompts for _ in range(n)]
    was_training = model.training
    model.eval()
    completions: list[Completion] = []
    step = batch or max(len(ids), 1)
    with sharding.engine_weights(model):  # a sharded model: every process calls, with prompts or none
        for start in range(0, len(ids), step):
            completions += sample(model, tokenizer, ids[start : start + step], params)
    model.train(was_training)
    blocks = [completions[k * n : (k + 1) * n] for k in range(len(prompts))]
    return [
        Group(p, block, [c.trained_ids for c in block],
              [not (mask_truncated and c.finish_reason == "length") for c in block])
        for p, block in zip(prompts, blocks, strict=True)
    ]  # fmt: skip


# --- the training forward pass ----------------------------------------------------------------------------


def packed_logps(
    model: torch.nn.Module,
    head: OutputHead,
    groups: list[Group],
    temperature: float,
    precision: str,
    device: torch.device,
    with_entropy: bool = True,
) -> tuple[BranchRow, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The row of these groups, and at their trained completion tokens: log-probs (N,) under the sampling
    distribution (temperature applied), entropies (N,) with `with_entropy`, and final hidden states (N, H)
    (PPO's value head reads them)."""
    row = pack_branches([g.segment() for g in groups])
    entropy = None
    with autocast(precision, device):
        hidden = final_hidden(model, row)[row.positions]  # (N, H)
        # The policy that sampled is softmax(logits / temperature).
        head = head.at(temperature)
        if with_entropy:
            logps, entropy = token_logps_and_entropy(hidden, head, row.targets)
        else:
            logps, _ = token_logps(hidden, head, row.targets)
    return row, logps, entropy, hidden


def split_by_sequence(values: torch.Tensor, row: BranchRow) -> list[torch.Tensor]:
    """Flat per-token values (N,) of a row, one tensor per completion."""
    counts = torch.bincount(row.sequence, minlength=row.n_sequences).tolist()
    return list(values.split(counts))


def per_group(values: torch.Tensor, row: BranchRow, groups: list[Group]) -> list[list[torch.Tensor]]:
    """Flat per-token values (N,) of a row, split by completion and grouped by prompt."""
    per_answer = split_by_sequence(values, row)
    out = []
    for g in groups:
        out.append(per_answer[: len(g.answers)])
        per_answer = per_answer[len(g.answers) :]
    return out


# --- prompts in, samples and counts out -------------------------------------------------------------------


def load_prompt_splits(
    opened: lifecycle.Opened, max_prompt_length: int
) -> tuple[list[PromptItem], list[PromptItem]]:
    """The training and held-out prompts; prompts longer than `max_prompt_length` are skipped, with a
    warning naming their lines."""
    train_prompts, too_long = load_prompt_data(opened.train_path, opened.tokenizer, max_prompt_length)
    valid_prompts = (
        load_prompt_data(opened.valid_path, opened.tokenizer, max_prompt_length)[0]
        if opened.valid_path
        else []
    )
    lifecycle.log_prompt_warning(opened.world, too_long, max_prompt_length)
    return train_prompts, valid_prompts


def shown_samples(
    prompts: list[PromptItem], completions: list[Completion], values: list[float], name: str, limit: int
) -> list[dict[str, Any]]:
    """The first `limit` held-out completions with their `name` (reward, score), for samples.jsonl."""
    return [
        {"line": p.line, "prompt": p.messages[-1]["content"], "completion": c.text, name: v}
        for p, c, v in list(zip(prompts, completions, values, strict=True))[:limit]
    ]


def completion_counts(
    run: lifecycle.Run, completions: int, valid_metric: str, n_train: int, n_valid: int
) -> dict[str, Any]:
    """summary.json's counts of a run that samples: completions, their rate, where `valid_metric` started."""
    return {
        "completions": completions,
        "completions_per_second": lifecycle.per_second(completions, run.train_seconds),
        f"start_{valid_metric}": lifecycle.start_value(run.run_dir, valid_metric),
        "train_examples": n_train,
        "valid_examples": n_valid,
    }


# --- what scores the completions --------------------------------------------------------------------------


def grader_digest(grader: str) -> str | None:
    """The grader file's digest, for config.yaml (a resumed run must grade the same way): the grader
    JSON, or the Python file of `file.py:function`."""
    match = re.fullmatch(r"(.+\.py):\w+", grader)
    return file_digest(match.group(1) if match else grader)


def reward_model_digest(path: str) -> str | None:
    """The reward head's digest, for config.yaml: what a run was scored by."""
    head = Path(path) / "final" / "score.safetensors"
    return file_digest(str(head if head.is_file() else Path(path) / "score.safetensors"))
