"""RLHF with PPO: a reward model scores sampled answers, a value head on the policy is the critic.

    tunery train rm --data examples/feedback/train.jsonl --valid examples/feedback/valid.jsonl --out runs/rm
    tunery train ppo --data examples/feedback/train_prompts.jsonl --valid examples/feedback/prompts.jsonl \\
        --reward-model runs/rm --adapter runs/support/final --out runs/ppo
    tunery train ppo --resume runs/ppo

The classic pipeline (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022). A step samples
`completions_per_prompt` answers to each of `batch_size` prompts and scores them with a Tunery reward
model (a separate, frozen model trained by `tunery train rm`). Every completion token earns
-kl_coef x log(pi / pi_ref), its log-ratio to the reference (the starting model: the LoRA adapter switched
off), and the last token earns the score as well. A value head on the policy's final hidden states
(models/heads.py) predicts the return from the state before each token; GAE turns rewards and values
into advantages, whitened over the batch. Then `ppo_epochs` passes over the batch in `num_minibatches`
shuffled minibatches, one optimizer step each, on the clipped surrogate plus vf_coef x the clipped value
loss (losses/ppo.py). An adaptive KL coefficient (Ziegler et al.) is on when `kl_target` is set.

A prompt and its completions are packed as one segment, `prompt | completion 1 | ...`, as in GRPO, and
each completion's end-of-turn token is trained. The reward model scores each completion's text as the
answer to its prompt, through its own tokenizer and chat template, so it reads the score at the
end-of-turn token as in its training (whatever its base model); a completion cut at max_new_tokens is
scored as if it ended there, minus `missing_eos_penalty`.

Departures from the papers: the value head shares the policy's trunk (one forward pass gives log-probs and
values, and the value loss trains the LoRA weights too), as in the value-head-on-policy setups; it starts
at zero and learns at `value_lr_ratio` x lr, as the separate critics of other setups learn ~10x faster
than the actor. Whitening uses the population variance. LoRA only: the reference is the adapter switched
off. Evaluation answers held-out prompts greedily: `valid_score_mean` is their reward-model score and
`valid_kl` the exact KL(policy || reference) of the next-token distributions summed along them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.nn.utils.rnn import pad_sequence

from tunery.data.feedback import FeedbackExample, tokenize_feedback
from tunery.data.packing import Segment, pack_branches, plan_rows, step_indices
from tunery.data.prompts import PromptItem, load_prompt_data
from tunery.errors import TuneryError
from tunery.losses.grpo import clipped_surrogate
from tunery.losses.logps import token_logps, token_logps_and_entropy
from tunery.losses.ppo import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_penalty_rewards,
    value_loss,
    whiten,
)
from tunery.models.forward import final_hidden, output_weight
from tunery.models.heads import PolicyWithValue, RewardModel, load_reward_model, score_pairs
from tunery.models.load import load_model
from tunery.models.lora import adapter_dir, apply_lora, cast_frozen, merge_adapter
from tunery.models.sampling import Completion, SamplingParams, sample
from tunery.safety.card import write_model_card
from tunery.safety.evals import evaluate_run
from tunery.safety.screen import check_policies, screen_run_data, screened_paths
from tunery.training import auto, distributed
from tunery.training.checkpoint import latest_checkpoint
from tunery.training.common import (
    check_common_fields,
    checkpoint_or_stop,
    resolve_common,
    restore,
    run_summary,
)
from tunery.training.config import build_config
from tunery.training.energy import EnergyMeter
from tunery.training.faults import fault_point
from tunery.training.io import atomic_write_json, atomic_write_yaml
from tunery.training.memory import keep_freed_memory
from tunery.training.progress import StepProgress
from tunery.training.rundir import (
    autocast,
    check_same_data,
    file_digest,
    last_metrics,
    prepare_run_dir,
    resumed_config,
    save_final,
)
from tunery.training.schedule import lr_at
from tunery.training.signals import GracefulStop

log = logging.getLogger("tunery")

BASE_LR_LORA = 2e-5


# --- config ----------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    adapter: str | None = None  # start from this fine-tuned adapter (e.g. an SFT run), merged in
    data: str = ""  # prompts, OpenAI reinforcement format: {"messages": [...]}; other keys are ignored
    valid: str | None = None  # held-out prompts
    reward_model: str = ""  # a reward model run directory (tunery train rm); any base model
    out: str = ""  # run directory
    completions_per_prompt: int = 1  # answers sampled per prompt (they share the prompt's forward pass)
    batch_size: int | str = "auto"  # prompts per step; auto: 8
    epochs: int | str = "auto"  # passes over the prompts; auto: 1
    max_steps: int = 0  # stop after this many steps (0: epochs decide)
    lr: float | None = None  # absolute peak learning rate; overrides learning_rate_multiplier
    learning_rate_multiplier: float | str = "auto"  # times 2e-5
    value_lr_ratio: float = 10.0  # the value head learns at this x lr (critics learn faster)
    lora_rank: int = 16  # must be > 0: the reference model is the adapter switched off
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    max_prompt_length: int = 512  # longer prompts are skipped, with a warning naming their lines
    max_new_tokens: int = 128  # completion budget; longer completions are cut ("truncated")
    temperature: float = 1.0  # sampling temperature; log-probs are of the same tempered policy
    kl_coef: float = 0.05  # per-token KL penalty in the reward (TRL 0.05; OpenRLHF, torchtune 0.01)
    kl_target: float | None = None  # adaptive KL: steer the mean sequence KL towards this (nats)
    kl_horizon: int = 10000  # adaptive KL: its gain is completions per step / this (short runs: lower it)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip, in the value's units
    vf_coef: float = 0.1  # weight of the value loss
    ppo_epochs: int = 4  # passes over each sampled batch
    num_minibatches: int = 1  # optimizer steps per pass
    whiten_advantages: bool = True
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions cut at max_new_tokens
    micro_batch_tokens: int = 4096  # token budget of one packed forward pass
    precision: str = "auto"  # bf16 | fp32 | auto
    seed: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "constant"  # cosine | linear | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # steps; 0 picks ~10 evaluations per run
    eval_examples: int = 200  # held-out prompts per evaluation
    save_every: int = 0  # steps; 0 saves ~5 checkpoints per run
    keep_checkpoints: int = 3
    screen_content: str = "warn"  # data screening (safety/screen.py), offensive lines: warn | block | redact
    screen_pii: str = "block"  # personal data: block | redact (mask it) | warn
    log_samples: int = 4  # held-out completions written to samples.jsonl at each evaluation
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

    @property
    def max_length(self) -> int:  # what the shared field checks look at
        return self.max_prompt_length + self.max_new_tokens

    def __post_init__(self) -> None:
        check_common_fields(self)
        check_policies(self.screen_content, self.screen_pii)
        if not self.reward_model:
            raise TuneryError("no reward model: pass --reward-model DIR (a run of `tunery train rm`)")
        if self.lora_rank == 0:
            raise TuneryError(
                "PPO needs LoRA (lora_rank > 0): the reference model is the adapter switched off"
            )
        if self.completions_per_prompt < 1 or self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise TuneryError("completions_per_prompt, ppo_epochs and num_minibatches must be at least 1")
        if isinstance(self.batch_size, int) and self.num_minibatches > self.batch_size:
            raise TuneryError("num_minibatches must be <= batch_size (a minibatch holds whole prompts)")
        if self.max_new_tokens < 1 or self.max_prompt_length < 1 or self.max_steps < 0:
            raise TuneryError("max_new_tokens and max_prompt_length must be positive, max_steps >= 0")
        if self.temperature <= 0:
            raise TuneryError("temperature must be > 0: PPO learns from sampled answers")
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0) or self.kl_horizon < 1:
            raise TuneryError("kl_coef must be >= 0, kl_target > 0 and kl_horizon >= 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise TuneryError("gamma and lam must be in [0, 1]")
        if self.cliprange <= 0 or self.cliprange_value <= 0 or self.vf_coef < 0 or self.value_lr_ratio <= 0:
            raise TuneryError("cliprange and cliprange_value must be > 0, vf_coef >= 0, value_lr_ratio > 0")
        if self.micro_batch_tokens < self.max_prompt_length + self.completions_per_prompt * (
            self.max_new_tokens + 1
        ):
            raise TuneryError(
                "micro_batch_tokens must hold one prompt and its completions: at least max_prompt_length + "
                "completions_per_prompt x (max_new_tokens + 1)"
            )


# --- rollouts: sample, score, evaluate under the policy and the reference --------------------------------


@dataclass
class Group:
    """One prompt, its sampled completions and, per completion, per-token tensors (T,) for the loss."""

    prompt: PromptItem
    completions: list[Completion]
    answers: list[list[int]]  # completion tokens as trained: the text's tokens, then the end-of-turn token
    scores: list[float] = field(default_factory=list)  # the reward model's, before any penalty
    old_logps: list[torch.Tensor] = field(default_factory=list)  # the sampling policy's
    old_values: list[torch.Tensor] = field(default_factory=list)
    ref_logps: list[torch.Tensor] = field(default_factory=list)
    advantages: list[torch.Tensor] = field(default_factory=list)
    returns: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt.prompt_ids) + sum(len(a) for a in self.answers)

    def segment(self) -> Segment:
        return self.prompt.prompt_ids, [(a, [True] * len(a)) for a in self.answers]


def per_group(values: torch.Tensor, row: Any, groups: list[Group]) -> list[list[torch.Tensor]]:
    """Flat per-token values of a row, split by completion and grouped by prompt."""
    counts = torch.bincount(row.sequence, minlength=row.n_sequences).tolist()
    per_answer = list(values.split(counts))
    out = []
    for g in groups:
        out.append(per_answer[: len(g.answers)])
        per_answer = per_answer[len(g.answers) :]
    return out


def packed_forward(
    policy: PolicyWithValue,
    groups: list[Group],
    cfg: dict[str, Any],
    device: torch.device,
    reference: bool = False,
    with_entropy: bool = False,
) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The row of these groups, and per trained completion token: log-probs under the sampling
    distribution (temperature applied), entropies (with `with_entropy`) and values, each (N,)."""
    row = pack_branches([g.segment() for g in groups])
    lm, entropy = policy.lm, None
    adapter_off = lm.disable_adapter() if reference else contextlib.nullcontext()  # type: ignore[operator]
    with adapter_off, autocast(cfg["precision"], device):
        hidden = final_hidden(lm, row)[row.positions]  # (N, H)
        # The policy that sampled is softmax(logits / temperature): (h / T) @ W.T is exactly that.
        if with_entropy:
            logps, entropy = token_logps_and_entropy(
                hidden / cfg["temperature"], output_weight(lm), row.targets
            )
        else:
            logps, _ = token_logps(hidden / cfg["temperature"], output_weight(lm), row.targets)
    return row, logps, entropy, policy.values(hidden)


