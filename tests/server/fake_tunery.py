"""A stand-in for `python -m tunery` in the in-process service tests: the same command lines and the
same run directory layout as the real CLI, in milliseconds and without torch.

    fake_tunery.py data validate FILE --json --format F --min-examples N [--screen-content P --screen-pii P]
    fake_tunery.py train sft|dpo|grpo --data F --out DIR [--epochs N] [--batch-size N] ... | --resume DIR

Training writes config.yaml, metrics.jsonl, checkpoints/step-N/ (every step), final/ and summary.json,
with the run directory's writers and names (tunery/run/files.py) where it has them; SIGTERM checkpoints at the next step boundary and exits 2 with the recipe's message, as the recipes do.
Each step sleeps FAKE_STEP_SECONDS (default 0.05). A training file containing FAIL_TRAINING fails at
step 2. Data screening runs for real, except that the classifier is a stand-in: it flags a text
containing FAKE_OFFENSIVE. Every command line is appended to DIR/../argv.jsonl, so tests can check what
the service ran.

FAKE_FAULT makes a training process die at an exact place, for the scheduler's recovery tests: a comma-
separated list of WHERE:ACTION, e.g. `checkpoint:2:SIGKILL` or `step:3:SIGKILL,summary:137`.

    WHERE   step:N            after step N's metrics, before its checkpoint (each attempt meets it again)
            checkpoint:N      after step N's checkpoint (an attempt resumed from it does not)
            summary           after final/ and summary.json, before the process exits
            partial_summary   after final/ and the first bytes of summary.json (once: the next attempt
                              writes all of it)
    ACTION  a signal name     sent to itself (SIGTERM takes the graceful stop, as the recipes do)
            a number          the exit status, without a word of output
            raise             an exception (a traceback naming the server's paths; status 1)
            hang              wait for SIGTERM

The file check prints a line to stderr for a file containing FAKE_CHECK_NOTE and SIGKILLs itself, silently,
for a file containing FAKE_CHECK_KILL; a file containing FAKE_CHECK_SLOW takes it a minute.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from tunery.data.chat import check_chat_example
from tunery.run.files import (
    CONFIG,
    FINAL,
    METRICS,
    STEP,
    SUMMARY,
    TOTAL_STEPS,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    RunSummary,
    read_config,
    write_config,
    write_summary,
)


def validate(args: list[str]) -> int:
    path = Path(args[0])
    fmt = args[args.index("--format") + 1] if "--format" in args else "auto"
    minimum = int(args[args.index("--min-examples") + 1]) if "--min-examples" in args else 10
    if not path.is_file() or path.stat().st_size == 0:
        print(f"tunery: error: {path}: the file is empty; it needs one JSON object per line", file=sys.stderr)
        return 2
    text = path.read_text()
    if "FAKE_CHECK_NOTE" in text:
        print("fake: a note from the file check", file=sys.stderr, flush=True)
    if "FAKE_CHECK_KILL" in text:
        os.kill(os.getpid(), signal.SIGKILL)
    if "FAKE_CHECK_SLOW" in text:  # a file that takes a minute to check (a huge one)
        time.sleep(60)
    problems, examples, detected = [], 0, None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            problems.append(
                {
                    "line": number,
                    "key": "invalid_json",
                    "message": f"invalid JSON: {exc.msg}",
                    "severity": "error",
                }
            )
            continue
        kind = "preference" if isinstance(value, dict) and "preferred_output" in value else "chat"
        if isinstance(value, dict) and "label" in value and "completion" in value:
            kind = "unpaired"  # thumbs up/down (KTO)
        detected = detected or kind
        if kind == "chat" and fmt != "prompts":
            _, found = check_chat_example(value, number)
            problems += [
                {"line": p.line, "key": p.key, "message": p.message, "severity": p.severity} for p in found
            ]
            if found:
                continue
        examples += 1
    # --- data screening: the real screen, with FAKE_OFFENSIVE in a text standing in for the classifier
    screening = None
    if "--screen-pii" in args or "--screen-content" in args:
        from tunery.safety.screen import screen_file, validation_problems

        screening = screen_file(
            path,
            flag(args, "--screen-content", "warn") or "warn",
            flag(args, "--screen-pii", "block") or "block",
            score=lambda texts: [0.99 if "FAKE_OFFENSIVE" in t else 0.01 for t in texts],
            write=False,
        )
        problems += [
            {"line": p.line, "key": p.key, "message": p.message, "severity": p.severity}
            for p in validation_problems(screening)
        ]
    # --- end of data screening
    errors = [p for p in problems if p["severity"] == "error"]
    if not errors and examples < minimum:
        problems.append(
            {
                "line": None,
                "key": "invalid_n_examples",
                "message": f"{examples} examples; at least {minimum} are required",
                "severity": "error",
            }
        )
    report = {
        "file": str(path),
        "format": fmt if fmt != "auto" else (detected or "chat"),
        "ok": not [p for p in problems if p["severity"] == "error"],
        "stats": {"examples": examples, "total_tokens": 100 * examples},
        "problems": problems,
    }
    if screening is not None:
        report["screening"] = screening.report()
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def flag(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def fault(where: str, stop: dict[str, bool], run_dir: Path) -> None:
    """The FAKE_FAULT actions for this place (see the module docstring)."""
    for spec in filter(None, os.environ.get("FAKE_FAULT", "").split(",")):
        point, _, action = spec.rpartition(":")
        if point != where:
            continue
        if action == "raise":
            raise RuntimeError(
                f"fake crash at {where} (python {sys.executable}, run {run_dir}, library {sys.prefix}/lib)"
            )
        if action == "hang":
            while not stop["requested"]:
                time.sleep(0.01)
        elif action.isdigit():
            os._exit(int(action))
        else:
            os.kill(os.getpid(), getattr(signal, action))


def train(method: str, args: list[str]) -> int:
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    resume = flag(args, "--resume")
    run_dir = Path(resume or flag(args, "--out") or "run")
    with (run_dir.parent / "argv.jsonl").open("a") as fh:
        fh.write(json.dumps([method, *args]) + "\n")
    if resume:
        saved = read_config(run_dir)
        assert saved is not None, f"no {CONFIG} in {run_dir}"
        config = saved.fields
        steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*")]
        start = max(steps, default=0)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        data = Path(flag(args, "--data") or "")
        n = sum(1 for line in data.read_text().splitlines() if line.strip())
        batch = int(flag(args, "--batch-size", "5") or 5)
        epochs = int(flag(args, "--epochs", "1") or 1)
        config = {
            "model": flag(args, "--model") or "",
            "data": str(data),
            "epochs": epochs,
            "batch_size": batch,
            "learning_rate_multiplier": float(flag(args, "--lr-multiplier", "1.0") or 1.0),
            "beta": float(flag(args, "--beta", "0.1") or 0.1) if method == "dpo" else None,
            "total_steps": -(-n // batch) * epochs,
        }
        write_config(run_dir, config)
        (run_dir / METRICS).write_text("")
        start = 0
    total = int(config["total_steps"])
    fails = "FAIL_TRAINING" in Path(config["data"]).read_text()
    with (run_dir / METRICS).open("a") as metrics:
        for step in range(start + 1, total + 1):
            time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.05")))
            if fails and step == 2:
                print("tunery: error: the loss is NaN at step 2; lower the learning rate", file=sys.stderr)
                return 2
            metrics.write(
                json.dumps(
                    {STEP: step, TOTAL_STEPS: total, TRAIN_LOSS: 2.0 / step, TRAIN_ACCURACY: 0.1 * step}
                )
                + "\n"
            )
            metrics.flush()
            fault(f"step:{step}", stop, run_dir)
            ckpt = run_dir / "checkpoints" / f"step-{step}"
            (ckpt / "model").mkdir(parents=True, exist_ok=True)
            (ckpt / "model" / "adapter_config.json").write_text("{}")
            (ckpt / "state.json").write_text(json.dumps({"step": step}))
            fault(f"checkpoint:{step}", stop, run_dir)
            if stop["requested"] and step < total:
                print(
                    f"tunery: error: stopped at step {step}/{total} (SIGTERM); continue with: tunery train {method} --resume {run_dir}",
                    file=sys.stderr,
                )
                return 2
    (run_dir / FINAL).mkdir(exist_ok=True)
    (run_dir / FINAL / "adapter_config.json").write_text("{}")
    summary = RunSummary(
        method=method,
        model=str(config.get("model", "")),
        run_dir=str(run_dir),
        steps=total,
        trained_tokens=1000 * total,
        wall_seconds=0.1 * total,
        train_seconds=0.1 * total,
        tokens_per_second=10000.0,
        peak_memory_mb=0.0,
        final_metrics={TRAIN_LOSS: 2.0 / total},
        world_size=1,
        pid=os.getpid(),
        energy={"kwh": 0.0021, "kg_co2e": 0.001, "method": "estimated (fake)", "country": "WORLD"},
        safety_flags=json.loads(os.environ.get("FAKE_SAFETY_FLAGS", "[]")),
        extra={
            "final_step": int(os.environ.get("FAKE_FINAL_STEP", total)),  # select_best kept an earlier step
            "best_valid_loss": 1.25,
        },
    )
    faults = os.environ.get("FAKE_FAULT", "").split(",")
    if any(f.startswith("partial_summary:") for f in faults) and not (run_dir / SUMMARY).exists():
        # a summary torn mid-write, as a writer without write_summary's rename could leave it
        (run_dir / SUMMARY).write_text(json.dumps(summary.to_json())[:20])
        fault("partial_summary", stop, run_dir)
    write_summary(run_dir, summary)
    fault("summary", stop, run_dir)
    print(f"done: {total} steps")
    return 0


def main(argv: list[str]) -> int:
    if argv[:2] == ["data", "validate"]:
        return validate(argv[2:])
    if argv[0] == "train":
        return train(argv[1], argv[2:])
    print(f"fake tunery: unsupported command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
