"""Bigger models: what a quantized base (`--quantize int8|int4`) and sharding (`--shard`) save and cost.

    python bench/scale.py --part quantize        # bundled model and a ~1B random Llama, ~25 min on 2 cores
    python bench/scale.py --part quantize --sizes bundled    # the bundled model only, ~6 min
    python bench/scale.py --part shard --sizes bundled       # full fine-tuning: 1 process, DDP x2, --shard x2

--part quantize runs each base three ways for Tunery (`tunery train sft --quantize none|int8|int4`) and the
same three for TRL (bench/trl_scripts/sft.py: SFTTrainer with a peft LoRA config, the base loaded with
bitsandbytes' LLM.int8 or 4-bit NF4: QLoRA as TRL's documentation writes it), on the same conversations in
the same order (Tunery trains the last assistant turn, TRL the completion: the same tokens), the same
steps, LoRA r16 on every linear layer, the same precision.

--part shard runs full fine-tuning three ways on the same data and steps: one process; two processes with
DDP (torchrun, every process holding the whole model); two processes with --shard (FSDP2). Peak memory is
per process (os.wait4 of torchrun reports the largest of its workers), and the losses must agree.

Each run is `tunery train sft` as a user types it, in a fresh process: peak resident memory is the
process's own (os.wait4), tokens/s and the held-out loss come from its summary.json, wall time is the
whole command. Precision is `auto` (bf16 where the CPU runs it fast, fp32 elsewhere); the table says which.

- bundled: SmolLM2-135M-Instruct, LoRA r16 all-linear, STEPS steps of BATCH support conversations, held-out
  loss on examples/support/valid.jsonl (the cost of quantization in quality). Its weights (0.5 GB in fp32)
  are small beside the activations of a 2048-token micro-batch, so memory moves little.
- 1b: a random model with Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192)
  and the bundled tokenizer's vocabulary (49152): 1.1B parameters, built once and saved under
  $TUNERY_HOME/bench/ as a bf16 model directory (2.3 GB). Weights are random, so only memory and speed mean
  anything; the loss is not reported.
- 0.5b: the same with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864):
  0.4B parameters, a tenth of them the embedding. Full fine-tuning's weights, gradients and optimizer
  state (~6.5 GB) outweigh its activations, which is where sharding pays.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUPPORT = REPO / "examples" / "support"


# random models' shapes: (hidden, MLP width, layers, heads, KV heads)
SHAPES = {"0.5b": (896, 4864, 24, 14, 2), "1b": (2048, 8192, 16, 32, 8)}  # Qwen2.5-0.5B's, Llama 3.2 1B's


def random_model(size: str) -> Path:
    """The random Llama-architecture model of `size` (SHAPES), built on first use."""
    from tunery.models.locate import tunery_home

    out = tunery_home() / "bench" / f"llama-{size}-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunery.models.load import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    hidden, mlp, layers, heads, kv_heads = SHAPES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def conversations(work: Path, steps: int, batch: int) -> dict[str, Path]:
    """Tunery's and TRL's files of the same `steps` x `batch` support conversations (one epoch; each
    assistant turn an example, with the conversation before it)."""
    sys.path.insert(0, str(REPO / "bench"))
    from sft import expand
    from whole_process import write_chats

    chats = expand(SUPPORT / "train.jsonl", steps * batch)
    if len(chats) < steps * batch:
        sys.exit(f"the support set has {len(chats)} examples; lower --steps x --batch")
    (work / "data").mkdir(parents=True)
    return write_chats(work / "data", chats[: steps * batch], seed=0)


def trl_train(model_dir: Path, quantize: str, steps: int, batch: int, precision: str, data: Path,
              work: Path) -> dict:  # fmt: skip
    """bench/trl_scripts/sft.py with --quantize; peak memory of its process, tokens/s of its loop."""
    out = work / f"trl-{model_dir.name}-{quantize}"
    cmd = [sys.executable, str(REPO / "bench" / "trl_scripts" / "sft.py"), str(model_dir), str(data), str(out),
           "--batch-size", str(batch), "--lr", "2e-4", "--precision", precision, "--quantize", quantize,
           "--max-steps", str(steps), "--seed", "0"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="datasets-", dir=work)}  # fmt: skip
    started = time.monotonic()
    log_path = work / f"{out.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if status != 0:
        sys.exit(f"TRL --quantize {quantize} failed:\n{log_path.read_text()[-3000:]}")
    logs = []
    for line in log_path.read_text().splitlines():
        text = line.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                logs.append(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                continue
    tokens = max((float(d["num_tokens"]) for d in logs if "num_tokens" in d), default=0.0)
    runtime = next(float(d["train_runtime"]) for d in logs if "train_runtime" in d)
    return {
        "way": "trl",
        "train_losses": [float(d["loss"]) for d in logs if "loss" in d],
        "quantize": quantize,
        "precision": precision,
        "peak_gb": usage.ru_maxrss / 1e6,
        "tokens_per_second": tokens / runtime,
        "train_seconds": runtime,
        "wall": wall,
        "valid_loss": None,
    }


def train(model: str, quantize: str, steps: int, batch: int, work: Path, way: str = "",
          data: Path | None = None, valid: bool = True) -> dict:  # fmt: skip
    """One `tunery train sft` run; its summary with the process's peak memory and wall time. `way`:
    "" (LoRA, one process), or full fine-tuning "one", "ddp" (torchrun x2) or "shard" (torchrun x2, --shard)."""
    out = work / f"{Path(model).name}-{quantize}{way}"
    launch = [str(BIN / "tunery")]
    if way in ("ddp", "shard"):
        launch = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tunery"]
    held_out = ["--valid", str(SUPPORT / "valid.jsonl"), "--eval-every", str(steps)] if valid else []
    cmd = [*launch, "train", "sft", "--model", model, "--data", str(data or SUPPORT / "train.jsonl"),
           *held_out, "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch), "--safety-evals", "none",
           "--no-track-energy", "--seed", "0", "--quantize", quantize, "--overwrite"]  # fmt: skip
    if way:
        cmd += ["--full", *(["--shard"] if way == "shard" else [])]
    started = time.monotonic()
    with open(work / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if status != 0:
        sys.exit(
            f"{' '.join(cmd[:4])} --quantize {quantize} failed:\n{(work / f'{out.name}.log').read_text()[-3000:]}"
        )
    summary = json.loads((out / "summary.json").read_text())
    config = (out / "config.yaml").read_text()
    precision = next(
        line.split(":")[1].strip() for line in config.splitlines() if line.startswith("precision:")
    )
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "way": way,
        "train_losses": [r["train_loss"] for r in losses if "train_loss" in r],
        "quantize": quantize,
        "precision": precision,
        "peak_gb": usage.ru_maxrss / 1e6,  # KiB -> GB
        "tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "wall": wall,
        "valid_loss": summary["final_metrics"].get("full_valid_loss"),
    }


def table(title: str, rows: list[dict], loss: bool) -> str:
    """Tunery's rows, then TRL's; each against its own unquantized base, and Tunery's tokens/s against
    TRL's at the same quantization."""
    base = {way: next(r for r in rows if r["way"] == way and r["quantize"] == "none") for way in ("", "trl")}
    trl = {r["quantize"]: r for r in rows if r["way"] == "trl"}
    lines = [f"{title}", "", "| trainer | base | precision | peak memory | vs none | tokens/s | vs none | "
             "Tunery / TRL tokens/s | wall |" + (" held-out loss |" if loss else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if loss else "")]  # fmt: skip
    for r in rows:
        own = base[r["way"]]
        ratio = (
            f"{r['tokens_per_second'] / trl[r['quantize']]['tokens_per_second']:.2f}x" if not r["way"] else ""
        )
        cells = ["TRL" if r["way"] else "Tunery", r["quantize"], r["precision"],
                 f"{r['peak_gb']:.2f} GB", f"{r['peak_gb'] / own['peak_gb']:.2f}x", f"{r['tokens_per_second']:.0f}",
                 f"{r['tokens_per_second'] / own['tokens_per_second']:.2f}x", ratio, f"{r['wall']:.0f} s"]  # fmt: skip
        if loss:
            cells.append(f"{r['valid_loss']:.4f}" if r["valid_loss"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shard_table(title: str, rows: list[dict]) -> str:
    base = rows[0]
    names = {"one": "1 process", "ddp": "2 processes, DDP", "shard": "2 processes, --shard"}
    lines = [title, "", "| full fine-tuning | precision | peak memory per process | vs 1 process | tokens/s | "
             "wall | last train loss | held-out loss |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append("| " + " | ".join([
            names[r["way"]], r["precision"], f"{r['peak_gb']:.2f} GB", f"{r['peak_gb'] / base['peak_gb']:.2f}x",
            f"{r['tokens_per_second']:.0f}", f"{r['wall']:.0f} s", f"{r['train_losses'][-1]:.5f}",
            f"{r['valid_loss']:.5f}" if r["valid_loss"] is not None else "-",
        ]) + " |")  # fmt: skip
    gap = max(
        abs(a - b) / abs(a)
        for r in rows
        for a, b in zip(base["train_losses"], r["train_losses"], strict=True)
    )
    return "\n".join(
        [*lines, "", f"largest relative difference of a step's train loss from 1 process: {gap:.1e}"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["quantize", "shard"], default="quantize")
    parser.add_argument("--sizes", nargs="+", choices=["bundled", *SHAPES], default=["bundled", "1b"])
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 20 bundled, 3 for 1b)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from tunery.models.load import resolve_model_dir

    reports = []
    with tempfile.TemporaryDirectory(prefix="tunery-scale-") as tmp:
        work = Path(tmp)
        for size in args.sizes:
            model = "smollm2-135m-instruct" if size == "bundled" else str(random_model(size))
            steps = args.steps or (20 if size == "bundled" else 3)
            if args.part == "shard":
                rows = [train(model, "none", steps, args.batch, work, way) for way in ("one", "ddp", "shard")]
                for row in rows:
                    print(json.dumps(row), flush=True)
                title = (f"{size}: full SFT, {steps} steps of {args.batch} support conversations, "
                         f"{os.cpu_count()} cores")  # fmt: skip
                reports.append(shard_table(title, rows))
                continue
            data = conversations(work / size, steps, args.batch)
            model_dir = resolve_model_dir(model)
            assert model_dir is not None
            rows = []
            for quantize in ("none", "int8", "int4"):
                # the held-out loss on the bundled model only (random weights' loss means nothing), so the
                # wall times of the larger sizes compare with TRL's, which evaluates nothing
                rows.append(train(model, quantize, steps, args.batch, work, data=data["tunery"],
                                  valid=size == "bundled"))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            for quantize in ("none", "int8", "int4"):
                rows.append(
                    trl_train(model_dir, quantize, steps, args.batch, rows[0]["precision"], data["trl"], work)
                )
                print(json.dumps(rows[-1]), flush=True)
            title = (f"{size}: LoRA r16 SFT, {steps} steps of {args.batch} support conversations (the last "
                     f"assistant turn trained), {os.cpu_count()} cores")  # fmt: skip
            reports.append(table(title, rows, loss=size == "bundled"))
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
