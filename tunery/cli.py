"""The `tunery` command line: one table of commands, each a plain function of its parsed arguments.

Heavy imports (torch, transformers) happen inside the commands, so `tunery --help` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

log = logging.getLogger("tunery")


# --- commands --------------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from tunery.models.locate import available_models_text

    print(available_models_text())
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from tunery.data.feedback import detect_file_kind, format_feedback_report, validate_feedback_file
    from tunery.data.validate import format_report, validate_chat_file
    from tunery.safety.screen import validation_problems

    tokenizer = None
    if args.model != "none":
        from tunery.models.load import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    if args.format == "prompts":
        return _validate_prompts(args, tokenizer)
    kind = detect_file_kind(args.file, args.max_bytes) if args.format == "auto" else args.format
    minimum = {"min_examples": args.min_examples} if args.min_examples is not None else {}
    if kind == "chat":
        report = validate_chat_file(
            args.file, tokenizer, args.max_length, max_bytes=args.max_bytes, **minimum
        )
    else:
        report = validate_feedback_file(
            args.file, tokenizer, args.max_length, max_bytes=args.max_bytes, **minimum
        )
    screening = _validation_screening(args)
    if screening is not None:
        report.problems += validation_problems(screening)
    if args.json:
        print(
            json.dumps(
                {
                    "file": report.path,
                    "format": kind,
                    "ok": not report.errors,
                    "stats": report.stats,
                    "problems": [
                        {"line": p.line, "key": p.key, "message": p.message, "severity": p.severity}
                        for p in report.problems
                    ],
                }
                | ({"screening": screening.report()} if screening is not None else {}),
                indent=2,
            )
        )
    else:
        print(format_report(report) if kind == "chat" else format_feedback_report(report))
    return 1 if report.errors else 0


def _validation_screening(args: argparse.Namespace) -> Any:
    """`data validate --screen-content/--screen-pii`: the data screen (a FileScreen), or None without those
    flags. Nothing is written: under `redact` the report says what a run would mask or drop."""
    if args.screen_content is None and args.screen_pii is None:
        return None
    from tunery.safety.screen import DEFAULT_CONTENT_POLICY, DEFAULT_PII_POLICY, screen_file

    content = args.screen_content or DEFAULT_CONTENT_POLICY
    return screen_file(
        args.file, content, args.screen_pii or DEFAULT_PII_POLICY, max_bytes=args.max_bytes, write=False
    )


def _validate_prompts(args: argparse.Namespace, tokenizer: Any) -> int:
    """Reinforcement prompts ({"messages": [...], ...}): line checks, and prompts over --max-length."""
    from tunery.data.chat import Problem
    from tunery.data.prompts import validate_prompt_file
    from tunery.safety.screen import validation_problems

    if tokenizer is None:
        raise TuneryError("--format prompts needs a tokenizer: pass --model NAME")
    report = validate_prompt_file(args.file, tokenizer, args.max_length)
    problems = list(report.errors)
    problems += [
        Problem(n, "too_many_tokens", "prompt longer than --max-length; skipped", "warning")
        for n in report.too_long
    ]
    minimum = 10 if args.min_examples is None else args.min_examples
    if not report.errors and len(report.items) < minimum:
        problems.append(
            Problem(
                None,
                "invalid_n_examples",
                f"{len(report.items)} usable prompts; at least {minimum} are required",
            )
        )
    screening = _validation_screening(args)
    if screening is not None:
        problems += validation_problems(screening)
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        stats = {"examples": len(report.items), "errors": len(errors), "too_long": len(report.too_long)}
        found = [
            {"line": p.line, "key": p.key, "message": p.message, "severity": p.severity} for p in problems
        ]
        out = {"file": args.file, "format": "prompts", "ok": not errors, "stats": stats, "problems": found}
        if screening is not None:
            out["screening"] = screening.report()
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.file}: {len(report.items)} prompts, {len(errors)} errors")
        for problem in problems:
            print(f"  {problem.severity:<7} {problem}")
    return 1 if errors else 0


def cmd_data_screen(args: argparse.Namespace) -> int:
    """Offensive content and personal data, per line and field, with the policies applied."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tunery.safety.screen import block_message, run_report, screen_file, summary

    outputs = _redacted_outputs(args.files, args.redacted_out)
    results = {path: screen_file(path, args.content, args.pii, outputs[path]) for path in args.files}
    if args.json:
        report = run_report(results, args.content, args.pii)
        for path, result in results.items():
            report["files"][path]["findings"] = [f.to_json() for f in result.findings]
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        console = Console(width=max(100, Console().width))
        for path, result in results.items():
            table = Table(title=f"{path}: {result.lines} lines; {summary(result)}", title_justify="left")
            for name, ratio in (("line", 1), ("field", 3), ("found", 3), ("text (personal data masked)", 8)):
                table.add_column(name, ratio=ratio, justify="right" if name == "line" else "left")
            ordered = sorted(result.findings, key=lambda f: (f.fictional, f.line))
            for f in ordered[: args.max_rows]:
                found = f"{f.category} {f.score:.2f}" if f.score is not None else f.category
                if f.fictional:
                    found += f" (placeholder: {f.reason})"
                style = "dim" if f.fictional else ""
                table.add_row(str(f.line), f.field, Text(found, style), Text(f.snippet, style))
            if len(ordered) > args.max_rows:
                table.caption = f"{len(ordered) - args.max_rows} more findings: --json lists them all"
            if ordered and args.max_rows > 0:
                console.print(table)
        totals = Table(title="Data screening", title_justify="left")
        copies = any(r.redacted_path for r in results.values())
        for name in ("file", "lines", "flagged (by category)", "placeholders", "action", "redacted copy"):
            if name != "redacted copy" or copies:
                totals.add_column(name, overflow="fold", no_wrap=name in ("lines", "action"))
        for path, result in results.items():
            r = result.report()
            flagged = ", ".join(f"{k} {n}" for k, n in r["by_category"].items())
            row = [
                path,
                str(r["lines"]),
                f"{r['flagged_lines']} ({flagged})" if flagged else "0",
                ", ".join(f"{k} {n}" for k, n in r["fictional_by_category"].items()) or "-",
                r["action"],
            ]
            totals.add_row(*row, *([r["redacted_path"] or "-"] if copies else []))
        console.print(totals)
        console.print(f"content: {args.content} (classifier: alt-profanity-check), personal data: {args.pii}")
    blocked = [r for r in results.values() if r.action == "blocked"]
    for result in blocked:
        print(block_message(result), file=sys.stderr)
    return 1 if blocked else 0


def _redacted_outputs(files: list[str], out: str | None) -> dict[str, Path | None]:
    """Where redacted copies go: --redacted-out for one file, a directory for several, else FILE.redacted.jsonl
    beside each file (None)."""
    if out is None:
        return dict.fromkeys(files)
    if len(files) == 1 and not Path(out).is_dir():
        return {files[0]: Path(out)}
    names = [Path(f).name for f in files]
    if len(set(names)) < len(names):
        raise TuneryError("--redacted-out DIR: the files share names; screen them one at a time")
    return {f: Path(out) / Path(f).name for f in files}


