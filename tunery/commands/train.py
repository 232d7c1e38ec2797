"""`tunery train sft | rm | dpo | kto | grpo | ppo`: one recipe's run, configured by YAML and flags.

The flags are the method's config (tunery/recipes/configs.py), one per field: `--lora-rank` sets
`lora_rank`, its value is read as the field's annotation says and its help is the field's comment with the
method's default. `--config FILE` gives values first, the flags override it and `--set KEY=VALUE` (a YAML
value) overrides both. The config is also built here, torch-free, so a bad value is refused before the
recipe's ~4 s of imports; the recipe builds it again from the same values.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import typing
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.recipes.configs import CONFIGS
from tunery.run.config import RunConfig, field_help, field_types

RECIPES = {
    "sft": "tunery.recipes.sft",
    "rm": "tunery.recipes.reward_model",
    "dpo": "tunery.recipes.dpo",
    "kto": "tunery.recipes.kto",
    "grpo": "tunery.recipes.grpo",
    "ppo": "tunery.recipes.ppo",
    "federated": "tunery.recipes.federated",
}
DATA_FORMATS = {
    "dpo": "preference",
    "rm": "preference",
    "kto": "unpaired",
    "grpo": "prompts",
    "ppo": "prompts",
}
# flags older than the generated ones whose names differ from their field's: they stay, as aliases
ALIASES = {"learning_rate_multiplier": ("--lr-multiplier",)}
FIELD = "field:"  # where a field's flag puts its value in the namespace, apart from the other options


def cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "max_length", None) is not None:  # grpo, ppo: a prompt and its completion have budgets
        raise TuneryError(
            f"{args.method}: use --max-prompt-length and --max-new-tokens instead of --max-length"
        )
    if args.method == "federated" and importlib.util.find_spec("flwr") is None:
        raise TuneryError(
            "federated training runs on Flower, which is not installed: `make install` installs it (or "
            "pip install 'tunery[federated]', which also moves fastapi, starlette and uvicorn back to "
            "versions the service streams worse on)"
        )
    overrides = config_overrides(args)
    check_before_loading(args, overrides)
    if not args.resume and os.environ.get("RANK", "0") == "0":  # the process that screens the data
        from tunery.safety.content import start_worker

        start_worker()  # the classifier loads on another core during the recipe's imports
    recipe = importlib.import_module(RECIPES[args.method])
    summary = recipe.run(args.config, overrides, resume_dir=args.resume, overwrite=args.overwrite)
    print_summary(summary)
    if args.method == "grpo" and summary.get("start_valid_reward_mean") is not None:
        print(
            f"held-out reward: {summary['start_valid_reward_mean']:.4f} before training, "
            f"{summary['final_metrics'].get('valid_reward_mean', float('nan')):.4f} after"
        )
    if args.method == "ppo" and summary.get("start_valid_score_mean") is not None:
        final = summary["final_metrics"]
        print(
            f"held-out reward-model score: {summary['start_valid_score_mean']:.4f} before training, "
            f"{final.get('valid_score_mean', float('nan')):.4f} after "
            f"(KL to the start: {final.get('valid_kl', float('nan')):.2f} nats)"
        )
    return 0


# --- the flags, from the config -------------------------------------------------------------------------


def add_flags(p: argparse.ArgumentParser, method: str) -> None:
    """`tunery train METHOD`'s flags: the options of a run, then one flag per field of the method's config
    (the shared fields, then the method's own)."""
    config = CONFIGS[method]
    p.usage = (
        "%(prog)s [-h] [--config FILE] [--FIELD VALUE ...] [--set KEY=VALUE ...] [--resume DIR] [--overwrite]"
    )
    run = p.add_argument_group("the run")
    run.add_argument("--config", metavar="FILE", help="YAML file of config fields; flags override it")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, by its YAML name")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (lora_rank 0)")
    types, comments = field_types(config), field_help(config)
    if "max_length" not in types:  # refused with a pointer to the budgets that replace it
        run.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    shared = p.add_argument_group("shared fields (tunery/run/config.py)")
    if any(_declared_by(config, name) is config for name in types):  # SFT's are all shared ones
        title = f"{method} fields ({config.__name__}, tunery/recipes/configs.py)"
        own = p.add_argument_group(title, (config.__doc__ or "").strip())
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, annotation in types.items():
        group = own if _declared_by(config, name) is config else shared
        flag = "--" + name.replace("_", "-")
        default = _shown(defaults[name])
        if annotation is bool:
            default += f", --no-{flag[2:]}: false"
        text = comments[name] + (f" (default {default})" if default else "")
        group.add_argument(
            flag,
            *ALIASES.get(name, ()),
            dest=FIELD + name,
            help=text.replace("%", "%%"),
            **_reader(name, annotation),
        )
        if annotation is bool:
            group.add_argument(
                f"--no-{flag[2:]}",
                dest=FIELD + name,
                action="store_const",
                const=False,
                help=argparse.SUPPRESS,
            )


def _declared_by(config: type[RunConfig], name: str) -> type:
    """The most basic class declaring a field: RunConfig and its groups for the shared ones, even where a
    method redeclares one to change its default."""
    return next(k for k in reversed(config.__mro__) if name in getattr(k, "__annotations__", {}))


def _shown(default: Any) -> str:
    if default is None or default is dataclasses.MISSING or default == "":
        return ""  # the comment says what no value means
    return str(default).lower() if isinstance(default, bool) else str(default)


