"""`tunery data validate | screen | augment | convert`: check, screen and reshape training data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

POLICY_CHOICES = ("warn", "block", "redact")  # tunery/safety/screen.py's, without importing it for --help


def cmd_validate(args: argparse.Namespace) -> int:
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


def validate_flags(p: argparse.ArgumentParser) -> None:
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


def cmd_screen(args: argparse.Namespace) -> int:
    """Offensive content and personal data, per line and field, with the policies applied."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tunery.safety.screen import block_message, run_report, screen_file, summary, unscored_text

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
        console.print(
            f"content: {args.content} (classifier: alt-profanity-check; other languages: their word lists),"
            f" personal data: {args.pii}"
        )
        for path, result in results.items():
            listed = ", ".join(f"{k} {len(v)}" for k, v in sorted(result.word_list_lines.items()))
            if listed:
                console.print(f"{path}: lines in other languages, checked against their word lists: {listed}")
            if result.unscored_lines:
                console.print(f"{path}: {unscored_text(result)}")
    blocked = [r for r in results.values() if r.action == "blocked"]
    for result in blocked:
        print(block_message(result), file=sys.stderr)
    return 1 if blocked else 0


def screen_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--content", choices=POLICY_CHOICES, default="warn", help="offensive lines (default warn)")
    p.add_argument("--pii", choices=POLICY_CHOICES, default="block", help="personal data (default block)")
    p.add_argument("--redacted-out", metavar="PATH", help="redacted copy (a directory for several files)")
    p.add_argument("--max-rows", type=int, default=30, help="findings shown per file")
    p.add_argument("--json", action="store_true", help="machine-readable report with every finding")


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


def cmd_augment(args: argparse.Namespace) -> int:
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


def augment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--counterfactual", action="store_true", help="swap gendered words and listed names")
    p.add_argument("--out", required=True, help="the augmented JSONL (originals and copies)")


def cmd_convert(args: argparse.Namespace) -> int:
    from tunery.data.convert import convert_data, format_conversion, parse_columns

    columns = parse_columns(args.columns)
    conversion = convert_data(args.file, args.out, args.source, args.system, columns, args.overwrite)
    print(format_conversion(conversion))
    return 0


def convert_flags(p: argparse.ArgumentParser) -> None:
    p.description = (
        'Write IN as OpenAI chat JSONL ({"messages": [...]} per line) to OUT. Texts lose trailing whitespace '
        'only: legacy prompt/completion separators ("\\n\\n###\\n\\n") and stop words (" END") are kept, and '
        "reported when every line has one; remove them yourself if so."
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
