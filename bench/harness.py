"""Shared by the benchmarks: run a worker in its own process, and the bundled feedback pairs written for
Tunery and for TRL in the same order."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_worker(script: str, kind: str, extra: list[str]) -> dict:
    """Run `script --worker kind ...` in a fresh process (clean peak-memory numbers); its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = fh.name
    cmd = [sys.executable, script, "--worker", kind, "--result", result_path, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(result_path).read_text())


def trl_pair(pair: dict, tokenizer, joined: bool) -> dict:  # type: ignore[no-untyped-def]
    """A pair as TRL reads it: text rendered with the chat template, each answer ending with
    `<|im_end|>` as in Tunery's tokens; `joined` puts the prompt in front of each answer (reward models)."""
    from tunery.data.template import render

    prompt = render(tokenizer, pair["input"]["messages"], add_generation_prompt=True)
    end = tokenizer.eos_token  # <|im_end|>: the end of an assistant turn in SmolLM2's template
    chosen = pair["preferred_output"][0]["content"] + end
    rejected = pair["non_preferred_output"][0]["content"] + end
    if joined:
        return {"chosen": prompt + chosen, "rejected": prompt + rejected}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_pairs(work: Path, n_pairs: int, seed: int, joined: bool) -> dict[str, Path]:
    """`n_pairs` of examples/feedback/train.jsonl (a seeded sample), written as `write_pair_files` does."""
    from tunery.data.packing import epoch_order

    lines = (REPO / "examples/feedback/train.jsonl").read_text().splitlines()
    chosen_lines = [lines[i] for i in sorted(epoch_order(len(lines), seed, 0)[:n_pairs])]
    return write_pair_files(work, chosen_lines, seed, joined)


def in_visit_order(rows: list, seed: int) -> list:
    """`rows` in the order Tunery's seeded shuffle visits them in its first epoch (data/packing.py): a
    trainer reading this file sequentially gets Tunery's batches, step for step."""
    from tunery.data.packing import epoch_order

    return [rows[i] for i in epoch_order(len(rows), seed, 0)]


def write_pair_files(work: Path, lines: list[str], seed: int, joined: bool) -> dict[str, Path]:
    """Pairs (OpenAI preference JSONL lines) for Tunery as they are and for TRL (`trl_pair`), such that
    Tunery's seeded shuffle of its file visits the pairs in the order the TRL file lists them (TRL's
    sampler is made sequential). Also the held-out pairs for TRL ("valid")."""
    from tunery.models.load import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    paths = {"tunery": work / "tunery.jsonl", "trl": work / "trl.jsonl", "valid": work / "valid-trl.jsonl"}
    paths["tunery"].write_text("".join(line + "\n" for line in lines))
    valid = (REPO / "examples/feedback/valid.jsonl").read_text().splitlines()
    for key, rows in (("trl", in_visit_order(lines, seed)), ("valid", valid)):
        with paths[key].open("w") as fh:
            for line in rows:
                fh.write(json.dumps(trl_pair(json.loads(line), tokenizer, joined)) + "\n")
    return paths
