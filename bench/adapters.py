"""Serving many LoRA adapters of one base model: memory and decoding speed of the inference worker with
each adapter beside the shared base weights, against a merged copy of the model per adapter (how the
worker served adapters before), on SmolLM2-135M-Instruct in the worker's precision (bf16 here).

    python bench/adapters.py                     # about 4 minutes on 2 CPU cores
    python bench/adapters.py --adapter runs/sft  # agreement measured on a trained adapter too

1. Memory: a fresh worker process answers a request with the base model, then with each of `--count`
   adapters (rank 16 on every linear layer, random factors), each way; its resident memory after each.
2. Speed: tokens per second at batch 1 and 16 (`--new-tokens` each, sampled at temperature 1, end of
   turn ignored) for the merged copy, the adapter beside the base, and, as the field's reference for an
   adapter served unmerged, transformers' `generate` on the peft model (bf16 weights).
3. Agreement (with `--adapter`): greedy answers to the support questions, beside vs merged, in fp32 and
   bf16: how many are identical.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import REPO
from sample import prompts, time_hf

RANK = 16


def random_adapter(path: Path, seed: int) -> Path:
    from tunery.models.load import BUNDLED, load_model
    from tunery.models.lora import apply_lora

    model, _ = load_model(BUNDLED)
    torch.manual_seed(seed)
    peft = apply_lora(model, rank=RANK, alpha=2 * RANK, dropout=0.0, targets="all-linear")
    with torch.no_grad():
        for key, p in peft.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.002)
    peft.save_pretrained(str(path))
    return path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(mode: str, adapters: list[str]) -> None:
    """In a fresh process: the worker loading each adapter in turn; prints resident MB after each."""
    import tunery.server.inference as inference
    from tunery.models.load import BUNDLED

    kept = len(adapters) if mode == "beside" else 0  # 0: each adapter merged into a copy of its own
    worker = inference.Worker(io.StringIO(), cache_size=len(adapters) + 1, adapter_cache=kept)
    sizes = []
    for adapter in [None, *adapters]:  # each answers one request, so its decoding engine is built
        request = {"model": BUNDLED, "adapter": adapter, "messages": [{"role": "user", "content": "Hi"}]}
        worker.chat(0, {**request, "params": {"max_new_tokens": 1}})
        sizes.append(rss_mb())
    print(json.dumps(sizes))


def time_sampler(model, tokenizer, ids, new_tokens: int, repeats: int, adapter=None) -> float:  # type: ignore[no-untyped-def]
    from tunery.models.sampling import SamplingParams, sample

    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    sample(model, tokenizer, ids, params, adapter=adapter)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sample(model, tokenizer, ids, params, adapter=adapter)
        best = min(best, time.perf_counter() - start)
    return len(ids) * new_tokens / best


def loaded(adapter: str, precision: str):  # type: ignore[no-untyped-def]
    """(merged copy, base, factors beside the base, tokenizer) in `precision`."""
    from tunery.models.decode import decode_model_for
    from tunery.models.load import BUNDLED, load_for_inference
    from tunery.models.lora import read_lora

    merged, tokenizer = load_for_inference(BUNDLED, adapter, precision)
    base, _ = load_for_inference(BUNDLED, None, precision)
    engine = decode_model_for(base)
    updates = read_lora(adapter)
    assert engine is not None and not isinstance(updates, str)
    factors = engine.adapter(updates)
    assert not isinstance(factors, str), factors
    return merged, base, factors, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=4, help="adapters loaded for the memory rows")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--adapter", help="a trained adapter (run directory) for the agreement rows")
    parser.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1:])
        return
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [str(random_adapter(Path(tmp) / f"a{i}", i)) for i in range(args.count)]
        print(f"## Memory: resident MB of a worker process, base then {args.count} adapters (rank {RANK})\n")
        print("| way | base | " + " | ".join(f"+{i + 1}" for i in range(args.count)) + " | per adapter |")
        print("|---|---|" + "---|" * args.count + "---|")
        for mode in ("merged", "beside"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", mode, *adapters],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO / "bench",
            ).stdout.splitlines()[-1]
            sizes = json.loads(out)
            each = (sizes[-1] - sizes[0]) / args.count
            print(f"| {mode} | " + " | ".join(f"{s:.0f}" for s in sizes) + f" | {each:.1f} |", flush=True)

        print(f"\n## Speed: tokens/s, {args.new_tokens} new tokens, best of {args.repeats}\n")
        print("| batch | merged copy | beside the base | beside / merged | peft generate (unmerged) |")
        print("|---|---|---|---|---|")
        merged, base, factors, tokenizer = loaded(adapters[0], "auto")
        print(f"(factors: {factors.nbytes / 2**20:.1f} MB in {factors.layers[0]['qkv'][0].dtype})")
        from tunery.models.load import BUNDLED, load_model
        from tunery.models.lora import cast_frozen, load_adapter

        reference, _ = load_model(BUNDLED)
        reference = load_adapter(reference, adapters[0]).eval()
        cast_frozen(reference, torch.bfloat16)
        reference.requires_grad_(False)
        for batch in (1, 16):
            ids = prompts(tokenizer, batch)
            a = time_sampler(merged, tokenizer, ids, args.new_tokens, args.repeats)
            b = time_sampler(base, tokenizer, ids, args.new_tokens, args.repeats, factors)
            c = time_hf(reference, tokenizer, ids, args.new_tokens, args.repeats)
            print(f"| {batch} | {a:.1f} | {b:.1f} | {b / a:.2f} | {c:.1f} |", flush=True)
        del merged, base, reference

    if args.adapter:
        agreement(args.adapter)


def agreement(adapter: str) -> None:
    """Greedy answers beside the base and merged, each against the merged model's fp32 answers."""
    from tunery.models.sampling import SamplingParams, sample

    print(f"\n## Agreement: greedy answers (64 tokens) to 32 support prompts, {adapter}\n")
    print("| precision | way | answers identical to merged fp32 | first token identical |")
    print("|---|---|---|---|")
    params = SamplingParams(max_new_tokens=64)
    reference = None
    for precision in ("fp32", "bf16"):
        merged, base, factors, tokenizer = loaded(adapter, precision)
        ids = prompts(tokenizer, 32)
        ways = {"merged": sample(merged, tokenizer, ids, params)}
        ways["beside"] = sample(base, tokenizer, ids, params, adapter=factors)
        reference = reference or ways["merged"]
        for way, got in ways.items():
            same = sum(a.token_ids == b.token_ids for a, b in zip(got, reference, strict=True))
            first = sum(a.token_ids[:1] == b.token_ids[:1] for a, b in zip(got, reference, strict=True))
            print(f"| {precision} | {way} | {same}/{len(ids)} | {first}/{len(ids)} |", flush=True)


if __name__ == "__main__":
    main()
