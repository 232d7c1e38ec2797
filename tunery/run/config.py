"""A run's config: the fields every method shares, declared once, and how YAML and the command line set
them. Torch-free: the CLI builds its flags from these classes without loading a model library.

Each method's config (tunery/recipes/configs.py) is a dataclass that adds its own fields to `RunConfig`
and to the groups it uses (`HeldOutFields`, `ChatEvalFields`, `SamplingFields`). These classes hold
fields and their checks only, no behaviour. A field's comment is its `--help` text (`field_help`), so a
new shared knob is one line here: its YAML key, `--set` name and flag follow.

`Resolved` is what a run makes of `auto`: the numbers it trains with, recorded in config.yaml.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from tunery.errors import TuneryError

C = TypeVar("C")

PRECISIONS = ("auto", "bf16", "fp32")
QUANTIZE = ("none", "int8", "int4")  # --quantize (models/quantize.py)
SCHEDULES = ("cosine", "linear", "constant")
SAFETY_EVAL_SIZES = ("none", "quick", "default", "full")


# --- the shared fields ------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The fields every recipe has. Subclasses redeclare a field only to change its default."""

    # per method: the learning rate a multiplier of 1 means, with LoRA and for full fine-tuning, and the
    # epochs `auto` means (None: OpenAI's rule from the number of examples)
    BASE_LR_LORA: ClassVar[float] = 2e-4
    BASE_LR_FULL: ClassVar[float] = 2e-5
    AUTO_EPOCHS: ClassVar[int | None] = None
    SHARDS: ClassVar[bool] = False  # the method trains with --shard (training/sharding.py)

    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    adapter: str | None = None  # start from this fine-tuned adapter (e.g. an SFT run), merged into the base
    data: str = ""  # training JSONL in the method's format
    valid: str | None = None  # held-out JSONL in the same format
    out: str = ""  # run directory
    epochs: int | str = "auto"  # passes over the data, or auto
    max_steps: int = 0  # stop after this many steps (0: the epochs decide); the schedule ends there
    batch_size: int | str = "auto"  # examples per optimizer step, or auto
    lr: float | None = None  # absolute peak learning rate; overrides learning_rate_multiplier
    learning_rate_multiplier: float | str = "auto"  # times the method's base learning rate, or auto
    lora_rank: int = 16  # 0 means full fine-tuning
    lora_alpha: int = 32  # LoRA scaling numerator (the update is scaled by alpha / rank)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    lora_targets: str = "all-linear"  # or comma-separated module names, e.g. q_proj,v_proj
    quantize: str = "none"  # none | int8 | int4: the frozen base stored quantized under LoRA (QLoRA)
    memory_check: bool = True  # refuse a run whose estimated peak memory is above the free memory
    shard: bool = False  # under torchrun, --full: weights, gradients and optimizer state split (FSDP2)
    micro_batch_tokens: int = 2048  # token budget of one packed forward pass
    precision: str = "auto"  # bf16 | fp32 | auto (bf16 where the hardware runs it fast)
    seed: int = 0  # data order, LoRA initialisation and sampling
    warmup_ratio: float = 0.1  # share of the steps the learning rate warms up over
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_every: int = 0  # steps; 0 picks ~10 evaluations per run
    eval_examples: int = 64  # held-out examples in each periodic evaluation (all at the end)
    save_every: int = 0  # steps; 0 saves ~5 checkpoints per run
    keep_checkpoints: int = 3  # most recent checkpoints kept on disk
    screen_content: str = "warn"  # data screening (safety/screen.py), offensive lines: warn | block | redact
    screen_pii: str = "block"  # personal data: block | redact (mask it) | warn
    # the run's report: MODEL_CARD.md (safety/card.py) and energy (training/energy.py)
    intended_use: str = "not declared"  # what the model is for, and for whom
    limitations: str = "not declared"  # known weaknesses; uses to avoid
    risk_category: str = "undeclared"  # EU AI Act tier: minimal | limited | high ("unacceptable" is refused)
    track_energy: bool = True  # codecarbon's kWh and CO2e estimate, in summary.json and the card
    energy_country: str = "WORLD"  # ISO-3 code of the grid (FRA, USA, IND, ...); WORLD: world average
    cpu_power_watts: float | None = None  # the CPU's power in watts, if known, where there is no RAPL
    # experiment trackers (run/trackers.py): copies of metrics.jsonl, which stays the source of truth
    report_to: str = "none"  # tensorboard, mlflow, wandb (comma-separated), or none
    tracking_project: str = "tunery"  # the MLflow experiment and W&B project
    tracking_run_name: str | None = None  # the run's name there (default: the run directory's name)
    tracking_tags: str = ""  # comma-separated tags for MLflow and W&B
    mlflow_tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else mlflow.db beside the run dir
    wandb_entity: str | None = None  # the W&B team or user (online mode only)
    wandb_run_id: str | None = None  # the W&B run's id (default: a new one; --resume keeps the run's own)

    def __post_init__(self) -> None:
        check_run_fields(self)