def _train_overrides(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Config overrides from the flags every training command shares, `extra` flags, and --set; checked
    here, so a command imports its recipe (and torch) only once they pass."""
    from tunery.training.config import parse_set

    overrides: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "valid": args.valid,
        "out": args.out,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "learning_rate_multiplier": args.lr_multiplier,
        "lora_rank": 0 if args.full else args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_targets": args.lora_targets,
        "max_length": args.max_length,
        "seed": args.seed,
        "precision": args.precision,
        "save_every": args.save_every,
        "eval_every": args.eval_every,
        "micro_batch_tokens": args.micro_batch_tokens,
    }
    if getattr(args, "safety_evals", None) is not None:
        overrides["safety_evals"] = args.safety_evals
    overrides.update({name: getattr(args, name) for name in extra})
    overrides.update(parse_set(args.set or []))
    _check_before_loading(args, overrides)
    return overrides


def _check_before_loading(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """What a training command can refuse before its recipe's ~4 s of imports (torch, transformers, peft):
    a misspelt model, no or missing data, no --out, a missing adapter or reward model. The recipes check
    these again."""
    import yaml

    from tunery.data.jsonl import check_readable
    from tunery.models.locate import adapter_dir, check_model_name, check_run_path
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
    if not values.get("data"):
        raise TuneryError("no training data: pass --data FILE.jsonl")
    if not values.get("out"):
        raise TuneryError("no run directory: pass --out DIR")
    from tunery.data.formats import foreign_problem

    expect = {"dpo": "preference", "rm": "preference", "kto": "unpaired", "grpo": "prompts", "ppo": "prompts"}
    for key in ("data", "valid"):
        if values.get(key):
            check_readable(Path(str(values[key])))
            foreign = foreign_problem(str(values[key]), expect.get(args.method, "chat"))
            if foreign is not None:  # a CSV, a JSON array, legacy prompt/completion...: before screening
                raise TuneryError(f"{values[key]}, line {foreign.line}: {foreign.message}")
    if values.get("adapter"):
        adapter_dir(str(values["adapter"]))
    if values.get("reward_model"):
        check_run_path(str(values["reward_model"]), reward_model=True)
    check_run_dir(Path(str(values["out"])), resume=False, overwrite=args.overwrite)


def cmd_train_sft(args: argparse.Namespace) -> int:
    overrides = _train_overrides(args, ("adapter",))
    from tunery.recipes import sft

    summary = sft.run(args.config, overrides, resume_dir=args.resume, overwrite=args.overwrite)
    _print_summary(summary)
    return 0


def cmd_train_dpo(args: argparse.Namespace) -> int:
    overrides = _train_overrides(
        args, ("adapter", "loss", "beta", "label_smoothing", "simpo_gamma", "sft_weight")
    )
    from tunery.recipes import dpo

    summary = dpo.run(args.config, overrides, resume_dir=args.resume, overwrite=args.overwrite)
    _print_summary(summary)
    return 0


def cmd_train_kto(args: argparse.Namespace) -> int:
    overrides = _train_overrides(args, ("adapter", "beta", "desirable_weight", "undesirable_weight"))
    from tunery.recipes import kto

    summary = kto.run(args.config, overrides, resume_dir=args.resume, overwrite=args.overwrite)
    _print_summary(summary)
    return 0


def cmd_train_rm(args: argparse.Namespace) -> int:
    overrides = _train_overrides(args, ("adapter", "center_coef"))
    from tunery.recipes import reward_model

    summary = reward_model.run(args.config, overrides, resume_dir=args.resume, overwrite=args.overwrite)
    _print_summary(summary)
    return 0


def cmd_train_grpo(args: argparse.Namespace) -> int:
    if args.max_length is not None:
        raise TuneryError("grpo: use --max-prompt-length and --max-new-tokens instead of --max-length")
    extra = ("adapter", "grader", "group_size", "max_new_tokens", "max_prompt_length", "temperature",
             "beta", "baseline", "scale_rewards", "loss_aggregation", "num_iterations")  # fmt: skip
    overrides = _train_overrides(args, extra)
    overrides.pop("max_length")
    from tunery.recipes import grpo

    summary = grpo.run(args.config, overrides, resume_dir=args.resume, overwrite=args.overwrite)
    _print_summary(summary)
    if summary.get("start_valid_reward_mean") is not None:
        print(
            f"held-out reward: {summary['start_valid_reward_mean']:.4f} before training, "
            f"{summary['final_metrics'].get('valid_reward_mean', float('nan')):.4f} after"
        )
    return 0


def cmd_train_ppo(args: argparse.Namespace) -> int:
    if args.max_length is not None:
        raise TuneryError("ppo: use --max-prompt-length and --max-new-tokens instead of --max-length")
    extra = ("adapter", "reward_model", "completions_per_prompt", "max_new_tokens", "max_prompt_length",
             "temperature", "kl_coef", "kl_target", "ppo_epochs", "num_minibatches", "vf_coef")  # fmt: skip
    overrides = _train_overrides(args, extra)
    overrides.pop("max_length")
    from tunery.recipes import ppo

    summary = ppo.run(args.config, overrides, resume_dir=args.resume, overwrite=args.overwrite)
    _print_summary(summary)
    if summary.get("start_valid_score_mean") is not None:
        final = summary["final_metrics"]
        print(
            f"held-out reward-model score: {summary['start_valid_score_mean']:.4f} before training, "
            f"{final.get('valid_score_mean', float('nan')):.4f} after "
            f"(KL to the start: {final.get('valid_kl', float('nan')):.2f} nats)"
        )
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
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


def _sampling_params(args: argparse.Namespace) -> Any:
    from tunery.models.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop or [],
        seed=args.seed,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    _check_model_and_adapters(args.model, args.adapter)
    from tunery.data.template import prompt_ids
    from tunery.models.load import load_for_inference
    from tunery.models.sampling import sample

    model, tokenizer = load_for_inference(args.model, args.adapter)
    params = _sampling_params(args)

    def reply(messages: list[dict[str, str]]) -> str:
        print("assistant> ", end="", flush=True)
        [completion] = sample(
            model,
            tokenizer,
            [prompt_ids(tokenizer, messages)],
            params,
            on_text=lambda _i, delta: print(delta, end="", flush=True),
        )
        print()
        return completion.text

    return chat_loop(reply, args.model + (f" + {args.adapter}" if args.adapter else ""), args.system)


CHAT_COMMANDS = "/reset clears the conversation; /exit, /quit, Ctrl-D or an empty line leaves"


def chat_loop(
    reply: Callable[[list[dict[str, str]]], str],
    who: str,
    system: str | None = None,
    read: Callable[[str], str] | None = None,
) -> int:
    """`tunery chat`'s conversation: each line typed goes to `reply` with the turns before it, unless it is
    a slash command. Ctrl-C during an answer drops that turn; at the prompt it leaves, as Ctrl-D does."""
    read = read or input
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"Chatting with {who}: {CHAT_COMMANDS}.", file=sys.stderr)
    while True:
        try:
            user = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user in ("", "/exit", "/quit"):
            return 0
        if user == "/reset":
            messages = list(start)
            print("conversation cleared", file=sys.stderr)
            continue
        if re.fullmatch(r"/\w+", user):  # /help or a misspelt command: not a question for the model
            print(
                CHAT_COMMANDS if user == "/help" else f"unknown command {user}; {CHAT_COMMANDS}",
                file=sys.stderr,
            )
            continue
        question = {"role": "user", "content": user}
        try:
            answer = reply([*messages, question])
        except KeyboardInterrupt:
            print("\n(answer stopped; that question is dropped)", file=sys.stderr)
            continue
        messages += [question, {"role": "assistant", "content": answer}]


def _check_model_and_adapters(model: str | None, *adapters: str | None) -> None:
    """A misspelt --model or a missing adapter, refused before the model loads (models/locate.py: no torch)."""
    from tunery.models.locate import adapter_dir, check_model_name

    if model:
        check_model_name(model)
    for adapter in adapters:
        if adapter:
            adapter_dir(adapter)


def _read_prompts(path: str) -> list[dict[str, Any]]:
    from tunery.data.jsonl import read_jsonl

    prompts = []
    for line in read_jsonl(path):
        if line.error:
            raise TuneryError(f"{path} line {line.number}: {line.error}")
        value = line.value
        if isinstance(value, dict) and isinstance(value.get("input"), dict):  # a preference pair's prompt
            value = value["input"]
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            messages = [m for m in value["messages"] if isinstance(m, dict)]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]  # a full chat: complete its last user turn instead
        elif isinstance(value, dict) and isinstance(value.get("prompt"), str):
            messages = [{"role": "user", "content": value["prompt"]}]
        else:
            raise TuneryError(
                f'{path} line {line.number}: expected {{"messages": [...]}} or {{"prompt": "..."}}'
            )
        if not messages or any(not isinstance(m.get("content"), str) for m in messages):
            raise TuneryError(f"{path} line {line.number}: every message needs a string 'content'")
        prompts.append({"line": line.number, "messages": messages, "item": value})
    if not prompts:
        raise TuneryError(f"{path}: no prompts found")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    _check_model_and_adapters(args.model, args.adapter)
    prompts = _read_prompts(args.prompts)
    from tunery.data.template import prompt_ids
    from tunery.models.load import load_for_inference
    from tunery.models.sampling import sample
    from tunery.training.io import atomic_write_text

    model, tokenizer = load_for_inference(args.model, args.adapter)
    params = _sampling_params(args)
    lines = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        completions = sample(
            model,
            tokenizer,
            [prompt_ids(tokenizer, p["messages"]) for p in chunk],
            params,
        )
        for p, c in zip(chunk, completions, strict=True):
            lines.append(
                json.dumps(
                    {
                        "line": p["line"],
                        "messages": p["messages"],
                        "completion": c.text,
                        "finish_reason": c.finish_reason,
                        "completion_tokens": len(c.token_ids),
                    },
                    ensure_ascii=False,
                )
            )
        print(f"{min(start + args.batch_size, len(prompts))}/{len(prompts)} prompts", file=sys.stderr)
    atomic_write_text(args.out, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} completions to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Base vs tuned answers to the same prompts, side by side, then the run's final metrics."""
    _check_model_and_adapters(args.model, args.adapter)
    prompts = _read_prompts(args.prompts)
    from rich.console import Console
    from rich.table import Table

    from tunery.data.template import prompt_ids
    from tunery.models.load import load_for_inference
    from tunery.models.sampling import sample

    model, tokenizer = load_for_inference(args.model, args.adapter)
    params = _sampling_params(args)
    ids = [prompt_ids(tokenizer, p["messages"]) for p in prompts]
    with model.disable_adapter():
        before = sample(model, tokenizer, ids, params)
    after = sample(model, tokenizer, ids, params)
    console = Console(width=max(100, Console().width))
    table = Table(title="Before and after fine-tuning (held-out questions)", show_lines=True)
    table.add_column("question", ratio=2)
    table.add_column(f"base: {args.model}", ratio=3)
    table.add_column("tuned", ratio=3)
    for p, b, a in zip(prompts, before, after, strict=True):
        table.add_row(p["messages"][-1]["content"], b.text.strip(), a.text.strip())
    console.print(table)
    run_dir = Path(args.adapter)
    summary_path = (run_dir.parent if run_dir.name == "final" else run_dir) / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        metrics = Table(title="Final metrics")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for key, value in summary["final_metrics"].items():
            metrics.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        for key in ("steps", "trained_tokens", "tokens_per_second", "train_seconds", "peak_memory_mb"):
            metrics.add_row(key, str(summary[key]))
        console.print(metrics)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from tunery.data.jsonl import check_readable
    from tunery.models.locate import check_run_path

    check_run_path(args.rm, reward_model=True)
    check_readable(Path(args.data))
    from tunery.recipes.compare import score_file
    from tunery.training.io import atomic_write_text

    rows, summary = score_file(args.rm, args.data, args.max_length)
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} scores to {args.out}")
    else:
        for row in rows:
            print(json.dumps(row))
    print(json.dumps(summary), file=sys.stderr if not args.out else sys.stdout)
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from tunery.models.locate import check_run_path

    check_run_path(args.rm, reward_model=True)
    _check_model_and_adapters(args.model, args.adapter, args.baseline_adapter)
    prompts = [p["messages"] for p in _read_prompts(args.prompts)]
    from tunery.recipes.compare import compare_models

    result = compare_models(
        args.rm, prompts, args.model, args.adapter, args.baseline_adapter, _sampling_params(args), args.out
    )
    print(
        f"{result['candidate']} vs {result['baseline']} on {result['prompts']} prompts, judged by {args.rm}: "
        f"win rate {result['win_rate']:.1%} (mean score {result['candidate_mean_score']:.3f} vs "
        f"{result['baseline_mean_score']:.3f}; identical answers: {result['identical_answers']})"
    )
    if args.out:
        print(f"answers and scores: {args.out}")
    return 0


