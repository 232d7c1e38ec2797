"""What a queue's labels say: each item's verdict, the training lines they export to, the quality report
and a blind comparison's result. Pure functions of the queue's items and labels (no database, no I/O);
the statistics themselves are in tunery/data/agreement.py.

Verdicts: an item's verdict is the choice most of its labels gave (a strict plurality over answer_1,
answer_2, tie and both_bad, or up and down); two choices tied for the most is a conflict and the item has
no verdict. Exports and comparisons use verdicts, so an item counts once however many people labelled it;
the biases and labellers' statistics count labels.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from tunery.data.agreement import (
    binomial_p_value,
    cohen_kappa,
    fleiss_kappa,
    median,
    plurality,
    wilson_interval,
)
from tunery.server.feedback_store import FeedbackItem, FeedbackLabel

PAIR_CHOICES = ("answer_1", "answer_2", "tie", "both_bad")
THUMB_CHOICES = ("up", "down")
# labellers' outlier rules (the report states them next to the flags)
MIN_SECONDS = {"pairwise": 3.0, "thumbs": 1.0}  # a median faster than this is too fast to have read
FAST_FRACTION = 0.25  # ... or faster than a quarter of the other labellers' median
LOW_AGREEMENT_GAP = 0.2  # agreement with the others this far below theirs with each other
MIN_COMPARED = 5  # items shared with others before agreement is judged
ONE_SIDED = 0.9  # the same side (left or right) in this share of decisive labels ...
MIN_SIDED = 10  # ... out of at least this many
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Verdict:
    choice: str | None  # None: a conflict (two choices tied for the most)
    agreement: float  # the share of the item's labels that gave `choice` (or the top choices)
    labels: int


def verdicts(labels: Sequence[FeedbackLabel]) -> dict[str, Verdict]:
    """Each labelled item's verdict, by item id."""
    by_item: dict[str, list[str]] = defaultdict(list)
    for label in labels:
        by_item[label.item_id].append(label.choice)
    out = {}
    for item_id, choices in by_item.items():
        choice, share = plurality(choices)
        out[item_id] = Verdict(choice, share, len(choices))
    return out


# --- exports -------------------------------------------------------------------------------------------------


@dataclass
class Export:
    lines: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


EXPORT_RULE = (
    "Each item's verdict is the choice most of its labels gave; items without one (two choices tied for the "
    "most), ties, both-bad items, items with fewer than min_labels labels, items whose verdict has less "
    "than min_agreement of their labels, and pairs with an empty answer are left out."
)


def export_lines(
    mode: str,
    items: Sequence[FeedbackItem],
    labels: Sequence[FeedbackLabel],
    form: str,
    min_agreement: float = 0.0,
    min_labels: int = 1,
) -> Export:
    """Training lines from a queue's verdicts, in `form`:

    preference  OpenAI's DPO format, the winner as `preferred_output` (pairwise queues)
    unpaired    {messages, completion, label}: a thumbs verdict; from a pairwise verdict the winner up and
                the loser down, and both answers down when both are bad (KTO's data)
    """
    found = verdicts(labels)
    out = Export()
    for item in items:
        verdict = found.get(item.id)
        out.counts["items"] += 1
        if verdict is None:
            out.counts["unlabelled"] += 1
            continue
        if verdict.labels < min_labels:
            out.counts["too_few_labels"] += 1
            continue
        if verdict.choice is None:
            out.counts["conflicts"] += 1
            continue
        if verdict.agreement < min_agreement:
            out.counts["low_agreement"] += 1
            continue
        lines = _lines(mode, item, verdict.choice, form)
        if not lines:
            out.counts["ties" if verdict.choice == "tie" else "both_bad"] += 1
            continue
        if any(_blank(line) for line in lines):  # training files refuse empty answers: the job would fail
            out.counts["blank_answers"] += 1
            continue
        out.counts["exported_items"] += 1
        out.lines += lines
    out.counts["lines"] = len(out.lines)
    return out


