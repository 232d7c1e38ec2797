"""Per-language results of a model tuned on examples/support-multilingual, against the base model.

    tunery train sft --config configs/sft-multilingual.yaml                      # writes runs/multilingual
    python examples/support-multilingual/per_language.py --adapter runs/multilingual

For each language (the `language` key of each line):

- held-out loss: the mean token loss of the assistant turns of `valid.jsonl`, the same loss training
  reports, for the base model and the tuned one;
- win rate: the tuned model's greedy answer to each conversation of `prompts.jsonl` against the base
  model's, judged by chrF (character n-gram F-score, sacrebleu) against the reference answer in
  `valid.jsonl`: a win when the tuned answer is closer to it, half a win for a tie; with its Wilson 95%
  interval. chrF is a reference-based judge that works the same in every language, and says nothing
  about facts a reference does not contain;
- answered in the customer's language: the share of answers whose words are mostly that language's most
  common function words (a crude detector, enough to tell English from Spanish from German).

Prints a table and writes it as JSON (`--out`, default RUN/per_language.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LANGUAGES = ("en", "es", "fr", "de", "pt")

# The most common function words of each language, for the crude language check (a word in two lists
# counts for both).
FUNCTION_WORDS = {
    "en": "the and to you your is it for of a in we can on with be this that are if or",
    "es": "el la los las de que y en un una es por para con tu te se no lo del al su",
    "fr": "le la les de des et en un une est vous votre pour que qui pas sur au du avec",
    "de": "der die das und ist sie ihr ihre nicht mit zu den ein eine auf für wir es",
    "pt": "o a os as de que e em um uma é você seu sua para com não do da no na",
}
VOCABULARY = {lang: set(words.split()) for lang, words in FUNCTION_WORDS.items()}


def language_of(text: str) -> str | None:
    words = re.findall(r"[^\W\d_]+", text.lower())
    counts = {lang: sum(w in vocab for w in words) for lang, vocab in VOCABULARY.items()}
    best = max(counts, key=lambda lang: counts[lang])
    return best if counts[best] >= 2 else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def held_out_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean token loss of each language's assistant turns."""
    import tempfile

    from tunery.data.validate import load_chat_data
    from tunery.recipes.sft import evaluate
    from tunery.training.distributed import World

    losses = {}
    for lang in LANGUAGES:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{lang}.jsonl"
            path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows
                                    if r["language"] == lang))  # fmt: skip
            chats = load_chat_data(path, tokenizer, 2048, min_examples=1)
        losses[lang] = evaluate(model, chats, 4096, "bf16", World())[0]
    return losses


def answers(model: Any, tokenizer: Any, prompts: list[dict[str, Any]], max_tokens: int) -> list[str]:
    from tunery.models.sampling import SamplingParams, sample

    ids = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for p in prompts]  # fmt: skip
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    out: list[str] = []
    for start in range(0, len(ids), 16):
        out += [c.text for c in sample(model, tokenizer, ids[start : start + 16], params)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="the tuned run directory")
    parser.add_argument("--model", default=None, help="base model (default: the one the run recorded)")
    parser.add_argument("--data", default=str(HERE), help="the example's directory")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON to write (default: ADAPTER/per_language.json)")
    args = parser.parse_args(argv)

    from sacrebleu.metrics import CHRF

    from tunery.data.agreement import wilson_interval
    from tunery.models.load import load_for_inference
    from tunery.run.files import read_config

    saved = read_config(Path(args.adapter))
    if args.model is None and saved is None:
        parser.error(f"{args.adapter}: no config.yaml to read the base model from; pass --model")
    model_name = args.model or saved.model  # type: ignore[union-attr]
    valid = read_jsonl(Path(args.data) / "valid.jsonl")
    prompts = read_jsonl(Path(args.data) / "prompts.jsonl")
    references = [row["messages"][-1]["content"] for row in valid]
    chrf = CHRF()
    result: dict[str, Any] = {"model": model_name, "adapter": args.adapter, "languages": {}}
    said: dict[str, list[str]] = {}
    loss: dict[str, dict[str, float]] = {}
    for which, adapter in (("base", None), ("tuned", args.adapter)):
        model, tokenizer = load_for_inference(model_name, adapter)
        loss[which] = held_out_loss(model, tokenizer, valid)
        said[which] = answers(model, tokenizer, prompts, args.max_tokens)
        del model
    by_lang: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_lang[p["language"]].append(i)
    print(
        f"{'lang':4} {'loss base':>9} {'tuned':>6} {'win rate (95% CI)':>22} {'in its language: base':>22} {'tuned':>6}"
    )
    for lang in LANGUAGES:
        rows = by_lang[lang]
        score = {w: [chrf.sentence_score(said[w][i], [references[i]]).score for i in rows] for w in said}
        wins = sum(
            1.0 if t > b else 0.5 if t == b else 0.0
            for t, b in zip(score["tuned"], score["base"], strict=True)
        )
        low, high = wilson_interval(wins, len(rows)) or (0.0, 1.0)
        native = {w: sum(language_of(said[w][i]) == lang for i in rows) / len(rows) for w in said}
        result["languages"][lang] = {
            "valid_loss": {"base": loss["base"][lang], "tuned": loss["tuned"][lang]},
            "win_rate": wins / len(rows), "win_rate_interval": [low, high], "prompts": len(rows),
            "chrf_mean": {w: sum(score[w]) / len(rows) for w in score},
            "answered_in_language": native,
        }  # fmt: skip
        print(f"{lang:4} {loss['base'][lang]:9.3f} {loss['tuned'][lang]:6.3f} "
              f"{wins / len(rows):8.0%} ({low:.0%}-{high:.0%}){'':7} {native['base']:16.0%} {native['tuned']:7.0%}")  # fmt: skip
    result["answers"] = [{"line": i + 1, "language": p["language"], "base": said["base"][i],
                          "tuned": said["tuned"][i]} for i, p in enumerate(prompts)]  # fmt: skip
    out = Path(args.out or Path(args.adapter) / "per_language.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