def _reader(name: str, annotation: Any) -> dict[str, Any]:
    """How a flag reads its value, from the field's annotation (as YAML values are coerced, run/config.py):
    numbers, `auto` where the type allows a string, and booleans as `--flag [true|false]` or `--no-flag`."""
    if typing.get_origin(annotation) is list:
        return {"nargs": "+", "metavar": name.upper().removesuffix("S")}
    kinds = {kind for kind in typing.get_args(annotation) or (annotation,) if kind is not type(None)}
    if kinds == {bool}:
        return {"nargs": "?", "const": True, "type": _boolean, "metavar": "true|false"}
    if kinds == {int}:
        return {"type": int, "metavar": "N"}
    if kinds == {float}:
        return {"type": float, "metavar": "X"}
    if kinds == {str}:
        return {"metavar": name.upper()}
    if kinds == {int, str}:
        return {"type": _int_or_auto, "metavar": "N|auto"}
    if kinds == {float, str}:
        return {"type": _float_or_auto, "metavar": "X|auto"}
    raise TypeError(f"config field {name}: no flag reads a {annotation}; add it to _reader")


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "yes", "1")


def _int_or_auto(text: str) -> int | str:
    try:
        return text if text == "auto" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _float_or_auto(text: str) -> float | str:
    try:
        return text if text == "auto" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


# --- the config's values, checked before loading ----------------------------------------------------------


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the flags give (`--full` is lora_rank 0), then --set's: what overrides the YAML file."""
    from tunery.run.config import parse_set

    overrides = {
        name.removeprefix(FIELD): value
        for name, value in vars(args).items()
        if name.startswith(FIELD) and value is not None
    }
    if args.full:
        overrides["lora_rank"] = 0
    overrides.update(parse_set(args.set or []))
    return overrides


def check_before_loading(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """What a training command can refuse before its recipe's ~4 s of imports (torch, transformers, peft):
    a misspelt model, no or missing data, no --out, a missing adapter or reward model, then any value the
    config's own checks refuse. The recipes check these again."""
    import yaml

    from tunery.data.jsonl import check_readable
    from tunery.models.locate import adapter_dir, check_model_name, check_run_path
    from tunery.run.config import build_config
    from tunery.training.rundir import check_run_dir

    if args.resume:
        check_run_dir(Path(args.resume), resume=True, overwrite=False)
        return  # the run's config.yaml holds the values
    try:
        values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    except (OSError, yaml.YAMLError):
        return  # the recipe says what is wrong with the file
    if not isinstance(values, dict):
        return
    values |= {key: value for key, value in overrides.items() if value is not None}
    if values.get("model"):
        check_model_name(str(values["model"]))
    if not values.get("data") and not values.get("clients") and values.get("federation") != "deployment":
        raise TuneryError("no training data: pass --data FILE.jsonl")
    if not values.get("out"):
        raise TuneryError("no run directory: pass --out DIR")
    from tunery.data.formats import foreign_problem

    paths = [values.get("data"), values.get("valid"), *(values.get("clients") or [])]
    for path in [str(path) for path in paths if path]:
        check_readable(Path(path))
        foreign = foreign_problem(path, DATA_FORMATS.get(args.method, "chat"))
        if foreign is not None:  # a CSV, a JSON array, legacy prompt/completion...: before screening
            raise TuneryError(f"{path}, line {foreign.line}: {foreign.message}")
    if values.get("adapter"):
        adapter_dir(str(values["adapter"]))
    if values.get("reward_model"):
        check_run_path(str(values["reward_model"]), reward_model=True)
    check_run_dir(Path(str(values["out"])), resume=False, overwrite=args.overwrite)
    build_config(CONFIGS[args.method], args.config, overrides)  # the fields' own checks, torch-free


# --- the end of a run -------------------------------------------------------------------------------------


def print_summary(summary: dict[str, Any]) -> None:
    if summary:
        final = summary["final_metrics"]
        if any(k.startswith("full_") for k in final):  # the full held-out evaluation says it all
            final = {k: v for k, v in final.items() if k.startswith("full_") or k == "train_loss"}
        shown = ", ".join(
            f"{k.removeprefix('full_')} {v:.4f}" for k, v in final.items() if isinstance(v, float)
        )
        if "completions" in summary:  # GRPO, PPO: sampling takes most of a step, so trained tok/s misleads
            done = f"{summary['completions']} completions at {summary['completions_per_second']:.1f}/s"
        else:
            done = f"{summary['trained_tokens']} tokens at {summary['tokens_per_second']:.0f} tok/s"
        print(
            f"done: {summary['steps']} steps, {done} ({summary['train_seconds']:.0f} s training, "
            f"{summary['wall_seconds']:.0f} s in all); {shown}"
        )
        print(f"saved: {Path(summary['run_dir']) / 'final'} (with MODEL_CARD.md)")
        if summary.get("final_step") not in (None, summary["steps"]):
            stopped = "stopped early; " if summary.get("stopped_early") else ""
            print(f"{stopped}final/ holds step {summary['final_step']}, the lowest validation loss")
        energy = summary.get("energy")
        if isinstance(energy, dict) and "kwh" in energy:
            how = str(energy.get("method", "")).split(":")[0]
            print(f"energy: {energy['kwh'] * 1e3:.3g} Wh, {energy['kg_co2e'] * 1e3:.3g} g CO2e ({how})")
        for warning in summary.get("warnings", []):
            print(f"warning: {warning}")