def cmd_eval_suite(args: argparse.Namespace) -> int:
    """`tunery eval safety|bias|memorization|diversity|grounding|all`: base vs tuned, as in evals.json."""
    from tunery.models.locate import check_run_path
    from tunery.safety.evals import SECTIONS, run_evals
    from tunery.training.io import atomic_write_text

    sections = SECTIONS if args.eval_command == "all" else (args.eval_command,)
    if args.eval_command == "grounding" and not args.references:
        raise TuneryError("eval grounding needs --references FILE (the citations answers may use)")
    check_run_path(args.adapter)  # a full fine-tune's run works too, so only that it exists
    _check_model_and_adapters(args.model)
    prompts = [p["messages"] for p in _read_prompts(args.prompts)] if args.prompts else None
    model, tokenizer, base, data, out = _eval_setup(args)
    report = run_evals(
        model,
        tokenizer,
        base_model=base,
        train_path=data,
        references=args.references,
        grounding_prompts=prompts,
        sections=sections,
        size=args.size,
        seed=args.seed,
    )
    merged = _merge_evals(out, report) if out is not None else report
    if out is not None:
        atomic_write_text(out, json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_evals(report)
        if out is not None:
            print(f"wrote {out}" + (" (other sections kept)" if len(merged) > len(report) else ""))
    return 0


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
        model, tokenizer = load_for_inference(str(final))
        base, _ = load_for_inference(base_name)
    else:
        model, tokenizer = load_for_inference(base_name, args.adapter)
        base = None
    out = Path(args.out) if args.out else (run_dir / "evals.json" if meta else None)
    return model, tokenizer, base, data, out


def _merge_evals(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Sections already in `path` that this run did not redo stay (e.g. grounding added to a training run's
    evals); the new config replaces the old one."""
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        old = {}
    old = old if isinstance(old, dict) else {}
    merged = {k: v for k, v in old.items() if k != "config" and k not in report}
    return merged | report


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


def cmd_data_convert(args: argparse.Namespace) -> int:
    from tunery.data.convert import convert_data, format_conversion, parse_columns

    columns = parse_columns(args.columns)
    conversion = convert_data(args.file, args.out, args.source, args.system, columns, args.overwrite)
    print(format_conversion(conversion))
    return 0


def cmd_data_augment(args: argparse.Namespace) -> int:
    from tunery.safety.augment import augment_counterfactual

    if not args.counterfactual:
        raise TuneryError("choose an augmentation: --counterfactual (gender-swapped copies)")
    report = augment_counterfactual(args.file, args.out)
    common = ", ".join(f"{swap} {n}" for swap, n in report.swaps.most_common(8))
    print(
        f"wrote {args.out}: {report.written} lines, the {report.lines} of {args.file} and "
        f"{report.changed} gender-swapped copies ({sum(report.swaps.values())} words swapped"
        + (f": {common}" if common else "")
        + ")"
    )
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from tunery.safety.card import write_model_card

    print(f"wrote {write_model_card(Path(args.run_dir))}")
    return 0


def _model_map(pairs: list[str] | None) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        name, sep, local = pair.partition("=")
        if not sep or not name or not local:
            raise TuneryError(
                f"--model-map {pair!r}: write it as NAME=LOCAL, e.g. gpt-4o=smollm2-135m-instruct"
            )
        mapping[name] = local
    return mapping


def cmd_graders_validate(args: argparse.Namespace) -> int:
    from tunery.graders.files import parse_grader_file

    spec = parse_grader_file(args.grader, _model_map(args.model_map))
    print(f"{args.grader}: ok, {spec.type} grader '{spec.name}'")
    for name, sub in getattr(spec, "graders", {}).items():
        print(f"  {name}: {sub.type}")
    return 0


def cmd_graders_run(args: argparse.Namespace) -> int:
    from tunery.graders.files import grade_files, load_grader, read_items, read_samples
    from tunery.graders.run import run_response
    from tunery.graders.sandbox import SandboxLimits
    from tunery.graders.template import make_sample
    from tunery.training.io import atomic_write_text
    from tunery.training.progress import StepProgress

    grader = load_grader(args.grader, _model_map(args.model_map), SandboxLimits(timeout=args.timeout))
    if args.sample_text is not None:
        try:
            item = json.loads(args.item) if args.item else {}
        except json.JSONDecodeError as exc:
            raise TuneryError(f"--item: invalid JSON at column {exc.colno}: {exc.msg}") from None
        if not isinstance(item, dict):
            raise TuneryError('--item: must be a JSON object, e.g. \'{"answer": "Paris"}\'')
        print(json.dumps(run_response(grader(make_sample(args.sample_text), item), grader), indent=2))
        return 0
    if not args.data or not args.samples:
        raise TuneryError("graders run needs --data and --samples (or --sample-text with --item)")
    items, samples = read_items(args.data), read_samples(args.samples)
    if len(items) != len(samples):
        raise TuneryError(
            f"{args.data} has {len(items)} rows but {args.samples} has {len(samples)} samples; they are "
            "matched line by line, so give one sample per row, in the same order"
        )
    with StepProgress(len(items), description="grading") as progress:
        rows, summary = grade_files(grader, items, samples, lambda done, _: progress.update(done, ""))
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    passed = f", pass rate {summary['pass_rate']:.1%}" if "pass_rate" in summary else ""
    print(
        f"{grader.name} ({grader.type}): mean reward {summary['mean_reward']:.4f} over {len(rows)} samples{passed}"
    )
    for name, mean in summary.get("sub_rewards", {}).items():
        print(f"  {name}: mean {mean:.4f}")
    if summary["errors"]:
        counts = ", ".join(f"{key} {n}" for key, n in summary["errors"].items())
        print(f"errors in {summary['samples_with_errors']} samples: {counts}")
        for row in [r for r in rows if "errors" in r][:5]:
            print(f"  row {row['row']}: {'; '.join(row['messages'])[:300]}")
    else:
        print("errors: none")
    if args.out:
        print(f"per-row results: {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    if not args.merge:
        raise TuneryError("export needs --merge (write a merged Hugging Face model directory)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise TuneryError(f"{out} is not empty; choose a new --out directory")
    _check_model_and_adapters(args.model, args.adapter)
    from tunery.models.load import load_model
    from tunery.models.lora import load_adapter

    model, tokenizer = load_model(args.model)
    merged = load_adapter(model, args.adapter).merge_and_unload()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"wrote merged model to {out} (load it with --model {out})")
    return 0


def _service_settings(args: argparse.Namespace) -> Any:
    from tunery.server.settings import Settings

    return Settings.from_env(
        data_dir=Path(args.data_dir) if args.data_dir else None,
        database_url=args.database_url,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from tunery.graders.sandbox import UNCONFINED_ENV
    from tunery.server.app import create_app, serve

    # every file the service and its workers write (uploads, runs, logs, the database) is the owner's alone
    os.umask(0o077)
    settings = _service_settings(args)
    settings.host, settings.port = args.host, args.port
    settings.max_running_jobs = args.max_running_jobs
    settings.max_upload_bytes = args.max_upload_mb * 2**20
    settings.stop_grace_seconds = args.stop_grace
    settings.train_overrides = list(args.train_set or [])
    settings.audit = not args.no_audit
    settings.audit_redact, settings.audit_fsync = args.audit_redact, args.audit_fsync
    settings.screen_content, settings.screen_pii = args.screen_content, args.screen_pii
    settings.moderate_completions = args.moderate_completions
    for pair in args.base_model or []:
        name, sep, local = pair.partition("=")
        if not name:
            raise TuneryError(
                f"--base-model {pair!r}: write NAME or NAME=LOCAL, e.g. gpt-4o-mini=smollm2-135m-instruct"
            )
        settings.base_models[name] = local if sep else name
    # the address is tried before anything starts: a port in use would otherwise fail inside uvicorn,
    # after the banner, with its exit status 3 and no word of --port
    import errno
    import socket

    def bind_error(port: int) -> OSError | None:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET  # as uvicorn picks it
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                probe.bind((args.host, port))
            except OSError as exc:
                return exc
        return None

    address = f"http://[{args.host}]:{args.port}" if ":" in args.host else f"http://{args.host}:{args.port}"
    problem = bind_error(args.port)
    if problem is not None and problem.errno == errno.EADDRINUSE:
        free = next((p for p in range(args.port + 1, min(args.port + 100, 65536)) if not bind_error(p)), None)
        raise TuneryError(
            f"{address} is already in use (another `tunery serve`?); start on another port with "
            f"--port {free or 'PORT'}"
        )
    if problem is not None:
        hint = "ports below 1024 need root: use --port 8000" if problem.errno == errno.EACCES else ""
        raise TuneryError(
            f"cannot listen on {address}: {problem.strerror or problem}; {hint or 'check --host and --port'}"
        )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host}: anyone who can reach it and holds a key can train and chat",
            file=sys.stderr,
        )
    if args.unconfined_python_graders:  # read by the sandbox here and in every worker the service starts
        os.environ[UNCONFINED_ENV] = "1"
    app = create_app(settings)  # before the banner: a damaged database stops here, with its message
    print(
        f"Tunery serving OpenAI's fine-tuning API on http://{args.host}:{args.port}/v1 and the web app on "
        f"http://{args.host}:{args.port}/ (data: {settings.data_dir})"
    )  # the app logs at start-up whether python graders run in the kernel sandbox
    serve(app, settings, log_level="debug" if args.verbose else "info", access_log=args.access_log)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from tunery.server.auth import create_key
    from tunery.server.store import Store

    store = Store(_service_settings(args).database_url)
    try:
        if args.labeller:
            key_id, key = create_key(store, args.project, role="labeller", name=args.labeller)
        else:
            key_id, key = create_key(store, args.project)
    except ValueError as exc:
        raise TuneryError(str(exc)) from None
    _audit_key_change(args, args.project, "key.created", {"key_id": key_id, "labeller": args.labeller})
    print(key)
    who = f", labeller {args.labeller}" if args.labeller else ""
    print(f"({key_id}, project {args.project}{who}: shown once, stored hashed)", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from tunery.server.auth import list_keys
    from tunery.server.store import Store

    for key_id, project, prefix, _created, revoked, role, name in list_keys(
        Store(_service_settings(args).database_url)
    ):
        who = f"labeller {name}" if role == "labeller" else role
        print(f"{key_id}  {project:<20} {prefix}...  {who}{'  revoked' if revoked else ''}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from tunery.server.auth import list_keys, revoke_key
    from tunery.server.store import Store

    store = Store(_service_settings(args).database_url)
    project = next((row[1] for row in list_keys(store) if row[0] == args.key_id), None)
    if project is None or not revoke_key(store, args.key_id):
        raise TuneryError(f"no key {args.key_id}; `tunery keys list` shows them")
    _audit_key_change(args, project, "key.revoked", {"key_id": args.key_id})
    print(f"revoked {args.key_id}")
    return 0


def _audit_key_change(args: argparse.Namespace, project: str, kind: str, payload: dict[str, Any]) -> None:
    """Keys made or revoked on the command line go in the project's audit log, as the service's own
    changes do (the actor is whoever ran the command: the operator)."""
    from tunery.safety.audit import AuditLog

    payload = payload | {"via": "tunery keys", "user": _os_user()}
    AuditLog(_service_settings(args).audit_dir).append(project, kind, payload, None)


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _audit_logs(args: argparse.Namespace) -> list[Path]:
    """The audit logs a `tunery audit` command names: --project's, or with --all every project's."""
    from tunery.safety.audit import AuditLog, logs
    from tunery.server.settings import Settings

    directory = Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None).audit_dir
    if getattr(args, "all", False):
        paths = logs(directory)
        if not paths:
            raise TuneryError(f"no audit logs in {directory} (is --data-dir the one `tunery serve` uses?)")
        return paths
    if not args.project:
        raise TuneryError("name a project with --project P, or check every log with --all")
    try:
        path = AuditLog(directory).path(args.project)
    except ValueError as exc:
        raise TuneryError(str(exc)) from None
    if not path.is_file():
        known = ", ".join(p.stem for p in logs(directory)) or "none"
        raise TuneryError(
            f"no audit log for project {args.project!r} at {path} (projects with logs: {known})"
        )
    return [path]


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from tunery.safety.audit import verify

    witness = None
    if args.witness:
        seq, _, digest = args.witness.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise TuneryError(
                f"--witness {args.witness!r}: write SEQ:HASH as `tunery audit head` printed them"
            )
        witness = (int(seq), digest)
    intact = True
    for path in _audit_logs(args):
        result = verify(path, witness)
        intact = intact and result.ok
        span = f"seq {result.first_seq}-{result.last_seq}" if result.records else "empty"
        if result.ok:
            print(f"{path.stem}: intact, {result.records} records ({span}), last hash {result.last_hash}")
        else:
            print(
                f"{path.stem}: NOT INTACT, {result.problem_count} problem(s) in {path} ({result.records} records)"
            )
            for problem in result.problems:
                print(f"  {problem}")
        for note in result.notes:
            print(f"  note: {note}")
    return 0 if intact else 1


def cmd_audit_export(args: argparse.Namespace) -> int:
    from tunery.safety.audit import export

    (path,) = _audit_logs(args)
    try:
        manifest = export(path, Path(args.out), args.since, args.until, args.type or (), args.format)
    except ValueError as exc:
        raise TuneryError(f"audit export: {exc}") from None
    span = f"seq {manifest['first_seq']}-{manifest['last_seq']}" if manifest["records"] else "no records"
    print(f"wrote {manifest['records']} records ({span}) to {args.out}, sha256 {manifest['sha256']}")
    print(f"manifest: {args.out}.manifest.json")
    verification = manifest["verification"]
    if not verification["ok"]:
        print(f"warning: the log failed verification: {verification['problems'][0]}", file=sys.stderr)
    return 0


def cmd_audit_head(args: argparse.Namespace) -> int:
    from tunery.safety.audit import read_head

    (path,) = _audit_logs(args)
    try:
        head = read_head(path)
    except ValueError as exc:
        raise TuneryError(str(exc)) from None
    if head is None:
        raise TuneryError(f"{path}: no head file; `tunery audit verify --project {args.project}` says why")
    print(json.dumps({"project": args.project, "seq": head.seq, "hash": head.hash, "time": head.time}))
    print(
        f"keep this where the service cannot write it; later: tunery audit verify --project {args.project} "
        f"--witness {head.seq}:{head.hash}",
        file=sys.stderr,
    )
    return 0


# --- argument parsing ------------------------------------------------------------------------------------

POLICY_CHOICES = ("warn", "block", "redact")  # tunery/safety/screen.py's, without importing it for --help
VERBOSE_FLAGS = ("-v", "--verbose")  # tunery's own, before the command


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def _int_or_auto(value: str) -> int | str:
    return value if value == "auto" else int(value)


class TuneryParser(argparse.ArgumentParser):
    """Every parser and subparser (add_subparsers makes them of this class). No prefix matching: `--epoch`
    must not silently become `--epochs`. An unknown flag is refused by the subcommand it was given to, with
    that subcommand's usage and its closest flags; plain argparse hands a subcommand's leftovers up to the
    top parser, whose message shows `tunery`'s usage. (`exit_on_error=False` does not help in Python 3.11:
    unrecognized and missing required arguments still call error().)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        # before argparse's own checks, so a misspelt flag is named rather than "arguments are required"
        words = list(sys.argv[1:] if args is None else args)
        if self._subparsers is not None:  # the flags before the subcommand are this parser's
            words = list(itertools.takewhile(lambda word: word.startswith("-"), words))
        self._refuse_unknown(
            [flag for flag in _option_like(words) if flag not in self._option_string_actions]
        )
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self._refuse_unknown(list(_option_like(extras)))
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _refuse_unknown(self, flags: list[str]) -> None:
        if not flags:
            return
        if flags[0] in VERBOSE_FLAGS:
            command = self.prog.removeprefix("tunery ")
            self.error(f"{flags[0]} goes before the command: tunery {flags[0]} {command} ...")
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        hints = {flag: _close_flags(flag, known) for flag in flags}
        if len(flags) == 1 and hints[flags[0]]:
            self.error(f"unknown flag {flags[0]}; did you mean {' or '.join(hints[flags[0]])}?")
        if len(flags) == 1:
            self.error(f"unknown flag {flags[0]}; `{self.prog} --help` describes the flags above")
        self.error(
            "unknown flags "
            + ", ".join(f + (f" (did you mean {' or '.join(hints[f])}?)" if hints[f] else "") for f in flags)
        )


def _option_like(args: Sequence[str]) -> list[str]:
    """The flag names among command-line words, as argparse tells flags from values (`--x=1` names --x;
    negative numbers, `-` and words with spaces are values; nothing after `--` is a flag)."""
    flags = []
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or " " in arg or _is_number(arg):
            continue
        flags.append(arg.split("=", 1)[0] if arg.startswith("--") else arg)
    return flags


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# other tools' names whose words the rules in _close_flags cannot map to Tunery's
_FLAG_SYNONYMS = {"output": "out", "output-dir": "out", "max-seq-length": "max-length"}


def _close_flags(flag: str, known: list[str]) -> list[str]:
    """The known flags an unknown one most likely meant: the same words spelt differently (`--batch_size`,
    `--batchsize`, `--epoch`, `--lr-mult`, `--bs`, `--learning-rate` -> `--lr` by initials), else one with a
    word fewer (`--num-epochs`, `--data-file`), else difflib's closest spellings."""
    name = flag.lstrip("-").lower().replace("_", "-")
    words = name.split("-")
    forms = {name, _FLAG_SYNONYMS.get(name, name)}
    for i in range(len(words)):  # a run of whole words by its initials: learning-rate -> lr
        for j in range(i + 2, len(words) + 1):
            if all(len(w) > 2 for w in words[i:j]):
                forms.add("-".join([*words[:i], "".join(w[0] for w in words[i:j]), *words[j:]]))

    def respelt(parts: list[str]) -> bool:
        squashed = "".join(parts)
        if any(
            squashed in (f.replace("-", ""), f.replace("-", "") + "s") or f == squashed + "s" for f in forms
        ):
            return True
        if len(parts) > 1 and name == "".join(p[0] for p in parts):  # --bs
            return True
        return len(parts) == len(words) and all(p.startswith(w) for p, w in zip(parts, words, strict=True))

    def shortened(parts: list[str]) -> bool:
        return len(parts) < len(words) and parts in (words[: len(parts)], words[-len(parts) :])

    split = {option: option.lstrip("-").split("-") for option in known}
    for rule in (respelt, shortened):
        found = [option for option, parts in split.items() if rule(parts)]
        if found:
            return found[:3]
    close = difflib.get_close_matches(name, [option.lstrip("-") for option in known], n=3, cutoff=0.6)
    return [f"--{option}" for option in close]


def build_parser() -> argparse.ArgumentParser:
    parser = TuneryParser(prog="tunery", description="Fine-tune and align language models locally.")
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the models Tunery can load")
    p.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="check training data").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser(
        "validate", help="validate a chat, preference or thumbs up/down JSONL file line by line"
    )
    p.add_argument("file")
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="tokenizer for token counts ('none' to skip)"
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-bytes", type=int, default=512 * 2**20)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument(
        "--format",
        choices=["auto", "chat", "preference", "unpaired", "prompts"],
        default="auto",
        help="the file's format (default: detected; prompts = reinforcement prompts)",
    )
    p.add_argument("--min-examples", type=int, help="fewer valid examples is an error (default 10)")
    p.add_argument("--screen-content", choices=POLICY_CHOICES, help="also screen for offensive content")
    p.add_argument("--screen-pii", choices=POLICY_CHOICES, help="also screen for personal data")
    p.set_defaults(func=cmd_data_validate)
    p = data.add_parser(
        "screen", help="find offensive content and personal data line by line; block, redact or warn"
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--content", choices=POLICY_CHOICES, default="warn", help="offensive lines (default warn)")
    p.add_argument("--pii", choices=POLICY_CHOICES, default="block", help="personal data (default block)")
    p.add_argument("--redacted-out", metavar="PATH", help="redacted copy (a directory for several files)")
    p.add_argument("--max-rows", type=int, default=30, help="findings shown per file")
    p.add_argument("--json", action="store_true", help="machine-readable report with every finding")
    p.set_defaults(func=cmd_data_screen)
    p = data.add_parser("augment", help="add counterfactual copies of training examples (gender-swapped)")
    p.add_argument("file")
    p.add_argument("--counterfactual", action="store_true", help="swap gendered words and listed names")
    p.add_argument("--out", required=True, help="the augmented JSONL (originals and copies)")
    p.set_defaults(func=cmd_data_augment)
    p = data.add_parser(
        "convert",
        help="convert CSV, TSV, JSON-array, ShareGPT, Alpaca or prompt/completion data to chat JSONL",
        description='Write IN as OpenAI chat JSONL ({"messages": [...]} per line) to OUT. Texts lose '
        'trailing whitespace only: legacy prompt/completion separators ("\\n\\n###\\n\\n") and stop '
        'words (" END") are kept, and reported when every line has one; remove them yourself if so.',
    )
    p.add_argument("file", metavar="IN")
    p.add_argument("out", metavar="OUT", help="the chat JSONL to write (atomically)")
    p.add_argument(
        "--from",
        dest="source",
        choices=["auto", "prompt-completion", "sharegpt", "alpaca", "csv", "tsv", "json-array", "jsonl"],
        default="auto",
        help="IN's format (default: detected; jsonl = flat objects read with --columns)",
    )
    p.add_argument("--system", metavar="TEXT", help="a system message for every example without one")
    p.add_argument(
        "--columns",
        metavar="user=COL,assistant=COL",
        help="the columns (or keys) holding each turn, when their names do not say; system=COL optional, "
        "COL+COL joins two",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_data_convert)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="method", required=True)
    p = train.add_parser("sft", help="supervised fine-tuning on chat data (LoRA or full)")
    _add_training_flags(p)
    p.add_argument(
        "--adapter", help="continue from this fine-tuned adapter (a run, checkpoint or adapter dir)"
    )
    p.set_defaults(func=cmd_train_sft)

    p = train.add_parser("dpo", help="direct preference optimisation on comparisons (DPO, IPO, SimPO)")
    _add_training_flags(p)
    p.add_argument(
        "--adapter", help="start from this fine-tuned adapter (e.g. the SFT run); also the reference"
    )
    p.add_argument("--loss", choices=["dpo", "ipo", "simpo"], help="dpo (default), ipo or simpo")
    p.add_argument("--beta", type=float, help="strength of the pull towards the reference (0.1; simpo 2.0)")
    p.add_argument("--label-smoothing", type=float, help="conservative DPO: probability a label is flipped")
    p.add_argument("--simpo-gamma", type=float, help="SimPO target margin (default 1.0)")
    p.add_argument("--sft-weight", type=float, help="add the chosen answers' NLL with this weight (RPO)")
    p.set_defaults(func=cmd_train_dpo)

    p = train.add_parser("kto", help="Kahneman-Tversky optimisation on unpaired thumbs up/down ratings")
    _add_training_flags(p)
    p.add_argument(
        "--adapter", help="start from this fine-tuned adapter (e.g. the SFT run); also the reference"
    )
    p.add_argument("--beta", type=float, help="strength of the pull towards the reference (default 0.1)")
    p.add_argument("--desirable-weight", type=float, help="loss weight of thumbs-up examples (default 1)")
    p.add_argument("--undesirable-weight", type=float, help="loss weight of thumbs-down examples (default 1)")
    p.set_defaults(func=cmd_train_kto)

    p = train.add_parser("rm", help="reward model from comparisons (Bradley-Terry)")
    _add_training_flags(p, evals=False)
    p.add_argument("--adapter", help="start from this fine-tuned adapter (e.g. the SFT run)")
    p.add_argument("--center-coef", type=float, help="weight of the score-centring penalty (default 0)")
    p.set_defaults(func=cmd_train_rm)

    p = train.add_parser("grpo", help="reinforcement fine-tuning with graders (GRPO, RLOO)")
    _add_training_flags(p)
    p.add_argument("--adapter", help="start from this fine-tuned adapter (e.g. the SFT run)")
    p.add_argument("--grader", help="grader JSON (OpenAI format) or file.py:function")
    p.add_argument("--group-size", type=int, help="completions sampled per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, help="completion budget (default 128)")
    p.add_argument("--max-prompt-length", type=int, help="longer prompts are skipped (default 512)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--beta", type=float, help="weight of the KL to the reference (default 0)")
    p.add_argument("--baseline", choices=["mean", "rloo"], help="group mean (GRPO) or leave-one-out")
    p.add_argument("--scale-rewards", choices=["group", "batch", "none"], help="std normalisation")
    p.add_argument("--loss-aggregation", choices=["token", "sequence", "fixed"])
    p.add_argument("--num-iterations", type=int, help="optimizer updates per sampled batch (default 1)")
    p.set_defaults(func=cmd_train_grpo)

    p = train.add_parser("ppo", help="RLHF with PPO: a reward model's scores, a value head, a KL penalty")
    _add_training_flags(p)
    p.add_argument("--adapter", help="start from this fine-tuned adapter (e.g. the SFT run)")
    p.add_argument("--reward-model", help="reward model run directory (tunery train rm)")
    p.add_argument("--completions-per-prompt", type=int, help="answers sampled per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="completion budget (default 128)")
    p.add_argument("--max-prompt-length", type=int, help="longer prompts are skipped (default 512)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--kl-coef", type=float, help="per-token KL penalty in the reward (default 0.05)")
    p.add_argument("--kl-target", type=float, help="adapt kl_coef to hold the KL near this (nats)")
    p.add_argument("--ppo-epochs", type=int, help="passes over each sampled batch (default 4)")
    p.add_argument("--num-minibatches", type=int, help="optimizer steps per pass (default 1)")
    p.add_argument("--vf-coef", type=float, help="weight of the value loss (default 0.1)")
    p.set_defaults(func=cmd_train_ppo)

    p = sub.add_parser("chat", help="talk to a model (streams tokens)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", help="LoRA adapter or run directory")
    p.add_argument("--system", help="system message")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete a JSONL file of prompts")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter")
    p.add_argument("--prompts", required=True, help='JSONL of {"messages": [...]} or {"prompt": "..."}')
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="base vs fine-tuned answers side by side, with the run's metrics")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", required=True, help="LoRA adapter or run directory")
    p.add_argument("--prompts", required=True)
    _add_sampling(p, max_tokens=96)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("score", help="score answers with a reward model")
    p.add_argument("--rm", required=True, help="reward model run directory (tunery train rm)")
    p.add_argument("--data", required=True, help="pairs, rated answers, or chats ending with the answer")
    p.add_argument("--out", help="write one JSON line of scores per input line")
    p.add_argument("--max-length", type=int, default=1024)
    p.set_defaults(func=cmd_score)

    evaluation = sub.add_parser("eval", help="evaluate models").add_subparsers(
        dest="eval_command", required=True
    )
    p = evaluation.add_parser("compare", help="win rate of one model over another, judged by a reward model")
    p.add_argument("--rm", required=True, help="reward model run directory (the judge)")
    p.add_argument("--prompts", required=True, help='JSONL of {"messages": [...]} prompts')
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", help="the candidate's adapter (default: the base model)")
    p.add_argument("--baseline-adapter", help="the baseline's adapter (default: the base model)")
    p.add_argument("--out", help="write prompts, both answers and their scores as JSONL")
    _add_sampling(p, max_tokens=128)
    p.set_defaults(func=cmd_eval_compare)
    from tunery.safety.evals import SECTIONS, SIZES  # no torch: cheap at parse time

    for section in (*SECTIONS, "all"):
        what = "every evaluation" if section == "all" else f"the {section} evaluation"
        p = evaluation.add_parser(section, help=f"{what}: base vs tuned model (tunery/safety/evals.py)")
        p.add_argument(
            "--adapter", required=True, help="run directory or adapter (a full fine-tune's run works)"
        )
        p.add_argument("--model", help="base model (default: the one the run recorded)")
        p.add_argument("--data", help="training JSONL for memorization (default: the run's)")
        p.add_argument("--references", help="citations answers may use (.txt one per line, .json, .jsonl)")
        p.add_argument("--prompts", help="prompts to answer for grounding (default: training prompts)")
        p.add_argument(
            "--size", choices=list(SIZES), default="default", help="prompt counts (default: default)"
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help="evals.json to write or update (default: RUN_DIR/evals.json for a run)")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.set_defaults(func=cmd_eval_suite)

    p = sub.add_parser("card", help="(re)write a run's final/MODEL_CARD.md from the files in its directory")
    p.add_argument("run_dir", help="a finished run directory (e.g. after `tunery eval all` added evals.json)")
    p.set_defaults(func=cmd_card)

    graders = sub.add_parser("graders", help="check and run OpenAI-format graders").add_subparsers(
        dest="graders_command", required=True
    )
    p = graders.add_parser("validate", help="check a grader JSON file (every field, formula and template)")
    p.add_argument("--grader", required=True, help="grader JSON (OpenAI format)")
    p.add_argument("--model-map", action="append", metavar="NAME=LOCAL", help="run model NAME as LOCAL")
    p.set_defaults(func=cmd_graders_validate)
    p = graders.add_parser("run", help="grade samples against dataset rows; per-grader means and errors")
    p.add_argument("--grader", required=True, help="grader JSON (OpenAI format)")
    p.add_argument("--data", help="dataset rows (JSONL): what {{item.*}} refers to")
    p.add_argument(
        "--samples", help="answers (JSONL), one per data row: a string, {output_text}, a chat completion"
    )
    p.add_argument("--out", help="write one JSON line of results per row")
    p.add_argument("--sample-text", help="grade this one answer instead (prints OpenAI's run response)")
    p.add_argument("--item", help="the dataset row for --sample-text, as JSON")
    p.add_argument("--model-map", action="append", metavar="NAME=LOCAL", help="run model NAME as LOCAL")
    p.add_argument("--timeout", type=float, default=120.0, help="python graders: seconds per batch")
    p.set_defaults(func=cmd_graders_run)

    p = sub.add_parser("export", help="write a merged model (base + LoRA adapter)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", required=True)
    p.add_argument("--merge", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible fine-tuning service (files, jobs, models, chat)")
    _add_service_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-running-jobs", type=int, default=1, help="training processes at once")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest file upload")
    p.add_argument("--stop-grace", type=float, default=30.0, help="seconds to checkpoint on cancel/stop")
    p.add_argument("--base-model", action="append", metavar="NAME[=LOCAL]", help="offer another base model")
    p.add_argument("--train-set", action="append", metavar="KEY=VALUE", help="config field for every job")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--no-audit", action="store_true", help="keep no audit log (DATA_DIR/audit/)")
    p.add_argument("--audit-redact", action="store_true", help="redact personal data in the audit log")
    p.add_argument("--audit-fsync", action="store_true", help="sync each audit record to disk")
    p.add_argument("--screen-content", choices=POLICY_CHOICES, default="warn", help="jobs' offensive lines")
    p.add_argument("--screen-pii", choices=POLICY_CHOICES, default="block", help="jobs' personal data")
    p.add_argument(
        "--moderate-completions", action="store_true", help="withhold chat completions the classifier flags"
    )
    p.add_argument(
        "--unconfined-python-graders",
        action="store_true",
        help="run python graders without the bubblewrap sandbox where it cannot run (trusted graders only)",
    )
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="API keys of the service").add_subparsers(
        dest="keys_command", required=True
    )
    p = keys.add_parser("create", help="print a new API key for a project")
    _add_service_flags(p)
    p.add_argument("--project", required=True, help="project name (lowercase letters, digits, - and _)")
    p.add_argument(
        "--labeller", metavar="NAME", help="a labeller's key: labelling in the feedback studio only, as NAME"
    )
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="list keys (ids, projects, prefixes)")
    _add_service_flags(p)
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke a key by id")
    _add_service_flags(p)
    p.add_argument("key_id")
    p.set_defaults(func=cmd_keys_revoke)

    audit = sub.add_parser("audit", help="the service's audit log: verify, export, head").add_subparsers(
        dest="audit_command", required=True
    )
    p = audit.add_parser("verify", help="check the hash chain and head; exit 1 naming the first bad line")
    _add_audit_flags(p)
    p.add_argument("--all", action="store_true", help="every project's log")
    p.add_argument("--witness", metavar="SEQ:HASH", help="a head recorded earlier by `tunery audit head`")
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser("export", help="a copy for auditors (JSONL or CSV) and a manifest")
    _add_audit_flags(p)
    p.add_argument("--since", metavar="ISO", help="from this time (UTC unless it says otherwise)")
    p.add_argument("--until", metavar="ISO", help="before this time")
    p.add_argument("--type", action="append", metavar="T", help="record type, e.g. inference or job.status")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_audit_export)
    p = audit.add_parser("head", help="print the newest record's seq and hash, for an auditor to keep")
    _add_audit_flags(p)
    p.set_defaults(func=cmd_audit_head)
    return parser


