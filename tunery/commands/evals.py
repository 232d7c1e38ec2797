"""`tunery eval compare | safety | bias | memorization | diversity | grounding | all` and `tunery card`:
how a trained model compares with its base, and the model card that reports it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from tunery.commands.models import add_sampling, check_model_and_adapters, read_prompts, sampling_params
from tunery.errors import TuneryError
from tunery.run import files
from tunery.run.config import PRECISIONS

log = logging.getLogger("tunery")


def cmd_compare(args: argparse.Namespace) -> int:
    from tunery.models.locate import check_run_path

    check_run_path(args.rm, reward_model=True)
    check_model_and_adapters(args.model, args.adapter, args.baseline_adapter)
    prompts = [p["messages"] for p in read_prompts(args.prompts)]
    from tunery.recipes.compare import compare_models

    result = compare_models(
        args.rm, prompts, args.model, args.adapter, args.baseline_adapter, sampling_params(args), args.out
    )
    low, high = result["win_rate_interval"]
    print(
        f"{result['candidate']} vs {result['baseline']} on {result['prompts']} prompts, judged by {args.rm}: "
        f"win rate {result['win_rate']:.1%} (95% {low:.0%}-{high:.0%}; mean score "
        f"{result['candidate_mean_score']:.3f} vs {result['baseline_mean_score']:.3f}; identical answers: "
        f"{result['identical_answers']})"
    )
    interval = result["length_controlled_interval"]
    print(
        f"length-controlled win rate {result['length_controlled_win_rate']:.1%}"
        + (f" (95% {interval[0]:.0%}-{interval[1]:.0%})" if interval else "")
        + f": answers {result['candidate_mean_length']:.0f} vs {result['baseline_mean_length']:.0f} characters"
        " on average; the win rate had both been equally long"
    )
    if args.out:
        print(f"answers and scores: {args.out}")
    return 0


def compare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rm", required=True, help="reward model run directory (the judge)")
    p.add_argument("--prompts", required=True, help='JSONL of {"messages": [...]} prompts')
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", help="the candidate's adapter (default: the base model)")
    p.add_argument("--baseline-adapter", help="the baseline's adapter (default: the base model)")
    p.add_argument("--out", help="write prompts, both answers and their scores as JSONL")
    add_sampling(p, max_tokens=128)


def cmd_suite(args: argparse.Namespace) -> int:
    """`tunery eval safety|bias|memorization|diversity|grounding|all`: base vs tuned, as in evals.json."""
    from tunery.models.locate import check_run_path
    from tunery.safety.evals import SECTIONS, run_evals

    sections = SECTIONS if args.eval_command == "all" else (args.eval_command,)
    if args.eval_command == "grounding" and not args.references:
        raise TuneryError("eval grounding needs --references FILE (the citations answers may use)")
    check_run_path(args.adapter)  # a full fine-tune's run works too, so only that it exists
    check_model_and_adapters(args.model)
    prompts = [p["messages"] for p in read_prompts(args.prompts)] if args.prompts else None
    model, tokenizer, base, data, out = _eval_setup(args)
    report = run_evals(
        model,
        tokenizer,
        base_model=base,
        train_path=data,
        references=args.references,
        grounding_prompts=prompts,
        languages=args.languages,
        sections=sections,
        size=args.size,
        seed=args.seed,
    )
    kept = ""
    if out is not None:
        merged = _merge_evals(out, report)
        files.write_evals(out, merged)
        kept = " (other sections kept)" if set(merged.sections) - set(report) else ""
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_evals(report)
        if out is not None:
            print(f"wrote {out}{kept}")
    return 0


def _languages(value: str) -> list[str]:
    from tunery.safety.evals.safety import ENGLISH, REDTEAM_LANGUAGES  # no torch: cheap at parse time

    codes = [c.strip().lower() for c in value.split(",") if c.strip()]
    unknown = [c for c in codes if c not in (ENGLISH, *REDTEAM_LANGUAGES)]
    if unknown or not codes:
        raise argparse.ArgumentTypeError(
            f"no red-team prompts in {', '.join(unknown) or repr(value)}; choose from "
            f"{', '.join((ENGLISH, *REDTEAM_LANGUAGES))}, comma-separated"
        )
    return codes


def suite_flags(p: argparse.ArgumentParser) -> None:
    from tunery.safety.evals import SIZES  # no torch: cheap at parse time

    p.add_argument("--adapter", required=True, help="run directory or adapter (a full fine-tune's run works)")
    p.add_argument("--model", help="base model (default: the one the run recorded)")
    p.add_argument("--data", help="training JSONL for memorization (default: the run's)")
    p.add_argument("--references", help="citations answers may use (.txt one per line, .json, .jsonl)")
    p.add_argument("--prompts", help="prompts to answer for grounding (default: training prompts)")
    p.add_argument("--size", choices=list(SIZES), default="default", help="prompt counts (default: default)")
    p.add_argument(
        "--languages",
        type=_languages,
        metavar="CODES",
        help="safety: also ask the red-team prompts in these languages, e.g. es,de (of es, fr, de, pt, it; "
        "'en' for English only). Default: the languages of the training prompts, beside English",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default): a greedy answer does not depend on which prompts share its batch, so the numbers "
        "repeat; bf16 decodes about twice as fast, but a few verdicts change with the batch size",
    )
    p.add_argument("--out", help="evals.json to write or update (default: RUN_DIR/evals.json for a run)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _eval_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, str | None, Path | None]:
    """The tuned model and tokenizer, a separate base model for a full fine-tune (None for an adapter: the
    suite switches it off), the training data and where to write evals.json. The base model's name and the
    data default to what the run recorded in final/tunery.yaml."""
    import yaml

    from tunery.models.load import load_for_inference

    given = Path(args.adapter)
    run_dir = given.parent if given.name == "final" else given
    final = run_dir / "final" if (run_dir / "final").is_dir() else given
    meta_path = final / "tunery.yaml"
    meta = yaml.safe_load(meta_path.read_text()) if meta_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    base_name = args.model or meta.get("base_model") or "smollm2-135m-instruct"
    data = args.data
    if data is None:
        recorded = (meta.get("config") or {}).get("data")
        if recorded and Path(recorded).is_file():
            data = str(recorded)
        elif recorded:
            log.warning(
                "the run's training data %s is not here; memorization is skipped (pass --data)", recorded
            )
    elif not Path(data).is_file():
        raise TuneryError(f"--data {data}: no such file")
    if (final / "config.json").is_file():  # a full fine-tune: the run holds the whole model
        model, tokenizer = load_for_inference(str(final), precision=args.precision)
        base, _ = load_for_inference(base_name, precision=args.precision)
    else:
        model, tokenizer = load_for_inference(base_name, args.adapter, precision=args.precision)
        base = None
    out = Path(args.out) if args.out else (run_dir / "evals.json" if meta else None)
    return model, tokenizer, base, data, out


def _merge_evals(path: Path, report: dict[str, Any]) -> files.EvalsReport:
    """Sections already in `path` that this run did not redo stay (e.g. grounding added to a training run's
    evals), unless they were decoded in another precision (their numbers would not compare); the new config
    replaces the old one."""
    new = files.evals_from_json(report)
    previous = files.read_evals(path)
    if previous and previous.config.get("precision") != new.config.get("precision"):
        dropped = sorted(set(previous.sections) - set(new.sections))
        if dropped:
            log.warning(
                "%s: %s decoded in %s, this run in %s; replaced by this run's sections only", path,
                ", ".join(dropped), previous.config.get("precision", "bf16"), new.config.get("precision"),
            )  # fmt: skip
        previous = None
    kept = {k: v for k, v in previous.sections.items() if k not in new.sections} if previous else {}
    return files.EvalsReport(sections=kept | new.sections, config=new.config)


def _print_evals(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    for name, section in report.items():
        if name == "config":
            continue
        table = Table(title=name, title_justify="left")
        for column in ("metric", "base", "tuned", "change"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        base, tuned = section["base"], section["tuned"]
        for metric, value in tuned.items():
            before = base.get(metric)
            table.add_row(
                metric,
                "-" if before is None else f"{before:.3f}",
                f"{value:.3f}",
                "-" if before is None else f"{value - before:+.3f}",
            )
        console.print(table)
        for flag in section["flags"]:
            console.print(f"[bold red]flag:[/] {flag}")
    config = report["config"]
    for section, reason in config["skipped"].items():
        console.print(f"{section}: skipped, {reason}")
    base = {"adapter disabled": "the adapter switched off", "separate model": "the base model"}
    console.print(
        f"{config['size']} size, seed {config['seed']}; base = {base.get(config['base'], 'not measured')}; "
        f"{config['wall_seconds']:.0f} s"
    )


def cmd_card(args: argparse.Namespace) -> int:
    from tunery.safety.card import write_model_card

    print(f"wrote {write_model_card(Path(args.run_dir))}")
    return 0


def card_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory (e.g. after `tunery eval all` added evals.json)")