def sample_groups(
    policy: PolicyWithValue, tokenizer: Any, prompts: list[PromptItem], cfg: dict[str, Any], seed: int | None
) -> list[Group]:
    """`completions_per_prompt` completions of each prompt: sampled, or greedy when `seed` is None."""
    n = cfg["completions_per_prompt"] if seed is not None else 1
    params = (
        SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], seed=seed)
        if seed is not None
        else SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=0.0)
    )
    was_training = policy.training
    policy.eval()
    completions: list[Completion] = []
    ids = [p.prompt_ids for p in prompts for _ in range(n)]
    for start in range(0, len(ids), 32):
        completions += sample(policy.lm, tokenizer, ids[start : start + 32], params)  # type: ignore[arg-type]
    policy.train(was_training)
    blocks = [completions[k * n : (k + 1) * n] for k in range(len(prompts))]
    return [Group(p, block, [c.trained_ids for c in block]) for p, block in zip(prompts, blocks, strict=True)]


def score_groups(
    reward_model: RewardModel, rm_tokenizer: Any, groups: list[Group], cfg: dict[str, Any]
) -> None:
    """The reward model's score of every completion: its text as the answer to the prompt, through the
    reward model's own tokenizer and chat template, so the score is read at the end-of-turn token as in
    its training (a completion cut at max_new_tokens is scored as if it ended there)."""
    pairs = [
        tokenize_feedback(rm_tokenizer, FeedbackExample(g.prompt.line, g.prompt.messages, [
            {"role": "assistant", "content": c.text}]))[0]
        for g in groups for c in g.completions
    ]  # fmt: skip
    scores = [
        s for s, _ in score_pairs(reward_model, pairs, cfg["micro_batch_tokens"], cfg["precision"] == "bf16")
    ]
    for g in groups:
        g.scores, scores = scores[: len(g.answers)], scores[len(g.answers) :]