def _add_audit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", help="the project whose log to read")
    p.add_argument("--data-dir", help="the service's data directory (default $TUNERY_HOME/service)")


def _add_service_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="files, jobs and the database (default $TUNERY_HOME/service)")
    p.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")


def _add_training_flags(p: argparse.ArgumentParser, evals: bool = True) -> None:
    p.add_argument("--config", help="YAML file of config fields; flags override it")
    p.add_argument("--model")
    p.add_argument("--data", help="training JSONL")
    p.add_argument("--valid", help="validation JSONL")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--epochs", type=_int_or_auto)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule ends there)")
    p.add_argument("--batch-size", type=_int_or_auto)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--lr-multiplier", type=float, help="times the base learning rate (OpenAI's knob)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="all-linear (default) or comma-separated module names")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--max-length", type=int)
    p.add_argument("--micro-batch-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["bf16", "fp32", "auto"])
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    if evals:
        p.add_argument(
            "--safety-evals",
            choices=["none", "quick", "default", "full"],
            help="base-vs-tuned evaluations after training (default quick, ~40 s on the bundled model)",
        )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config field")


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("transformers", "peft", "torch", "httpx", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    from tunery.training.memory import keep_freed_memory

    keep_freed_memory()
    try:
        return int(args.func(args))
    except TuneryError as exc:
        print(f"tunery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntunery: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunery ... | head` closed the pipe: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
