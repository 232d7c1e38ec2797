"""Whole-process time, as a user waits for it: `tunery train sft|dpo|rm` against a plain TRL script.

    python bench/whole_process.py          # or `make bench`; 3 methods x 2 data sets, ~12 min on 2 cores
    python bench/whole_process.py --methods rm --data-sets short --steps 2   # a smoke check, ~1 min

bench/sft.py, dpo.py and reward_model.py time the training loop. A user waits for the whole process:
imports, model loading, data checks, the loop, saving. On short examples the loop is short, and what a
run does once (and around every step) weighs more. Here each run is a fresh process, timed by the wall
clock from its start to its exit, with the same environment for both (offline, unbuffered output, a new
empty datasets cache):

- Tunery: the CLI as a user types it, `tunery train METHOD --data ... --out ...`, with its defaults (data
  screening, energy tracking, checkpoints, model card) and safety evaluations off (`--safety-evals none`;
  `rm` has none).
- TRL: bench/trl_scripts/METHOD.py, what a user writes: load model and tokenizer, a peft LoraConfig, the
  dataset from the JSONL, the trainer, `trainer.train()`, `trainer.save_model()`. No evaluation.

Both train on the same examples in the same batches (the TRL file lists them in the order Tunery's seeded
shuffle visits them, and TRL reads it sequentially), one epoch of steps x batch examples, LoRA r16 / alpha
32 on all linear layers, bf16, constant learning rate, the same max length. TRL runs with gradient
checkpointing off, its faster setting on CPU (`--trl-gradient-checkpointing`: its default, on).

Data sets ("today": what the loop benchmarks train on; "short": short examples):
- sft today: one example per assistant turn of examples/support/train.jsonl, the earlier turns as prompt.
  sft short: the first user turn of each support chat, answered with the first sentence(s) of its first
  answer (at least 40 characters), no system prompt (the chat template adds SmolLM2's default one).
- dpo / rm today: a seeded sample of examples/feedback/train.jsonl. short: its single-turn pairs whose two
  answers both have at most 180 characters, in file order, no system prompt.

Columns: Tunery tokens/example (as Tunery counts them: a pair's prompt once, while TRL runs it twice; a system
prompt shared by a row's examples runs once but is counted in each);
whole (process start to exit); TRL / Tunery (>1: Tunery faster); to step 1 (process start to the start of
Tunery's first step: imports, loading, data checks, LoRA, and DPO's reference pass); loop (summary.json's
train_seconds, plus DPO's up-front reference pass as in bench/dpo.py: TRL computes the reference inside
its steps; DPO's reference pass is thus in both); fixed = whole - loop; after (Tunery's last step line to
exit: last checkpoint, final/, summary, card). TRL's loop is its own `train_runtime`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import REPO, in_visit_order, write_pair_files, write_pairs
from sft import expand

BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).resolve().parent / "trl_scripts"
MODEL = "smollm2-135m-instruct"
SHORT_ANSWER_CHARS = 40  # sft short: sentences are taken until the answer has at least this many
SHORT_PAIR_CHARS = 180  # dpo / rm short: both answers at most this long


@dataclass(frozen=True)
class Method:
    command: str  # tunery train COMMAND
    script: str  # bench/trl_scripts/SCRIPT
    lr: float  # as in the loop benchmark
    safety_evals: bool  # the method has --safety-evals


METHODS = {
    "sft": Method("sft", "sft.py", 2e-4, True),
    "dpo": Method("dpo", "dpo.py", 5e-5, True),
    "rm": Method("rm", "reward_model.py", 1e-4, False),
}


# --- data ------------------------------------------------------------------------------------------------


def short_answer(text: str) -> str:
    """The answer's first sentences, as few as make SHORT_ANSWER_CHARS characters."""
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        out = f"{out} {sentence}".strip()
        if len(out) >= SHORT_ANSWER_CHARS:
            break
    return out


