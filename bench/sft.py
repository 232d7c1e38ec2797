"""Tunery vs TRL SFTTrainer: same model, data, LoRA config, max length, batch, steps and precision.

    python bench/sft.py                 # or `make bench`; about 10 minutes on 2 CPU cores
    python bench/sft.py --steps 8       # a quicker look

Each trainer runs in its own process (peak memory is that process's max RSS, model loading included).
The data is the bundled support chats, one example per assistant turn (its history as prompt), so both
trainers compute the loss on exactly the same tokens: TRL through its prompt-completion format (loss on
the completion only), Tunery through `weight: 0` on the earlier assistant turns. Throughput counts the
non-padding tokens that went through the model per second of the training loop. Quality is checked with
one evaluation code path for both adapters: token loss on the held-out support chats.

TRL runs twice: with its defaults (gradient checkpointing on, as TRL ships) and with gradient
checkpointing off (its fastest setting here; padding-free packing needs flash-attention, absent on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunery.training.memory import peak_memory_mb

REPO = Path(__file__).resolve().parents[1]
N_PARAMS = 134.5e6  # SmolLM2-135M
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def expand(path: Path, limit: int | None = None) -> list[list[dict]]:
    """One example per assistant turn: the conversation up to and including that turn."""
    out = []
    for line in path.read_text().splitlines():
        messages = [{"role": m["role"], "content": m["content"]} for m in json.loads(line)["messages"]]
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                out.append(messages[: i + 1])
    return out[:limit] if limit else out


def write_data(work: Path, n_examples: int) -> dict[str, Path]:
    train = expand(REPO / "examples/support/train.jsonl", n_examples)
    valid = expand(REPO / "examples/support/valid.jsonl")
    paths = {"trl": work / "trl.jsonl", "tunery": work / "tunery.jsonl", "valid": work / "valid.jsonl"}
    with paths["trl"].open("w") as fh:
        for ex in train:
            fh.write(json.dumps({"prompt": ex[:-1], "completion": ex[-1:]}) + "\n")
    for key, rows in (("tunery", train), ("valid", valid)):
        with paths[key].open("w") as fh:
            for ex in rows:
                msgs = [dict(m, weight=0) if m["role"] == "assistant" else m for m in ex[:-1]] + ex[-1:]
                fh.write(json.dumps({"messages": msgs}) + "\n")
    return paths


def matmul_peak(dtype_name: str) -> float:
    import torch

    dtype = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype_name])
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


# --- workers (each in its own process) -------------------------------------------------------------------


def worker_tunery(args: argparse.Namespace) -> dict:
    from tunery.recipes import sft

    cfg = sft.SFTConfig(
        model="smollm2-135m-instruct",
        data=args.data,
        out=args.out,
        epochs=1,
        batch_size=args.batch_size,
        lr=args.lr,
        lora_rank=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=0.0,
        max_length=args.max_length,
        precision=args.precision,
        seed=0,
        warmup_ratio=1 / args.steps,
        save_every=10**6,
        micro_batch_tokens=args.micro_batch_tokens,
    )
    summary = sft.train(cfg, overwrite=True)
    records = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    return {
        "tokens": summary["trained_tokens"],
        "seconds": summary["train_seconds"],
        "final_train_loss": sum(losses[-3:]) / 3,
        "adapter": str(Path(args.out) / "final"),
    }


def worker_trl(args: argparse.Namespace, gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunery.models.load import BUNDLED, resolve_model_dir

    model_dir = resolve_model_dir(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|endoftext|>"  # distinct from EOS, as in Tunery
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = SFTConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        bf16=args.precision == "bf16",
        use_cpu=True,
        gradient_checkpointing=gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=args.max_length,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    trainer.model.save_pretrained(Path(args.out) / "final", save_embedding_layers=False)
    return {
        "tokens": int(logs[-1]["num_tokens"]),
        "seconds": seconds,
        "final_train_loss": sum(h["loss"] for h in logs[-3:]) / 3,
        "adapter": str(Path(args.out) / "final"),
    }


def worker_eval(args: argparse.Namespace) -> dict:
    """Held-out token loss of each adapter, through one code path (Tunery's evaluation)."""
    from tunery.data.validate import load_chat_data
    from tunery.models.load import load_model
    from tunery.models.lora import load_adapter
    from tunery.recipes.sft import evaluate
    from tunery.training.distributed import World

    out = {}
    for adapter in args.adapters:
        model, tokenizer = load_model("smollm2-135m-instruct")
        chats = load_chat_data(args.data, tokenizer, args.max_length, min_examples=1)
        model = load_adapter(model, adapter)
        out[adapter] = evaluate(model, chats, 1024, "fp32", World())[0]
    return out


def run_worker(kind: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = fh.name
    cmd = [sys.executable, __file__, "--worker", kind, "--result", result_path, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(result_path).read_text())


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--micro-batch-tokens", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument(
        "--skip-trl-default", action="store_true", help="skip TRL with gradient checkpointing"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        if args.worker == "tunery":
            result = worker_tunery(args)
        elif args.worker.startswith("trl"):
            result = worker_trl(args, gradient_checkpointing=args.worker == "trl")
        else:
            result = worker_eval(args)
        result["peak_memory_mb"] = peak_memory_mb()
        Path(args.result).write_text(json.dumps(result))
        return

    from tunery.models.load import BUNDLED, resolve_model_dir

    resolve_model_dir(BUNDLED)  # convert the GGUF once, outside the timed runs
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-"))
    paths = write_data(work, args.steps * args.batch_size)
    common = [
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--precision",
        args.precision,
        "--micro-batch-tokens",
        str(args.micro_batch_tokens),
    ]
    peak = matmul_peak(args.precision)
    print(f"2048x2048 {args.precision} matmul peak: {peak:.0f} GFLOP/s", flush=True)
    runs: dict[str, dict] = {}
    order = ["tunery", "trl-no-gc"] + ([] if args.skip_trl_default else ["trl"])
    for kind in order:
        data = paths["tunery"] if kind == "tunery" else paths["trl"]
        print(f"running {kind} ...", flush=True)
        runs[kind] = run_worker(kind, [*common, "--data", str(data), "--out", str(work / kind)])
        runs[kind]["tok_s"] = runs[kind]["tokens"] / runs[kind]["seconds"]
    evals = run_worker(
        "eval",
        [
            "--data",
            str(paths["valid"]),
            "--max-length",
            str(args.max_length),
            "--adapters",
            *[runs[k]["adapter"] for k in order],
        ],
    )

    names = {
        "tunery": "Tunery",
        "trl-no-gc": "TRL SFTTrainer (grad. checkpointing off)",
        "trl": "TRL SFTTrainer (defaults: grad. checkpointing on)",
    }
    print()
    print(
        f"SmolLM2-135M-Instruct, LoRA r16 all-linear, {args.precision}, batch {args.batch_size}, max length "
        f"{args.max_length}, {args.steps} steps, {args.steps * args.batch_size} examples; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print("| trainer | tokens | train s | tok/s | vs TRL | peak MB | final train loss | held-out loss |")
    print("|---|---|---|---|---|---|---|---|")
    base = runs["trl-no-gc"]["tok_s"]
    for kind in order:
        r = runs[kind]
        print(
            f"| {names[kind]} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
            f"{r['peak_memory_mb']:.0f} | {r['final_train_loss']:.3f} | {evals[r['adapter']]:.3f} |"
        )
    mfu = 4 * N_PARAMS * runs["tunery"]["tok_s"] / (peak * 1e9)
    print(
        f"\nTunery model FLOP utilisation (4 x 134.5M FLOP per token for LoRA): {100 * mfu:.0f}% of the measured "
        f"{args.precision} matmul peak"
    )


if __name__ == "__main__":
    main()
