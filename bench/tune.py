"""`tunery tune` against `auto`: does a budget of N trials find a config with a lower held-out loss?

    python bench/tune.py                 # bundled model, 6 trials, ~25 min on 2 cores
    python bench/tune.py --model tiny-random --trials 3     # a smoke check, ~2 min

examples/support/valid.jsonl is split in two, alternate lines: the first half is what the trials are
pruned and chosen on (`valid`), the second is a test set no choice looked at. Both runs start from the
same base config (the bundled model, LoRA, every hyperparameter `auto`, safety evaluations off):

- auto: `tunery train sft --config base.yaml` as it is.
- tune: `tunery tune --config base.yaml --trials N --space "lr=loguniform(1e-4,3e-3)" "lora_rank=choice(8,16,32)"`.

Printed: each one's held-out loss on the test half (the final weights: with a valid set, a run keeps its
best evaluation's weights), its loss on the selection half, and the wall time. Numbers vary with the data;
this is one data set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_loss(run: Path, model: str, test: Path) -> float:
    from tunery.data.validate import load_chat_data
    from tunery.models.load import load_model
    from tunery.models.lora import load_adapter
    from tunery.recipes.sft import evaluate
    from tunery.training import distributed

    base, tokenizer = load_model(model)
    tuned = load_adapter(base, run).eval()
    chats = load_chat_data(test, tokenizer, 1024, min_examples=1)
    world = distributed.World()  # one process, on the CPU
    loss, _ = evaluate(tuned, chats, 1024, "fp32", world)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--out", default="bench_runs/tune")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "examples/support/valid.jsonl").read_text().splitlines()
    select, test = out / "select.jsonl", out / "test.jsonl"
    select.write_text("".join(line + "\n" for line in lines[0::2]))
    test.write_text("".join(line + "\n" for line in lines[1::2]))
    base = out / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": args.model, "data": str(REPO / "examples/support/train.jsonl"), "valid": str(select),
        "max_length": 1024, "micro_batch_tokens": 1024, "safety_evals": "none", "seed": 0,
    }))  # fmt: skip
    tunery = [sys.executable, "-m", "tunery"]
    started = time.monotonic()
    subprocess.run([*tunery, "train", "sft", "--config", str(base), "--out", str(out / "auto"), "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    auto_seconds = time.monotonic() - started
    started = time.monotonic()
    subprocess.run(
        [*tunery, "tune", "--config", str(base), "--trials", str(args.trials), "--out", str(out / "tune"),
         "--space", "lr=loguniform(1e-4,3e-3)", "lora_rank=choice(8,16,32)"],
        check=True,
    )  # fmt: skip
    tune_seconds = time.monotonic() - started
    best_yaml = yaml.safe_load((out / "tune" / "best.yaml").read_text())
    best_run = Path((out / "tune" / "best.yaml").read_text().splitlines()[1].split(": ", 1)[1])
    auto_config = yaml.safe_load((out / "auto" / "config.yaml").read_text())
    rows = []
    for name, run, seconds, config in (
        ("auto", out / "auto", auto_seconds, auto_config),
        (
            f"tune, best of {args.trials}",
            best_run if best_run.is_absolute() else Path.cwd() / best_run,
            tune_seconds,
            best_yaml,
        ),
    ):
        summary = json.loads((run / "summary.json").read_text())
        rows.append((
            name, test_loss(run, args.model, test), summary["final_metrics"].get("full_valid_loss"), seconds,
            config.get("lr"), config.get("lora_rank"),
        ))  # fmt: skip
    trials = [line.split(",")[1] for line in (out / "tune" / "trials.csv").read_text().splitlines()[1:]]
    print(
        f"\n{args.model}, examples/support: {len(lines[0::2])} chats to choose on, {len(lines[1::2])} to test on"
    )
    print(f"{'':22} {'test loss':>9} {'select loss':>11} {'wall s':>7}  lr, lora_rank")
    for name, loss, selected, seconds, lr, rank in rows:
        print(f"{name:22} {loss:9.4f} {selected:11.4f} {seconds:7.0f}  {lr:.3g}, {rank}")
    print(f"trials: {', '.join(f'{s}: {trials.count(s)}' for s in sorted(set(trials)))}")
    print(f"test loss, tune / auto: {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
