"""Commands that load a model: `tunery models`, `chat`, `generate`, `compare`, `score` and `export`, and
the sampling flags and prompt files they share with `tunery eval compare`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.run import files


def cmd_models(args: argparse.Namespace) -> int:
    from tunery.models.locate import available_models_text, support_matrix_text

    print(available_models_text())
    print("\nFamilies covered, each cell tested on the family's tiny-random model:")
    print(support_matrix_text())
    return 0


def add_sampling(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def sampling_params(args: argparse.Namespace) -> Any:
    from tunery.models.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop or [],
        seed=args.seed,
    )


def check_model_and_adapters(model: str | None, *adapters: str | None) -> None:
    """A misspelt --model or a missing adapter, refused before the model loads (models/locate.py: no torch)."""
    from tunery.models.locate import adapter_dir, check_model_name

    if model:
        check_model_name(model)
    for adapter in adapters:
        if adapter:
            adapter_dir(adapter)


def read_prompts(path: str) -> list[dict[str, Any]]:
    from tunery.data.jsonl import read_jsonl

    prompts = []
    for line in read_jsonl(path):
        if line.error:
            raise TuneryError(f"{path} line {line.number}: {line.error}")
        value = line.value
        if isinstance(value, dict) and isinstance(value.get("input"), dict):  # a preference pair's prompt
            value = value["input"]
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            messages = [m for m in value["messages"] if isinstance(m, dict)]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]  # a full chat: complete its last user turn instead
        elif isinstance(value, dict) and isinstance(value.get("prompt"), str):
            messages = [{"role": "user", "content": value["prompt"]}]
        else:
            raise TuneryError(
                f'{path} line {line.number}: expected {{"messages": [...]}} or {{"prompt": "..."}}'
            )
        if not messages or any(not isinstance(m.get("content"), str) for m in messages):
            raise TuneryError(f"{path} line {line.number}: every message needs a string 'content'")
        prompts.append({"line": line.number, "messages": messages, "item": value})
    if not prompts:
        raise TuneryError(f"{path}: no prompts found")
    return prompts


def cmd_chat(args: argparse.Namespace) -> int:
    check_model_and_adapters(args.model, args.adapter)
    from tunery.data.template import prompt_ids
    from tunery.models.load import load_for_inference
    from tunery.models.sampling import sample

    model, tokenizer = load_for_inference(args.model, args.adapter)
    params = sampling_params(args)

    def reply(messages: list[dict[str, str]]) -> str:
        print("assistant> ", end="", flush=True)
        [completion] = sample(
            model,
            tokenizer,
            [prompt_ids(tokenizer, messages)],
            params,
            on_text=lambda _i, delta: print(delta, end="", flush=True),
        )
        print()
        return completion.text

    return chat_loop(reply, args.model + (f" + {args.adapter}" if args.adapter else ""), args.system)


def chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", help="LoRA adapter or run directory")
    p.add_argument("--system", help="system message")
    add_sampling(p)


CHAT_COMMANDS = "/reset clears the conversation; /exit, /quit, Ctrl-D or an empty line leaves"


def chat_loop(
    reply: Callable[[list[dict[str, str]]], str],
    who: str,
    system: str | None = None,
    read: Callable[[str], str] | None = None,
) -> int:
    """`tunery chat`'s conversation: each line typed goes to `reply` with the turns before it, unless it is
    a slash command. Ctrl-C during an answer drops that turn; at the prompt it leaves, as Ctrl-D does."""
    read = read or input
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"Chatting with {who}: {CHAT_COMMANDS}.", file=sys.stderr)
    while True:
        try:
            user = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user in ("", "/exit", "/quit"):
            return 0
        if user == "/reset":
            messages = list(start)
            print("conversation cleared", file=sys.stderr)
            continue
        if re.fullmatch(r"/\w+", user):  # /help or a misspelt command: not a question for the model
            print(
                CHAT_COMMANDS if user == "/help" else f"unknown command {user}; {CHAT_COMMANDS}",
                file=sys.stderr,
            )
            continue
        question = {"role": "user", "content": user}
        try:
            answer = reply([*messages, question])
        except KeyboardInterrupt:
            print("\n(answer stopped; that question is dropped)", file=sys.stderr)
            continue
        messages += [question, {"role": "assistant", "content": answer}]


def cmd_generate(args: argparse.Namespace) -> int:
    check_model_and_adapters(args.model, args.adapter)
    prompts = read_prompts(args.prompts)
    from tunery.data.template import prompt_ids
    from tunery.models.load import load_for_inference
    from tunery.models.sampling import sample
    from tunery.training.io import atomic_write_text

    model, tokenizer = load_for_inference(args.model, args.adapter)
    params = sampling_params(args)
    lines = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        completions = sample(
            model,
            tokenizer,
            [prompt_ids(tokenizer, p["messages"]) for p in chunk],
            params,
        )
        for p, c in zip(chunk, completions, strict=True):
            lines.append(
                json.dumps(
                    {
                        "line": p["line"],
                        "messages": p["messages"],
                        "completion": c.text,
                        "finish_reason": c.finish_reason,
                        "completion_tokens": len(c.token_ids),
                    },
                    ensure_ascii=False,
                )
            )
        print(f"{min(start + args.batch_size, len(prompts))}/{len(prompts)} prompts", file=sys.stderr)
    atomic_write_text(args.out, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} completions to {args.out}")
    return 0


def generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter")
    p.add_argument("--prompts", required=True, help='JSONL of {"messages": [...]} or {"prompt": "..."}')
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    add_sampling(p)


def cmd_compare(args: argparse.Namespace) -> int:
    """Base vs tuned answers to the same prompts, side by side, then the run's final metrics."""
    check_model_and_adapters(args.model, args.adapter)
    prompts = read_prompts(args.prompts)
    from rich.console import Console
    from rich.table import Table

    from tunery.data.template import prompt_ids
    from tunery.models.load import load_for_inference
    from tunery.models.sampling import sample

    model, tokenizer = load_for_inference(args.model, args.adapter)
    params = sampling_params(args)
    ids = [prompt_ids(tokenizer, p["messages"]) for p in prompts]
    with model.disable_adapter():
        before = sample(model, tokenizer, ids, params)
    after = sample(model, tokenizer, ids, params)
    console = Console(width=max(100, Console().width))
    table = Table(title="Before and after fine-tuning (held-out questions)", show_lines=True)
    table.add_column("question", ratio=2)
    table.add_column(f"base: {args.model}", ratio=3)
    table.add_column("tuned", ratio=3)
    for p, b, a in zip(prompts, before, after, strict=True):
        table.add_row(p["messages"][-1]["content"], b.text.strip(), a.text.strip())
    console.print(table)
    run_dir = Path(args.adapter)
    summary = files.read_summary(run_dir.parent if run_dir.name == "final" else run_dir)
    if summary is not None:
        metrics = Table(title="Final metrics")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for key, value in summary.final_metrics.items():
            metrics.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        for key in ("steps", "trained_tokens", "tokens_per_second", "train_seconds", "peak_memory_mb"):
            metrics.add_row(key, str(getattr(summary, key)))
        console.print(metrics)
    return 0