@dataclass
class HeldOutFields:
    """The methods that score a validation loss: truncation, early stopping and best-weights selection."""

    max_length: int = 1024  # longer examples are truncated from the end
    early_stopping_patience: int = 0  # stop after this many evaluations without a lower valid_loss; 0: never
    early_stopping_min_delta: float = 0.0  # a valid_loss must be lower by more than this to count
    select_best: bool = True  # final/ from the evaluation with the lowest valid_loss (when there is --valid)


@dataclass
class ChatEvalFields:
    """The methods that train a chat model: before-vs-after evaluations at the end of the run."""

    # before-vs-after safety, bias, memorisation and diversity evaluations (safety/evals) into evals.json
    # and the model card: none | quick (~40 s on the bundled model) | default (~1.5 min) | full
    safety_evals: str = "quick"


@dataclass
class SamplingFields:
    """The methods that learn from sampled answers (GRPO, PPO)."""

    max_prompt_length: int = 512  # longer prompts are skipped, with a warning naming their lines
    max_new_tokens: int = 128  # completion budget; longer completions are cut ("truncated")
    temperature: float = 1.0  # sampling temperature; log-probs are of the same tempered policy
    log_samples: int = 4  # held-out completions written to samples.jsonl at each evaluation

    @property
    def max_length(self) -> int:  # what the shared checks look at
        return self.max_prompt_length + self.max_new_tokens


