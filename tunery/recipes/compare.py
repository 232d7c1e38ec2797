"""Score answers with a reward model, and judge two models against each other with it.

    tunery score --rm runs/rm --data pairs_or_answers.jsonl [--out scores.jsonl]
    tunery eval compare --rm runs/rm --prompts examples/feedback/prompts.jsonl \\
        --adapter runs/dpo --baseline-adapter runs/support --out comparison.jsonl

`eval compare` answers every prompt with both models (greedy by default, so the comparison is
repeatable), scores both answers with the reward model, and reports how often the candidate's answer
scores higher (the win rate; exact ties count half, with its 95% Wilson interval), and the same rate
with the answers' length difference taken out (`tunery.data.agreement.length_controlled_win_rate`): a
judge that prefers longer answers, and a candidate that writes them, otherwise look like a better model.
Lengths are counted in characters.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from tunery.data.agreement import length_controlled_win_rate, wilson_interval
from tunery.data.feedback import FeedbackExample, check_feedback_example, detect_kind, tokenize_feedback
from tunery.data.jsonl import read_jsonl
from tunery.data.template import prompt_ids
from tunery.errors import TuneryError
from tunery.models.heads import load_reward_model, score_pairs
from tunery.models.load import load_for_inference
from tunery.models.lora import bf16_is_fast
from tunery.models.sampling import SamplingParams, sample
from tunery.training.io import atomic_write_text


def _read_scorable(path: str) -> list[FeedbackExample]:
    """Pairs, rated answers, or chats whose last message is the assistant answer to score."""
    examples, problems = [], []
    for line in read_jsonl(path):
        if line.error is not None:
            problems.append(f"line {line.number}: {line.error}")
            continue
        value = line.value
        if detect_kind(value) == "chat":
            messages = value["messages"]
            if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)):
                problems.append(f"line {line.number}: 'messages' must be a non-empty list")
                continue
            if messages[-1].get("role") != "assistant":
                problems.append(f"line {line.number}: the last message must be the assistant answer to score")
                continue
            value = {"prompt": messages[:-1], "completion": [messages[-1]], "label": True}
        example, found = check_feedback_example(value, line.number)
        problems += [str(p) for p in found if p.severity == "error"]
        if example is not None:
            examples.append(example)
    if problems:
        raise TuneryError(f"{path}:\n  " + "\n  ".join(problems[:20]))
    if not examples:
        raise TuneryError(f"{path}: nothing to score")
    return examples


def score_file(rm_dir: str, data: str, max_length: int = 1024) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-line scores and a summary (mean score; accuracy and margin for pairs)."""
    model, tokenizer, _ = load_reward_model(rm_dir)
    bf16 = bf16_is_fast(torch.device("cpu"))
    examples = _read_scorable(data)
    pairs = [tokenize_feedback(tokenizer, ex, max_length)[0] for ex in examples]
    scores = score_pairs(model, pairs, bf16=bf16)
    rows: list[dict[str, Any]] = []
    for ex, (first, second) in zip(examples, scores, strict=True):
        if second is None:
            rows.append({"line": ex.line, "score": first})
        else:
            rows.append({"line": ex.line, "chosen_score": first, "rejected_score": second})
    summary: dict[str, Any] = {"lines": len(rows)}
    paired = [r for r in rows if "chosen_score" in r]
    if paired:
        summary["accuracy"] = sum(r["chosen_score"] > r["rejected_score"] for r in paired) / len(paired)
        summary["mean_margin"] = statistics.fmean(r["chosen_score"] - r["rejected_score"] for r in paired)
        # length bias: accuracy where the chosen answer is the longer (in tokens), and where it is the shorter
        for name, sign in (("accuracy_chosen_longer", 1), ("accuracy_chosen_shorter", -1)):
            right = [
                r["chosen_score"] > r["rejected_score"]
                for r, p in zip(rows, pairs, strict=True)
                if "chosen_score" in r and (sum(p.chosen_mask) - sum(p.rejected_mask)) * sign > 0
            ]
            if right:
                summary[name] = sum(right) / len(right)
                summary[name.replace("accuracy", "pairs")] = len(right)
    single = [r["score"] for r in rows if "score" in r]
    if single:
        summary["mean_score"] = statistics.fmean(single)
    return rows, summary


def _answers(
    model_name: str, adapter: str | None, prompts: list[list[dict[str, Any]]], params: SamplingParams
) -> list[str]:
    model, tokenizer = load_for_inference(model_name, adapter)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    texts: list[str] = []
    for start in range(0, len(ids), 16):
        texts += [c.text for c in sample(model, tokenizer, ids[start : start + 16], params)]
    return texts


def compare_models(
    rm_dir: str,
    prompts: list[list[dict[str, Any]]],
    model_name: str,
    adapter: str | None,
    baseline_adapter: str | None,
    params: SamplingParams,
    out: str | None = None,
) -> dict[str, Any]:
    """Win rate of (model + adapter) over (model + baseline_adapter) as judged by the reward model."""
    model, tokenizer, _ = load_reward_model(rm_dir)  # first: a wrong --rm fails before any generation
    candidate = _answers(model_name, adapter, prompts, params)
    baseline = _answers(model_name, baseline_adapter, prompts, params)
    examples = [
        FeedbackExample(
            i, p, [{"role": "assistant", "content": a or " "}], [{"role": "assistant", "content": b or " "}]
        )
        for i, (p, a, b) in enumerate(zip(prompts, candidate, baseline, strict=True))
    ]
    pairs = [tokenize_feedback(tokenizer, ex, 1024)[0] for ex in examples]
    scores = score_pairs(model, pairs, bf16=bf16_is_fast(torch.device("cpu")))
    # the same answer twice is a tie: scored at two places of a packed row, its two scores can differ by
    # rounding, which must not decide a comparison
    same = [x == y for x, y in zip(candidate, baseline, strict=True)]
    scores = [(a, a if tie else b) for (a, b), tie in zip(scores, same, strict=True)]
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in scores if b is not None]
    wins = sum(outcomes)
    lengths = [(len(a), len(b)) for a, b in zip(candidate, baseline, strict=True)]
    controlled = length_controlled_win_rate(outcomes, [a - b for a, b in lengths])
    assert controlled is not None
    result = {
        "prompts": len(prompts),
        "win_rate": wins / len(prompts),
        "win_rate_interval": wilson_interval(wins, len(prompts)),
        "length_controlled_win_rate": controlled.rate,
        "length_controlled_interval": controlled.interval,
        "length_effect": controlled.length_effect,
        "candidate_mean_length": statistics.fmean(a for a, _ in lengths),
        "baseline_mean_length": statistics.fmean(b for _, b in lengths),
        "candidate": adapter or model_name,
        "baseline": baseline_adapter or model_name,
        "candidate_mean_score": statistics.fmean(a for a, _ in scores),
        "baseline_mean_score": statistics.fmean(b for _, b in scores if b is not None),
        "identical_answers": sum(same),
    }
    if out:
        lines = [
            json.dumps(
                {"prompt": p, "candidate": a, "baseline": b, "candidate_score": sa, "baseline_score": sb},
                ensure_ascii=False,
            )
            for p, a, b, (sa, sb) in zip(prompts, candidate, baseline, scores, strict=True)
        ]
        atomic_write_text(Path(out), "".join(line + "\n" for line in lines))
    return result
