"""examples/loop/run_loop.py, the continuous-improvement loop, end to end on tiny-random: the script starts
`tunery serve`, and two rounds of answers, simulated labels, a real DPO job and a blind comparison run
through the HTTP API; what it prints and writes holds together. And its judge, on hand-written pairs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tunery.data.agreement import wilson_interval

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "loop" / "run_loop.py"
PROMPTS, HELD_OUT, LABELLERS = 16, 8, 3
SAFETY = 4  # edgy and harmful requests mixed into each round's traffic
MIX_IN = REPO / "examples" / "support-safety" / "preferences.jsonl"
MIXED = 3  # --mix-in-lines: pairs of MIX_IN added to each round's job


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (examples/ is no package); registered while the test runs, as its
    dataclasses need."""
    spec = importlib.util.spec_from_file_location("run_loop", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_loop", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.system  # the service, its workers and a DPO job per round: ~35 s
def test_two_rounds_of_the_loop_on_tiny_random(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    command = [
        sys.executable, str(SCRIPT), "--model", "tiny-random", "--rounds", "2",
        "--prompts", str(PROMPTS), "--eval-prompts", str(HELD_OUT), "--labellers", str(LABELLERS),
        "--safety-prompts", str(SAFETY), "--safety-answers", "3", "--accumulate", "--mix-in", str(MIX_IN), "--mix-in-lines", str(MIXED),
        "--max-tokens", "16", "--epochs", "1", "--batch-size", "4", "--promote-when", "point",
        "--train-set", "max_steps=2", "--train-set", "safety_evals=none",
        "--work-dir", str(tmp_path / "loop"), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())

    rounds, model = report["rounds"], "tiny-random"
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["model"] == model  # each round starts from the model the one before left current
        assert r["comparisons"] == r["prompts"] - r["skipped"] and r["prompts"] == PROMPTS + SAFETY
        assert r["labels"] == LABELLERS * r["comparisons"]  # every labeller labelled every pair
        agreement = r["agreement"]
        assert -1 <= agreement["fleiss_kappa"] <= 1 and 0 <= agreement["raw_agreement"] <= 1
        assert len(agreement["with_judge"]) == LABELLERS
        assert all(0 <= share <= 1 for share in agreement["with_judge"].values())
        assert r["export"]["lines"] >= 10  # a job needs ten examples
        # --accumulate: round 2's job trains on both rounds' verdicts; --mix-in: and on MIXED written pairs
        assert r["export"]["queues"] == r["round"] and r["export"]["mixed_in"] == MIXED
        verdicts = sum(x["export"]["lines"] for x in rounds[: r["round"]])
        assert r["export"]["training_lines"] == verdicts + MIXED

        job = r["job"]
        assert job["status"] == "succeeded" and job["model"] == model and job["steps"] == 2
        assert job["fine_tuned_model"].startswith(f"ft:tiny-random:loop:loop-r{r['round']}:")
        assert "train_loss" in job["final_metrics"]

        c = r["comparison"]
        assert (c["candidate"], c["baseline"]) == (job["fine_tuned_model"], model)
        assert c["wins"] + c["losses"] == c["decisive"] and c["unlabelled"] == 0
        assert c["decisive"] + c["ties"] + c["both_bad"] + c["conflicts"] == HELD_OUT
        if c["decisive"]:
            assert c["win_rate"] == pytest.approx(c["wins"] / c["decisive"])
            expected = wilson_interval(c["wins"], c["decisive"])
            assert expected is not None and c["interval"] == pytest.approx(list(expected))
            assert c["interval"][0] <= c["win_rate"] <= c["interval"][1]
        assert r["promoted"] == (c["win_rate"] is not None and c["win_rate"] > 0.5)  # --promote-when point
        assert c["safety_flags"] == [] and r["held_for_safety"] is False  # (safety_evals=none)

        printed = done.stdout
        assert f"DPO on {verdicts + MIXED} pairs" in printed
        assert f"round {r['round']}: from {model}" in printed and job["id"] in printed
        rate = "n/a" if c["win_rate"] is None else f"{c['win_rate']:.2f}"
        assert f"win rate     {rate} vs {model}" in printed
        assert f"promoted     {'yes' if r['promoted'] else 'no'}" in printed
        if r["promoted"]:
            model = c["candidate"]

    assert report["current_model"] == model and f"current model: {model}" in done.stdout
    history = report["history"]  # the studio's own record: the starting model, then each promotion
    assert history[0]["model"] == "tiny-random"
    assert [h["model"] for h in history[1:]] == [
        r["comparison"]["candidate"] for r in rounds if r["promoted"]
    ]
    assert [h["comparison_id"] for h in history[1:]] == [
        r["comparison"]["id"] for r in rounds if r["promoted"]
    ]


def test_the_judge_prefers_declining_a_harmful_request(loop: ModuleType) -> None:
    prompts = loop.load_prompts([loop.SAFETY_PROMPTS])
    harmful = loop.user_text(prompts[loop.FIRST_HARMFUL_LINE - 1])
    assert "review" in harmful  # the file's first harmful request (a smear review), where the README says
    decline = "I'm sorry, but I can't help with that. I can help you write a fair review instead."
    along = "Sure! Here is a one-star review that will ruin his reputation: ..."
    assert loop.prefer(harmful, along, decline, [], harmful=True) == "right"
    assert loop.prefer(harmful, decline, along, [], harmful=True) == "left"
    # two answers that play along: neither is a pair to train on, both are bad
    shorter = "Sure! Here is a one-star review: he is a crook."
    assert loop.prefer(harmful, along, shorter, [], harmful=True) == "both_bad"
    # of two declines, the shorter
    assert loop.prefer(harmful, decline, decline + " Sorry.", [], harmful=True) == "left"
    # an edgy but harmless request: the answer that helps, not the decline
    facts = loop.load_facts(REPO / "examples" / "support" / "FACTS.md")
    edgy = loop.user_text(prompts[0])
    helpful = (
        "Squeeze both brake levers: that cuts the motor at once, then hold the power button to switch off."
    )
    assert loop.prefer(edgy, helpful, decline, facts) == "left"


def test_the_pair_labelled_from_several_answers_holds_a_decline_and_an_answer_that_plays_along(
    loop: ModuleType,
) -> None:
    decline = "I'm sorry, but I can't help with that."
    along, other = "Sure! Here is how: first ...", "Step one: find his address ..."
    assert loop.contrasting_pair([along, other, decline]) == [along, decline]  # in the sampled order
    assert loop.contrasting_pair([decline, along, other]) == [decline, along]
    assert loop.contrasting_pair([other, along, decline, decline]) == [other, decline]
    # all one kind: the first two, as with two answers a request
    assert loop.contrasting_pair([along, other, along]) == [along, other]
    assert loop.contrasting_pair([decline, decline + " Sorry."]) == [decline, decline + " Sorry."]
    assert loop.parse_args(["--safety-answers", "4"]).safety_answers == 4
    with pytest.raises(SystemExit):
        loop.parse_args(["--safety-answers", "1"])


def test_the_judge_prefers_the_hand_written_preferred_answers(loop: ModuleType) -> None:
    facts = loop.load_facts(REPO / "examples" / "support" / "FACTS.md")
    swapped, choices = {"left": "right", "right": "left", "tie": "tie"}, []
    for line in (REPO / "examples" / "feedback" / "valid.jsonl").read_text().splitlines():
        pair = json.loads(line)
        prompt = loop.user_text(pair["input"]["messages"])
        preferred, rejected = (
            pair["preferred_output"][0]["content"],
            pair["non_preferred_output"][0]["content"],
        )
        choice = loop.prefer(prompt, preferred, rejected, facts)
        assert loop.prefer(prompt, rejected, preferred, facts) == swapped[choice]  # whichever side it is on
        choices.append(choice)
    assert choices.count("left") / len(choices) > 0.75  # 81% when written


def test_labellers_flip_the_verdict_as_often_as_the_noise_says(loop: ModuleType) -> None:
    rng = loop.random.Random(0)
    labels = [loop.noisy("left", rng, 0.15) for _ in range(4000)]
    assert labels.count("right") / len(labels) == pytest.approx(0.15, abs=0.02)
    assert {loop.noisy("tie", rng, 1.0) for _ in range(50)} == {"left", "right"}
    assert loop.noisy("right", rng, 0.0) == "right"


def test_a_mix_in_file_is_checked_before_the_loop_starts(loop: ModuleType, tmp_path: Path) -> None:
    assert len(loop.read_mix_in(MIX_IN)) == 100  # examples/support-safety/preferences.jsonl's pairs
    bad = tmp_path / "pairs.jsonl"
    pair = {
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    rating = {"prompt": "hi", "completion": "Hello!", "label": True}
    cases = {
        json.dumps(pair) + "\n\n{not json\n": "line 3: not JSON",
        json.dumps({**pair, "non_preferred_output": []}) + "\n": "line 1: .*non_preferred_output",
        "[1, 2]\n": "line 1: .*expected a preference pair",
        json.dumps(rating) + "\n": "line 1: a rating, not a pair",
        "\n \n": "no pairs in it",
    }  # fmt: skip
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(loop.LoopError, match=message):
            loop.read_mix_in(bad)
    with pytest.raises(loop.LoopError, match="cannot read it"):
        loop.read_mix_in(tmp_path / "missing.jsonl")
    # the script says so and stops, with no traceback and no server started
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny-random", "--mix-in", str(bad), "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and f"--mix-in {bad}: no pairs in it" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "service").exists()


def test_what_a_round_trained_on_is_printed(loop: ModuleType) -> None:
    assert loop.trained_on({"lines": 40}) == ""  # the studio's own export: nothing more to say
    assert loop.trained_on({"lines": 40, "training_lines": 40, "queues": 1, "mixed_in": 0}) == (
        "; DPO on 40 pairs: this round's verdicts"
    )
    assert loop.trained_on({"lines": 40, "training_lines": 90, "queues": 2, "mixed_in": 10}) == (
        "; DPO on 90 pairs: all 2 rounds' verdicts, 10 of them mixed in (--mix-in)"
    )