def short_chats(n: int) -> list[list[dict]]:
    chats = []
    for line in (REPO / "examples/support/train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        user = next(m for m in messages if m["role"] == "user")
        answer = next(m for m in messages if m["role"] == "assistant")
        chats.append(
            [{"role": "user", "content": user["content"]},
             {"role": "assistant", "content": short_answer(answer["content"])}]
        )  # fmt: skip
    if n > len(chats):
        sys.exit(f"the short sft set has {len(chats)} examples; lower --steps x --batch-size")
    return chats[:n]


def short_pair_lines(n: int) -> list[str]:
    lines = []
    for line in (REPO / "examples/feedback/train.jsonl").read_text().splitlines():
        pair = json.loads(line)
        turns = [m for m in pair["input"]["messages"] if m["role"] != "system"]
        answers = (pair["preferred_output"][0]["content"], pair["non_preferred_output"][0]["content"])
        if len(turns) == 1 and max(map(len, answers)) <= SHORT_PAIR_CHARS:
            lines.append(json.dumps({**pair, "input": {"messages": turns}}))
    if n > len(lines):
        sys.exit(f"the short pair set has {len(lines)} pairs; lower --steps x --batch-size")
    return lines[:n]


def write_chats(work: Path, chats: list[list[dict]], seed: int) -> dict[str, Path]:
    """Tunery trains the last assistant turn of each chat (`weight: 0` on earlier ones); TRL gets the same
    chat as prompt and completion (its loss on the completion only), in Tunery's visiting order."""
    paths = {"tunery": work / "tunery.jsonl", "trl": work / "trl.jsonl"}
    with paths["tunery"].open("w") as fh:
        for chat in chats:
            msgs = [dict(m, weight=0) if m["role"] == "assistant" else m for m in chat[:-1]] + chat[-1:]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    with paths["trl"].open("w") as fh:
        for chat in in_visit_order(chats, seed):
            fh.write(json.dumps({"prompt": chat[:-1], "completion": chat[-1:]}) + "\n")
    return paths


def write_data(method: str, data_set: str, work: Path, n: int, seed: int) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    if method == "sft":
        chats = short_chats(n) if data_set == "short" else expand(REPO / "examples/support/train.jsonl", n)
        if len(chats) < n:
            sys.exit(f"today's sft set has {len(chats)} examples; lower --steps x --batch-size")
        return write_chats(work, chats, seed)
    joined = method == "rm"  # the reward model reads prompt + answer as one text
    if data_set == "short":
        return write_pair_files(work, short_pair_lines(n), seed, joined)
    return write_pairs(work, n, seed, joined)


# --- one timed process -----------------------------------------------------------------------------------


@dataclass
class Timed:
    seconds: float  # process start to exit
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, output line)


def run_timed(cmd: list[str], env: dict[str, str], log_path: Path) -> Timed:
    """Run `cmd` as a fresh process; its wall-clock time and its output lines (stdout and stderr), each
    stamped with the time it arrived."""
    print("  $ " + shlex.join(cmd), flush=True)
    timed = Timed(0.0)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        timed.lines.append((time.perf_counter() - start, line.rstrip("\n")))
    returncode = proc.wait()
    timed.seconds = time.perf_counter() - start
    log_path.write_text("".join(f"{t:8.2f}  {line}\n" for t, line in timed.lines))
    if returncode != 0:
        tail = "\n".join(line for _, line in timed.lines[-40:])
        sys.exit(f"exit status {returncode}: {shlex.join(cmd)}\n{tail}\n(whole log: {log_path})")
    return timed


def run_env(work: Path) -> dict[str, str]:
    """The same for both: offline, unbuffered output (so output lines are stamped when they are written)
    and a new, empty datasets cache (no run reuses another's arrow files)."""
    cache = Path(tempfile.mkdtemp(prefix="datasets-", dir=work))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "HF_DATASETS_CACHE": str(cache)}  # fmt: skip


STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")


def run_tunery(method: Method, args: argparse.Namespace, data: Path, out: Path) -> dict:
    cmd = [str(BIN / "tunery"), "train", method.command, "--model", MODEL, "--data", str(data),
           "--out", str(out), "--epochs", "1", "--batch-size", str(args.batch_size), "--lr", str(method.lr),
           "--schedule", "constant", "--warmup-ratio", "0", "--lora-rank", "16", "--lora-alpha", "32",
           "--lora-dropout", "0", "--lora-targets", "all-linear", "--precision", args.precision,
           "--max-length", str(args.max_length), "--seed", str(args.seed),
           *(["--safety-evals", "none"] if method.safety_evals else []), "--overwrite"]  # fmt: skip
    timed = run_timed(cmd, run_env(out.parent), out.parent / f"{out.name}.log")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    step_lines = [(t, int(m[1])) for t, line in timed.lines if (m := STEP_LINE.search(line))]
    step1_line = next((t for t, step in step_lines if step == 1), None)
    step1_seconds = steps[0]["tokens"] / steps[0]["tokens_per_second"]  # the first record: one step's tokens
    loop = summary["train_seconds"] + summary.get("reference_seconds", 0.0)
    return {
        "whole": timed.seconds,
        "loop": loop,
        "fixed": timed.seconds - loop,
        "to_step1": step1_line - step1_seconds if step1_line is not None else float("nan"),
        "after": timed.seconds - step_lines[-1][0] if step_lines else float("nan"),
        "steps": len(steps),
        "tokens": summary["trained_tokens"],
        "losses": [r["train_loss"] for r in steps],
        "command": cmd,
    }


