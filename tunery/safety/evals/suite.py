"""The suite: plan every section's prompts once, run the base and the tuned model on them, build each
section's report and write evals.json; `evaluate_run` does that at the end of a training run."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.run.files import EVALS, EvalSection, EvalsReport, write_evals
from tunery.safety.evals.bias import BiasPrompt, answer_bias, bias_prompts, bias_section
from tunery.safety.evals.common import SIZES, EvalSizes, Thresholds, Tick, training_examples
from tunery.safety.evals.diversity import answer_diversity, diversity_section, plan_diversity
from tunery.safety.evals.grounding import answer_grounding, grounding_section, load_references, plan_grounding
from tunery.safety.evals.memorization import answer_memorization, memorization_section, plan_memorization
from tunery.safety.evals.safety import ENGLISH, answer_safety, plan_safety, safety_section, training_languages

SECTIONS = ("safety", "bias", "memorization", "diversity", "grounding")
EVAL_SIZES = ("none", *SIZES)  # `safety_evals` after training: "none" skips them

log = logging.getLogger("tunery")

# --- the plan -----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything both models answer, built once so base and tuned see identical prompts."""

    sizes: EvalSizes
    seed: int
    redteam: list[dict[str, Any]] = field(default_factory=list)
    bias: list[BiasPrompt] = field(default_factory=list)
    memorization: list[tuple[list[dict[str, Any]], str]] = field(default_factory=list)
    diversity: list[list[list[dict[str, Any]]]] = field(default_factory=list)  # groups of prompts
    grounding: list[list[dict[str, Any]]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)  # the safety prompts' besides English
    skipped: dict[str, str] = field(default_factory=dict)

    def grounding_reuses_memorization(self) -> bool:
        """Grounding asks the memorisation prompts (the default): their answers serve both."""
        return self.grounding == [p for p, _ in self.memorization]


def make_plan(
    sections: Sequence[str],
    sizes: EvalSizes,
    seed: int,
    train_path: str | Path | None,
    references: str | Path | Sequence[str] | None,
    grounding_prompts: Sequence[list[dict[str, Any]]] | None,
    languages: Sequence[str] | None = None,
) -> Plan:
    plan = Plan(sizes, seed)
    # One generator, drawn from in this order (memorisation, diversity, grounding): reordering the draws
    # would make a seed pick other prompts than earlier reports did.
    rng = random.Random(seed)
    needs_data = {"memorization", "diversity", "grounding"} & set(sections)
    if languages is None and "safety" in sections:
        needs_data |= {"safety"}
    examples = training_examples(train_path) if train_path and needs_data else []
    if "safety" in sections:
        if languages is None:  # the languages the model was tuned on, beside English
            languages = training_languages([p for p, _ in examples])
        plan.languages = [c for c in dict.fromkeys(languages) if c != ENGLISH]
        plan.redteam = plan_safety(sizes, plan.languages)
    if "bias" in sections:
        plan.bias = bias_prompts(sizes.bias_templates, sizes.names_per_group)
    if "memorization" in sections:
        plan.memorization = plan_memorization(examples, sizes, rng)
        if not plan.memorization:
            plan.skipped["memorization"] = (
                "no training data given" if not train_path else f"{train_path} has no answers to compare"
            )
    if "diversity" in sections:
        plan.diversity = plan_diversity(examples, sizes, rng)
    if "grounding" in sections:
        if references is None:
            plan.skipped["grounding"] = "no reference list given (--references)"
        else:
            plan.references = load_references(references)
            memorized = [p for p, _ in plan.memorization]
            plan.grounding = plan_grounding(grounding_prompts, memorized, examples, sizes, rng)
            if not plan.grounding:
                plan.skipped["grounding"] = "no prompts to answer: give training data or grounding prompts"
    return plan


# --- running the models -------------------------------------------------------------------------------------


def answer_all(model: Any, tokenizer: Any, plan: Plan, batch_size: int, tick: Tick) -> dict[str, Any]:
    """One model's raw outputs for every planned section."""
    sizes, seed = plan.sizes, plan.seed
    out: dict[str, Any] = {}
    if plan.redteam:
        out["safety"] = answer_safety(model, tokenizer, plan.redteam, sizes, seed, batch_size, tick)
    if plan.bias:
        out["bias"] = answer_bias(model, tokenizer, plan.bias, batch_size, tick)
    if plan.memorization:
        out["memorization"] = answer_memorization(
            model, tokenizer, plan.memorization, sizes, seed, batch_size, tick
        )
    if plan.diversity:
        out["diversity"] = answer_diversity(model, tokenizer, plan.diversity, sizes, seed, batch_size, tick)
    if plan.grounding:
        if plan.memorization and plan.grounding_reuses_memorization():
            out["grounding"] = out["memorization"]
        else:
            out["grounding"] = answer_grounding(
                model, tokenizer, plan.grounding, sizes, seed, batch_size, tick
            )
    return out


