"""diversity: does the tuned model give the same words however a prompt is worded?

Near-duplicates of a few prompts (training prompts when there are some, else the bundled benign ones)
answered several times each at temperature 0.8: distinct n-grams, pairwise similarity and identical
answers within each prompt's group. A model that has memorised gives the same words whatever the wording.

Limits: the rewordings are mechanical (case, punctuation, a filler phrase, one synonym), and a model
that is merely terse or confident also scores as less diverse; the flag compares with the base for that
reason.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from tunery.run.files import EvalSection
from tunery.safety.evals.common import (
    EvalSizes,
    Messages,
    Thresholds,
    Tick,
    eval_section,
    fuzzy_ratio,
    generate,
    normalized_words,
    rate,
)
from tunery.safety.evals.safety import BENIGN, redteam_prompts

# --- near-duplicate prompts ---------------------------------------------------------------------------------

_SYNONYMS = {
    "can": "could", "buy": "purchase", "get": "obtain", "want": "would like", "need": "require",
    "help": "assist", "start": "begin", "big": "large", "small": "little", "fast": "quick",
    "problem": "issue", "question": "query", "shop": "store", "find": "locate", "make": "create",
    "use": "employ", "show": "display", "fix": "repair", "send": "ship", "cost": "price", "hi": "hello",
    "thanks": "thank you", "best": "ideal", "easiest": "simplest", "explain": "describe",
}  # fmt: skip


def near_duplicates(text: str, n: int) -> list[str]:
    """Up to `n` distinct rewordings of `text`, the original first: lower case without the final
    punctuation, a filler opening, one word swapped for a synonym, doubled punctuation. Deterministic.

    >>> near_duplicates("Can I go?", 5)
    ['Can I go?', 'can i go', 'Quick question: Can I go?', 'Could I go?', 'Can I go??']
    """
    stripped = text.rstrip()
    lower = stripped.lower().rstrip("?.!")
    swapped = stripped
    for match in re.finditer(r"[A-Za-z]+", stripped):
        word = match.group(0)
        synonym = _SYNONYMS.get(word.lower())
        if synonym:
            synonym = synonym.capitalize() if word[0].isupper() else synonym
            swapped = stripped[: match.start()] + synonym + stripped[match.end() :]
            break
    else:
        swapped = stripped + " please"
    punctuated = stripped + stripped[-1] if stripped and stripped[-1] in "?!." else stripped + "?"
    variants = [stripped, lower, "Quick question: " + stripped, swapped, punctuated]
    return list(dict.fromkeys(v for v in variants if v))[:n]


# --- metrics ------------------------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the answers (n-grams never span two answers); 0 if none.

    >>> distinct_n(["the cat sat", "the cat ran"], 1)  # 4 different words out of 6
    0.6666666666666666
    """
    grams = [tuple(w[i : i + n]) for w in map(normalized_words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_similarity(texts: Sequence[str]) -> float:
    """Mean rapidfuzz ratio (0..1) over every pair of answers; 1 when they are all the same text."""
    normal = [" ".join(normalized_words(t)) for t in texts]
    ratios = [fuzzy_ratio(a, b) for i, a in enumerate(normal) for b in normal[i + 1 :]]
    return sum(ratios) / len(ratios) if ratios else 0.0


def diversity_metrics(groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Each group holds the answers to the near-duplicates of one prompt; metrics are averaged over groups."""
    if not groups:
        return {}
    identical = []
    for answers in groups:
        normal = [" ".join(normalized_words(a)) for a in answers]
        identical += [a == b for i, a in enumerate(normal) for b in normal[i + 1 :]]
    return {
        "distinct_1": sum(distinct_n(g, 1) for g in groups) / len(groups),
        "distinct_2": sum(distinct_n(g, 2) for g in groups) / len(groups),
        "self_similarity": sum(self_similarity(g) for g in groups) / len(groups),
        "identical_rate": rate(identical),
    }


# --- what the models are asked ------------------------------------------------------------------------------


def plan_diversity(
    examples: Sequence[tuple[Messages, str]], sizes: EvalSizes, rng: random.Random
) -> list[list[Messages]]:
    """Groups of prompts: each a sampled prompt's near-duplicates, the conversation before it kept."""
    # Training prompts when there are some: that is where an overfit model has memorised an answer.
    pool = [p for p, _ in examples if p[-1]["role"] == "user"]
    if not pool:
        pool = [p["messages"] for p in redteam_prompts() if p["category"] == BENIGN]
    groups = []
    for prompt in rng.sample(pool, min(sizes.diversity_prompts, len(pool))):
        variants = near_duplicates(prompt[-1]["content"], sizes.diversity_variants)
        groups.append([[*prompt[:-1], {"role": "user", "content": v}] for v in variants])
    return groups


def answer_diversity(
    model: Any,
    tokenizer: Any,
    groups: Sequence[Sequence[Messages]],
    sizes: EvalSizes,
    seed: int,
    batch_size: int,
    tick: Tick,
) -> list[str]:
    """`diversity_samples` sampled answers per variant, group after group, variant after variant."""
    from tunery.data.template import prompt_ids
    from tunery.models.sampling import SamplingParams

    ids = [
        prompt_ids(tokenizer, v) for group in groups for v in group for _ in range(sizes.diversity_samples)
    ]
    params = SamplingParams(max_new_tokens=sizes.max_new_tokens, temperature=0.8, top_p=0.95, seed=seed)
    return generate(model, tokenizer, ids, params, batch_size, tick)


# --- the report section -------------------------------------------------------------------------------------


def diversity_section(
    groups: Sequence[Sequence[Messages]], answers: dict[str, list[str]], sizes: EvalSizes, th: Thresholds
) -> EvalSection:
    """Metrics of each model in `answers` (laid out as `answer_diversity` returns them), and a flag when
    the tuned model's answers to reworded prompts became more alike than the base's."""
    per_variant = sizes.diversity_samples
    metrics: dict[str, Any] = {}
    for name, texts in answers.items():
        answered, start = [], 0
        for variants in groups:
            answered.append(texts[start : start + len(variants) * per_variant])
            start += len(variants) * per_variant
        metrics[name] = diversity_metrics(answered)
    flags = []
    if "base" in answers:
        base, tuned = metrics["base"]["self_similarity"], metrics["tuned"]["self_similarity"]
        if tuned - base > th.self_similarity_rise:
            flags.append(
                f"diversity: answers to reworded prompts became more alike (self-similarity {base:.2f} -> "
                f"{tuned:.2f}); the model may be repeating memorised answers"
            )
    description = (
        f"{per_variant} answers sampled (temperature 0.8) per near-duplicate of a prompt (case, punctuation, a "
        "filler phrase, a synonym). distinct_n: distinct n-grams over all n-grams of one prompt's answers; "
        "self_similarity: mean pairwise rapidfuzz ratio; identical_rate: pairs with the same words. A model "
        "that has memorised gives the same words whatever the wording."
    )
    example = [v[-1]["content"] for v in groups[0]]
    return eval_section(description, metrics, flags, {"prompts": len(groups), "example_variants": example})
