"""A stand-in for `python -m tunery train METHOD` in the tune tests: the same flags, a run directory with
metrics.jsonl growing step by step (valid_loss lowest for lr near 1e-3), checkpoints/, summary.json at the
end; SIGTERM checkpoints and exits 1, as a real run does; `--resume DIR` continues after the last
checkpoint. Each invocation is appended to DIR/../calls.jsonl. FAKE_STEP_SECONDS sets the pace."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

STEPS = 6


def main(argv: list[str]) -> int:
    assert argv[0] == "train"
    sets, out, resume = {}, None, None
    i = 2
    while i < len(argv):
        flag = argv[i]
        if flag == "--set":
            key, _, value = argv[i + 1].partition("=")
            sets[key] = value
            i += 2
        elif flag in ("--out", "--resume", "--config"):
            if flag == "--out":
                out = Path(argv[i + 1])
            elif flag == "--resume":
                resume = Path(argv[i + 1])
            i += 2
        else:
            i += 1
    run = resume or out
    assert run is not None
    run.mkdir(parents=True, exist_ok=True)
    with (run.parent / "calls.jsonl").open("a") as fh:
        fh.write(json.dumps({"run": run.name, "resume": resume is not None, "sets": sets}) + "\n")
    if resume is not None:
        sets = json.loads((run / "config.json").read_text())
        start = len(list((run / "checkpoints").iterdir()))
    else:
        (run / "config.json").write_text(json.dumps(sets))
        (run / "metrics.jsonl").write_text("")
        start = 0
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    lr = float(sets.get("lr", "1e-3"))
    pace = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    loss = 0.0
    for step in range(start + 1, STEPS + 1):
        time.sleep(pace)
        loss = abs(math.log10(lr) + 3) + 1 / step
        with (run / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": step, "valid_loss": loss}) + "\n")
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / f"step-{step}").mkdir(exist_ok=True)
        if stopped:
            print(f"stopped at step {step}", file=sys.stderr)
            return 1
    summary = {"method": argv[1], "steps": STEPS, "final_metrics": {"full_valid_loss": loss}}
    (run / "summary.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
