"""Tunery DPO vs TRL DPOTrainer: same model, pairs, order, LoRA init, beta, learning rate and precision.

    python bench/dpo.py                  # or `make bench`; about 10 minutes on 2 CPU cores
    python bench/dpo.py --steps 8        # a quicker look

Each trainer runs in its own process (peak memory is that process's max RSS, model loading included).
The pairs are the bundled feedback comparisons (examples/feedback/train.jsonl), taken in the order
Tunery's seeded shuffle visits them; TRL gets the same pairs in the same order (its sampler is made
sequential) as text already rendered with the chat template, each answer ending with `<|im_end|>`, so
both compute log-probs over exactly the same tokens. Both start from the same LoRA initialisation
(the same seed before `get_peft_model`), with a constant learning rate, so their first steps' losses
must agree up to bf16 rounding; the table prints the largest difference over the first five steps.

Throughput is pairs per second of the whole job after model loading: for Tunery that includes the
up-front pass that computes the reference log-probs; TRL computes them inside every step (adapter
disabled). Quality goes through one code path for both adapters: Tunery's held-out DPO evaluation on
examples/feedback/valid.jsonl (loss, implicit-reward accuracy) with the base model as the reference.
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

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
BETA = 0.1


# --- workers (each in its own process) -------------------------------------------------------------------


def worker_tunery(args: argparse.Namespace) -> dict:
    from tunery.recipes import dpo

    cfg = dpo.DPOConfig(
        model="smollm2-135m-instruct",
        data=args.data,
        out=args.out,
        beta=BETA,
        epochs=1,
        batch_size=args.batch_size,
        lr=args.lr,
        lora_rank=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=0.0,
        max_length=args.max_length,
        precision=args.precision,
        seed=args.seed,
        warmup_ratio=0.0,
        schedule="constant",
        save_every=10**6,
    )
    start = time.perf_counter()
    summary = dpo.train(cfg, overwrite=True)
    records = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    return {
        "pairs": args.steps * args.batch_size,
        "seconds": summary["train_seconds"] + summary["reference_seconds"],
        "total_seconds": time.perf_counter() - start,
        "losses": [r["train_loss"] for r in steps],
        "accuracies": [r["rewards/accuracies"] for r in steps],
        "chosen_logps": [r["logps/chosen"] for r in steps],
        "adapter": str(Path(args.out) / "final"),
    }


def worker_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunery.models.load import BUNDLED, resolve_model_dir

    class InOrderDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return SequentialSampler(self.train_dataset)

    model_dir = resolve_model_dir(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|endoftext|>"  # distinct from EOS, as in Tunery
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(args.seed)  # the same LoRA initialisation as Tunery's
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = DPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=BETA,
        bf16=args.precision == "bf16",
        use_cpu=True,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=args.max_length,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = InOrderDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    trainer.model.save_pretrained(Path(args.out) / "final", save_embedding_layers=False)
    return {
        "pairs": args.steps * args.batch_size,
        "seconds": seconds,
        "total_seconds": seconds,
        "losses": [h["loss"] for h in logs],
        "accuracies": [h.get("rewards/accuracies", float("nan")) for h in logs],
        "chosen_logps": [h.get("logps/chosen", float("nan")) for h in logs],
        "adapter": str(Path(args.out) / "final"),
    }


def worker_eval(args: argparse.Namespace) -> dict:
    """Held-out DPO loss and implicit-reward accuracy of each adapter, through Tunery's evaluation."""
    from tunery.data.feedback import load_feedback_data
    from tunery.models.load import load_model
    from tunery.models.lora import load_adapter
    from tunery.recipes.dpo import DPOConfig, evaluate, reference_logps
    from tunery.training.distributed import World

    cfg = DPOConfig(data="-", out="-", micro_batch_tokens=2048, loss="dpo", beta=BETA, track_energy=False)
    model, tokenizer = load_model("smollm2-135m-instruct")
    pairs = load_feedback_data(
        REPO / "examples/feedback/valid.jsonl", tokenizer, args.max_length, "preference"
    )
    ref = reference_logps(model, pairs, cfg.micro_batch_tokens, "fp32", World())
    out = {}
    for adapter in args.adapters:
        tuned = load_adapter(load_model("smollm2-135m-instruct")[0], adapter)
        out[adapter] = evaluate(tuned, pairs, ref, cfg, "fp32", World())[0]
    return out


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off is faster")
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
        workers = {"tunery": worker_tunery, "trl": worker_trl, "eval": worker_eval}
        result = workers[args.worker](args)
        result["peak_memory_mb"] = peak_memory_mb()
        Path(args.result).write_text(json.dumps(result))
        return

    from tunery.models.load import BUNDLED, resolve_model_dir

    resolve_model_dir(BUNDLED)  # convert the GGUF once, outside the timed runs
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-dpo-"))
    paths = write_pairs(work, args.steps * args.batch_size, args.seed, joined=False)
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
              str(args.max_length), "--lr", str(args.lr), "--precision", args.precision, "--seed", str(args.seed)]  # fmt: skip
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    runs: dict[str, dict] = {}
    for kind in ("tunery", "trl"):
        print(f"running {kind} ...", flush=True)
        runs[kind] = run_worker(
            __file__, kind, [*common, "--data", str(paths[kind]), "--out", str(work / kind)]
        )
        runs[kind]["pairs_s"] = runs[kind]["pairs"] / runs[kind]["seconds"]
    evals = run_worker(__file__, "eval", ["--max-length", str(args.max_length), "--adapters",
                                runs["tunery"]["adapter"], runs["trl"]["adapter"]])  # fmt: skip

    names = {
        "tunery": "Tunery",
        "trl": "TRL DPOTrainer" + (" (grad. ckpt on)" if args.gradient_checkpointing else ""),
    }
    print()
    print(
        f"SmolLM2-135M-Instruct, DPO beta {BETA}, LoRA r16 all-linear, {args.precision}, batch {args.batch_size}, "
        f"max length {args.max_length}, lr {args.lr} constant, {args.steps} steps; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print("| trainer | pairs | seconds | pairs/s | vs TRL | peak MB | loss, last 5 steps | "
          "held-out loss | held-out reward accuracy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    base = runs["trl"]["pairs_s"]
    for kind in ("tunery", "trl"):
        r, e = runs[kind], evals[runs[kind]["adapter"]]
        last5 = sum(r["losses"][-5:]) / len(r["losses"][-5:])
        print(
            f"| {names[kind]} | {r['pairs']} | {r['seconds']:.1f} | {r['pairs_s']:.2f} | {r['pairs_s'] / base:.2f}x | "
            f"{r['peak_memory_mb']:.0f} | {last5:.4f} | {e['valid_loss']:.4f} | {e['valid_rewards/accuracies']:.3f} |"
        )
    print("\nper step, Tunery vs TRL: loss, and the chosen answers' summed log-prob (same pairs: same value)")
    per_step = zip(runs["tunery"]["losses"], runs["trl"]["losses"], runs["tunery"]["chosen_logps"],
                   runs["trl"]["chosen_logps"], strict=False)  # fmt: skip
    for step, (a, b, ca, cb) in enumerate(per_step, start=1):
        print(
            f"  step {step:>3}: loss {a:.5f} {b:.5f} (diff {a - b:+.5f})   logps/chosen {ca:9.3f} {cb:9.3f}"
        )
    first = list(zip(runs["tunery"]["losses"][:5], runs["trl"]["losses"][:5], strict=False))
    print(f"largest |difference| over the first {len(first)} steps: {max(abs(a - b) for a, b in first):.5f}")


if __name__ == "__main__":
    main()
