"""Safety, bias, memorisation, diversity and grounding evaluations of a tuned model against its base.

    tunery eval all --adapter runs/support [--data TRAIN.jsonl] [--references refs.txt] [--out evals.json]
    report = run_evals(model, tokenizer, train_path=cfg.data, out=run_dir / "evals.json")   # in a recipe

Each evaluation answers one question about what training did, on prompts bundled in `tunery/safety/data/`
(written for Tunery) or taken from the training file, by running the same prompts through the base model
(the LoRA adapter switched off, or a separate model for a full fine-tune) and the tuned one. One module
each, holding its data, metrics, prompts and report section; its docstring says what it cannot see:

    safety.py        does it still decline red-team prompts, without declining harmless ones?
    bias.py          does a yes/no decision change when only the person in it changes?
    memorization.py  does it recite its training answers?
    diversity.py     does it give the same words however a prompt is worded?
    grounding.py     are its citations in a given reference list?
    suite.py         run_evals (plan once, run both models, write evals.json), evaluate_run, headline
    common.py        sizes, thresholds, generation and the section shape they share

`evals.json` (tunery.run.files: write_evals / read_evals) holds, per section, `description`, `base` and
`tuned` (metric -> number), `flags` (the tuned model worse than the base beyond a threshold, in words) and
`details`; `config` records what was run. Torch is imported inside functions, so the CLI's parser reads
SECTIONS and SIZES without loading it.
"""

from tunery.safety.evals.bias import (
    ANSWER_INSTRUCTION,
    BIAS_DOMAINS,
    BiasPrompt,
    answer_token_ids,
    bias_attributes,
    bias_prompts,
    bias_section,
    bias_templates,
    favourable_probability,
    group_gaps,
    yes_no_token_ids,
)
from tunery.safety.evals.common import SIZES, EvalSizes, Thresholds, normalized_words, training_examples
from tunery.safety.evals.diversity import (
    distinct_n,
    diversity_metrics,
    diversity_section,
    near_duplicates,
    self_similarity,
)
from tunery.safety.evals.grounding import (
    FUZZY_CITATION_THRESHOLD,
    Citation,
    citation_supported,
    extract_citations,
    grounding_metrics,
    grounding_section,
    load_references,
    normalize_citation,
)
from tunery.safety.evals.memorization import (
    MIN_REFERENCE_WORDS,
    NEAR_VERBATIM_FRACTION,
    NEAR_VERBATIM_WORDS,
    longest_common_run,
    memorization_scores,
    memorization_section,
)
from tunery.safety.evals.safety import (
    BENIGN,
    REDTEAM_CATEGORIES,
    REFUSAL_WINDOW,
    is_redirect,
    is_refusal,
    redteam_prompts,
    safety_metrics,
    safety_section,
)
from tunery.safety.evals.suite import EVAL_SIZES, SECTIONS, eval_flags, evaluate_run, headline, run_evals

__all__ = [
    "ANSWER_INSTRUCTION",
    "BENIGN",
    "BIAS_DOMAINS",
    "EVAL_SIZES",
    "FUZZY_CITATION_THRESHOLD",
    "MIN_REFERENCE_WORDS",
    "NEAR_VERBATIM_FRACTION",
    "NEAR_VERBATIM_WORDS",
    "REDTEAM_CATEGORIES",
    "REFUSAL_WINDOW",
    "SECTIONS",
    "SIZES",
    "BiasPrompt",
    "Citation",
    "EvalSizes",
    "Thresholds",
    "answer_token_ids",
    "bias_attributes",
    "bias_prompts",
    "bias_section",
    "bias_templates",
    "citation_supported",
    "distinct_n",
    "diversity_metrics",
    "diversity_section",
    "eval_flags",
    "evaluate_run",
    "extract_citations",
    "favourable_probability",
    "group_gaps",
    "grounding_metrics",
    "grounding_section",
    "headline",
    "is_redirect",
    "is_refusal",
    "load_references",
    "longest_common_run",
    "memorization_scores",
    "memorization_section",
    "near_duplicates",
    "normalize_citation",
    "normalized_words",
    "redteam_prompts",
    "run_evals",
    "safety_metrics",
    "safety_section",
    "self_similarity",
    "training_examples",
    "yes_no_token_ids",
]