def held_out_split(
    lines: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training lines, held-out lines): `fraction` of the prompts, drawn with `seed`, are held out with every
    line they made (an unpaired export's winner and loser of one pair stay on the same side, so the held-out
    loss never scores an answer to a prompt the model trained on). At least one prompt is held out and one
    kept when there are two; `fraction` 0 holds out nothing."""
    prompts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        messages = line["input"]["messages"] if "input" in line else line["messages"]
        prompts[json.dumps(messages, sort_keys=True)].append(line)
    if fraction <= 0 or len(prompts) < 2:
        return list(lines), []
    keys = sorted(prompts)
    random.Random(seed).shuffle(keys)
    held = set(keys[: min(len(keys) - 1, max(1, int(len(keys) * fraction)))])  # never above `fraction`

    def side(line: dict[str, Any]) -> bool:
        messages = line["input"]["messages"] if "input" in line else line["messages"]
        return json.dumps(messages, sort_keys=True) in held

    return [x for x in lines if not side(x)], [x for x in lines if side(x)]


def _blank(line: dict[str, Any]) -> bool:
    """Whether a training line holds an answer with no text (a model can answer with nothing)."""
    answers = [line.get("completion")] if "completion" in line else [
        m["content"] for key in ("preferred_output", "non_preferred_output") for m in line[key]
    ]  # fmt: skip
    return any(not isinstance(a, str) or not a.strip() for a in answers)


def _lines(mode: str, item: FeedbackItem, choice: str, form: str) -> list[dict[str, Any]]:
    prompt = item.messages
    if mode == "thumbs":
        return [{"messages": prompt, "completion": item.answer_1, "label": choice == "up"}]
    answers = {"answer_1": item.answer_1, "answer_2": item.answer_2}
    if choice in answers:
        winner = answers[choice]
        loser = answers["answer_2" if choice == "answer_1" else "answer_1"]
        if form == "preference":
            return [
                {
                    "input": {"messages": prompt},
                    "preferred_output": [{"role": "assistant", "content": winner}],
                    "non_preferred_output": [{"role": "assistant", "content": loser}],
                }
            ]
        return [
            {"messages": prompt, "completion": winner, "label": True},
            {"messages": prompt, "completion": loser, "label": False},
        ]
    if choice == "both_bad" and form == "unpaired":
        return [{"messages": prompt, "completion": a, "label": False} for a in answers.values()]
    return []  # a tie says nothing to train on; both-bad makes no pair


# --- quality -------------------------------------------------------------------------------------------------


def _side_rate(wins: int, n: int) -> dict[str, Any]:
    p_value = binomial_p_value(wins, n)
    return {
        "decisive": n,
        "wins": wins,
        "rate": wins / n if n else None,
        "p_value": p_value,
        "significant": n > 0 and p_value < SIGNIFICANCE,
    }


def _left_won(label: FeedbackLabel) -> bool:
    """answer_1 is on the left unless the labeller saw the pair flipped."""
    return (label.choice == "answer_1") != label.shown_flipped


def quality_report(
    mode: str, items: Sequence[FeedbackItem], labels: Sequence[FeedbackLabel], names: dict[str, str]
) -> dict[str, Any]:
    """Agreement, biases and each labeller's numbers for one queue (`names`: key id -> display name)."""
    by_id = {item.id: item for item in items}
    labels = [label for label in labels if label.item_id in by_id]
    choices = PAIR_CHOICES if mode == "pairwise" else THUMB_CHOICES
    by_item: dict[str, dict[str, str]] = defaultdict(dict)  # item -> labeller -> choice
    for label in labels:
        by_item[label.item_id][label.labeller_key_id] = label.choice
    multi = [
        Counter(given.values()) for given in by_item.values() if len(given) >= 2
    ]  # items labelled by two or more
    labeller_ids = sorted({label.labeller_key_id for label in labels}, key=lambda k: names.get(k, k))

    pairs = []
    for first, second in combinations(labeller_ids, 2):
        shared = [given for given in by_item.values() if first in given and second in given]
        a, b = [g[first] for g in shared], [g[second] for g in shared]
        pairs.append(
            {
                "labellers": [names.get(first, first), names.get(second, second)],
                "key_ids": [first, second],
                "items": len(shared),
                "raw_agreement": sum(x == y for x, y in zip(a, b, strict=True)) / len(shared)
                if shared
                else None,
                "cohen_kappa": cohen_kappa(a, b) if len(shared) >= 2 else None,
            }
        )
    agreeing_pairs = sum(sum(c * (c - 1) for c in counts.values()) for counts in multi)
    all_pairs = sum(sum(counts.values()) * (sum(counts.values()) - 1) for counts in multi)

    report: dict[str, Any] = {
        "object": "tunery.feedback_quality",
        "mode": mode,
        "labels": len(labels),
        "labellers": len(labeller_ids),
        "items": len(items),
        "items_labelled": len(by_item),
        "items_multi_labelled": len(multi),
        "choices": {c: sum(1 for label in labels if label.choice == c) for c in choices},
        "agreement": {
            "fleiss_kappa": fleiss_kappa(multi),
            "raw_agreement": agreeing_pairs / all_pairs if all_pairs else None,
            "items": len(multi),
            "method": (
                "Fleiss' kappa over items labelled two or more times, counting each item's own number of "
                "labels (with equal numbers this is Fleiss' kappa exactly); raw_agreement is the share of "
                "pairs of labels on the same item that agree. Cohen's kappa per pair of labellers over the "
                "items both labelled."
            ),
            "pairs": pairs,
        },
    }
    decisive = [label for label in labels if label.choice in ("answer_1", "answer_2")]
    if mode == "pairwise":
        report["position_bias"] = _side_rate(sum(_left_won(x) for x in decisive), len(decisive)) | {
            "meaning": "the share of decisive labels (A or B better) where the answer shown on the left won",
        }
        longer = []
        for label in decisive:
            item = by_id[label.item_id]
            len_1, len_2 = len(item.answer_1 or ""), len(item.answer_2 or "")
            if len_1 != len_2:
                longer.append((label.choice == "answer_1") == (len_1 > len_2))
        report["length_bias"] = _side_rate(sum(longer), len(longer)) | {
            "meaning": "the share of decisive labels on answers of different lengths (characters) where the "
            "longer answer won; a high share is a preference for length, wanted or not",
        }
    else:
        report["up_rate"] = report["choices"]["up"] / len(labels) if labels else None
    report["labellers_detail"] = _labellers(mode, labeller_ids, labels, by_item, names)
    report["rules"] = {
        "too_fast": f"median seconds per label under {MIN_SECONDS[mode]:g} s, or under "
        f"{FAST_FRACTION:g} of the other labellers' median (with 5 labels or more)",
        "low_agreement": f"agrees with the others' verdict {LOW_AGREEMENT_GAP:g} or more below the rate at "
        f"which the others agree with each other (over {MIN_COMPARED} shared items or more)",
        "one_sided": f"picks the same side in {ONE_SIDED:.0%} or more of {MIN_SIDED}+ decisive labels",
        "significance": f"p < {SIGNIFICANCE} in an exact two-sided binomial test against 0.5",
    }
    report["findings"] = _findings(report)
    return report


