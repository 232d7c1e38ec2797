"""`tunery tune`: hyperparameter search over a recipe's config fields (tunery/tuning.py, on optuna)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

METHODS = ("sft", "dpo", "kto", "rm", "grpo", "ppo")
NOT_SEARCHED = ("data", "valid", "out", "model", "adapter")


def cmd_tune(args: argparse.Namespace) -> int:
    import yaml

    from tunery.recipes.configs import CONFIGS
    from tunery.run.config import build_config, field_types, parse_set

    for name in ("optuna", "matplotlib"):
        if importlib.util.find_spec(name) is None:
            raise TuneryError(f"tunery tune needs {name}: pip install 'tunery[tune]' (make install has it)")
    if args.trials < 1:
        raise TuneryError("--trials must be at least 1")
    if args.parallel < 1:
        raise TuneryError("--parallel must be at least 1")
    from tunery.tuning import Search, parse_space, report, run_search

    fields = field_types(CONFIGS[args.method])
    space = parse_space(args.space, fields)
    fixed = [d.name for d in space if d.name in NOT_SEARCHED]
    if fixed:
        raise TuneryError(f"--space: {', '.join(fixed)} is what every trial shares, not a hyperparameter")
    out = Path(args.out)
    overrides = parse_set(args.set or [])
    if "out" in overrides:
        raise TuneryError("--set out=...: each trial's run directory is OUT/trial-NNN (--out)")
    base: dict[str, Any] = {}
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
        except OSError as exc:
            raise TuneryError(f"--config {args.config}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise TuneryError(f"--config {args.config}: not valid YAML: {exc}") from exc
        base = dict(loaded or {}) if isinstance(loaded, dict) else {}
    base |= overrides
    # the base config must make a valid run (checked now, torch-free, not once per trial)
    build_config(CONFIGS[args.method], args.config, {**overrides, "out": str(out / "trial-000")})
    if args.metric.startswith(("valid_", "full_valid_")) and not base.get("valid"):
        raise TuneryError(
            f"--metric {args.metric} is measured on held-out data: give the base config a `valid` file "
            "(or --set valid=FILE)"
        )
    storage = args.storage or f"sqlite:///{out.resolve() / 'study.db'}"
    out.mkdir(parents=True, exist_ok=True)
    search = Search(
        method=args.method,
        base_config=Path(args.config).resolve() if args.config else None,
        base_values=base,
        sets=list(args.set or []),
        space=space,
        out=out,
        trials=args.trials,
        metric=args.metric,
        direction=args.direction,
        parallel=args.parallel,
        storage=storage,
        study_name=args.study or out.resolve().name,
        pruner=args.pruner,
        sampler=args.sampler,
        seed=args.seed,
    )
    print(
        f"study {search.study_name} in {storage}: {args.trials} trials of tunery train {args.method}, "
        f"{args.parallel} at a time, searching " + ", ".join(d.text() for d in space)
    )
    study = run_search(search)
    report(study, search)
    return 0


def tune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method", choices=METHODS, default="sft", help="the recipe each trial runs (default sft)"
    )
    p.add_argument("--config", help="the base config (YAML) every trial starts from")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config field every trial shares")
    p.add_argument(
        "--space",
        nargs="+",
        required=True,
        metavar="NAME=KIND(ARGS)",
        help='e.g. "lr=loguniform(1e-5,1e-3)" "lora_rank=choice(8,16,32)" "epochs=int(1,4)"; '
        "KIND: loguniform, uniform, int, logint, choice",
    )
    p.add_argument(
        "--trials", type=int, required=True, help="finished trials wanted, over every run of the study"
    )
    p.add_argument("--out", required=True, help="the study's directory: trial-NNN runs, logs, results")
    p.add_argument(
        "--metric", default="valid_loss", help="the periodic held-out metric (the value: full_<metric>)"
    )
    p.add_argument("--direction", choices=("minimize", "maximize"), default="minimize")
    p.add_argument("--parallel", type=int, default=1, help="trials at once from this process (default 1)")
    p.add_argument(
        "--storage", help="optuna storage URL (default sqlite:///OUT/study.db; PostgreSQL to share)"
    )
    p.add_argument("--study", help="the study's name in the storage (default: OUT's name)")
    p.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    p.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