def _units(plan: Plan, batch_size: int) -> int:
    """Progress units (batches) one model takes."""
    answers = sum(len(g) for g in plan.diversity) * plan.sizes.diversity_samples
    counts = [
        len(plan.redteam),
        len(plan.bias),
        len(plan.memorization),
        answers,
        0 if plan.grounding_reuses_memorization() else len(plan.grounding),
    ]
    return sum(math.ceil(n / batch_size) for n in counts)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while evaluating; a model called mid-training goes back to training mode."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --- the suite ----------------------------------------------------------------------------------------------


def run_evals(
    model: Any,
    tokenizer: Any,
    *,
    base_model: Any = None,
    train_path: str | Path | None = None,
    references: str | Path | Sequence[str] | None = None,
    grounding_prompts: Sequence[list[dict[str, Any]]] | None = None,
    languages: Sequence[str] | None = None,
    sections: Sequence[str] = SECTIONS,
    size: str | EvalSizes = "default",
    thresholds: Thresholds | None = None,
    seed: int = 0,
    batch_size: int = 48,  # decoding 48 rows costs little more per step than 16 on a CPU
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the tuned `model` and its base on every section in `sections`; write `out` if given.

    The base is `base_model` when given (a full fine-tune), else `model` with its LoRA adapter switched off
    (for a DPO run that is the SFT model it started from); with neither, only the tuned model is measured
    and only absolute thresholds can flag. Memorisation (and diversity on training prompts) needs
    `train_path`, grounding needs `references`; without them those sections are skipped, with the reason
    in `config.skipped`. Safety also asks its prompts in `languages` (codes, e.g. ["es", "de"]); None asks
    in the languages of the training prompts as well as English. In a training loop, call it on the main
    process with the unwrapped model (not the DDP wrapper); it puts the model in eval mode and hands it
    back in the mode it came in.

    Returns the report as evals.json holds it (section name -> section, then "config").
    """
    import torch

    from tunery.training.progress import StepProgress

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise TuneryError(f"unknown eval section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if isinstance(size, str) and size not in SIZES:
        raise TuneryError(f"unknown eval size {size!r}; choose from {', '.join(SIZES)}")
    sizes = SIZES[size] if isinstance(size, str) else size
    th = thresholds or Thresholds()
    started = time.monotonic()
    plan = make_plan(sections, sizes, seed, train_path, references, grounding_prompts, languages)

    runs: list[tuple[str, Any, Callable[[], contextlib.AbstractContextManager[Any]]]] = []
    base_source = None
    if base_model is not None:
        runs.append(("base", base_model, contextlib.nullcontext))
        base_source = "separate model"
    elif callable(getattr(model, "disable_adapter", None)):
        runs.append(("base", model, model.disable_adapter))
        base_source = "adapter disabled"
    runs.append(("tuned", model, contextlib.nullcontext))
    outputs: dict[str, dict[str, Any]] = {}
    with StepProgress(
        _units(plan, batch_size) * len(runs), description="evaluating", enabled=progress
    ) as bar:
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            bar.update(done, "")

        for name, net, switch in runs:
            with _eval_mode(net), switch(), torch.no_grad():
                outputs[name] = answer_all(net, tokenizer, plan, batch_size, tick)

    def collected(section: str) -> dict[str, Any]:
        return {name: out[section] for name, out in outputs.items() if section in out}

    built: dict[str, EvalSection] = {}
    if plan.redteam:
        built["safety"] = safety_section(plan.redteam, collected("safety"), th)
    if plan.bias:
        built["bias"] = bias_section(plan.bias, collected("bias"), th)
    if plan.memorization:
        built["memorization"] = memorization_section(
            plan.memorization, collected("memorization"), tokenizer, sizes, th
        )
    if plan.diversity:
        built["diversity"] = diversity_section(plan.diversity, collected("diversity"), sizes, th)
    if plan.grounding:
        built["grounding"] = grounding_section(plan.grounding, plan.references, collected("grounding"), th)
    config = {
        "sections": [s for s in SECTIONS if s in built],
        "size": size if isinstance(size, str) else "custom",
        "sizes": asdict(sizes),
        "thresholds": asdict(th),
        "seed": seed,
        # bf16: a few greedy answers change with the batch composition (docs/safety.md)
        "precision": decoding_precision(model),
        "batch_size": batch_size,
        "train_path": str(train_path) if train_path else None,
        # the safety prompts' languages besides English: asked for, or those of the training prompts
        "languages": plan.languages,
        "base": base_source,
        "skipped": plan.skipped,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    report = EvalsReport(sections=built, config=config)
    if out is not None:
        write_evals(Path(out), report)
    return report.to_json()


def decoding_precision(model: Any) -> str:
    """bf16 or fp32: what the sampler computes the answers in (the decoding engine's dtype, or for a model it
    does not cover, whether any weight is bf16)."""
    import torch

    from tunery.models.decode import engine_dtype, unsupported_reason

    if unsupported_reason(model) is None:
        return "bf16" if engine_dtype(model) == torch.bfloat16 else "fp32"
    return "bf16" if any(p.dtype == torch.bfloat16 for p in model.parameters()) else "fp32"


def eval_flags(report: dict[str, Any]) -> list[str]:
    """Every red flag in a report, for a job's warning events and a run summary."""
    return [flag for name in SECTIONS for flag in report.get(name, {}).get("flags", [])]


# --- after training -----------------------------------------------------------------------------------------


def evaluate_run(
    model: Any,
    tokenizer: Any,
    *,
    size: str,
    run_dir: Path,
    base_name: str,
    adapter: str | None = None,
    train_path: str | None = None,
    seed: int = 0,
) -> list[str]:
    """The before-vs-after evaluations at the end of a chat recipe (`safety_evals` in its config): writes
    `run_dir/evals.json`, which the model card reads, and returns the red flags for summary.json (the
    service turns them into warning events). "Before" is the model the run started from: the adapter
    switched off for LoRA; for a full fine-tune the base model (with `adapter` merged) is loaded again."""
    if size == "none":
        return []
    log.info(
        "evaluating the base and tuned models (%s size: safety, bias, memorisation, diversity; about %s on "
        "the bundled model); --safety-evals none skips this, `tunery eval all --adapter %s` runs it later",
        size, _EXPECTED_TIME.get(size, "a few minutes"), run_dir,
    )  # fmt: skip
    base = None
    if not callable(getattr(model, "disable_adapter", None)):
        from tunery.models.load import load_model
        from tunery.models.lora import merge_adapter

        base, _ = load_model(base_name)
        if adapter:
            base = merge_adapter(base, adapter)
    report = run_evals(
        model,
        tokenizer,
        base_model=base,
        train_path=train_path,
        size=size,
        seed=seed,
        out=run_dir / EVALS,
    )
    for line in headline(report):
        log.info("%s", line)
    return eval_flags(report)


# what `evaluate_run` tells the user to expect, measured on the bundled model on 2 CPU cores
_EXPECTED_TIME = {"quick": "40 s", "default": "1.5 min", "full": "several minutes"}
# the one number per section a console line shows: (metric, how it reads)
_HEADLINES = {
    "safety": ("refusal_rate", "red-team prompts declined"),
    "bias": ("max_gap", "largest gap between groups"),
    "memorization": ("verbatim_rate", "training answers reproduced verbatim"),
    "diversity": ("distinct_2", "distinct word pairs"),
    "grounding": ("unsupported_rate", "citations not in the references"),
}


def headline(report: dict[str, Any]) -> list[str]:
    """A few console lines of a report: one number per section (base -> tuned), then every red flag."""
    lines = []
    for name in SECTIONS:
        section = report.get(name)
        if not section or name not in _HEADLINES:
            continue
        metric, reads = _HEADLINES[name]
        tuned = section["tuned"].get(metric)
        if not isinstance(tuned, int | float):
            continue
        before = section["base"].get(metric)
        value = f"{before:.2f} -> {tuned:.2f}" if isinstance(before, int | float) else f"{tuned:.2f}"
        lines.append(f"  {name}: {metric} {value} ({reads}; base -> tuned)")
    flags = eval_flags(report)
    config = report.get("config", {})
    lines.insert(
        0,
        f"evaluations done in {config.get('wall_seconds', 0):.0f} s: "
        + (f"{len(flags)} red flag(s)" if flags else "no red flags")
        + "; details in evals.json and the model card",
    )
    lines += [f"  red flag: {flag}" for flag in flags]
    return lines
