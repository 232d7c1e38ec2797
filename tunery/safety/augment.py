"""Counterfactual augmentation: add a gender-swapped copy of every training example that mentions gender.

    tunery data augment examples/support/train.jsonl --counterfactual --out train_cf.jsonl

The mitigation the bias eval points to: when the data pairs "he" with one kind of answer and "she" with
another, training on both versions of each example leaves the model nothing to learn from the pronoun.
Pronouns, titles, family and other gendered words are swapped, and first names from the bias eval's name
lists (`data/bias/attributes.json`) are swapped with the name in the same place on the other gender's
list, within the same ethnicity, so "Emily Walsh" becomes "Jake Walsh". Every string in an example is
swapped the same way, so a conversation stays consistent.

Limits: English only; names outside the lists stay as they are; "her" becomes "his" or "him" by what
follows it (a word that can start a noun phrase, or not), which a few sentences get wrong; a swap that
makes no sense ("she gave birth" -> "he gave birth") is not caught.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

# Words whose swap is the same both ways. "her" and "hers" are handled apart: "his" can become either.
_PAIRS = [
    ("he", "she"), ("him", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
    ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("dad", "mom"),
    ("dads", "moms"), ("daddy", "mommy"), ("son", "daughter"), ("sons", "daughters"),
    ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"), ("husbands", "wives"),
    ("boyfriend", "girlfriend"), ("boyfriends", "girlfriends"), ("uncle", "aunt"), ("uncles", "aunts"),
    ("nephew", "niece"), ("nephews", "nieces"), ("king", "queen"), ("kings", "queens"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("sir", "madam"), ("grandfather", "grandmother"),
    ("grandpa", "grandma"), ("grandson", "granddaughter"), ("stepfather", "stepmother"),
    ("stepson", "stepdaughter"), ("male", "female"), ("males", "females"), ("masculine", "feminine"),
    ("mr", "ms"), ("groom", "bride"), ("fiancé", "fiancée"), ("actor", "actress"), ("waiter", "waitress"),
    ("businessman", "businesswoman"), ("chairman", "chairwoman"), ("spokesman", "spokeswoman"),
    ("policeman", "policewoman"), ("salesman", "saleswoman"), ("widower", "widow"),
]  # fmt: skip
_ONE_WAY = {"mum": "dad", "mums": "dads", "mrs": "mr", "hers": "his", "madame": "sir"}
# After an object "her" ("I told her the truth", "with her."), not a possessive one ("her bike").
_AFTER_OBJECT = {
    "a", "an", "the", "to", "and", "or", "but", "that", "this", "if", "when", "with", "about", "for", "from",
    "in", "on", "at", "up", "out", "off", "back", "again", "as", "so", "now", "today", "yesterday",
    "tomorrow", "because", "before", "after", "into", "than", "too", "know", "how", "what", "why", "where",
    "whether", "some", "any", "all", "by", "over", "down", "away", "soon", "later", "here", "there", "once",
}  # fmt: skip
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")  # "she's" is "she" + "'s"
_SKIP_KEYS = {
    "role",
    "type",
    "id",
    "tool_call_id",
    "tool_calls",
    "tools",
    "function",
    "functions",
    "name",
    "weight",
}


@functools.cache
def _swaps() -> tuple[dict[str, str], dict[str, str]]:
    """(word swaps in lower case, first-name swaps as written)."""
    from tunery.safety.evals import bias_attributes

    words = dict(_ONE_WAY)
    for a, b in _PAIRS:
        words[a], words[b] = b, a
    names: dict[str, str] = {}
    for by_gender in bias_attributes()["names"].values():
        for female, male in zip(by_gender["female"], by_gender["male"], strict=True):
            names[female.split()[0]], names[male.split()[0]] = male.split()[0], female.split()[0]
    return words, names


def _same_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word


def swap_gender(text: str) -> tuple[str, Counter[str]]:
    """`text` with gendered words and listed first names swapped, and a count of each swap made.

    >>> swap_gender("Emily said her brother gave her a bike, and she thanked him.")[0]
    'Jake said his sister gave him a bike, and he thanked her.'
    """
    words, names = _swaps()
    counts: Counter[str] = Counter()

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        lower = word.lower()
        if word in names:
            new = names[word]
        elif lower == "her":
            following = (
                _WORD.match(text, match.end() + 1) if text[match.end() : match.end() + 1] == " " else None
            )
            new = "his" if following and following.group(0).lower() not in _AFTER_OBJECT else "him"
        elif lower == "his":
            following = (
                _WORD.match(text, match.end() + 1) if text[match.end() : match.end() + 1] == " " else None
            )
            new = "her" if following and following.group(0).lower() not in _AFTER_OBJECT else "hers"
        elif lower == "miss" and re.match(r"\s+[A-Z]", text[match.end() :]) and word[0] == "M":
            new = "mr"  # the title, not the verb
        elif lower in words:
            new = words[lower]
        else:
            return word
        new = _same_case(new, word)
        counts[f"{word}->{new}"] += 1
        return new

    return _WORD.sub(replace, text), counts


def _swap_value(value: Any, counts: Counter[str]) -> Any:
    """Every string in a JSON value swapped, except roles, ids, names and tool calls (not prose)."""
    if isinstance(value, str):
        swapped, found = swap_gender(value)
        counts.update(found)
        return swapped
    if isinstance(value, list):
        return [_swap_value(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: v if k in _SKIP_KEYS else _swap_value(v, counts) for k, v in value.items()}
    return value


@dataclass
class AugmentReport:
    lines: int = 0  # lines read
    changed: int = 0  # lines with at least one swap: each gained a swapped copy
    swaps: Counter[str] = field(default_factory=Counter)

    @property
    def written(self) -> int:
        return self.lines + self.changed


def augment_counterfactual(path: str | Path, out: str | Path) -> AugmentReport:
    """Write every line of `path` to `out`, each line that mentions gender followed by its swapped copy.
    Chat, preference and prompt files all work: every prose string is swapped. `out` is written whole or
    not at all."""
    from tunery.data.jsonl import read_jsonl
    from tunery.training.io import atomic_write_text

    report, lines = AugmentReport(), []
    for line in read_jsonl(path):
        if line.error is not None:
            raise TuneryError(
                f"{path} line {line.number}: {line.error}; `tunery data validate` lists every problem"
            )
        report.lines += 1
        original = json.dumps(line.value, ensure_ascii=False)
        lines.append(original)
        counts: Counter[str] = Counter()
        swapped = _swap_value(line.value, counts)
        if counts:
            report.changed += 1
            report.swaps.update(counts)
            lines.append(json.dumps(swapped, ensure_ascii=False))
    if not report.lines:
        raise TuneryError(f"{path}: no lines to augment")
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return report
