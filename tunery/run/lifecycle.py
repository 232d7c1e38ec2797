"""What every run does around its recipe's loop, once: set-up before it, the end of each step, and the
finish after it. Plain functions and a plain bundle of handles; the loop stays in the recipe:

    opened = open_run(cfg, resume, overwrite)           # run dir, screening, energy probe, model, tokenizer
    examples = load_...(opened.paths["train"], opened.tokenizer, ...)
    plan = resolve_run(cfg, len(examples), opened.world, auto_batch)   # every `auto` filled in
    run = start_run(opened, cfg, plan, with_lora(opened.model, cfg, plan))   # config.yaml, optimizer, restore
    with run.stop, run.progress, run.energy:
        while step < plan.total_steps:
            ...                                       # the method
            if end_step(run, step): break             # checkpoint, Ctrl-C, early stopping
    select_final_weights(run, step)                   # the best evaluation's weights, when there is one
    return finish_run(run, cfg, step, ...)            # final/, evaluations, summary.json, model card

A new cross-cutting feature (a tracker, a new file in the run directory) goes here, not in six recipes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from tunery.data.packing import Item, plan_rows, shard, step_indices
from tunery.errors import TuneryError
from tunery.models.load import load_model
from tunery.models.locate import adapter_dir
from tunery.models.lora import apply_lora, cast_frozen, join_projections, merge_adapter, resolve_precision
from tunery.models.native import native_layers
from tunery.models.quantize import quantize_base
from tunery.run import files
from tunery.run.config import ChatEvalFields, HeldOutFields, Resolved, RunConfig, build_config, to_dict
from tunery.run.trackers import Trackers, open_trackers
from tunery.safety.card import write_model_card
from tunery.safety.content import stop_worker
from tunery.safety.screen import screen_run_data, screened_paths
from tunery.training import auto, distributed, fit, memory, sharding
from tunery.training.checkpoint import CheckpointWriter, latest_checkpoint, load_checkpoint
from tunery.training.early_stopping import EarlyStopping, restore_best, resume_early_stopping, save_best
from tunery.training.energy import EnergyMeter
from tunery.training.faults import fault_point
from tunery.training.io import atomic_write_json
from tunery.training.memory import give_back_freed_memory, keep_freed_memory
from tunery.training.progress import StepProgress
from tunery.training.rundir import (
    check_same_data,
    file_digest,
    prepare_run_dir,
    resumed_config,
    save_final,
    unlock_run_dir,
)
from tunery.training.signals import GracefulStop

log = logging.getLogger("tunery")

C = TypeVar("C", bound=RunConfig)

# --- before the data is read ------------------------------------------------------------------------------


@dataclass
class Opened:
    """A run directory ready for training data: screened, with the starting model loaded."""

    world: distributed.World
    run_dir: Path
    resume: bool
    energy: EnergyMeter
    train_path: str  # the data to read: the screened copies when screening redacted lines
    valid_path: str | None
    model: Any  # the base model, with `adapter` merged in
    tokenizer: Any


def open_run(
    cfg: RunConfig,
    resume: bool,
    overwrite: bool,
    single_process: bool = False,
    train_here: bool = True,
    lock: bool = True,
) -> Opened:
    """Prepare the run directory, screen the data (a resumed run keeps what was screened at its start),
    start the energy meter's hardware probe and load the starting model. `train_here` False: the training
    data is screened and read where it is trained (a federation's sites), only `valid` here. `lock` False:
    the directory is not locked (`rundir.lock_run_dir`), for a federation's sites, whose directories are
    inside the federation's run (locked by its server) and whose rounds may run in any of its processes."""
    if cfg.shard:
        give_back_freed_memory()  # (memory.py)
    else:
        keep_freed_memory()
    world = distributed.setup()
    if single_process and world.distributed:
        distributed.teardown(world)
        raise TuneryError(f"{type(cfg).__name__[:-6]} runs in one process for now; start it without torchrun")
    run_dir = Path(cfg.out)
    if cfg.shard:
        if world.distributed:
            world = replace(world, sharded=True)
        else:
            log.warning("--shard splits the model across processes and has none to split across here; "
                        "start with torchrun --nproc_per_node N")  # fmt: skip
    precision = resolve_precision(cfg.precision, world.device)
    if cfg.memory_check:  # before anything is written or loaded
        try:
            fit.check_fit(cfg.model, fit.Setup.of(cfg, precision, world.size if world.sharded else 1),
                          world.device)  # fmt: skip
        except TuneryError:
            distributed.teardown(world)
            raise
    energy = EnergyMeter.for_run(cfg, run_dir, world, resume)  # probes the hardware while the run sets up
    data = {"train": cfg.data if train_here else None, "valid": cfg.valid}
    if world.is_main:
        prepare_run_dir(run_dir, resume, overwrite, lock=lock)
        try:
            if not resume:  # a resumed run trains on the data screened at its start
                screen_run_data(data, cfg.screen_content, cfg.screen_pii, run_dir)
        finally:
            stop_worker()
    distributed.barrier(world)
    paths = screened_paths(run_dir, data)
    if resume:
        check_same_data(run_dir, cfg)
    # with --shard only the main process reads the weights; the others receive their shards from it
    empty = world.sharded and not world.is_main
    bf16 = fit.loads_in_bf16(cfg.lora_rank, cfg.quantize, precision, bool(cfg.adapter))
    model, tokenizer = load_model(cfg.model, torch.bfloat16 if bf16 else torch.float32, empty=empty)
    if cfg.adapter and not empty:
        model = merge_adapter(model, cfg.adapter)
    return Opened(
        world, run_dir, resume, energy, paths.get("train", ""), paths.get("valid"), model, tokenizer
    )


def resolve_run(
    cfg: RunConfig, n_train: int, world: distributed.World, auto_batch: auto.AutoBatch = auto.openai_batch
) -> Resolved:
    """Every `auto` filled in, with a log line saying why; `auto_batch` is the method's batch-size rule."""
    base_lr = cfg.BASE_LR_LORA if cfg.lora_rank else cfg.BASE_LR_FULL
    if cfg.epochs != "auto":
        epochs = int(cfg.epochs)
    else:
        epochs = cfg.AUTO_EPOCHS if cfg.AUTO_EPOCHS is not None else auto.auto_epochs(n_train)
    choice = auto_batch(n_train) if cfg.batch_size == "auto" else None
    batch_size = choice.size if choice is not None else int(cfg.batch_size)
    batch_size = max(batch_size, world.size)  # every process needs at least one example per step
    multiplier = (
        auto.auto_lr_multiplier(n_train) * (choice.lr_scale if choice is not None else 1.0)
        if cfg.learning_rate_multiplier == "auto"
        else float(cfg.learning_rate_multiplier)
    )
    if choice is not None and world.is_main:
        log.info("batch_size auto: %d per step (%s)", batch_size, choice.why)
        if choice.lr_scale != 1.0 and cfg.learning_rate_multiplier == "auto" and cfg.lr is None:
            log.info(
                "learning rate auto: %.1e (%.0e x %g: the batch is %g times OpenAI's rule, the rate follows it)",
                base_lr * multiplier, base_lr, multiplier, choice.lr_scale,
            )  # fmt: skip
    precision = resolve_precision(cfg.precision, world.device)
    steps = auto.total_steps(n_train, batch_size, epochs)
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    return Resolved(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate_multiplier=multiplier,
        lr=cfg.lr if cfg.lr is not None else base_lr * multiplier,
        precision=precision,
        eval_every=cfg.eval_every or max(1, steps // 10),
        save_every=cfg.save_every or max(1, math.ceil(steps / 5)),
        total_steps=steps,
        world_size=world.size,
        data_sha256=file_digest(cfg.data or None),
        valid_sha256=file_digest(cfg.valid),
    )


def with_lora(model: Any, cfg: RunConfig, plan: Resolved) -> Any:
    """LoRA on `model` when `lora_rank` > 0, its frozen weights stored in bf16 when training in bf16, or
    quantized (`quantize`)."""
    torch.manual_seed(cfg.seed)  # LoRA initialisation (and whatever the recipe initialises next)
    if not cfg.lora_rank:
        return model
    quantize_base(model, cfg.quantize, torch.bfloat16 if plan.precision == "bf16" else torch.float32)
    model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if plan.precision == "bf16":
        cast_frozen(model, torch.bfloat16)
        native_layers(model)  # RMS norms and SwiGLU on native kernels where this CPU has them
    return model


# --- the handles a loop needs -----------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop uses besides its data. Counters the loop advances live here too, so a
    checkpoint and the summary read them from one place."""

    world: distributed.World
    run_dir: Path
    resume: bool
    plan: Resolved
    record: dict[str, Any]  # config.yaml's content: the config's fields and the resolved values
    model: torch.nn.Module  # what is trained and saved (sharded in place with --shard)
    ddp_model: torch.nn.Module  # the same, wrapped for DDP when there are several processes and no --shard
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    metrics: files.MetricsLog | None  # the main process's
    trackers: Trackers  # --report-to: TensorBoard, MLflow, W&B (the main process's; none elsewhere)
    early: EarlyStopping | None  # the methods that score a validation loss
    energy: EnergyMeter
    stop: GracefulStop
    progress: StepProgress
    train_path: str
    start_step: int
    warmup_steps: int
    keep_checkpoints: int
    select_best: bool  # final/ from the best evaluation (the methods that score a validation loss)
    resumed_state: dict[str, Any] = field(default_factory=dict)  # the checkpoint's state.json, if resumed
    saves: CheckpointWriter = field(default_factory=CheckpointWriter)  # the main process's checkpoints
    whole: list[torch.nn.Parameter] = field(default_factory=list)  # --shard: the weights left unsharded
    tokens_seen: int = 0
    train_seconds: float = 0.0
    wall_start: float = field(default_factory=time.monotonic)


def start_run(
    opened: Opened,
    cfg: RunConfig,
    plan: Resolved,
    model: torch.nn.Module,
    *,
    method: str,
    config_extra: dict[str, Any] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> Run:
    """Record config.yaml (config fields, resolved values, `config_extra`: what the method resolved), put
    the model on its device, build the optimizer (AdamW over the trainable weights, or `param_groups`),
    and restore the latest checkpoint when resuming."""
    world, run_dir = opened.world, opened.run_dir
    record = {**to_dict(cfg), **to_dict(plan), **(config_extra or {})}
    if world.is_main and not opened.resume:
        files.write_config(run_dir, record)
        opened.tokenizer.save_pretrained(run_dir / "tokenizer")
    model.train()
    # sharded before the optimizer sees the weights, and before moving: on a GPU, fully_shard moves only
    # each process's shards there, and the .to() below the whole weights (embedding, output layer)
    whole = sharding.shard_model(model, world.device) if world.sharded else []
    torch.nn.Module.to(model, world.device)
    join_projections(model)  # LoRA's q|k|v and gate|up as one GEMM each, their weights stacked where they are
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: Any = param_groups if param_groups is not None else trainable
    optimizer = adamw(groups, plan.lr, cfg.weight_decay, fused=not world.sharded)
    ddp_model: torch.nn.Module = (
        DistributedDataParallel(model) if world.distributed and not world.sharded else model
    )

    state: dict[str, Any] = {}
    checkpoint = latest_checkpoint(run_dir) if opened.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        if world.is_main:
            log.info("resuming %s from %s", run_dir, checkpoint.name)
    start_step = int(state.get("step", 0))
    metrics = (
        files.MetricsLog(run_dir, resume_step=start_step if opened.resume else None)
        if world.is_main
        else None
    )
    trackers = (
        open_trackers(
            run_dir,
            cfg.report_to,
            record,
            start_step if opened.resume else None,
            project=cfg.tracking_project,
            run_name=cfg.tracking_run_name,
            tags=cfg.tracking_tags,
            mlflow_tracking_uri=cfg.mlflow_tracking_uri,
            wandb_entity=cfg.wandb_entity,
            wandb_run_id=cfg.wandb_run_id,
        )
        if world.is_main
        else Trackers([])
    )
    early = (
        resume_early_stopping(run_dir, cfg, opened.resume, world) if isinstance(cfg, HeldOutFields) else None
    )
    return Run(
        world=world,
        run_dir=run_dir,
        resume=opened.resume,
        plan=plan,
        record=record,
        model=model,
        ddp_model=ddp_model,
        tokenizer=opened.tokenizer,
        optimizer=optimizer,
        trainable=trainable,
        metrics=metrics,
        trackers=trackers,
        early=early,
        energy=opened.energy,
        stop=GracefulStop(),
        progress=StepProgress(plan.total_steps, start_step, method, enabled=world.is_main),
        train_path=opened.train_path,
        start_step=start_step,
        warmup_steps=round(cfg.warmup_ratio * plan.total_steps),
        keep_checkpoints=cfg.keep_checkpoints,
        select_best=isinstance(cfg, HeldOutFields) and cfg.select_best,
        resumed_state=state,
        whole=whole,
        tokens_seen=int(state.get("tokens", 0)),
        train_seconds=float(state.get("train_seconds", 0.0)),
    )


Logps = dict[int, tuple[float, float]]  # line -> two summed log-probs (e.g. chosen and rejected)


class _FusedAdamW(torch.optim.AdamW):
    """AdamW on torch's fused kernel, which updates the weights without advancing their version counters
    (an in-place op on a list of tensors): advanced here after each step, since they are how the decoding
    engine knows that the weights it samples with changed (models/decode.py `weights_version`; without it
    GRPO sampled from its first policy throughout, test_families)."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = super().step(closure)
        torch.autograd.graph.increment_version(
            [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        )
        return loss


def adamw(params: Any, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """The run's optimizer: AdamW, with torch's fused kernel (one call updates every weight) where torch
    has one for the weights' device and `fused` (not over sharded weights). On CPU torch's default is a
    Python loop of ~10 operators a weight: SmolLM2-135M's 420 LoRA matrices took 25 ms a step that way,
    4.5 ms fused. The same update to float rounding; a checkpoint saved either way resumes with the
    choice it was saved with."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    weights = [p for group in groups for p in group["params"]]
    kernels = torch.utils._foreach_utils._get_fused_kernels_supported_devices()
    if fused and all(
        type(p) is torch.nn.Parameter and p.device.type in kernels and p.is_floating_point() for p in weights
    ):
        return _FusedAdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def cached_reference(
    run: Run, compute: Callable[[], tuple[Logps, Logps]], what: str
) -> tuple[Logps, Logps, float]:
    """The reference model's log-probs of the train and valid examples, and the seconds they took:
    computed once before the first update (`compute`, while the policy still is the reference) into
    DIR/reference_logps.json, and read back from there by a resumed run."""
    path = run.run_dir / "reference_logps.json"
    if run.resume:
        if not path.is_file():
            raise TuneryError(
                f"cannot resume {run.run_dir}: reference_logps.json is missing; start a new run"
            )
        saved = json.loads(path.read_text())
        train, valid = ({int(k): (v[0], v[1]) for k, v in saved[part].items()} for part in ("train", "valid"))
        return train, valid, 0.0
    t0 = time.monotonic()
    train, valid = compute()
    seconds = time.monotonic() - t0
    if run.world.is_main:
        atomic_write_json(path, {"train": train, "valid": valid})
        log.info("reference log-probs of %s in %.0f s", what, seconds)
    return train, valid, seconds


def announce(run: Run, message: str, *args: Any) -> None:
    """The run's opening log line (main process): the recipe's `message`, then the number of trainable
    parameters and the precision."""
    if run.world.is_main:
        n_trainable = f"{sum(p.numel() for p in run.trainable):,}"
        log.info(message + "; %s trainable parameters; %s", *args, n_trainable, run.plan.precision)


# --- inside the loop --------------------------------------------------------------------------------------


def set_lr(run: Run, step: int, schedule: str) -> float:
    """The scheduled learning rate of `step`, set on every parameter group (scaled by a group's
    `lr_ratio` when it has one); returns it."""
    from tunery.training.schedule import lr_at

    lr = lr_at(step, run.plan.total_steps, run.plan.lr, run.warmup_steps, schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    return lr


@dataclass
class StepBatch(Generic[Item]):
    """One optimizer step's examples: `items`, the same on every process, and this process's `rows` of
    them, each as (its items, its weight in the step, the context its backward runs in). A process that
    a short last batch leaves no example runs one that counts for nothing (weight 0), so it still joins
    the gradient all-reduce; so does a padding row of a sharded model (`distributed.even_rows`)."""

    items: list[Item]
    rows: list[tuple[list[Item], float, contextlib.AbstractContextManager[None]]]


def step_batch(
    run: Run, examples: list[Item], step: int, seed: int, micro_batch_tokens: int
) -> StepBatch[Item]:
    """Step `step`'s examples, this process's share packed into rows of at most `micro_batch_tokens`."""
    batch = [examples[i] for i in step_indices(step, len(examples), run.plan.batch_size, seed)]
    mine = shard(batch, run.world.rank, run.world.size)
    weight = 1.0 if mine else 0.0
    rows = distributed.even_rows(plan_rows(mine or batch[:1], micro_batch_tokens), run.world)
    return StepBatch(
        batch,
        [
            (items, weight * counted, distributed.grads_sync(run.ddp_model, run.world, k == len(rows) - 1))
            for k, (items, counted) in enumerate(rows)
        ],
    )


def optimizer_step(run: Run, step: int, grad_clip: float, schedule: str) -> tuple[float, float]:
    """Set the scheduled learning rate and `update`; returns the learning rate and the gradient norm
    before clipping."""
    lr = set_lr(run, step, schedule)
    return lr, update(run, grad_clip)


def update(run: Run, grad_clip: float) -> float:
    """Clip the gradients (0: no clipping), step and zero them; returns the gradient norm before
    clipping. With --shard, the whole weights' gradients are averaged over the processes first."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    if run.world.sharded:
        sharding.average_replicated(run.whole, run.world.size)
        grad_norm = sharding.clip_grad_norm(run.trainable, max_norm)
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.trainable, max_norm))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def step_record(
    run: Run, step: int, lr: float, grad_norm: float, tokens: float, started: float
) -> tuple[dict[str, Any], float]:
    """Close optimizer step `step` (counted from 1): add its tokens (summed over processes) and seconds
    to the run's counters. Returns the fields every method's step record starts with, and the step's
    seconds, for the method's own rates."""
    tokens = distributed.all_sum([tokens], run.world)[0]
    seconds = time.monotonic() - started
    run.tokens_seen += int(tokens)
    run.train_seconds += seconds
    record = {
        files.STEP: step,
        files.TOTAL_STEPS: run.plan.total_steps,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens": run.tokens_seen,
        "tokens_per_second": tokens / seconds,
    }
    return record, seconds


def evaluates_after(run: Run, step: int) -> bool:
    """Whether the held-out evaluation runs after step `step` (counted from 1): every `eval_every` steps
    and after the last."""
    return step % run.plan.eval_every == 0 or step == run.plan.total_steps


def log_metrics(run: Run, record: dict[str, Any]) -> None:
    """A record to metrics.jsonl, and a copy to the trackers (--report-to)."""
    if run.metrics is not None:
        run.metrics.write(record)
        run.trackers.log(record)


def held_out_loss(run: Run, step: int, valid_loss: float) -> None:
    """Tell early stopping about an evaluation; keep the weights when they are the best so far."""
    assert run.early is not None
    if run.early.update(step, valid_loss) and run.select_best:
        save_best(run.run_dir, run.model, step, run.world)


def shown_line(record: dict[str, Any], parts: tuple[str, ...]) -> str:
    """The progress line: `parts` are format templates over the step's record, e.g. "loss {train_loss:.3f}".
    A part naming a `valid...` metric the record lacks (no evaluation at this step) is left out; any other
    missing name is an error."""
    shown = []
    for part in parts:
        names = [name for _, name, _, _ in string.Formatter().parse(part) if name]
        if any(name.startswith(files.VALID_PREFIX) and name not in record for name in names):
            continue
        shown.append(part.format_map(record))
    return " ".join(shown)


def end_step(run: Run, record: dict[str, Any], command: str, shown: tuple[str, ...], **state: Any) -> bool:
    """End of a step: its record to metrics.jsonl (a validation loss in it to early stopping and the best
    weights), `shown` beside the progress bar (see `shown_line`), a checkpoint on schedule (with `state`,
    the method's own counters), and on Ctrl-C / SIGTERM a checkpoint and a stop with a resume hint.
    Processes agree on stopping with one all-reduce, so all of them save and stop together. True when
    early stopping ends the run here. A checkpoint is written in the background during the next step;
    the one before is complete when this step ends."""
    step = int(record[files.STEP])
    if files.VALID_LOSS in record and run.early is not None:
        held_out_loss(run, step, float(record[files.VALID_LOSS]))
    log_metrics(run, record)
    run.progress.update(step, shown_line(record, shown))
    run.saves.wait()
    fault_point("after_step", step)
    world, plan = run.world, run.plan
    counters = {
        "tokens": run.tokens_seen,
        "train_seconds": run.train_seconds,
        **({"early_stopping": run.early.state()} if run.early is not None else {}),
        "energy": run.energy.so_far(),
        **state,
    }
    stopping = distributed.all_sum([float(run.stop.requested is not None)], world)[0] > 0
    if step % plan.save_every == 0 or step == plan.total_steps or stopping:
        if world.is_main or world.sharded:  # with --shard every process writes its shards
            run.saves.save(run.run_dir, step, run.model, run.optimizer, counters, run.record,
                           keep=run.keep_checkpoints, world=world)  # fmt: skip
        distributed.barrier(world)
    if stopping:
        run.saves.wait()
        distributed.teardown(world)
        raise TuneryError(
            f"stopped at step {step}/{plan.total_steps} ({run.stop.requested or 'signal'}); "
            f"continue with: tunery train {command} --resume {run.run_dir}"
        )
    return run.early is not None and run.early.should_stop


def log_samples(run: Run, step: int, shown: list[dict[str, Any]]) -> None:
    """Append held-out completions to DIR/samples.jsonl (the methods that sample)."""
    if run.world.is_main and shown:
        with (run.run_dir / "samples.jsonl").open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in shown)


def log_prompt_warning(world: distributed.World, too_long: list[int], max_prompt_length: int) -> None:
    if too_long and world.is_main:
        log.warning("skipped %d prompts longer than max_prompt_length=%d (lines %s)", len(too_long),
                    max_prompt_length, ", ".join(map(str, too_long[:10])))  # fmt: skip


# --- after the loop ---------------------------------------------------------------------------------------


def select_final_weights(run: Run, step: int) -> dict[str, Any]:
    """Load the best evaluation's weights when asked (and there was one); returns what summary.json and
    the last metrics record say about the choice (empty for methods without a validation loss)."""
    if run.early is None:
        return {}
    final_step = restore_best(run.run_dir, run.model, run.early, step, run.world) if run.select_best else step
    return run.early.summary(final_step, step, run.plan.total_steps)


def finish_run(
    run: Run,
    cfg: RunConfig,
    step: int,
    *,
    method: str,
    metric_prefixes: tuple[str, ...],
    final_eval: Callable[[], dict[str, Any]] | None = None,
    counts: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    lm: torch.nn.Module | None = None,
    eval_train_path: str | None = None,
) -> dict[str, Any]:
    """Load the best evaluation's weights when asked (`select_best`), run `final_eval` (the method's full
    validation, on every process) and write its metrics, final/ (with the adapter the run started from, so it loads
    on its own), the before-vs-after evaluations, summary.json and the model card; returns the summary.
    `lm` is the language model inside `run.model` when the model adds a head (PPO's value head);
    `counts` the method's own numbers for summary.json (pairs/s, completions, ...)."""
    world, run_dir = run.world, run.run_dir
    run.saves.wait()
    selection = select_final_weights(run, step)
    final_metrics = final_eval() if final_eval is not None else {}
    gathered = sharding.full_weights(run.model) if world.sharded else None  # every process takes part
    peak_mb = distributed.all_max([memory.peak_memory_mb()], world)[0]
    summary: dict[str, Any] = {}
    if world.is_main:
        assert run.metrics is not None
        if final_metrics:
            log_metrics(run, {files.STEP: step, **final_metrics, **selection})
        run.metrics.close()
        lm = lm if lm is not None else getattr(run.model, "lm", run.model)
        base_adapter = adapter_dir(cfg.adapter) if cfg.adapter and isinstance(lm, PeftModel) else None
        meta = {"base_model": cfg.model, "method": method, "adapter": cfg.adapter, "config": run.record}
        final_dir = save_final(
            run_dir, run.model, run.tokenizer, meta, base_adapter=str(base_adapter) if base_adapter else None,
            weights=gathered,
        )  # fmt: skip
        del gathered
        safety_flags: list[str] = []
        if isinstance(cfg, ChatEvalFields):
            from tunery.safety.evals import evaluate_run

            if world.sharded and cfg.safety_evals != "none":  # the sharded model runs only with every
                lm = load_model(str(final_dir))[0]  # process together; final/ runs alone

            safety_flags = evaluate_run(lm, run.tokenizer, size=cfg.safety_evals, run_dir=run_dir,
                                        base_name=cfg.model, adapter=cfg.adapter, train_path=eval_train_path,
                                        seed=cfg.seed)  # fmt: skip
        train_seconds = run.train_seconds
        report = files.RunSummary(
            method=method,
            model=cfg.model,
            run_dir=str(run_dir),
            steps=step,
            trained_tokens=run.tokens_seen,
            wall_seconds=round(time.monotonic() - run.wall_start, 2),
            train_seconds=round(train_seconds, 2),
            tokens_per_second=round(run.tokens_seen / max(train_seconds, 1e-9), 1),
            peak_memory_mb=round(peak_mb, 1),  # the largest over the processes
            final_metrics={**files.last_metrics(run_dir, metric_prefixes), **final_metrics},
            world_size=world.size,
            pid=os.getpid(),
            energy=run.energy.record(),
            safety_flags=safety_flags,
            warnings=warnings or [],
            extra={**(counts or {}), **selection},
        )
        files.write_summary(run_dir, report)
        write_model_card(run_dir)
        summary = report.to_json()
        run.trackers.finish(summary)
        unlock_run_dir(run_dir)
    distributed.barrier(world)
    distributed.teardown(world)
    return summary


def start_value(run_dir: Path, name: str) -> float | None:
    """The metric `name` of the evaluation before the first step (the methods that evaluate at step 0)."""
    for record in files.read_metrics(run_dir):
        if record.get(files.STEP) == 0 and name in record:
            return float(record[name])
    return None


def per_second(count: float, seconds: float) -> float:
    return round(count / max(seconds, 1e-9), 3)


def entry_config(
    cls: type[C], config_path: str | None, overrides: dict[str, Any], resume_dir: str | None
) -> tuple[C, bool]:
    """The config of `tunery train METHOD`: the one a run started with when resuming it, else YAML then
    flags. Returns it and whether the run resumes."""
    if resume_dir:
        return resumed_config(cls, resume_dir), True
    return build_config(cls, config_path, overrides), False


class EntryPoint(Protocol):
    def __call__(
        self,
        config_path: str | None,
        overrides: dict[str, Any],
        resume_dir: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]: ...


def entry_point(cls: type[C], train: Callable[[C, bool, bool], dict[str, Any]]) -> EntryPoint:
    """A recipe's `run(config_path, overrides, resume_dir=None, overwrite=False)`, what `tunery train
    METHOD` calls: the config from YAML then flags (or the resumed run's), then `train(cfg, resume,
    overwrite)`; returns the run's summary."""

    def run(
        config_path: str | None,
        overrides: dict[str, Any],
        resume_dir: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        cfg, resume = entry_config(cls, config_path, overrides, resume_dir)
        return train(cfg, resume, overwrite)

    return run
