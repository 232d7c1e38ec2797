"""Python grader cost: one call's latency (as `POST /v1/fine_tuning/alpha/graders/run` pays it) and graded
samples per second in a GRPO step (as `tunery train grpo` pays it), on examples/rl's grader.

    python bench/graders.py                 # about a minute on 2 CPU cores
    python bench/graders.py --steps 10      # a quicker look

examples/rl/grader.json is a multi grader of two python graders, so every graded batch starts two
sandboxed processes. A step grades `--prompts` prompts x `--group-size` completions in one batch, as
the GRPO recipe does. Completions are made from each prompt's answer: right, wrong, bare and wordy, so
both sub-graders do real work. Nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from harness import REPO

from tunery.graders import build_grader


def completions(answer: str, group_size: int) -> list[str]:
    forms = [
        answer,
        f"The answer is {answer}.",
        f"{int(float(answer)) + 1}",
        f"= {answer}.",
        "I am not sure.",
    ]
    return [forms[k % len(forms)] for k in range(group_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="single-sample calls timed")
    parser.add_argument("--steps", type=int, default=50, help="GRPO steps timed")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    args = parser.parse_args()

    spec = json.loads((REPO / "examples/rl/grader.json").read_text())
    items = [json.loads(line) for line in (REPO / "examples/rl/train.jsonl").read_text().splitlines()]
    grader = build_grader(spec)
    grader("4", {"answer": "4"})  # warm-up: imports, the sandbox probe, page cache

    single = []
    for k in range(args.calls):
        item = items[k % len(items)]
        started = time.perf_counter()
        result = build_grader(spec)(item["answer"], item)  # the service builds the grader per request
        single.append(time.perf_counter() - started)
        assert result.ok and result.reward == 1.0, result

    graded, started = 0, time.perf_counter()
    for step in range(args.steps):
        samples, rows = [], []
        for p in range(args.prompts):
            item = items[(step * args.prompts + p) % len(items)]
            samples += completions(str(item["answer"]), args.group_size)
            rows += [item] * args.group_size
        results = grader.grade_batch(samples, rows)
        assert all(r.ok for r in results), [r.messages for r in results if not r.ok]
        graded += len(results)
    seconds = time.perf_counter() - started

    print(
        f"python graders on {platform.node()} ({platform.machine()}), examples/rl/grader.json (2 python graders)"
    )
    print(
        f"  one call (graders/run):  median {statistics.median(single) * 1e3:.1f} ms, "
        f"p90 {sorted(single)[int(0.9 * (len(single) - 1))] * 1e3:.1f} ms over {len(single)} calls"
    )
    print(
        f"  GRPO grading:            {graded / seconds:.0f} samples/s "
        f"({args.steps} steps x {args.prompts} prompts x {args.group_size}; {seconds / args.steps * 1e3:.0f} ms a step)"
    )


if __name__ == "__main__":
    main()