def _labellers(
    mode: str,
    labeller_ids: list[str],
    labels: Sequence[FeedbackLabel],
    by_item: dict[str, dict[str, str]],
    names: dict[str, str],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key_id in labeller_ids:
        own = [label for label in labels if label.labeller_key_id == key_id]
        seconds = [label.seconds for label in own if label.seconds is not None]
        agree = compared = 0
        for given in by_item.values():
            if key_id not in given or len(given) < 2:
                continue
            verdict, _ = plurality([c for k, c in given.items() if k != key_id])
            if verdict is not None:
                compared += 1
                agree += given[key_id] == verdict
        decisive = [label for label in own if label.choice in ("answer_1", "answer_2")]
        rows.append(
            {
                "key_id": key_id,
                "name": names.get(key_id, key_id),
                "labels": len(own),
                "median_seconds": median(seconds),
                "compared_items": compared,
                "agreed": agree,
                "agreement_with_others": agree / compared if compared else None,
                "left_rate": sum(_left_won(x) for x in decisive) / len(decisive)
                if decisive and mode == "pairwise"
                else None,
                "up_rate": sum(x.choice == "up" for x in own) / len(own)
                if own and mode == "thumbs"
                else None,
                "decisive": len(decisive),
                "flags": [],
            }
        )
    for row in rows:
        others = [r for r in rows if r is not row]
        other_seconds = [
            s
            for label in labels
            if label.labeller_key_id != row["key_id"] and (s := label.seconds) is not None
        ]
        typical = median(other_seconds)
        fast = row["median_seconds"] is not None and row["labels"] >= 5
        if fast and (
            row["median_seconds"] < MIN_SECONDS[mode]
            or (typical is not None and row["median_seconds"] < FAST_FRACTION * typical)
        ):
            row["flags"].append("too_fast")
        agreed, compared = sum(r["agreed"] for r in others), sum(r["compared_items"] for r in others)
        if (
            row["compared_items"] >= MIN_COMPARED
            and compared >= MIN_COMPARED
            and row["agreement_with_others"] < agreed / compared - LOW_AGREEMENT_GAP
        ):
            row["flags"].append("low_agreement")
        sided = row["left_rate"] is not None and row["decisive"] >= MIN_SIDED
        if sided and not 1 - ONE_SIDED < row["left_rate"] < ONE_SIDED:
            row["flags"].append("one_sided")
    return rows


def _findings(report: dict[str, Any]) -> list[str]:
    """The report in sentences, worst first: what a person should look at."""
    notes = []
    kappa = report["agreement"]["fleiss_kappa"]
    if report["labels"] == 0:
        return ["No labels yet."]
    if kappa is None:
        notes.append(
            "Agreement cannot be measured yet: no item has two labels (set labels_per_item to 2 or more)."
        )
    elif kappa < 0.2:
        notes.append(f"Labellers barely agree (Fleiss' kappa {kappa:.2f}): clarify the instructions.")
    for name in ("position_bias", "length_bias"):
        bias = report.get(name)
        if bias and bias["significant"]:
            side = "the left answer" if name == "position_bias" else "the longer answer"
            notes.append(
                f"{side.capitalize()} won {bias['rate']:.0%} of {bias['decisive']} decisive labels "
                f"(p = {bias['p_value']:.2g})."
            )
    for row in report["labellers_detail"]:
        if row["flags"]:
            notes.append(f"{row['name']}: {', '.join(f.replace('_', ' ') for f in row['flags'])}.")
    return notes


# --- comparisons --------------------------------------------------------------------------------------------


def comparison_result(
    items: Sequence[FeedbackItem], labels: Sequence[FeedbackLabel], safety_flags: Sequence[str] = ()
) -> dict[str, Any]:
    """A blind comparison's result: the candidate wrote answer_1 of every item, the baseline answer_2.

    Each item counts once, by its verdict; the win rate is over decisive items (ties and both-bad are
    reported, not counted) with a 95% Wilson interval. Promote when the interval's lower bound is above
    0.5; keep the baseline when its upper bound is below 0.5; otherwise it is too close to call. A
    candidate that wins but whose training run raised safety flags (`safety_flags`: it got worse than its
    base on a safety evaluation) is `review_safety`: people preferring its answers says nothing of that.
    """
    found = verdicts(labels)
    counts: Counter[str] = Counter()
    for item in items:
        verdict = found.get(item.id)
        if verdict is None:
            counts["unlabelled"] += 1
        elif verdict.choice is None:
            counts["conflicts"] += 1
        else:
            counts[
                {"answer_1": "wins", "answer_2": "losses", "tie": "ties"}.get(verdict.choice, "both_bad")
            ] += 1
    wins, losses = counts["wins"], counts["losses"]
    decisive = wins + losses
    interval = wilson_interval(wins, decisive)
    if interval is None:
        recommendation, reason = "no_data", "No decisive verdict yet: label the comparison's items."
    elif interval[0] > 0.5:
        recommendation = "promote"
        reason = (
            f"The candidate won {wins} of {decisive} decisive items; the 95% interval of its win rate "
            f"({interval[0]:.0%}-{interval[1]:.0%}) lies above 50%."
        )
    elif interval[1] < 0.5:
        recommendation = "keep_baseline"
        reason = (
            f"The candidate won only {wins} of {decisive} decisive items; the 95% interval of its win rate "
            f"({interval[0]:.0%}-{interval[1]:.0%}) lies below 50%."
        )
    else:
        recommendation = "inconclusive"
        reason = (
            f"The candidate won {wins} of {decisive} decisive items; the 95% interval of its win rate "
            f"({interval[0]:.0%}-{interval[1]:.0%}) contains 50%: label more items to decide."
        )
    if recommendation == "promote" and safety_flags:
        recommendation = "review_safety"
        reason += (
            " But its training run raised safety flags: "
            + "; ".join(safety_flags)
            + ". Look at them (the job's events, `tunery eval safety`) before promoting it."
        )
    return {
        "wins": wins,
        "losses": losses,
        "ties": counts["ties"],
        "both_bad": counts["both_bad"],
        "conflicts": counts["conflicts"],
        "unlabelled": counts["unlabelled"],
        "decisive": decisive,
        "win_rate": wins / decisive if decisive else None,
        "interval": list(interval) if interval else None,
        "recommendation": recommendation,
        "reason": reason,
        "safety_flags": list(safety_flags),
    }
