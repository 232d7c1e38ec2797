"""examples/support-safety/calibrate.py: the data steps of the refusal-calibration recipe (SFT mix, the
prompts to answer, and preference pairs from the model's own mistakes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import example_module

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "support-safety"


def calibrate() -> ModuleType:
    return example_module(EXAMPLE / "calibrate.py")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_come_from_the_models_mistakes_as_many_each_way(tmp_path: Path) -> None:
    module = calibrate()
    assert module.main(["prompts", str(tmp_path / "prompts.jsonl")]) == 0
    prompts = lines(tmp_path / "prompts.jsonl")
    written = module.examples()
    assert len(prompts) == len(written) == 235 and [p["messages"] for p in prompts] == [
        e["prompt"] for e in written
    ]
    benign = [i for i, e in enumerate(written) if e["benign"]]
    harmful = [i for i, e in enumerate(written) if not e["benign"]]
    assert len(benign) == 150 and len(harmful) == 85

    # A model that declines the first 3 benign prompts, plays along with the first 2 harmful ones, and
    # otherwise answers as written (a second, sampled file repeats one mistake and adds one).
    greedy = [e["answer"] for e in written]
    for i in benign[:3]:
        greedy[i] = "I'm sorry, but I can't help with that."
    for i in harmful[:2]:
        greedy[i] = "Sure! Here is how you do it."
    sampled = list(greedy)
    sampled[benign[5]] = "I can't help with that. Anyway, here is roughly how."
    for name, answers in (("greedy", greedy), ("sampled", sampled)):
        rows = [{"line": k + 1, "completion": a} for k, a in enumerate(answers)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "pairs.jsonl"
    files = [str(tmp_path / "greedy.jsonl"), str(tmp_path / "sampled.jsonl")]
    assert module.main(["pairs", *files, str(out)]) == 0
    pairs = lines(out)
    # 4 benign mistakes (the repeated one once); the harmful side: 2 mistakes, then the written pairs
    assert len(pairs) == 8
    helpful, declines = pairs[:4], pairs[4:]
    assert [p["input"]["messages"] for p in helpful] == [
        written[i]["prompt"] for i in (*benign[:3], benign[5])
    ]
    assert all(
        p["preferred_output"][0]["content"] == written[i]["answer"]
        for p, i in zip(helpful, (*benign[:3], benign[5]), strict=True)
    )
    assert helpful[3]["non_preferred_output"][0]["content"].startswith("I can't help with that. Anyway")
    assert [p["non_preferred_output"][0]["content"] for p in declines[:2]] == [
        "Sure! Here is how you do it."
    ] * 2
    written_harmful_pairs = lines(EXAMPLE / "preferences.jsonl")[60:]
    assert declines[2:] == written_harmful_pairs[:2]


def test_the_sft_mix_and_usage(tmp_path: Path) -> None:
    out = tmp_path / "sft.jsonl"
    script = str(EXAMPLE / "calibrate.py")
    done = subprocess.run([sys.executable, script, "sft", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    chats = lines(out)
    support = (REPO / "examples" / "support" / "train.jsonl").read_text().count("\n")
    assert len(chats) == support + 60 + 135 + 100
    assert all(c["messages"][-1]["role"] == "assistant" for c in chats)
    wrong = subprocess.run([sys.executable, script, "pairs"], capture_output=True, text=True, cwd=REPO)
    assert wrong.returncode == 2 and "calibrate.py pairs" in wrong.stdout
    short = tmp_path / "short.jsonl"
    short.write_text('{"line": 1, "completion": "x"}\n')
    bad = subprocess.run([sys.executable, script, "pairs", str(short), str(tmp_path / "p.jsonl")],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert bad.returncode == 2 and "has 1 answers; the prompts file has 235" in bad.stdout
    short.write_text('{"line": 1, "completion": "x"}\n{"line": 2,\n')
    broken = subprocess.run([sys.executable, script, "pairs", str(short), str(tmp_path / "p.jsonl")],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert broken.returncode == 2 and f"{short}, line 2: not JSON" in broken.stdout, broken.stderr
    missing = subprocess.run([sys.executable, script, "pairs", str(tmp_path / "none.jsonl"), str(short)],
                             capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert missing.returncode == 2 and "cannot read" in missing.stdout and not missing.stderr
    short.write_text('["x"]\n')
    wrong = subprocess.run([sys.executable, script, "pairs", str(short), str(tmp_path / "p.jsonl")],
                           capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert wrong.returncode == 2 and "is not `tunery generate` output" in wrong.stdout


def test_languages_add_the_other_languages_examples_to_every_step(tmp_path: Path) -> None:
    """`--languages` adds languages.jsonl (6 helpful answers and 4 declines in each of five languages) to
    the SFT mix and the prompts, and `pairs` reads the answers against the same longer list. Every written
    decline reads as one to the evaluation's detector, and no helpful answer does."""
    from tunery.safety.evals.safety import declines

    module = calibrate()
    written = module.examples(languages=True)
    extra = written[235:]
    assert len(written) == 285 and module.examples()[:235] == written[:235]
    assert sum(e["benign"] for e in extra) == 30
    for e in extra:
        assert declines(e["answer"], e["benign"]) != e["benign"], e["answer"]
    assert module.main(["prompts", str(tmp_path / "prompts.jsonl"), "--languages"]) == 0
    assert len(lines(tmp_path / "prompts.jsonl")) == 285
    answers = [{"line": k + 1, "completion": e["answer"]} for k, e in enumerate(written)]
    answers[240]["completion"] = "I can't help with that."  # a declined benign prompt in Spanish
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    assert written[240]["benign"] and written[240]["prompt"][0]["content"].startswith("¿")
    out = tmp_path / "pairs.jsonl"
    assert module.main(["pairs", str(tmp_path / "answers.jsonl"), str(out), "--languages"]) == 0
    pairs = lines(out)
    assert len(pairs) == 2 and pairs[0]["input"]["messages"] == written[240]["prompt"]
    assert module.main(["pairs", str(tmp_path / "answers.jsonl"), str(out)]) == 2  # 285 answers, 235 prompts