def compare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", required=True, help="LoRA adapter or run directory")
    p.add_argument("--prompts", required=True)
    add_sampling(p, max_tokens=96)


def cmd_score(args: argparse.Namespace) -> int:
    from tunery.data.jsonl import check_readable
    from tunery.models.locate import check_run_path

    check_run_path(args.rm, reward_model=True)
    check_readable(Path(args.data))
    from tunery.recipes.compare import score_file
    from tunery.training.io import atomic_write_text

    rows, summary = score_file(args.rm, args.data, args.max_length)
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} scores to {args.out}")
    else:
        for row in rows:
            print(json.dumps(row))
    print(json.dumps(summary), file=sys.stderr if not args.out else sys.stdout)
    return 0


def score_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rm", required=True, help="reward model run directory (tunery train rm)")
    p.add_argument("--data", required=True, help="pairs, rated answers, or chats ending with the answer")
    p.add_argument("--out", help="write one JSON line of scores per input line")
    p.add_argument("--max-length", type=int, default=1024)


def cmd_export(args: argparse.Namespace) -> int:
    """A merged Hugging Face directory (--merge --out DIR) or one GGUF file for llama.cpp and Ollama (--gguf)."""
    if not args.merge and not args.gguf:
        raise TuneryError("export needs --gguf FILE (llama.cpp, Ollama) or --merge --out DIR (Hugging Face)")
    if args.merge and not args.out:
        raise TuneryError("--merge needs --out DIR, the directory to write the merged model to")
    if args.gguf:
        from tunery.models.gguf_export import check_quant

        check_quant(args.quant)
        if not args.gguf.endswith(".gguf"):
            raise TuneryError(f"--gguf {args.gguf}: name the file with a .gguf ending")
    elif args.ollama or args.quant != "f16":
        raise TuneryError("--quant and --ollama go with --gguf FILE")
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise TuneryError(f"{out} is not empty; choose a new --out directory")
    model_name = args.model or _adapter_base_model(args.adapter)
    if not model_name and not args.adapter:
        raise TuneryError(
            "export needs --adapter RUN (a LoRA run) or --model (a model or full fine-tune run)"
        )
    model_name = model_name or "smollm2-135m-instruct"
    check_model_and_adapters(model_name, args.adapter)
    from tunery.models.load import load_model
    from tunery.models.lora import load_adapter

    model, tokenizer = load_model(model_name)
    if args.adapter:
        model = load_adapter(model, args.adapter).merge_and_unload()
    model.eval()
    if args.merge:
        _save_merged(model, tokenizer, Path(args.out))
    if args.gguf:
        _export_gguf(model, tokenizer, args, Path(args.adapter or model_name).name)
    return 0