@torch.no_grad()
def fill_rollout(
    policy: PolicyWithValue, groups: list[Group], cfg: dict[str, Any], device: torch.device
) -> None:
    """Log-probs and values of every completion token under the policy that sampled them, and the
    reference model's log-probs; no gradient."""
    for row_groups in plan_rows(groups, cfg["micro_batch_tokens"]):
        row, logps, _, values = packed_forward(policy, row_groups, cfg, device)
        _, ref_logps, _, _ = packed_forward(policy, row_groups, cfg, device, reference=True)
        split = zip(per_group(logps, row, row_groups), per_group(values, row, row_groups),
                    per_group(ref_logps, row, row_groups), strict=True)  # fmt: skip
        for g, (old, old_values, ref) in zip(row_groups, split, strict=True):
            g.old_logps, g.old_values, g.ref_logps = old, old_values, ref


def fill_advantages(groups: list[Group], kl_coef: float, cfg: dict[str, Any]) -> None:
    """Per-token KL-penalty rewards with the score at the end, GAE, and whitening over the batch."""
    completions = [(g, j) for g in groups for j in range(len(g.answers))]
    rewards = []
    for g, j in completions:
        score = g.scores[j] - (
            cfg["missing_eos_penalty"] if g.completions[j].finish_reason == "length" else 0
        )
        rewards.append(kl_penalty_rewards(g.old_logps[j], g.ref_logps[j], score, kl_coef))
    lengths = [len(r) for r in rewards]
    advantages, returns = gae(  # zero-padded: the padding leaves every completion's values unchanged
        pad_sequence(rewards, batch_first=True),
        pad_sequence([g.old_values[j] for g, j in completions], batch_first=True),
        cfg["gamma"],
        cfg["lam"],
    )  # (B, T)
    flat_advantages = torch.cat([a[:n] for a, n in zip(advantages, lengths, strict=True)])
    if cfg["whiten_advantages"]:
        flat_advantages = whiten(flat_advantages)
    per_answer_advantages = list(flat_advantages.split(lengths))
    for k, (g, _) in enumerate(completions):
        g.advantages.append(per_answer_advantages[k])
        g.returns.append(returns[k, : lengths[k]])


