"""Tunery's sampler vs transformers' `generate` on SmolLM2-135M-Instruct: tokens per second at batch 1
and batch 16, same prompts, same number of new tokens, same precision.

    python bench/sample.py                       # about 1.5 minutes on 2 CPU cores
    python bench/sample.py --new-tokens 32       # a quicker look
    python bench/sample.py --llama-cpp           # beside llama.cpp on the same weights (make llama-cpp)

Every row generates exactly `--new-tokens` tokens (end-of-turn ignored in both), by sampling at
temperature 1, so both do the same work. transformers runs with bf16 weights (the same precision as
Tunery) and, for reference, with fp32 weights as loaded by default. Prompts are the support questions
in examples/support/questions.jsonl, cycled to fill the batch. Each configuration runs once to warm up,
then is timed over `--repeats` runs (best time kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time

import torch
from harness import REPO


def prompts(tokenizer, batch: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    from tunery.data.template import prompt_ids

    lines = (REPO / "examples/support/questions.jsonl").read_text().splitlines()
    chats = [json.loads(line)["messages"] for line in lines]
    return [prompt_ids(tokenizer, chats[i % len(chats)]) for i in range(batch)]


def time_tunery(model, tokenizer, ids: list[list[int]], new_tokens: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    from tunery.models.sampling import SamplingParams, sample

    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    sample(model, tokenizer, ids, params)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = sample(model, tokenizer, ids, params)
        best = min(best, time.perf_counter() - start)
        assert all(len(c.token_ids) == new_tokens for c in out)
    return len(ids) * new_tokens / best


def time_hf(model, tokenizer, ids: list[list[int]], new_tokens: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    longest = max(len(p) for p in ids)
    input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, p in enumerate(ids):
        input_ids[i, longest - len(p) :] = torch.tensor(p)
        attention[i, longest - len(p) :] = 1
    kwargs = {
        "attention_mask": attention,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.no_grad():
        model.generate(input_ids, **kwargs)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            best = min(best, time.perf_counter() - start)
            assert out.shape[1] == longest + new_tokens
    return len(ids) * new_tokens / best


def time_llama_cpp(path: str, ids: list[list[int]], new_tokens: int, repeats: int) -> float:
    """llama.cpp (llama-cpp-python) on a GGUF file `tunery export --gguf` wrote from the same weights: one
    sequence at a time (its Python API decodes one), the same sampling (temperature 1, no top-k/top-p)."""
    from llama_cpp import Llama

    from tunery.models.gguf_export import _quiet_native_output

    with _quiet_native_output():
        llm = Llama(path, n_ctx=1024, n_batch=512, n_threads=os.cpu_count(), verbose=False, seed=0)

    def run(prompt: list[int]) -> int:
        made = 0
        llm.reset()
        for _ in llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, reset=True):
            made += 1
            if made == new_tokens:
                break
        return made

    run(ids[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        made = sum(run(p) for p in ids)
        best = min(best, time.perf_counter() - start)
        assert made == len(ids) * new_tokens
    llm.close()
    return len(ids) * new_tokens / best


def time_llama_cpp_batched(path: str, ids: list[list[int]], new_tokens: int, repeats: int) -> float:
    """llama.cpp decoding all of `ids` together, as llama.cpp's own batched example and server do: one
    `llama_decode` per step carries every sequence's newest token (each its own sequence id in a unified
    KV cache), and llama.cpp's sampler (temperature 1, nothing filtered) draws each next token."""
    import llama_cpp as lc

    from tunery.models.gguf_export import _quiet_native_output

    batch = len(ids)
    with _quiet_native_output():
        model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx = batch * (max(len(p) for p in ids) + new_tokens + 8)
        params.n_batch = params.n_ubatch = max(512, sum(len(p) for p in ids))
        params.n_seq_max = batch
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        ctx = lc.llama_init_from_model(model, params)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(0))
    tokens = lc.llama_batch_init(params.n_batch, 0, 1)

    def fill(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        tokens.n_tokens = len(entries)
        for n, (token, pos, seq, out) in enumerate(entries):
            tokens.token[n], tokens.pos[n], tokens.n_seq_id[n] = token, pos, 1
            tokens.seq_id[n][0], tokens.logits[n] = seq, out

    def run() -> int:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        fill([(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(ids) for pos, t in enumerate(p)])
        assert lc.llama_decode(ctx, tokens) == 0
        outputs = list(itertools.accumulate(len(p) for p in ids))
        made = 0
        for step in range(new_tokens):
            drawn = [lc.llama_sampler_sample(chain, ctx, out - 1) for out in outputs]
            made += len(drawn)
            if step == new_tokens - 1:
                break
            fill([(t, len(p) + step, seq, True) for seq, (t, p) in enumerate(zip(drawn, ids, strict=True))])
            assert lc.llama_decode(ctx, tokens) == 0
            outputs = list(range(1, batch + 1))
        return made

    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        made = run()
        best = min(best, time.perf_counter() - start)
        assert made == batch * new_tokens
    lc.llama_batch_free(tokens)
    lc.llama_sampler_free(chain)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return batch * new_tokens / best


def llama_cpp_rows(model, tokenizer, args) -> None:  # type: ignore[no-untyped-def]
    """Tunery's sampler beside llama.cpp on the same weights, at each batch size: the CPU inference anchor.
    Batch 1 runs through llama-cpp-python's `Llama.generate`, larger batches through llama.cpp's batch API."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: not installed (make llama-cpp), not compared")
        return
    from tunery.models.gguf_export import export_gguf
    from tunery.models.load import BUNDLED, load_model

    full, _ = load_model(BUNDLED)  # fp32 weights, to write the files from
    print(
        "| batch | llama.cpp file | llama.cpp tok/s | Tunery tok/s (its inference precision) | Tunery / llama.cpp |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f32", "f16", "q8_0"):
            export_gguf(full, tokenizer, f"{tmp}/smollm2-{quant}.gguf", quant)
        for batch in args.batches:
            ids = prompts(tokenizer, batch)
            ours = time_tunery(model, tokenizer, ids, args.new_tokens, args.repeats)
            for quant in ("f32", "f16", "q8_0"):
                path = f"{tmp}/smollm2-{quant}.gguf"
                if batch == 1:
                    theirs = time_llama_cpp(path, ids, args.new_tokens, args.repeats)
                else:
                    theirs = time_llama_cpp_batched(path, ids, args.new_tokens, args.repeats)
                print(f"| {batch} | {quant} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--llama-cpp", action="store_true", help="beside llama.cpp on the same weights instead"
    )
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    from tunery.models.load import BUNDLED, load_for_inference, resolve_model_dir

    ours, tokenizer = load_for_inference(BUNDLED)  # what `tunery chat` and `generate` run
    if args.llama_cpp:
        print(f"SmolLM2-135M-Instruct, {args.new_tokens} new tokens at temperature 1; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Tunery in "
              f"{next(ours.parameters()).dtype}")  # fmt: skip
        llama_cpp_rows(ours, tokenizer, args)
        return
    model_dir = resolve_model_dir(BUNDLED)
    hf = {
        "bf16": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval(),
        "fp32": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
    }
    print(
        f"SmolLM2-135M-Instruct, sampling at temperature 1, {args.new_tokens} new tokens per row; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print("| batch | Tunery tok/s | transformers generate bf16 | ratio | generate fp32 | ratio |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        ids = prompts(tokenizer, batch)
        tunery = time_tunery(ours, tokenizer, ids, args.new_tokens, args.repeats)
        hf16 = time_hf(hf["bf16"], tokenizer, ids, args.new_tokens, args.repeats)
        hf32 = time_hf(hf["fp32"], tokenizer, ids, args.new_tokens, args.repeats)
        print(
            f"| {batch} | {tunery:.1f} | {hf16:.1f} | {tunery / hf16:.2f}x | {hf32:.1f} | {tunery / hf32:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
