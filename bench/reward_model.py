"""Tunery reward model vs TRL RewardTrainer: same model, pairs, order, LoRA, learning rate and precision.

    python bench/reward_model.py              # or `make bench`; about 8 minutes on 2 CPU cores
    python bench/reward_model.py --steps 8    # a quicker look

Each trainer runs in its own process (peak memory is that process's max RSS, model loading included).
The pairs are the bundled feedback comparisons (examples/feedback/train.jsonl), in the order Tunery's
seeded shuffle visits them; TRL gets the same pairs in the same order (its sampler is made sequential) as
text rendered with the chat template, each answer ending with `<|im_end|>`, the token both read the score
at. Both use LoRA r16 on the same seven projection types and train the score head in full, starting
from the same LoRA and head initialisation (TRL's `AutoModelForSequenceClassification` head is overwritten
with the values Tunery draws), so their first steps' losses agree up to rounding.

Throughput is pairs per second of the training loop. Held-out accuracy and loss are each trainer's own
evaluation on examples/feedback/valid.jsonl (both: chosen scored above rejected; Bradley-Terry loss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from harness import REPO, run_worker, write_pairs

from tunery.training.memory import peak_memory_mb

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS}


# --- workers (each in its own process) -------------------------------------------------------------------


def worker_tunery(args: argparse.Namespace) -> dict:
    from tunery.recipes import reward_model

    cfg = reward_model.RewardConfig(
        model="smollm2-135m-instruct",
        data=args.data,
        valid=str(REPO / "examples/feedback/valid.jsonl"),
        out=args.out,
        epochs=1,
        batch_size=args.batch_size,
        lr=args.lr,
        lora_rank=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=0.0,
        lora_targets=",".join(TARGETS),
        max_length=args.max_length,
        precision=args.precision,
        seed=args.seed,
        warmup_ratio=0.0,
        schedule="constant",
        save_every=10**6,
        eval_every=10**6,
    )
    summary = reward_model.train(cfg, overwrite=True)
    records = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    return {
        "pairs": args.steps * args.batch_size,
        "seconds": summary["train_seconds"],
        "losses": [r["train_loss"] for r in records if "train_loss" in r],
        "valid_loss": records[-1]["full_valid_loss"],
        "valid_accuracy": records[-1]["full_valid_accuracy"],
    }


def worker_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tunery.models.load import BUNDLED, resolve_model_dir

    class InOrderRewardTrainer(RewardTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return SequentialSampler(self.train_dataset)

    model_dir = resolve_model_dir(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|endoftext|>"  # distinct from EOS, as in Tunery
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(args.seed)  # the same LoRA initialisation as Tunery's...
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **LORA))
    # ...and the same head: Tunery draws it from a generator seeded with the run's seed (models/heads.py).
    hidden = model.config.hidden_size
    head = torch.randn((1, hidden), generator=torch.Generator().manual_seed(args.seed)) / (hidden + 1) ** 0.5
    for name, param in model.named_parameters():
        if "score" in name:
            param.data.copy_(head)
    config = RewardConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=args.precision == "bf16",
        use_cpu=True,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        max_length=args.max_length,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = InOrderRewardTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=args.data, split="train"),
        eval_dataset=load_dataset("json", data_files=args.valid_text, split="train"),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evaluation = trainer.evaluate()
    return {
        "pairs": args.steps * args.batch_size,
        "seconds": seconds,
        "losses": [h["loss"] for h in logs],
        "valid_loss": evaluation["eval_loss"],
        "valid_accuracy": evaluation.get("eval_accuracy", float("nan")),
    }


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off is faster")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--valid-text", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        result = {"tunery": worker_tunery, "trl": worker_trl}[args.worker](args)
        result["peak_memory_mb"] = peak_memory_mb()
        Path(args.result).write_text(json.dumps(result))
        return

    from tunery.models.load import BUNDLED, resolve_model_dir

    resolve_model_dir(BUNDLED)  # convert the GGUF once, outside the timed runs
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-rm-"))
    paths = write_pairs(work, args.steps * args.batch_size, args.seed, joined=True)
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
              str(args.max_length), "--lr", str(args.lr), "--precision", args.precision, "--seed", str(args.seed),
              "--valid-text", str(paths["valid"])]  # fmt: skip
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    runs: dict[str, dict] = {}
    for kind in ("tunery", "trl"):
        print(f"running {kind} ...", flush=True)
        runs[kind] = run_worker(
            __file__, kind, [*common, "--data", str(paths[kind]), "--out", str(work / kind)]
        )
        runs[kind]["pairs_s"] = runs[kind]["pairs"] / runs[kind]["seconds"]

    trl_name = "TRL RewardTrainer" + (" (grad. ckpt on)" if args.gradient_checkpointing else "")
    names = {"tunery": "Tunery", "trl": trl_name}
    print()
    print(
        f"SmolLM2-135M-Instruct reward model, LoRA r16 + score head, {args.precision}, batch {args.batch_size}, "
        f"lr {args.lr} constant, {args.steps} steps; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
    )
    print("| trainer | pairs | train s | pairs/s | vs TRL | peak MB | loss, last 5 steps | held-out loss | "
          "held-out accuracy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    base = runs["trl"]["pairs_s"]
    for kind in ("tunery", "trl"):
        r = runs[kind]
        last5 = sum(r["losses"][-5:]) / len(r["losses"][-5:])
        print(
            f"| {names[kind]} | {r['pairs']} | {r['seconds']:.1f} | {r['pairs_s']:.2f} | {r['pairs_s'] / base:.2f}x | "
            f"{r['peak_memory_mb']:.0f} | {last5:.4f} | {r['valid_loss']:.4f} | {r['valid_accuracy']:.3f} |"
        )
    print("\nper-step loss, Tunery vs TRL:")
    for step, (a, b) in enumerate(
        zip(runs["tunery"]["losses"], runs["trl"]["losses"], strict=False), start=1
    ):
        print(f"  step {step:>3}: {a:.5f}  {b:.5f}  diff {a - b:+.5f}")
    first = list(zip(runs["tunery"]["losses"][:5], runs["trl"]["losses"][:5], strict=False))
    print(f"largest |difference| over the first {len(first)} steps: {max(abs(a - b) for a, b in first):.5f}")


if __name__ == "__main__":
    main()
