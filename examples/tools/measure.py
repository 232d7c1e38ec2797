"""How often a model calls the right function with the right arguments, on test.jsonl's held-out requests.

    python examples/tools/measure.py                                  # the bundled model as it is
    python examples/tools/measure.py --adapter runs/tools             # after `tunery train sft` on train.jsonl

Each request is rendered with its tools as Tunery renders them in training and in the service, answered
greedily, and its calls read back as the service reads them (tunery/data/tools.py). Counted:
- decision: called a function when one was expected, answered in text when none was;
- function: the right function (of the requests that expect one);
- arguments: valid JSON with exactly the expected values (of the requests that expect one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from tunery.data.template import prompt_ids
from tunery.data.tools import parse_tool_calls
from tunery.models.load import load_for_inference
from tunery.models.sampling import SamplingParams, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter")
    parser.add_argument("--data", default=str(Path(__file__).parent / "test.jsonl"))
    parser.add_argument("--show", type=int, default=3, help="print this many answers")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    model, tokenizer = load_for_inference(args.model, args.adapter)
    prompts = [prompt_ids(tokenizer, row["messages"], row["tools"]) for row in rows]
    answers = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=96, temperature=0.0))
    decision = function = arguments = expecting = 0
    for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        names = {t["function"]["name"] for t in row["tools"]}
        calls = parse_tool_calls(answer.text, names).tool_calls
        expected = row["expected"]
        if i < args.show:
            print(f"{row['messages'][-1]['content']!r} -> {answer.text[:160]!r}")
        if expected is None:
            decision += not calls
            continue
        expecting += 1
        decision += bool(calls)
        if calls and calls[0]["function"]["name"] == expected["name"]:
            function += 1
            with contextlib.suppress(json.JSONDecodeError):
                arguments += json.loads(calls[0]["function"]["arguments"]) == expected["arguments"]
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''}, {len(rows)} held-out requests:")
    print(f"  decision (call or not) right: {decision}/{len(rows)} = {decision / len(rows):.0%}")
    print(f"  right function: {function}/{expecting} = {function / max(expecting, 1):.0%}")
    print(f"  right function and exact arguments: {arguments}/{expecting} = {arguments / max(expecting, 1):.0%}")


if __name__ == "__main__":
    main()