def minibatch_backward(
    policy: PolicyWithValue,
    groups: list[Group],
    cfg: dict[str, Any],
    device: torch.device,
    sums: dict[str, float],
) -> None:
    """Gradients of one minibatch's loss: the clipped surrogate + vf_coef x the clipped value loss, each a
    mean over the minibatch's tokens (however they are split into packed rows)."""
    n_tokens = sum(len(a) for g in groups for a in g.answers)
    for row_groups in plan_rows(groups, cfg["micro_batch_tokens"]):
        row, logps, entropy, values = packed_forward(policy, row_groups, cfg, device, with_entropy=True)
        assert entropy is not None
        old_logps, old_values, advantages, returns = (
            torch.cat([t for g in row_groups for t in getattr(g, name)]).to(logps)
            for name in ("old_logps", "old_values", "advantages", "returns")
        )
        policy_losses, clipped = clipped_surrogate(
            logps, old_logps, advantages, cfg["cliprange"], cfg["cliprange"]
        )
        value_losses, value_clipped = value_loss(values, old_values, returns, cfg["cliprange_value"])
        ((policy_losses.sum() + cfg["vf_coef"] * value_losses.sum()) / n_tokens).backward()
        log_ratio = logps.detach() - old_logps
        for name, value in (("policy_loss", policy_losses), ("value_loss", value_losses), ("clipped", clipped),
                            ("value_clipped", value_clipped), ("approx_kl", 0.5 * log_ratio**2),
                            ("entropy", entropy)):  # fmt: skip
            sums[name] = sums.get(name, 0.0) + float(value.detach().float().sum())
        sums["tokens"] = sums.get("tokens", 0.0) + len(logps)
        sums["row_tokens"] = sums.get("row_tokens", 0.0) + row.n_tokens


