"""`tunery graders validate | run`: check OpenAI-format grader files and grade samples with them."""

from __future__ import annotations

import argparse
import json

from tunery.errors import TuneryError


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


def cmd_validate(args: argparse.Namespace) -> int:
    from tunery.graders.files import parse_grader_file

    spec = parse_grader_file(args.grader, _model_map(args.model_map))
    print(f"{args.grader}: ok, {spec.type} grader '{spec.name}'")
    for name, sub in getattr(spec, "graders", {}).items():
        print(f"  {name}: {sub.type}")
    return 0


def validate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grader", required=True, help="grader JSON (OpenAI format)")
    p.add_argument("--model-map", action="append", metavar="NAME=LOCAL", help="run model NAME as LOCAL")


def cmd_run(args: argparse.Namespace) -> int:
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


def run_flags(p: argparse.ArgumentParser) -> None:
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