def run_trl(method: Method, args: argparse.Namespace, model_dir: Path, data: Path, out: Path) -> dict:
    cmd = [sys.executable, str(SCRIPTS / method.script), str(model_dir), str(data), str(out),
           "--batch-size", str(args.batch_size), "--lr", str(method.lr), "--max-length", str(args.max_length),
           "--precision", args.precision, "--seed", str(args.seed),
           *(["--gradient-checkpointing"] if args.trl_gradient_checkpointing else [])]  # fmt: skip
    timed = run_timed(cmd, run_env(out.parent), out.parent / f"{out.name}.log")
    # transformers prints each log as a dict (logging_steps=1: one per step), the last with train_runtime
    logs = []
    for t, line in timed.lines:
        text = line.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                logs.append((t, ast.literal_eval(text)))
            except (ValueError, SyntaxError):
                continue
    losses = [float(d["loss"]) for _, d in logs if "loss" in d]
    end = next(((t, float(d["train_runtime"])) for t, d in logs if "train_runtime" in d), None)
    if not losses or end is None:
        sys.exit(f"TRL logged no loss or no train_runtime: see {out.parent / f'{out.name}.log'}")
    return {
        "whole": timed.seconds,
        "loop": end[1],
        "fixed": timed.seconds - end[1],
        "steps": len(losses),
        "losses": losses,
        "command": cmd,
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median whole-process time (the lower middle one for an even count)."""
    ranked = sorted(runs, key=lambda r: r["whole"])
    return {**ranked[(len(ranked) - 1) // 2], "all_whole": [r["whole"] for r in runs]}


# --- main ------------------------------------------------------------------------------------------------


def warm_up(model_dir: Path) -> None:
    """Untimed: read the model files and import both stacks once, so neither side's first run pays for a
    cold page cache."""
    for path in model_dir.rglob("*"):
        if path.is_file():
            path.read_bytes()
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, datasets, trl, tunery.cli"],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip


COLUMNS = ["data set", "Tunery tokens/example", "Tunery whole s", "TRL whole s", "TRL / Tunery",
           "Tunery to step 1 s", "Tunery loop s", "Tunery fixed s", "Tunery after loop s", "TRL loop s",
           "TRL fixed s", "loop TRL / Tunery"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="sft,dpo,rm", help="comma-separated: sft, dpo, rm")
    parser.add_argument("--data-sets", default="short,today", help="comma-separated: short, today")
    parser.add_argument("--steps", type=int, default=8, help="one epoch of steps x batch-size examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side; the median is shown")
    parser.add_argument(
        "--trl-gradient-checkpointing", action="store_true", help="TRL's default; off is faster"
    )
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    data_sets = [d.strip() for d in args.data_sets.split(",")]
    unknown = [m for m in methods if m not in METHODS] + [d for d in data_sets if d not in ("short", "today")]
    if unknown:
        sys.exit(f"unknown method or data set: {', '.join(unknown)}")

    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    from tunery.models.load import BUNDLED, resolve_model_dir

    model_dir = resolve_model_dir(BUNDLED)  # converts the GGUF once, outside the timed runs
    assert model_dir is not None
    warm_up(model_dir)
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-whole-"))
    n = args.steps * args.batch_size
    print(f"work directory (data, run directories, each run's output as <run>.log): {work}", flush=True)

    results: dict[tuple[str, str], dict[str, dict]] = {}
    for name in methods:
        method = METHODS[name]
        for data_set in data_sets:
            where = work / f"{name}-{data_set}"
            paths = write_data(name, data_set, where, n, args.seed)
            print(f"{name}, {data_set} data ({n} examples):", flush=True)
            runs: dict[str, list[dict]] = {"tunery": [], "trl": []}
            for k in range(args.repeats):
                runs["tunery"].append(run_tunery(method, args, paths["tunery"], where / f"tunery-{k}"))
                runs["trl"].append(run_trl(method, args, model_dir, paths["trl"], where / f"trl-{k}"))
            results[name, data_set] = {side: median_run(r) for side, r in runs.items()}

    print()
    print(
        f"SmolLM2-135M-Instruct, LoRA r16 all-linear, {args.precision}, {args.steps} steps x batch "
        f"{args.batch_size}, constant lr (sft 2e-4, dpo 5e-5, rm 1e-4), TRL gradient checkpointing "
        f"{'on' if args.trl_gradient_checkpointing else 'off'}, median of {args.repeats}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    for name in methods:
        print(f"\n{name}")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for data_set in data_sets:
            a, b = results[name, data_set]["tunery"], results[name, data_set]["trl"]
            cells = [data_set, f"{a['tokens'] / n:.0f}", f"{a['whole']:.1f}", f"{b['whole']:.1f}",
                     f"{b['whole'] / a['whole']:.2f}x", f"{a['to_step1']:.1f}", f"{a['loop']:.1f}",
                     f"{a['fixed']:.1f}", f"{a['after']:.1f}", f"{b['loop']:.1f}", f"{b['fixed']:.1f}",
                     f"{b['loop'] / a['loop']:.2f}x"]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        for data_set in data_sets:
            for side, label in (("tunery", "Tunery"), ("trl", "TRL")):
                r = results[name, data_set][side]
                wholes = ", ".join(f"{s:.1f}" for s in r["all_whole"])
                print(f"  {data_set}, {label}: {r['steps']} steps, loss {r['losses'][0]:.4f} (step 1) -> "
                      f"{r['losses'][-1]:.4f} (last); whole s of each run: {wholes}")  # fmt: skip


if __name__ == "__main__":
    main()
