"""Each method's config: its own fields on top of the shared ones (tunery/run/config.py), and its checks.
Torch-free, so `tunery train METHOD --help` and the CLI's early checks never load a model library. A
field's comment is its --help text; a redeclared shared field changes only its default for the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tunery.errors import TuneryError
from tunery.graders.template import check_template
from tunery.run.config import ChatEvalFields, HeldOutFields, RunConfig, SamplingFields

DPO_LOSSES = ("dpo", "ipo", "simpo")


def _check_pair_fits_a_row(cfg: RewardConfig | DPOConfig | KTOConfig) -> None:
    """The pair methods pack a prompt and both its answers into one row of at most micro_batch_tokens."""
    if cfg.micro_batch_tokens < cfg.max_length:
        raise TuneryError("micro_batch_tokens must be >= max_length (a pair's sequences share one row)")


@dataclass
class SFTConfig(ChatEvalFields, HeldOutFields, RunConfig):
    """Supervised fine-tuning on OpenAI chat JSONL."""

    BASE_LR_LORA: ClassVar[float] = 2e-4
    BASE_LR_FULL: ClassVar[float] = 2e-5
    SHARDS: ClassVar[bool] = True

    micro_batch_tokens: int = 1024  # token budget of one packed forward pass
    warmup_ratio: float = 0.05  # share of the steps the learning rate warms up over


@dataclass
class RewardConfig(HeldOutFields, RunConfig):
    """A reward model from comparisons (OpenAI DPO format or {prompt, chosen, rejected}, optional margin)."""

    BASE_LR_LORA: ClassVar[float] = 1e-4  # LoRA and the score head
    BASE_LR_FULL: ClassVar[float] = 1e-5
    SHARDS: ClassVar[bool] = True

    center_coef: float = 0.0  # weight of the centring penalty (r_chosen + r_rejected)^2
    length_coef: float = 0.0  # weight of the penalty corr(score, answer length)^2 per micro-batch

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("center_coef", "length_coef"):
            if getattr(self, name) < 0:
                raise TuneryError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_pair_fits_a_row(self)


@dataclass
class DPOConfig(ChatEvalFields, HeldOutFields, RunConfig):
    """DPO and its family on comparisons (OpenAI DPO format or {prompt, chosen, rejected})."""

    BASE_LR_LORA: ClassVar[float] = 5e-5
    BASE_LR_FULL: ClassVar[float] = 1e-6  # DPO moves far with small updates
    SHARDS: ClassVar[bool] = True

    loss: str = "dpo"  # dpo | ipo | simpo
    beta: float | None = None  # None: 0.1 for dpo and ipo, 2.0 for simpo
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
    simpo_gamma: float = 1.0  # SimPO's target reward margin
    sft_weight: float = 0.0  # weight of the chosen answers' NLL added to the loss (RPO)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in DPO_LOSSES:
            raise TuneryError(f"loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        if self.beta is not None and self.beta <= 0:
            raise TuneryError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise TuneryError("label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.loss != "dpo":
            raise TuneryError("label_smoothing (conservative DPO) applies to loss dpo only")
        _check_pair_fits_a_row(self)

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.loss == "simpo" else 0.1)


@dataclass
class KTOConfig(ChatEvalFields, HeldOutFields, RunConfig):
    """KTO on thumbs-up / thumbs-down ratings ({prompt | messages, completion, label})."""

    BASE_LR_LORA: ClassVar[float] = 5e-5
    BASE_LR_FULL: ClassVar[float] = 1e-6  # as DPO: small updates move the policy far
    SHARDS: ClassVar[bool] = True

    beta: float = 0.1  # strength of the KL to the reference in the value function
    desirable_weight: float = 1.0  # loss weight of thumbs-up examples
    undesirable_weight: float = 1.0  # loss weight of thumbs-down examples

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise TuneryError(f"{name} must be > 0, got {getattr(self, name)}")
        _check_pair_fits_a_row(self)


@dataclass
class GRPOConfig(ChatEvalFields, SamplingFields, RunConfig):
    """GRPO and its variants on prompts (OpenAI reinforcement format), scored by a grader."""

    BASE_LR_LORA: ClassVar[float] = 2e-5
    BASE_LR_FULL: ClassVar[float] = 1e-6
    SHARDS: ClassVar[bool] = True
    AUTO_EPOCHS: ClassVar[int | None] = 1

    batch_size: int | str = "auto"  # prompts per step; auto: 4
    micro_batch_tokens: int = 4096  # token budget of one packed forward pass
    warmup_ratio: float = 0.05  # share of the steps the learning rate warms up over
    schedule: str = "constant"  # cosine | linear | constant
    eval_examples: int = 200  # held-out prompts per evaluation
    grader: str = ""  # grader JSON file (OpenAI format) or file.py:function (a reward function)
    group_size: int = 8  # completions sampled per prompt
    shuffle: bool = True  # visit prompts in a seeded random order each epoch; False: file order
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # 0: no top-k cut
    loss_aggregation: str = "token"  # token (DAPO) | sequence (GRPO) | fixed (Dr. GRPO)
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    baseline: str = "mean"  # mean (GRPO) | rloo (leave-one-out)
    epsilon: float = 0.2  # clip range below 1
    epsilon_high: float | None = None  # clip range above 1 (None: epsilon; DAPO suggests 0.28)
    beta: float = 0.0  # weight of the KL to the reference in the loss
    num_iterations: int = 1  # optimizer updates per sampled batch
    mask_truncated: bool = False  # leave completions cut at max_new_tokens out of the loss
    warm_start: str = ""  # chat JSONL of replies in the format the grader asks for, trained on before RL
    warm_start_epochs: int = 3  # passes over warm_start
    guide: str = ""  # a reference reply from each prompt's fields, e.g. "{{item.answer}}": stands in for one completion of a group that scored below it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warm_start_epochs < 1:
            raise TuneryError("warm_start_epochs must be at least 1")
        if self.guide:
            check_template(self.guide, "guide")
            if "{{" not in self.guide or "sample." in self.guide:
                raise TuneryError(
                    'guide is a reference reply built from the prompt\'s fields, such as "{{item.answer}}"'
                )
        if not self.grader:
            raise TuneryError("no grader: pass --grader grader.json (OpenAI format) or file.py:function")
        if self.group_size < 2:
            raise TuneryError("group_size must be at least 2: advantages compare completions of a prompt")
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
            raise TuneryError("max_new_tokens and max_prompt_length must be positive")
        if self.temperature <= 0:
            raise TuneryError("temperature must be > 0: GRPO needs different completions to compare")
        choices = {
            "loss_aggregation": ("token", "sequence", "fixed"),
            "scale_rewards": ("group", "batch", "none"),
            "baseline": ("mean", "rloo"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TuneryError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise TuneryError("epsilon must be in (0, 1) and epsilon_high > 0")
        if self.beta < 0 or self.num_iterations < 1:
            raise TuneryError("beta must be >= 0, num_iterations >= 1 and max_steps >= 0")
        if self.beta > 0 and self.lora_rank == 0:
            raise TuneryError(
                "beta > 0 with full fine-tuning needs a reference copy; use LoRA (lora_rank > 0)"
            )
        if self.micro_batch_tokens < self.max_prompt_length + self.group_size * (self.max_new_tokens + 1):
            raise TuneryError(
                "micro_batch_tokens must hold one prompt and its group: at least max_prompt_length + "
                "group_size x (max_new_tokens + 1)"
            )

    @property
    def resolved_epsilon_high(self) -> float:
        return self.epsilon_high if self.epsilon_high is not None else self.epsilon


@dataclass
class PPOConfig(ChatEvalFields, SamplingFields, RunConfig):
    """PPO with a value head against a reward model, on prompts (OpenAI reinforcement format)."""

    BASE_LR_LORA: ClassVar[float] = 2e-5
    BASE_LR_FULL: ClassVar[float] = 2e-5  # unused: PPO trains LoRA only
    AUTO_EPOCHS: ClassVar[int | None] = 1

    batch_size: int | str = "auto"  # prompts per step; auto: 8
    lora_rank: int = 16  # must be > 0: the reference model is the adapter switched off
    micro_batch_tokens: int = 4096  # token budget of one packed forward pass
    warmup_ratio: float = 0.0  # share of the steps the learning rate warms up over
    schedule: str = "constant"  # cosine | linear | constant
    eval_examples: int = 200  # held-out prompts per evaluation
    reward_model: str = ""  # a reward model run directory (tunery train rm); any base model
    completions_per_prompt: int = 1  # answers sampled per prompt (they share the prompt's forward pass)
    value_lr_ratio: float = 10.0  # the value head learns at this x lr (critics learn faster)
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
    whiten_advantages: bool = True  # normalise advantages over the batch
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions cut at max_new_tokens

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
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


FEDERATED_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


@dataclass
class FederatedConfig(SFTConfig):
    """Federated SFT of one LoRA adapter over rounds (Flower): each site trains it on its own data for
    local_steps, the server aggregates. batch_size, lr and the schedule are a site's local steps'."""

    # simulation: the sites are simulated here (--clients or --data); deployment: they are machines of their
    # own that connect to `tunery federated server` (each `tunery federated client --data ...`)
    federation: str = "simulation"
    clients: list[str] = field(default_factory=list)  # one training JSONL per site (simulation)
    partition: str = "iid"  # with --data instead: iid (seeded random split) or field:NAME (a site per value)
    num_clients: int = 3  # sites: how many an iid partition makes; in a deployment, how many to wait for
    rounds: int = 3  # aggregation rounds
    local_steps: int = 2  # optimizer steps each site trains per round
    clients_per_round: int = 0  # sites sampled for each round (0: all)
    # fewest site results a round aggregates (0: half the sampled sites, rounded up); fewer: it is redone
    min_results: int = 0
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term (mu / 2) ||w - w_global||^2
    server_lr: float = 0.01  # fedadam, fedyogi: the server optimizer's learning rate (eta)
    dp_noise: float = 0.0  # differential privacy: Gaussian noise multiplier on the summed updates (0: off)
    dp_clip: float = 1.0  # differential privacy: each site's update is clipped to this L2 norm
    dp_delta: float = 1e-5  # differential privacy: the delta at which epsilon is reported (below 1 / sites)
    dp_max_epsilon: float = 0.0  # differential privacy: stop before a round would pass this epsilon (0: none)
    secure_aggregation: bool = False  # SecAgg+: the server sees only the sum of the sites' adapters
    client_cpus: int = 1  # simulation: CPU cores per virtual site (Flower's Ray backend)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank == 0:
            raise TuneryError("federated training exchanges a LoRA adapter: lora_rank must be > 0")
        if self.federation not in ("simulation", "deployment"):
            raise TuneryError(f"federation must be simulation or deployment, got {self.federation!r}")
        if self.federation == "deployment" and (self.clients or self.data):
            raise TuneryError(
                "in a deployment each site passes its own data (tunery federated client --data)"
            )
        if self.clients and self.data:
            raise TuneryError("pass either --clients (a file per site) or --data with --partition, not both")
        if not (self.partition == "iid" or self.partition.startswith("field:") and len(self.partition) > 6):
            raise TuneryError(f"partition must be iid or field:NAME, got {self.partition!r}")
        for name in ("rounds", "local_steps", "num_clients", "client_cpus"):
            if getattr(self, name) < 1:
                raise TuneryError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.clients_per_round < 0 or self.min_results < 0:
            raise TuneryError("clients_per_round and min_results must be >= 0 (0: the default)")
        if self.strategy not in FEDERATED_STRATEGIES:
            raise TuneryError(
                f"strategy must be one of {', '.join(FEDERATED_STRATEGIES)}, got {self.strategy!r}"
            )
        if self.proximal_mu < 0 or self.server_lr <= 0 or self.dp_noise < 0 or self.dp_clip <= 0:
            raise TuneryError("proximal_mu and dp_noise must be >= 0, server_lr and dp_clip > 0")
        if not 0 < self.dp_delta < 1 or self.dp_max_epsilon < 0:
            raise TuneryError("dp_delta must be between 0 and 1, dp_max_epsilon >= 0 (0: no limit)")
        if self.dp_noise > 0 and self.strategy not in ("fedavg", "fedprox"):
            raise TuneryError(
                "dp_noise works with strategy fedavg or fedprox: the noise is added to the strategy's result, "
                "and an adaptive server optimizer (fedadam, fedyogi) would stand between the sum and the noise"
            )
        if self.secure_aggregation and (self.dp_noise > 0 or self.strategy not in ("fedavg", "fedprox")):
            raise TuneryError(
                "secure aggregation works with strategy fedavg or fedprox and without dp_noise (server-side "
                "clipping needs each site's update, which secure aggregation hides)"
            )
        if self.early_stopping_patience:
            raise TuneryError(
                "early stopping is not available for federated runs yet; select_best keeps the best round"
            )


CONFIGS: dict[str, type[RunConfig]] = {
    "sft": SFTConfig,
    "rm": RewardConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "federated": FederatedConfig,
}
