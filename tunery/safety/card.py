"""MODEL_CARD.md for a run directory, built only from the files in it.

    write_model_card(run_dir)      # every recipe, at the end of its run
    tunery card runs/mine          # again, e.g. after `tunery eval all` added evals.json

Sources, each optional except final/: final/tunery.yaml (base model, method), config.yaml
(hyperparameters, data hashes, the declared use, limitations and risk category), summary.json (results,
energy), metrics.jsonl (the loss curve), screening.json (data screening: counts and actions, never the
flagged text) and evals.json (base vs tuned), the run directory's files read with their readers
(tunery/run/files.py). A missing source or section is written as "not run" rather than left out, so a
reader can tell "not checked" from "nothing found".

The EU AI Act tier is the user's declaration, recorded as given: the card points at the obligations a
tier carries, it does not assess compliance (and is not legal advice). `unacceptable` is refused before
training starts (check_card_fields).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tunery.errors import TuneryError
from tunery.run.files import (
    CONFIG,
    EVALS,
    FINAL,
    FULL_VALID_PREFIX,
    METRICS,
    STEP,
    SUMMARY,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    VALID_ACCURACY,
    VALID_LOSS,
    EvalsReport,
    RunSummary,
    read_config,
    read_evals,
    read_metrics,
    read_summary,
)
from tunery.training.io import atomic_write_text

EVAL_SECTIONS = ("safety", "bias", "memorization", "diversity", "grounding")  # what `tunery eval all` runs

RISK_TIERS = {
    "undeclared": (
        "Not declared. Set `risk_category` (minimal, limited or high) in the training config once the use is "
        "known; the EU AI Act's obligations depend on the use, not on the model."
    ),
    "minimal": (
        "Minimal risk, as declared: no obligations specific to this tier under the EU AI Act beyond AI "
        "literacy (Article 4); voluntary codes of conduct apply."
    ),
    "limited": (
        "Limited risk, as declared: transparency obligations (Article 50): people must be told they are "
        "dealing with an AI system, and AI-generated text published to inform the public must be disclosed "
        "as such."
    ),
    "high": (
        "High risk, as declared (an Annex III use such as employment, education, credit, essential services, "
        "law enforcement, migration or justice, or a safety component of a regulated product). The Act's "
        "requirements for such systems, to review before deployment:"
    ),
}
HIGH_RISK_OBLIGATIONS = (
    "Risk management system over the system's lifetime (Article 9)",
    "Data governance: training, validation and test data relevant, representative, bias-checked (Art. 10)",
    "Technical documentation (Article 11, Annex IV); this card covers part of it",
    "Record-keeping: automatic logging of events while the system runs (Article 12)",
    "Instructions for use and transparency towards deployers (Article 13)",
    "Human oversight: people able to understand, monitor and override the system (Article 14)",
    "Accuracy, robustness and cybersecurity (Article 15)",
    "Quality management, conformity assessment and registration in the EU database (Articles 17, 43, 49)",
)
PROHIBITED = (
    "risk_category 'unacceptable': Tunery does not train models for practices the EU AI Act prohibits "
    "(Article 5): manipulative or deceptive techniques that distort behaviour and cause significant harm; "
    "exploiting vulnerabilities due to age, disability or social or economic situation; social scoring; "
    "predicting crimes from profiling or personality traits alone; untargeted scraping of facial images; "
    "emotion recognition at work or in education; biometric categorisation by race, politics, religion or "
    "sexual orientation; real-time remote biometric identification in public spaces for law enforcement. "
    "If the intended use is none of these, declare risk_category minimal, limited or high."
)
METHODS = {
    "sft": "supervised fine-tuning (SFT)",
    "dpo": "direct preference optimisation (DPO)",
    "ipo": "identity preference optimisation (IPO)",
    "simpo": "simple preference optimisation (SimPO)",
    "kto": "Kahneman-Tversky optimisation (KTO)",
    "rm": "reward model (Bradley-Terry)",
    "grpo": "reinforcement fine-tuning with graders (GRPO)",
    "ppo": "RLHF with PPO and a reward model",
}
# Screening actions (safety/screen.py: passed, warned, redacted, blocked) after which flagged lines were
# not trained as they were; any other action with flagged lines is a red flag.
REMOVED = {"redacted", "blocked", "dropped", "removed"}
NOT_DECLARED = "not declared"
SOURCES = (f"{FINAL}/tunery.yaml", CONFIG, SUMMARY, METRICS, "screening.json", EVALS)
SETTINGS = {  # config field -> how the card names it
    "epochs": "epochs",
    "batch_size": "batch size",
    "lr": "peak learning rate",
    "schedule": "schedule",
    "warmup_ratio": "warmup (fraction of steps)",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "quantize": "base quantized in training (QLoRA)",
    "max_length": "max length",
    "precision": "precision",
    "seed": "seed",
    "loss": "loss",
    "beta": "beta",
    "group_size": "group size",
    "kl_coef": "KL coefficient",
    "total_steps": "steps planned",
}
CURVE_METRICS = (  # the first / best / last table; "best" is the lowest loss or KL, the highest otherwise
    TRAIN_LOSS,
    VALID_LOSS,
    TRAIN_ACCURACY,
    VALID_ACCURACY,
    "valid_rewards/accuracies",
    "valid_accuracy",
    "train_reward_mean",
    "valid_reward_mean",
    "train_score_mean",
    "valid_score_mean",
    "kl",
)


def check_card_fields(cfg: Any) -> None:
    """Config checks of what the card declares."""
    if cfg.risk_category == "unacceptable":
        raise TuneryError(PROHIBITED)
    if cfg.risk_category not in RISK_TIERS:
        raise TuneryError(
            f"risk_category must be one of {', '.join(RISK_TIERS)} (EU AI Act tiers), "
            f"got {cfg.risk_category!r}"
        )


def write_model_card(run_dir: Path) -> Path:
    """Write DIR/final/MODEL_CARD.md atomically and return its path."""
    run_dir = Path(run_dir)
    if not (run_dir / FINAL).is_dir():
        raise TuneryError(f"{run_dir} has no final/ directory: a model card describes a finished run")
    path = run_dir / FINAL / "MODEL_CARD.md"
    atomic_write_text(path, render_model_card(run_dir))
    return path


def render_model_card(run_dir: Path) -> str:
    run = _Run(Path(run_dir))
    blocks = [
        _header(run),
        _red_flags(run),
        _declared(run),
        _data(run),
        _federation(run),
        _training(run),
        _evaluations(run),
        _energy(run),
        _footer(run),
    ]
    return "\n\n".join(b.strip("\n") for b in blocks if b) + "\n"


# --- reading the run directory ---------------------------------------------------------------------------


class _Run:
    """The run directory's files, each read once; an unreadable file is noted, not fatal. config.yaml is
    kept as its fields by name (the card shows a method's own, like `beta`, beside the common ones)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.problems: list[str] = []
        self.meta = self._load(run_dir / FINAL / "tunery.yaml") or {}
        saved = read_config(run_dir)
        self._unreadable(CONFIG, saved)
        self.config: dict[str, Any] = (saved.fields if saved else None) or self.meta.get("config") or {}
        self.summary: RunSummary | None = read_summary(run_dir)
        self._unreadable(SUMMARY, self.summary)
        self.screening = self._load(run_dir / "screening.json")
        self.evals: EvalsReport | None = read_evals(run_dir / EVALS)
        self._unreadable(EVALS, self.evals)
        self.records = read_metrics(run_dir)

    def _unreadable(self, name: str, value: Any) -> None:
        """A file that is there but that its reader could not make sense of: noted, and left out."""
        if value is None and (self.dir / name).is_file():
            self.problems.append(f"{name} could not be read (not a JSON/YAML object); it is left out")

    def _load(self, path: Path) -> Any:
        if not path.is_file():
            return None
        try:
            text = path.read_text()
            value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            self.problems.append(f"{path.name} could not be read ({type(exc).__name__}); it is left out")
            return None
        if not isinstance(value, dict):
            self.problems.append(f"{path.name} is not a JSON/YAML object; it is left out")
            return None
        return value

    @property
    def name(self) -> str:
        # The service keeps runs at JOB_ID/run: the job id names them better than "run".
        return self.dir.resolve().parent.name if self.dir.name == "run" else self.dir.name

    @property
    def method(self) -> str:
        return str(self.meta.get("method") or (self.summary and self.summary.method) or "unknown")

    @property
    def extra(self) -> dict[str, Any]:
        """What the method added to summary.json (examples, early stopping's selection, ...)."""
        return self.summary.extra if self.summary else {}


# --- sections --------------------------------------------------------------------------------------------


def _header(run: _Run) -> str:
    cfg, summary = run.config, run.summary
    base = run.meta.get("base_model") or cfg.get("model") or "unknown"
    rank = cfg.get("lora_rank")
    kind = f"a LoRA adapter (rank {rank})" if rank else "fully fine-tuned weights" if rank == 0 else "weights"
    if run.method == "rm":
        kind += " with a reward head"
    trained = _date(run.dir / SUMMARY) or _date(run.dir / FINAL)
    rows = [
        ("Base model", f"`{base}`"),
        ("Method", f"{METHODS.get(run.method, run.method)}; {kind}"),
    ]
    if run.meta.get("adapter") or cfg.get("adapter"):
        rows.append(
            ("Trained on top of", f"`{run.meta.get('adapter') or cfg.get('adapter')}` (merged first)")
        )
    when = [trained] if trained else []
    if summary is not None:
        when.append(f"{summary.steps} of {cfg.get('total_steps', summary.steps)} steps")
        when.append(_duration(summary.wall_seconds))
    rows.append(("Trained", ", ".join(when) or "unknown (no summary.json)"))
    final_step = run.extra.get("final_step")
    if final_step is not None and summary is not None and final_step != summary.steps:
        rows.append(("Weights in final/", f"step {final_step}, the lowest validation loss"))
    rows.append(("Risk category (EU AI Act)", str(cfg.get("risk_category", "undeclared"))))
    energy = summary.energy if summary else None
    if isinstance(energy, dict) and "kwh" in energy:
        rows.append(
            ("Energy", f"{_kwh(energy['kwh'])}, {_kg(energy['kg_co2e'])} CO2e ({_short_method(energy)})")
        )
    return (
        f"# Model card: {run.name}\n\n"
        f"{kind[0].upper() + kind[1:]} for `{base}`, trained with Tunery. Built from the files in the run "
        "directory; see the end of the card for which.\n\n" + _table(("", ""), rows)
    )


def _red_flags(run: _Run) -> str:
    flags: list[str] = []
    for name, section in (run.evals.sections if run.evals else {}).items():
        for text in section.flags:
            flags.append(text if text.lower().startswith(f"{name}:") else f"{name}: {text}")
    for role, info in _screened_files(run):
        flagged, action = info.get("flagged_lines") or 0, str(info.get("action", "unknown"))
        if flagged and action.lower() not in REMOVED:
            flags.append(
                f"data screening: {flagged} of {info.get('lines', '?')} {role} lines flagged "
                f"({_categories(info)}) were kept (action: {action})"
            )
    for warning in run.summary.warnings if run.summary else []:
        flags.append(f"training: {warning}")
    if not flags:
        return ""
    items = "\n".join(f"> - {_one_line(f)}" for f in flags)
    return f"> **Red flags ({len(flags)})**: read these before using the model.\n>\n{items}"


def _declared(run: _Run) -> str:
    cfg = run.config
    tier = str(cfg.get("risk_category", "undeclared"))
    text = RISK_TIERS.get(tier, f"{tier} (not a tier Tunery knows)")
    if tier == "high":
        text += "\n\n" + "\n".join(f"- {item}" for item in HIGH_RISK_OBLIGATIONS)
    return (
        f"## Intended use\n\n{_declaration(cfg.get('intended_use'), 'intended_use')}\n\n"
        f"## Limitations\n\n{_declaration(cfg.get('limitations'), 'limitations')}\n\n"
        f"{_inherent_limits(run)}\n\n"
        f"## Risk category\n\n{text}\n\n"
        "The tier is the trainer's declaration; this card does not assess compliance and is not legal advice."
    )


def _inherent_limits(run: _Run) -> str:
    base = run.meta.get("base_model") or run.config.get("model") or "the base model"
    examples = run.extra.get("train_examples")
    seen = f"{examples} training examples" if examples else "its training file"
    return (
        f"Whatever is declared above: the model inherits the knowledge, gaps and biases of `{base}`, and "
        f"learned only what {seen} show. Fine-tuning can weaken a base model's refusals; see Evaluations."
    )


def _data(run: _Run) -> str:
    cfg, summary = run.config, run.summary
    rows = []
    for role, key in (("train", "data"), ("valid", "valid")):
        if cfg.get(key):
            sha = cfg.get(f"{key}_sha256")
            count = run.extra.get(f"{role}_examples")
            name = f"`{Path(str(cfg[key])).name}`"
            rows.append((role, name, f"`{sha}`" if sha else "not recorded", _value(count, "not recorded")))
    if not rows:
        return "## Training data\n\nNot recorded (config.yaml is missing)."
    lines = ["## Training data", "", _table(("file", "name", "sha256", "examples"), rows), ""]
    facts = []
    if summary is not None:
        facts.append(f"{summary.trained_tokens:,} tokens trained")
    if cfg.get("epochs") is not None:
        facts.append(f"{cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''}")
    if cfg.get("max_length"):
        facts.append(f"examples cut at {cfg['max_length']} tokens")
    if facts:
        lines += ["; ".join(facts).capitalize() + ".", ""]
    lines += ["### Data screening", "", _screening(run)]
    return "\n".join(lines)


def _screening(run: _Run) -> str:
    if run.screening is None:
        return "Not run: no screening.json in the run directory."
    policy = run.screening.get("policy") or {}
    head = f"Classifier: {run.screening.get('classifier', 'not recorded')}."
    if isinstance(policy, dict) and policy:
        head += " Policy: " + ", ".join(f"{k} {v}" for k, v in policy.items()) + "."
    rows = []
    for role, info in _screened_files(run):
        redacted = info.get("redacted_path")
        action = str(info.get("action", "not recorded")) + (
            f" (to `{Path(str(redacted)).name}`)" if redacted else ""
        )
        counts = (str(info.get("lines", "?")), str(info.get("flagged_lines", "?")))
        rows.append((role, *counts, _categories(info), action))
    if not rows:
        return head + " No files were screened."
    table = _table(("file", "lines", "flagged", "by category", "action"), rows)
    return f"{head}\n\n{table}\n\nCounts only: the flagged text stays out of this card."


def _federation(run: _Run) -> str:
    """A federated run (recipes/federated.py): who trained it and how, never the sites' data or paths."""
    fed = run.extra.get("federation")
    if not isinstance(fed, dict):
        return ""
    sites = [str(s) for s in fed.get("sites") or []]
    rows = [
        ("sites", f"{len(sites)}: {', '.join(sites)}"),
        ("rounds", _value(fed.get("rounds"))),
        ("strategy", str(fed.get("strategy"))),
        ("local steps per round", _value(fed.get("local_steps"))),
        ("sites per round / results needed", f"{fed.get('sites_per_round')} / {fed.get('min_results')}"),
    ]
    dp = fed.get("differential_privacy")
    if isinstance(dp, dict):
        rows.append(
            (
                "differential privacy",
                f"{dp.get('mechanism')}: noise multiplier {dp.get('noise_multiplier')}, "
                f"clipping norm {dp.get('clipping_norm')}, {dp.get('sampled_sites_per_round')} sites a round",
            )
        )
        ratio = dp.get("noise_to_update")
        if isinstance(ratio, int | float):  # runs from before this field have none
            rows.append(
                (
                    "noise against the update",
                    f"the noise added each round has an expected norm {ratio:.3g}x the clipping norm "
                    f"(adapter of {_value(dp.get('adapter_parameters'))} parameters)"
                    + ("; above 1 the noise outweighs what the sites learned" if ratio > 1 else ""),
                )
            )
        spent = fed.get("epsilon_spent")
        rows.append(
            (
                "privacy spent",
                f"epsilon {_value(spent)} at delta {dp.get('delta')} ({dp.get('accounting')})"
                if isinstance(spent, int | float)
                else "not counted",
            )
        )
    else:
        rows.append(("differential privacy", "off"))
    rows.append(
        (
            "secure aggregation",
            "on (SecAgg+): the server saw only the sum of the sites' adapters"
            if fed.get("secure_aggregation")
            else "off: the server saw each site's adapter",
        )
    )
    return "\n".join([
        "## Federation", "",
        "Trained by federated learning (Flower): each site trained the adapter on its own data, which never "
        "left it; the server saw only the adapters and example counts.", "",
        _table(("setting", "value"), rows),
    ])  # fmt: skip


def _training(run: _Run) -> str:
    cfg, summary = run.config, run.summary
    hyper = [
        (label, _value(cfg[key])) for key, label in SETTINGS.items() if cfg.get(key) not in (None, "none")
    ]
    lines = ["## Training", "", _table(("setting", "value"), hyper) if hyper else "No config.yaml.", ""]
    curve = _curve(run.records)
    lines += ["### Results", ""]
    if curve:
        lines += [_table(("metric", "first", "best", "last"), curve), ""]
    else:
        lines += ["No metrics.jsonl.", ""]
    final_metrics = summary.final_metrics if summary else {}
    full = {k: v for k, v in final_metrics.items() if k.startswith(FULL_VALID_PREFIX)}
    if full:
        values = ", ".join(f"{k.removeprefix('full_')} {_value(v)}" for k, v in sorted(full.items()))
        lines += [f"On the whole validation file, for the weights in final/: {values}.", ""]
    lines.append(_early_stopping(cfg, summary.steps if summary else None, run.extra))
    return "\n".join(lines)


def _early_stopping(cfg: dict[str, Any], steps: int | None, selection: dict[str, Any]) -> str:
    """`selection`: what early stopping and select_best wrote in summary.json (best_step, final_step, ...)."""
    if "early_stopping_patience" not in cfg:
        return ""
    patience, best = cfg.get("early_stopping_patience") or 0, selection.get("best_step")
    parts = []
    if patience:
        delta = _value(cfg.get("early_stopping_min_delta", 0))
        outcome = f"stopped at step {steps}." if selection.get("stopped_early") else "not triggered."
        parts.append(f"Early stopping: patience {patience} evaluations, min_delta {delta}; {outcome}")
    else:
        parts.append("Early stopping: off.")
    if cfg.get("select_best") and best is not None:
        parts.append(
            f"final/ holds the weights of step {selection.get('final_step', best)}: the lowest validation loss "
            f"({_value(selection.get('best_valid_loss'))}) of the periodic evaluations."
        )
    elif not cfg.get("select_best"):
        parts.append("final/ holds the last step's weights (select_best is off).")
    return " ".join(parts)


def _curve(records: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """First, best and last value of each headline metric, with their steps."""
    rows = []
    for key in CURVE_METRICS:
        points = [(r.get(STEP), r[key]) for r in records if isinstance(r.get(key), int | float)]
        points = [(s, v) for s, v in points if not (isinstance(v, float) and math.isnan(v))]
        if not points:
            continue
        lower_is_better = "loss" in key or key == "kl"
        best = (min if lower_is_better else max)(points, key=lambda p: p[1])
        if key == "kl":
            best = points[-1]  # no "best" KL; the table shows it for scale
        rows.append((key, _at(points[0]), _at(best) if key != "kl" else "", _at(points[-1])))
    return rows


def _evaluations(run: _Run) -> str:
    lines = ["## Evaluations", ""]
    config = run.evals.config if run.evals else {}
    if run.evals is None:
        lines += [
            "Not run: no evals.json. `tunery eval all` compares the tuned model with its base (safety, bias, "
            "memorization, diversity, grounding); `tunery card RUN_DIR` then updates this card.",
            "",
        ]
    elif config:
        how = [f"{key} {config[key]}" for key in ("size", "seed") if config.get(key) is not None]
        if config.get("base"):
            how.insert(0, f"base: {config['base']}")
        lines += [f"`tunery eval all`, the tuned model against its base ({', '.join(how)}).", ""]
    skipped: dict[str, Any] = config["skipped"] if isinstance(config.get("skipped"), dict) else {}
    sections = run.evals.sections if run.evals else {}
    for name in list(EVAL_SECTIONS) + [s for s in sections if s not in EVAL_SECTIONS]:
        section = sections.get(name)
        if section is None:
            reason = f": {_one_line(skipped[name])}" if name in skipped else ""
            lines.append(f"- **{name.capitalize()}**: not run{reason}.")
            continue
        if lines[-1].startswith("- "):
            lines.append("")
        lines += [f"### {name.capitalize()}", ""]
        if section.description:
            lines += [section.description, ""]
        base, tuned = section.base, section.tuned
        metrics = list(dict.fromkeys([*tuned, *base]))
        rows = [
            (f"`{m}`", _value(base.get(m)), _value(tuned.get(m)), _change(base.get(m), tuned.get(m)))
            for m in metrics
        ]
        if rows:
            lines += [_table(("metric", "base", "tuned", "change"), rows), ""]
        flags = section.flags
        lines += (["Flags:", "", *(f"- {_one_line(f)}" for f in flags)] if flags else ["No flags."]) + [""]
    return "\n".join(lines)


def _energy(run: _Run) -> str:
    head = "## Energy and carbon\n\n"
    if run.summary is None:
        return head + "Not recorded (no summary.json, or a run from before Tunery tracked energy)."
    energy = run.summary.energy
    if energy is None:
        return head + "Not tracked: the run had `track_energy: false`."
    if "kwh" not in energy:
        error = energy.get("error")
        return head + f"Not measured: codecarbon failed ({error}). The run itself was not affected."
    intensity = energy.get("carbon_intensity_g_per_kwh")
    where = energy.get("country_name") or energy.get("country")
    where = "world average" if energy.get("country") == "WORLD" else f"{where}'s grid, yearly average"
    emissions = f"{_kg(energy['kg_co2e'])} CO2e"
    if intensity:
        emissions += f" at {intensity:g} g/kWh ({where})"
    power = f"CPU {_value(energy.get('cpu_power_w'))} W, RAM {_value(energy.get('ram_power_w'))} W"
    if energy.get("gpu_power_w"):
        power += f", GPU {_value(energy['gpu_power_w'])} W"
    tracked = f"{_duration(energy.get('duration_s', 0))} of training"
    if energy.get("segments", 1) > 1:
        tracked += f" in {energy['segments']} segments (resumed)"
    rows = [
        ("energy", _kwh(energy["kwh"])),
        ("emissions", emissions),
        ("how", str(energy.get("method", "not recorded"))),
        ("mean power", power),
        ("tracked", tracked),
        ("tracker", str(energy.get("tracker", "codecarbon"))),
    ]
    note = "The training loop only: loading, the evaluation after training and inference are not included."
    if energy.get("country") == "WORLD":
        note += (
            " Set `energy_country` to the ISO-3 code of the grid the run used for a CO2e figure that fits it."
        )
    return head + _table(("", ""), rows) + "\n\n" + note


def _footer(run: _Run) -> str:
    present = [name for name in SOURCES if (run.dir / name).is_file()]
    lines = [
        "---",
        "",
        f"Sources: {', '.join(present) or 'none'} in `{run.dir}`. Generated "
        f"{datetime.date.today().isoformat()}; regenerate with `tunery card {run.dir}`.",
    ]
    if run.problems:
        lines += ["", "Problems: " + "; ".join(run.problems) + "."]
    return "\n".join(lines)


# --- formatting ------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_one_line(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([row(header), "|" + "|".join("---" for _ in header) + "|", *map(row, rows)])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _value(value: Any, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _change(base: Any, tuned: Any) -> str:
    numbers = (int, float)
    if isinstance(base, numbers) and isinstance(tuned, numbers) and not isinstance(base, bool):
        delta = tuned - base
        return "0" if delta == 0 else f"{delta:+.4g}"
    return ""


def _at(point: tuple[Any, Any]) -> str:
    step, value = point
    return f"{_value(value)} (step {step})"


def _kwh(kwh: float) -> str:
    return f"{kwh:.3g} kWh" if kwh >= 0.001 else f"{kwh * 1000:.3g} Wh"


def _kg(kg: float) -> str:
    return f"{kg:.3g} kg" if kg >= 0.001 else f"{kg * 1000:.3g} g"


def _short_method(energy: dict[str, Any]) -> str:
    method = str(energy.get("method", ""))
    return method.split(":")[0] if method else "method not recorded"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _date(path: Path) -> str | None:
    if not path.exists():
        return None
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, tz=datetime.UTC)
    return stamp.date().isoformat()


def _declaration(value: Any, field: str) -> str:
    text = str(value).strip() if value is not None else ""
    if not text or text.lower() == NOT_DECLARED:
        return f"Not declared. Set `{field}` in the training config (or `--set {field}=...`)."
    return text


def _screened_files(run: _Run) -> list[tuple[str, dict[str, Any]]]:
    files = (run.screening or {}).get("files") or {}
    return (
        [(role, info) for role, info in files.items() if isinstance(info, dict)]
        if isinstance(files, dict)
        else []
    )


def _categories(info: dict[str, Any]) -> str:
    counts = info.get("by_category") or {}
    text = "none"
    if isinstance(counts, dict) and counts:
        text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])) if v)
    listed, unscored = info.get("scored_by_word_list") or {}, info.get("not_scored_for_content") or {}
    if isinstance(listed, dict) and listed:  # the classifier reads English; other languages their lists
        text += f"; lines in other languages, checked for offensive words by word list: {_counts(listed)}"
    if isinstance(unscored, dict) and unscored:
        text += (
            "; lines not scored for offensive content (no classifier or word list for their language): "
            + _counts(unscored)
        )
    return text


def _counts(by_language: dict[Any, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(by_language.items(), key=lambda kv: str(kv[0])))
