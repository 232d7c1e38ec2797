"""Bigger models: what a quantized base (`--quantize int8|int4`) saves and costs.

    python bench/scale.py --part quantize        # bundled model and a ~1B random Llama, ~25 min on 2 cores
    python bench/scale.py --part quantize --sizes bundled    # the bundled model only, ~6 min

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
"""

from __future__ import annotations

import argparse
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


def one_billion_model() -> Path:
    """The ~1B random Llama-shaped model directory, built on first use."""
    from tunery.models.locate import tunery_home

    out = tunery_home() / "bench" / "llama-1b-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunery.models.load import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def train(model: str, quantize: str, steps: int, batch: int, work: Path) -> dict:
    """One `tunery train sft` run; its summary with the process's peak memory and wall time."""
    out = work / f"{Path(model).name}-{quantize}"
    cmd = [str(BIN / "tunery"), "train", "sft", "--model", model, "--data", str(SUPPORT / "train.jsonl"),
           "--valid", str(SUPPORT / "valid.jsonl"), "--out", str(out), "--max-steps", str(steps),
           "--batch-size", str(batch), "--eval-every", str(steps), "--safety-evals", "none",
           "--no-track-energy", "--seed", "0", "--quantize", quantize, "--overwrite"]  # fmt: skip
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
    return {
        "quantize": quantize,
        "precision": precision,
        "peak_gb": usage.ru_maxrss / 1e6,  # KiB -> GB
        "tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "wall": wall,
        "valid_loss": summary["final_metrics"].get("full_valid_loss"),
    }


def table(title: str, rows: list[dict], loss: bool) -> str:
    base = rows[0]
    lines = [f"{title}", "", "| base | precision | peak memory | vs none | tokens/s | vs none | wall |"
             + (" held-out loss |" if loss else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if loss else "")]  # fmt: skip
    for r in rows:
        cells = [r["quantize"], r["precision"], f"{r['peak_gb']:.2f} GB", f"{r['peak_gb'] / base['peak_gb']:.2f}x",
                 f"{r['tokens_per_second']:.0f}", f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x",
                 f"{r['wall']:.0f} s"]  # fmt: skip
        if loss:
            cells.append(f"{r['valid_loss']:.4f}" if r["valid_loss"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["quantize"], default="quantize")
    parser.add_argument("--sizes", nargs="+", choices=["bundled", "1b"], default=["bundled", "1b"])
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 30 bundled, 3 for 1b)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    reports = []
    with tempfile.TemporaryDirectory(prefix="tunery-scale-") as tmp:
        work = Path(tmp)
        for size in args.sizes:
            model = "smollm2-135m-instruct" if size == "bundled" else str(one_billion_model())
            steps = args.steps or (30 if size == "bundled" else 3)
            rows = []
            for quantize in ("none", "int8", "int4"):
                rows.append(train(model, quantize, steps, args.batch, work))
                print(json.dumps(rows[-1]), flush=True)
            title = (f"{size}: LoRA r16 SFT, {steps} steps of {args.batch} support conversations, "
                     f"{os.cpu_count()} cores")  # fmt: skip
            reports.append(table(title, rows, loss=size == "bundled"))
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
