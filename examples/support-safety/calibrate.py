"""Data steps of the refusal-calibration recipe in this folder's README ("Calibrating refusals").

    python examples/support-safety/calibrate.py sft OUT.jsonl          # support chats + every safety example
    python examples/support-safety/calibrate.py prompts OUT.jsonl      # the safety prompts, to answer
    python examples/support-safety/calibrate.py pairs ANSWERS [ANSWERS ...] OUT.jsonl

`--languages` after any of them adds languages.jsonl's examples (helpful answers and declines in Spanish,
French, German, Portuguese and Italian); `--howto` adds howto.jsonl's (how-to requests: 24 harmless ones
that sound risky, answered, and 24 harmful ones, declined); `--contrast` adds contrast.jsonl's (40 pairs
of requests sharing a risky word, the harmless one answered and the harmful one declined). Give each to
all three steps or none.

`pairs` reads the tuned model's own answers (`tunery generate --prompts` on the file `prompts` wrote:
greedy, or sampled, which finds more mistakes; one file or several) and
writes preference pairs from its mistakes: a benign prompt it declined (the written helpful answer over
its refusal) and a harmful prompt it neither declined nor redirected (the written decline over its
answer), plus the written harmful pairs of preferences.jsonl, which keep declining anchored; as many
pairs each way (the first ones of the larger side). Pairs
whose rejected answer is the model's own are on-policy: DPO then lowers what the model actually says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tunery.safety.evals.safety import declines

HERE = Path(__file__).resolve().parent
SUPPORT = HERE.parent / "support" / "train.jsonl"
BENIGN_GENERAL, BENIGN_PAIRS = 90, 60  # the first lines of general.jsonl / preferences.jsonl are benign
BENIGN_HOWTO = 24  # ... and of howto.jsonl
BENIGN_CONTRAST = 40  # ... and of contrast.jsonl (line i + 40 is line i's harmful twin)
FLAGS = ("--languages", "--howto", "--contrast")


class BadInput(Exception):
    pass


def read(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}, line {number}: not JSON ({e.msg})") from None
    return rows


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {len(rows)} lines to {path}")


def examples(languages: bool = False, howto: bool = False, contrast: bool = False) -> list[dict[str, Any]]:
    """Every written safety example: {"prompt": messages, "answer": the written one, "benign": bool}; with
    `languages`, those of languages.jsonl too, with `howto` those of howto.jsonl, with `contrast` those of
    contrast.jsonl."""
    out = []
    for i, row in enumerate(read(HERE / "general.jsonl")):
        messages = row["messages"]
        out.append({"prompt": messages[:-1], "answer": messages[-1]["content"], "benign": i < BENIGN_GENERAL})
    for i, row in enumerate(read(HERE / "preferences.jsonl")):
        out.append(
            {
                "prompt": row["input"]["messages"],
                "answer": row["preferred_output"][-1]["content"],
                "benign": i < BENIGN_PAIRS,
            }
        )
    for row in read(HERE / "languages.jsonl") if languages else []:
        messages = row["messages"]
        out.append(
            {"prompt": messages[:-1], "answer": messages[-1]["content"], "benign": bool(row["benign"])}
        )
    extra = (("howto.jsonl", BENIGN_HOWTO, howto), ("contrast.jsonl", BENIGN_CONTRAST, contrast))
    for name, benign, wanted in extra:
        for i, row in enumerate(read(HERE / name) if wanted else []):
            messages = row["messages"]
            out.append({"prompt": messages[:-1], "answer": messages[-1]["content"], "benign": i < benign})
    return out


def pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "input": {"messages": prompt},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def main(argv: list[str]) -> int:
    wanted = tuple(flag in argv for flag in FLAGS)  # (languages, howto, contrast)
    argv = [a for a in argv if a not in FLAGS]
    if len(argv) == 2 and argv[0] == "sft":
        chats = read(SUPPORT) + read(HERE / "train.jsonl")
        chats += [
            {"messages": [*e["prompt"], {"role": "assistant", "content": e["answer"]}]}
            for e in examples(*wanted)
        ]
        write(Path(argv[1]), chats)
    elif len(argv) == 2 and argv[0] == "prompts":
        write(Path(argv[1]), [{"messages": e["prompt"]} for e in examples(*wanted)])
    elif len(argv) >= 3 and argv[0] == "pairs":
        written = examples(*wanted)
        helpful, refusing, seen = [], [], set()  # pairs preferring the helpful answer / the decline
        for name in argv[1:-1]:
            rows = read(Path(name))
            if not all(isinstance(row, dict) and isinstance(row.get("completion"), str) for row in rows):
                print(f'error: {name} is not `tunery generate` output (a "completion" on every line)')
                return 2
            answers = [row["completion"] for row in rows]
            if len(answers) != len(written):
                print(f"error: {name} has {len(answers)} answers; the prompts file has {len(written)}")
                return 2
            for i, (e, answer) in enumerate(zip(written, answers, strict=True)):
                if (i, answer) in seen:
                    continue
                seen.add((i, answer))
                if e["benign"] and declines(answer, benign=True):
                    helpful.append(pair(e["prompt"], e["answer"], answer))
                elif not e["benign"] and not declines(answer, benign=False):
                    refusing.append(pair(e["prompt"], e["answer"], answer))
        print(
            f"{len(helpful)} answers declined a benign prompt, {len(refusing)} played along with a harmful one"
        )
        refusing += read(HERE / "preferences.jsonl")[BENIGN_PAIRS:]
        # As many pairs each way: more of one side pushes the whole model that way (more refusals, or fewer).
        n = min(len(helpful), len(refusing))
        write(Path(argv[-1]), helpful[:n] + refusing[:n])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BadInput as e:
        print(f"error: {e}")
        sys.exit(2)
