"""Tunery GRPO vs TRL GRPOTrainer: same model, prompts, group size, completion budget, LoRA, precision.

    python bench/grpo.py                 # or `make bench`; about 6 minutes on 2 CPU cores
    python bench/grpo.py --steps 6       # a quicker look

The prompts are the arithmetic questions of examples/rl/train.jsonl, in the same order for both
(both with shuffling off). A step is 2
prompts x 4 completions of at most 32 new tokens, sampled at temperature 1 (TRL's default setup on
CPU: `per_device_train_batch_size` 8 completions, 4 generations per prompt), LoRA r16 on all linear
layers, bf16, beta 0 (no reference model: both trainers' default), one update per batch, token-level
loss (TRL's default `dapo`; Tunery's `token`). TRL generates with transformers' `generate`; Tunery with
its decoding engine. Gradient checkpointing is off for TRL (its default is on, which is slower).

The reward is the same function for both: the right number (0.8) and the number alone (0.2), as
examples/rl/grader.json scores it. Tunery runs that grader JSON (its Python graders in the sandbox,
a subprocess per batch); TRL calls the same logic as an in-process function.

Throughput is completions per second over the training loop (model loading excluded), with completion
tokens per second beside it, since the two samplers' completions differ in length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

from harness import REPO, run_worker

from tunery.training.memory import peak_memory_mb

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
GROUP = 4
NUMBER = re.compile(r"[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?")


def reward(text: str, answer: str) -> float:
    """examples/rl/grader.json's formula in one function: 0.8 x correct + 0.2 x bare."""

    def value(s: str) -> float:
        return float(s.replace(",", "").replace("\u2212", "-"))

    numbers = NUMBER.findall(text or "")
    correct = bool(numbers) and abs(value(numbers[-1]) - value(answer)) < 1e-9
    bare_text = (text or "").strip().removesuffix(".").strip()
    bare = NUMBER.fullmatch(bare_text) is not None and abs(value(bare_text) - value(answer)) < 1e-9
    return 0.8 * correct + 0.2 * bare


# --- workers (each in its own process) -------------------------------------------------------------------


def worker_tunery(args: argparse.Namespace) -> dict:
    from tunery.recipes import grpo

    cfg = grpo.GRPOConfig(
        model="smollm2-135m-instruct",
        data=args.data,
        grader=str(REPO / "examples/rl/grader.json"),
        out=args.out,
        group_size=GROUP,
        batch_size=args.prompts_per_step,
        epochs=1,
        max_steps=args.steps,
        lr=args.lr,
        lora_rank=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        max_new_tokens=args.new_tokens,
        temperature=1.0,
        precision="bf16",
        seed=args.seed,
        warmup_ratio=0.0,
        save_every=10**6,
        shuffle=False,  # file order, as TRL visits it here
    )
    summary = grpo.train(cfg, overwrite=True)
    steps = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train_reward_mean" in r]
    n = args.steps * args.prompts_per_step * GROUP
    lengths = [r["completion_length"] for r in steps]
    return {
        "completions": n,
        "seconds": summary["train_seconds"],
        "completion_tokens": sum(lengths) / len(lengths) * n,
        "rewards": [r["train_reward_mean"] for r in steps],
    }


def worker_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunery.models.load import BUNDLED, resolve_model_dir

    lengths: list[float] = []

    class Lengths(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def trl_reward(completions, answer, **kwargs):  # type: ignore[no-untyped-def]
        return [reward(c[0]["content"], a) for c, a in zip(completions, answer, strict=True)]

    model_dir = resolve_model_dir(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(lambda row: {"prompt": row["messages"]}, remove_columns=["messages"])
    config = GRPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.prompts_per_step * GROUP,
        num_generations=GROUP,
        max_completion_length=args.new_tokens,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=1.0,
        bf16=True,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        shuffle_dataset=False,  # file order, as Tunery visits it here
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=trl_reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[Lengths()],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    n = args.steps * args.prompts_per_step * GROUP
    return {
        "completions": n,
        "seconds": seconds,
        "completion_tokens": (sum(lengths) / len(lengths) * n) if lengths else float("nan"),
        "rewards": [h["reward"] for h in logs],
    }


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        workers = {"tunery": worker_tunery, "trl": worker_trl}
        result = workers[args.worker](args)
        result["peak_memory_mb"] = peak_memory_mb()
        Path(args.result).write_text(json.dumps(result))
        return

    from tunery.models.load import BUNDLED, resolve_model_dir

    resolve_model_dir(BUNDLED)  # convert the GGUF once, outside the timed runs
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-grpo-"))
    lines = (REPO / "examples/rl/train.jsonl").read_text().splitlines()[: args.steps * args.prompts_per_step]
    data = work / "prompts.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    common = ["--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step), "--new-tokens",
              str(args.new_tokens), "--lr", str(args.lr), "--seed", str(args.seed), "--data", str(data)]  # fmt: skip
    runs: dict[str, dict] = {}
    for kind in ("tunery", "trl"):
        print(f"running {kind} ...", flush=True)
        runs[kind] = run_worker(__file__, kind, [*common, "--out", str(work / kind)])
        runs[kind]["per_s"] = runs[kind]["completions"] / runs[kind]["seconds"]
    print()
    print(
        f"SmolLM2-135M-Instruct, GRPO, {args.prompts_per_step} prompts x {GROUP} completions a step, "
        f"<= {args.new_tokens} new tokens, temperature 1, LoRA r16 all-linear, bf16, {args.steps} steps; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        "| trainer | completions | seconds | completions/s | vs TRL | completion tok/s | peak MB | mean reward |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = runs["trl"]["per_s"]
    for kind, name in (("tunery", "Tunery"), ("trl", "TRL GRPOTrainer")):
        r = runs[kind]
        mean_reward = sum(r["rewards"]) / max(len(r["rewards"]), 1)
        print(
            f"| {name} | {r['completions']} | {r['seconds']:.1f} | {r['per_s']:.2f} | {r['per_s'] / base:.2f}x | "
            f"{r['completion_tokens'] / r['seconds']:.1f} | {r['peak_memory_mb']:.0f} | {mean_reward:.3f} |"
        )


if __name__ == "__main__":
    main()