def test_howto_adds_its_examples_to_every_step(tmp_path: Path) -> None:
    """`--howto`: howto.jsonl's 24 answered harmless requests and 24 declined harmful ones, after the rest,
    in the SFT mix, the prompts and the pairs alike; each answer as the project's detector reads it."""
    from tunery.safety.evals.safety import declines, is_refusal

    module = calibrate()
    plain, more = module.examples(), module.examples(howto=True)
    added = more[len(plain) :]
    assert more[: len(plain)] == plain and len(added) == 48
    assert [e["benign"] for e in added] == [True] * 24 + [False] * 24
    assert not any(is_refusal(e["answer"]) for e in added[:24])
    assert all(declines(e["answer"], benign=False) for e in added[24:])
    assert module.main(["prompts", str(tmp_path / "prompts.jsonl"), "--howto"]) == 0
    assert [p["messages"] for p in lines(tmp_path / "prompts.jsonl")] == [e["prompt"] for e in more]
    assert module.main(["sft", str(tmp_path / "sft.jsonl"), "--howto"]) == 0
    assert lines(tmp_path / "sft.jsonl")[-48:] == lines(EXAMPLE / "howto.jsonl")


def test_contrast_pairs_share_a_word_and_stay_apart_from_the_evaluation(tmp_path: Path) -> None:
    """`--contrast`: contrast.jsonl's 40 harmless requests, answered, then their 40 harmful twins, declined
    (line i + 40 shares line i's risky word); after the rest in every step, each answer as the detector
    reads it, and no prompt within 0.5 word overlap of a red-team or benign evaluation prompt."""
    import re

    from tunery.safety.evals.safety import declines, is_refusal

    module = calibrate()
    plain, more = module.examples(howto=True), module.examples(howto=True, contrast=True)
    added = more[len(plain) :]
    assert more[: len(plain)] == plain and len(added) == 80
    assert [e["benign"] for e in added] == [True] * 40 + [False] * 40
    assert not any(is_refusal(e["answer"]) or declines(e["answer"], benign=True) for e in added[:40])
    assert all(declines(e["answer"], benign=False) for e in added[40:])

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z0-9']+", text.lower()))

    evaluation = REPO / "tunery" / "safety" / "data" / "redteam.jsonl"
    asked = [words(row["messages"][-1]["content"]) for row in lines(evaluation)]
    for e in added:
        prompt = words(e["prompt"][-1]["content"])
        assert max(len(prompt & other) / len(prompt | other) for other in asked) < 0.5, e["prompt"]
    assert module.main(["sft", str(tmp_path / "sft.jsonl"), "--howto", "--contrast"]) == 0
    assert lines(tmp_path / "sft.jsonl")[-80:] == lines(EXAMPLE / "contrast.jsonl")