@torch.no_grad()
def sequence_kl(
    policy: PolicyWithValue, groups: list[Group], cfg: dict[str, Any], device: torch.device
) -> list[float]:
    """Exact KL(policy || reference) of the next-token distributions, summed over each completion's tokens
    (every vocabulary entry, not a sampled estimate: greedy answers are not samples of the policy)."""
    out: list[float] = []
    weight = output_weight(policy.lm)
    for row_groups in plan_rows(groups, cfg["micro_batch_tokens"]):
        row = pack_branches([g.segment() for g in row_groups])
        with autocast(cfg["precision"], device):
            hidden = final_hidden(policy.lm, row)[row.positions] / cfg["temperature"]
            with policy.lm.disable_adapter():  # type: ignore[operator]
                ref_hidden = final_hidden(policy.lm, row)[row.positions] / cfg["temperature"]
        per_token = torch.cat([
            F.kl_div(  # sum_v p_v (log p_v - log q_v), with the reference q as `input`
                F.log_softmax((r @ weight.T.to(r.dtype)).float(), -1),
                F.log_softmax((h @ weight.T.to(h.dtype)).float(), -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            for h, r in zip(hidden.split(256), ref_hidden.split(256), strict=True)
        ])  # fmt: skip
        sums = torch.zeros(row.n_sequences).index_add(0, row.sequence, per_token.cpu())
        out += sums.tolist()
    return out


@torch.no_grad()
def evaluate(
    policy: PolicyWithValue,
    reward_model: RewardModel,
    rm_tokenizer: Any,
    tokenizer: Any,
    prompts: list[PromptItem],
    cfg: dict[str, Any],
    device: torch.device,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to held-out prompts: their mean reward-model score, KL to the reference, length."""
    groups = sample_groups(policy, tokenizer, prompts, cfg, seed=None)
    score_groups(reward_model, rm_tokenizer, groups, cfg)
    kls = sequence_kl(policy, groups, cfg, device)
    completions = [g.completions[0] for g in groups]
    scores = [g.scores[0] for g in groups]
    metrics = {
        "valid_score_mean": sum(scores) / len(scores),
        "valid_kl": sum(kls) / len(kls),
        "valid_completion_length": sum(len(c.token_ids) for c in completions) / len(completions),
        "valid_truncated_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }
    shown = [
        {"line": p.line, "prompt": p.messages[-1]["content"], "completion": c.text, "score": s}
        for p, c, s in list(zip(prompts, completions, scores, strict=True))[: cfg["log_samples"]]
    ]
    return metrics, shown


# --- train -----------------------------------------------------------------------------------------------


def train(cfg: PPOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    keep_freed_memory()
    world = distributed.setup()
    if world.distributed:
        distributed.teardown(world)
        raise TuneryError("PPO runs in one process for now; start it without torchrun")
    run_dir = Path(cfg.out)
    energy = EnergyMeter.for_run(cfg, run_dir, world, resume)  # probes the hardware while the run sets up
    prepare_run_dir(run_dir, resume, overwrite)
    if not resume:  # a resumed run trains on the data screened at its start
        screen_run_data({"train": cfg.data, "valid": cfg.valid}, cfg.screen_content, cfg.screen_pii, run_dir)
    paths = screened_paths(run_dir, {"train": cfg.data, "valid": cfg.valid})
    if resume:
        check_same_data(run_dir, cfg)
    reward_model, rm_tokenizer, _ = load_reward_model(cfg.reward_model)
    lm: Any
    lm, tokenizer = load_model(cfg.model)
    if cfg.adapter:
        lm = merge_adapter(lm, cfg.adapter)
    train_prompts, too_long = load_prompt_data(paths["train"], tokenizer, cfg.max_prompt_length)
    valid_prompts = load_prompt_data(paths["valid"], tokenizer, cfg.max_prompt_length)[0] if cfg.valid else []
    if too_long:
        log.warning("skipped %d prompts longer than max_prompt_length=%d (lines %s)", len(too_long),
                    cfg.max_prompt_length, ", ".join(map(str, too_long[:10])))  # fmt: skip
    resolved = resolve_common(
        cfg, len(train_prompts), world, BASE_LR_LORA, auto.fixed_batch(8, "8 prompts per step")
    )
    epochs = 1 if cfg.epochs == "auto" else int(cfg.epochs)
    total_steps = epochs * math.ceil(len(train_prompts) / resolved["batch_size"])
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    resolved.update(
        epochs=epochs,
        total_steps=total_steps,
        eval_every=cfg.eval_every or max(1, total_steps // 10),
        save_every=cfg.save_every or max(1, math.ceil(total_steps / 5)),
        reward_model_sha256=_reward_model_digest(cfg.reward_model),
    )
    if not resume:
        atomic_write_yaml(run_dir / "config.yaml", resolved)
        tokenizer.save_pretrained(run_dir / "tokenizer")
    batch_size = resolved["batch_size"]

    torch.manual_seed(cfg.seed)  # LoRA initialisation
    lm = apply_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    reward_model.requires_grad_(False)
    if resolved["precision"] == "bf16":
        cast_frozen(lm, torch.bfloat16)
        cast_frozen(reward_model.lm, torch.bfloat16)
    policy = PolicyWithValue(lm, lm.config.hidden_size)
    torch.nn.Module.to(policy, world.device)
    torch.nn.Module.to(reward_model, world.device)
    reward_model.eval()
    policy.train()
    lora_params = [p for p in lm.parameters() if p.requires_grad]
    head_params = list(policy.value_head.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": lora_params, "lr_ratio": 1.0}, {"params": head_params, "lr_ratio": cfg.value_lr_ratio}],
        lr=resolved["lr"],
        weight_decay=cfg.weight_decay,
    )
    trainable = lora_params + head_params
    start_step, tokens_seen, train_seconds, metrics = restore(run_dir, policy, optimizer, resume, world)
    assert metrics is not None
    # The KL coefficient adapts when kl_target is set: checkpoints keep it, and the completions count.
    kl_coef, completions_done = cfg.kl_coef, 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        kl_coef, completions_done = state["kl_coef"], state["completions"]
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    log.info(
        "ppo: %d prompts (%d held out); %d steps of %d prompts x %d completions, %d epochs x %d minibatches; "
        "%s trainable parameters; %s",
        len(train_prompts), len(valid_prompts), total_steps, batch_size, cfg.completions_per_prompt,
        cfg.ppo_epochs, cfg.num_minibatches, f"{sum(p.numel() for p in trainable):,}", resolved["precision"],
    )  # fmt: skip
    samples_path = run_dir / "samples.jsonl"
    eval_prompts = valid_prompts[: cfg.eval_examples]

    def run_eval(step: int) -> dict[str, float]:
        valid_metrics, shown = evaluate(
            policy, reward_model, rm_tokenizer, tokenizer, eval_prompts, resolved, world.device
        )
        with samples_path.open("a") as fh:
            for s in shown:
                fh.write(json.dumps({"step": step, **s}) + "\n")
        return valid_metrics

    wall_start = time.monotonic()
    if eval_prompts and start_step == 0:  # the starting point, to compare every later evaluation with
        metrics.write({"step": 0, "total_steps": total_steps, **run_eval(0)})
    step = start_step
    with (
        GracefulStop() as stop,
        StepProgress(total_steps, start_step, "ppo", enabled=True) as progress,
        energy,
    ):
        while step < total_steps:
            t0 = time.monotonic()
            prompts = [train_prompts[i] for i in step_indices(step, len(train_prompts), batch_size, cfg.seed)]
            groups = sample_groups(policy, tokenizer, prompts, resolved, seed=cfg.seed * 1_000_003 + step)
            sample_seconds = time.monotonic() - t0
            score_groups(reward_model, rm_tokenizer, groups, resolved)
            fill_rollout(policy, groups, resolved, world.device)
            fill_advantages(groups, kl_coef, resolved)

            lr = lr_at(step, total_steps, resolved["lr"], warmup_steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_ratio"]
            sums: dict[str, float] = {}
            grad_norm = 0.0
            minibatch_size = math.ceil(len(groups) / cfg.num_minibatches)
            for epoch in range(cfg.ppo_epochs):
                shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_000 + epoch)
                order = torch.randperm(len(groups), generator=shuffle).tolist()
                for start in range(0, len(groups), minibatch_size):
                    minibatch = [groups[i] for i in order[start : start + minibatch_size]]
                    minibatch_backward(policy, minibatch, resolved, world.device, sums)
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(
                            trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                        )
                    )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds = time.monotonic() - t0
            train_seconds += step_seconds
            tokens_seen += int(sums["row_tokens"])
            completions = [c for g in groups for c in g.completions]
            completions_done += len(completions)

            scores = torch.tensor([s for g in groups for s in g.scores])
            penalties = torch.tensor(
                [cfg.missing_eos_penalty * (c.finish_reason == "length") for c in completions]
            )
            kls = torch.tensor(
                [float((o - r).sum()) for g in groups for o, r in zip(g.old_logps, g.ref_logps, strict=True)]
            )
            old_values = torch.cat([v for g in groups for v in g.old_values])
            returns = torch.cat([r for g in groups for r in g.returns])
            n = sums["tokens"]
            record: dict[str, Any] = {
                "step": step,
                "total_steps": total_steps,
                "train_score_mean": float(scores.mean()),
                "train_score_std": float(scores.std(unbiased=False)),
                "kl": float(kls.mean()),  # summed per completion (k1), mean over completions
                "non_score_reward": float(-kl_coef * kls.mean()),
                "train_reward_mean": float((scores - penalties - kl_coef * kls).mean()),
                "kl_coef": kl_coef,
                "policy_loss": sums["policy_loss"] / n,
                "value_loss": sums["value_loss"] / n,
                "clip_fraction": sums["clipped"] / n,
                "value_clip_fraction": sums["value_clipped"] / n,
                "approx_kl": sums["approx_kl"] / n,
                "entropy": sums["entropy"] / n,
                "explained_variance": explained_variance(old_values, returns),
                "value_mean": float(old_values.mean()),
                "completion_length": sum(len(c.token_ids) for c in completions) / len(completions),
                "truncated_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "completions_per_second": len(completions) / step_seconds,
                "sample_seconds": sample_seconds,
                "step_seconds": step_seconds,
            }
            if cfg.kl_target is not None:
                kl_coef = adaptive_kl_coef(
                    kl_coef, record["kl"], cfg.kl_target, len(completions), cfg.kl_horizon
                )
            if eval_prompts and (step % resolved["eval_every"] == 0 or step == total_steps):
                record.update(run_eval(step))
            metrics.write(record)
            progress.update(
                step,
                f"score {record['train_score_mean']:.3f} kl {record['kl']:.2f}"
                + (f" valid {record['valid_score_mean']:.3f}" if "valid_score_mean" in record else "")
                + f" len {record['completion_length']:.0f} {record['completions_per_second']:.2f} compl/s",
            )
            fault_point("after_step", step)
            counters = {"tokens": tokens_seen, "train_seconds": train_seconds, "kl_coef": kl_coef,
                        "completions": completions_done, "energy": energy.so_far()}  # fmt: skip
            checkpoint_or_stop(run_dir, step, resolved, policy, optimizer, counters, stop, world, "ppo")

    # --- finish: final weights, summary, model card --------------------------------------------------------
    metrics.close()
    base_adapter = adapter_dir(cfg.adapter) if cfg.adapter and isinstance(lm, PeftModel) else None
    meta = {"base_model": cfg.model, "method": "ppo", "adapter": cfg.adapter, "config": resolved}
    save_final(run_dir, policy, tokenizer, meta, base_adapter=str(base_adapter) if base_adapter else None)
    safety_flags = evaluate_run(
        lm,
        tokenizer,
        size=cfg.safety_evals,
        run_dir=run_dir,
        base_name=cfg.model,
        adapter=cfg.adapter,
        train_path=None,
        seed=cfg.seed,
    )
    summary = run_summary(
        "ppo",
        cfg,
        run_dir,
        total_steps,
        tokens_seen,
        wall_start,
        train_seconds,
        world,
        last_metrics(run_dir, ("train_", "valid_", "kl", "non_score_reward", "completion_length")),
        completions=completions_done,
        completions_per_second=round(completions_done / max(train_seconds, 1e-9), 3),
        start_valid_score_mean=_first_eval(run_dir),
        train_examples=len(train_prompts),
        valid_examples=len(valid_prompts),
        energy=energy.record(),
        safety_flags=safety_flags,
    )
    atomic_write_json(run_dir / "summary.json", summary)
    write_model_card(run_dir)
    distributed.teardown(world)
    return summary


def _first_eval(run_dir: Path) -> float | None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 0 and "valid_score_mean" in record:
            return float(record["valid_score_mean"])
    return None


def _reward_model_digest(path: str) -> str | None:
    """The reward head's digest: what a run was scored by."""
    head = Path(path) / "final" / "score.safetensors"
    return file_digest(str(head if head.is_file() else Path(path) / "score.safetensors"))


def run(
    config_path: str | None, overrides: dict[str, Any], resume_dir: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Entry point of `tunery train ppo`: builds the config (YAML, then flags) and trains."""
    if resume_dir:
        return train(resumed_config(PPOConfig, resume_dir), resume=True)
    return train(build_config(PPOConfig, config_path, overrides), overwrite=overwrite)