def _adapter_base_model(adapter: str | None) -> str | None:
    """The base model a LoRA run was trained on, from its config.yaml (a run's adapter or checkpoint)."""
    from tunery.run.files import read_config

    if not adapter:
        return None
    for where in (Path(adapter), Path(adapter).parent, Path(adapter).parent.parent):
        saved = read_config(where)
        if saved and saved.model:
            return saved.model
    return None


def _save_merged(model: Any, tokenizer: Any, out: Path) -> None:
    import shutil

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"wrote merged model to {out} (load it with --model {out})")


def _export_gguf(model: Any, tokenizer: Any, args: argparse.Namespace, name: str) -> None:
    from tunery.models.gguf_export import compare_logits, export_gguf
    from tunery.training.io import atomic_write_text

    out = Path(args.gguf)
    report = export_gguf(model, tokenizer, out, args.quant, name)
    size = report.bytes / 1e6
    print(
        f"wrote {out} ({report.arch}, {args.quant}, {size:.1f} MB, {report.tensors} tensors, {report.seconds:.1f} s)"
    )
    for warning in report.warnings:
        print(f"  warning: {warning}")
    if report.at_f16:
        print(f"  {len(report.at_f16)} matrices at f16: their rows do not split into {args.quant} blocks")
    if args.ollama:
        from tunery.models.ollama import modelfile

        path = out.with_suffix(".Modelfile")  # beside its file, one per export
        atomic_write_text(path, modelfile(out.name, tokenizer))
        print(f"wrote {path}: `ollama create NAME -f {path}`, then `ollama run NAME`")
    if args.check:
        for line in compare_logits(out, model, tokenizer).lines():
            print(f"  {line}")


def export_flags(p: argparse.ArgumentParser) -> None:
    from tunery.models.gguf_export import QUANTS

    p.add_argument("--adapter", help="a LoRA run directory (or its checkpoint) to merge into its base model")
    p.add_argument(
        "--model", help="the base model (default: the one the run trained) or a full fine-tune run"
    )
    p.add_argument("--gguf", metavar="FILE", help="write one GGUF file for llama.cpp and Ollama")
    p.add_argument(
        "--quant",
        default="f16",
        metavar="TYPE",
        help=f"GGUF precision: {', '.join(QUANTS)} (k-quants need `make llama-cpp`)",
    )
    p.add_argument(
        "--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF file"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="read the GGUF file back (transformers, and llama.cpp if installed) and compare logits",
    )
    p.add_argument("--merge", action="store_true", help="write a merged Hugging Face model directory (--out)")
    p.add_argument("--out", help="the directory for --merge")