def check_run_fields(cfg: Any) -> None:
    """The checks of the shared fields, with messages a user can act on (`__post_init__` of a config)."""
    from tunery.models.locate import adapter_dir  # torch-free
    from tunery.run.trackers import check_report_to
    from tunery.safety.card import check_card_fields
    from tunery.safety.screen import check_policies
    from tunery.training.energy import check_energy_fields

    check_report_to(cfg.report_to)

    if not cfg.data and not getattr(cfg, "clients", None) and getattr(cfg, "federation", "") != "deployment":
        raise TuneryError("no training data: pass --data FILE.jsonl")
    if not cfg.out:
        raise TuneryError("no run directory: pass --out DIR")
    for name in ("epochs", "batch_size", "learning_rate_multiplier"):
        value = getattr(cfg, name)
        if value != "auto" and (isinstance(value, str) or value <= 0):
            raise TuneryError(f"{name} must be 'auto' or a positive number, got {value!r}")
    if cfg.max_steps < 0:
        raise TuneryError(f"max_steps must be >= 0 (0: the epochs decide), got {cfg.max_steps}")
    if cfg.lr is not None and not 0 < cfg.lr < 1:
        raise TuneryError(f"lr must be between 0 and 1, got {cfg.lr}")
    if cfg.lora_rank < 0:
        raise TuneryError("lora_rank must be >= 0 (0 means full fine-tuning)")
    check_quantize(cfg.quantize, cfg.lora_rank)
    check_shard(cfg)
    if cfg.max_length < 16:
        raise TuneryError("max_length must be at least 16 tokens")
    if cfg.micro_batch_tokens < 16:
        raise TuneryError("micro_batch_tokens must be at least 16")
    if cfg.precision not in PRECISIONS:
        raise TuneryError(f"precision must be bf16, fp32 or auto, got {cfg.precision!r}")
    if cfg.schedule not in SCHEDULES:
        raise TuneryError(f"schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise TuneryError("warmup_ratio must be in [0, 1)")
    check_energy_fields(cfg)
    check_card_fields(cfg)
    check_policies(cfg.screen_content, cfg.screen_pii)
    if cfg.adapter:  # before the run directory is made: a typo must not leave one behind
        adapter_dir(cfg.adapter)
    size = getattr(cfg, "safety_evals", "none")
    if size not in SAFETY_EVAL_SIZES:
        raise TuneryError(f"safety_evals must be none, quick, default or full, got {size!r}")
    patience = getattr(cfg, "early_stopping_patience", 0)
    if patience < 0 or getattr(cfg, "early_stopping_min_delta", 0.0) < 0:
        raise TuneryError("early_stopping_patience and early_stopping_min_delta must be >= 0")
    if patience and not cfg.valid:
        raise TuneryError("early stopping watches the validation loss: pass --valid FILE.jsonl")


def check_quantize(kind: str, lora_rank: int) -> None:
    """The config's check: a known kind, and LoRA (a quantized weight cannot be trained itself)."""
    if kind not in QUANTIZE:
        raise TuneryError(f"quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if kind != "none" and not lora_rank:
        raise TuneryError(
            f"quantize={kind} stores the frozen base quantized under LoRA; full fine-tuning (lora_rank 0 / "
            "--full) trains every weight and cannot: drop --quantize, or use --shard to spread full "
            "fine-tuning over several processes"
        )


def check_shard(cfg: Any) -> None:
    """--shard: full fine-tuning, in a method that shards."""
    if not cfg.shard:
        return
    method = type(cfg).__name__.removesuffix("Config").lower()
    if not cfg.SHARDS:
        raise TuneryError(
            f"--shard (sharded full fine-tuning) is for sft, dpo, kto, rm and grpo; {method} trains LoRA "
            "only: drop --shard"
        )
    if cfg.lora_rank:
        raise TuneryError(
            "--shard splits full fine-tuning's weights, gradients and optimizer state across processes; "
            "add --full (lora_rank 0), or drop --shard: LoRA's trained weights are small"
        )


# --- what `auto` became -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """The numbers a run trains with once every `auto` is filled in (config.yaml records them beside the
    config's fields). Components get these, not the config."""

    epochs: int
    batch_size: int  # examples per optimizer step, across all processes
    learning_rate_multiplier: float
    lr: float  # peak learning rate
    precision: str  # bf16 | fp32
    eval_every: int
    save_every: int
    total_steps: int
    world_size: int
    data_sha256: str | None
    valid_sha256: str | None

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> Resolved:
        """The resolved values config.yaml recorded when the run started (for a resumed run)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


# --- YAML, --set and flags into a config ------------------------------------------------------------------


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn YAML/CLI values into the field's type ('auto' stays a string where the type allows it)."""
    if typing.get_origin(annotation) is list:  # list[str]: a YAML list, or one value
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str | int | float) and not isinstance(item, bool) for item in items):
            raise TuneryError(f"config field '{name}': {value!r} is not a list of strings")
        return [str(item) for item in items]
    args = typing.get_args(annotation)
    options = (
        args
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    if value is None and type(None) in options:
        return None
    if isinstance(value, str) and value == "auto" and str in options:
        return value
    for option in options:
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif option in (int, float):
            if isinstance(value, bool):
                continue
            try:
                number = option(value)
            except (TypeError, ValueError):
                continue
            if option is int and isinstance(value, float) and value != int(value):
                continue
            return number
        elif option is str and isinstance(value, str | int | float):
            return str(value)
    raise TuneryError(f"config field '{name}': {value!r} is not a valid {annotation}")


def field_types(cls: type) -> dict[str, Any]:
    """Each config field's type, by name, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_config(
    cls: type[C], yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> C:
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise TuneryError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TuneryError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise TuneryError(f"{path}: expected a mapping of config fields")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise TuneryError(
            f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(hints))}"
        )
    coerced = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    return cls(**coerced)


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs (values parsed as YAML scalars; a value YAML cannot read, such as a
    template `{{item.answer}}`, is the string as written)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TuneryError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out[key.strip().replace("-", "_")] = value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# --- help text from the fields' comments ------------------------------------------------------------------


def field_help(cls: type) -> dict[str, str]:
    """Each field's comment, by name: the comment on its line, else the comment lines just above it. The
    most derived class that declares a field gives its comment (so a redeclared default brings its own)."""
    help_text: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not object:
            help_text.update(_class_comments(klass))
    return {f.name: help_text.get(f.name, "") for f in dataclasses.fields(cls)}


@functools.cache
def _class_comments(klass: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(klass))
    comments: dict[str, str] = {}
    above: list[str] = []
    line_of_field: dict[int, str] = {}
    own = set(getattr(klass, "__annotations__", {}))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if (
            tok.type == tokenize.NAME
            and tok.start[1] == 4
            and tok.string in own
            and tok.line.strip().startswith(tok.string + ":")
        ):
            line_of_field[tok.start[0]] = tok.string
            if above:
                comments[tok.string] = " ".join(above)
            above = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            name = line_of_field.get(tok.start[0])
            if name is not None:
                comments[name] = text  # the comment on the field's own line wins
            elif tok.start[1] == 4:
                above.append(text)
        elif tok.type == tokenize.NL and not tok.line.strip():
            above = []  # a blank line ends a block of comments
    return comments
