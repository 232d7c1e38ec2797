"""Preference and thumbs up/down files: every error named with its line and key, and the feedback report."""

from __future__ import annotations

import json

import pytest

from tests.conftest import pair_lines, thumbs_lines, write_jsonl
from tunery.cli import main
from tunery.data.feedback import check_feedback_example, detect_kind, validate_feedback_file

PROMPT = [{"role": "user", "content": "Can I return my helmet?"}]


def keys(obj) -> list[str]:
    return [p.key for p in check_feedback_example(obj, 7)[1]]


@pytest.mark.parametrize(
    ("obj", "key"),
    [
        ("just a string", "data_type"),
        ({"messages": PROMPT}, "data_type"),
        ({"input": "q", "preferred_output": [], "non_preferred_output": []}, "missing_messages_list"),
        (
            {"input": {"messages": PROMPT}, "preferred_output": [], "non_preferred_output": []},
            "invalid_output",
        ),
        (
            {
                "input": {"messages": PROMPT},
                "preferred_output": [{"role": "user", "content": "a"}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            "invalid_output",
        ),
        (
            {
                "input": {"messages": PROMPT + [{"role": "assistant", "content": "x"}]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            "prompt_ends_with_assistant",
        ),
        ({"prompt": "q", "chosen": "a"}, "missing_field"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "missing_prompt"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "missing_content"),
        (
            {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
            "unrecognized_role",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": -1}, "invalid_margin"),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "invalid_label"),
        ({"prompt": "q", "completion": "a", "label": 1}, "invalid_label"),
        ({"prompt": "q", "completion": 5, "label": True}, "invalid_output"),
    ],
)
def test_each_error_has_its_key(obj, key) -> None:
    example, problems = check_feedback_example(obj, 7)
    assert example is None
    assert key in [p.key for p in problems] and all(p.line == 7 for p in problems)


def test_the_forms_normalise_to_the_same_pair() -> None:
    openai, _ = check_feedback_example(pair_lines(1)[0], 1)
    common, _ = check_feedback_example(pair_lines(1, openai_format=False)[0], 1)
    whole = {
        "chosen": openai.prompt + openai.chosen,  # type: ignore[union-attr]
        "rejected": openai.prompt + openai.rejected,  # type: ignore[union-attr, operator]
    }
    implicit, _ = check_feedback_example(whole, 1)
    assert openai is not None and common is not None and implicit is not None
    for other in (common, implicit):
        assert (other.prompt, other.chosen, other.rejected) == (openai.prompt, openai.chosen, openai.rejected)
    assert detect_kind(pair_lines(1)[0]) == "preference" and detect_kind(thumbs_lines(1)[0]) == "unpaired"
    assert keys({"prompt": "q", "chosen": "a", "rejected": "a"}) == ["identical_pair"]


def test_feedback_report(tmp_path, tiny) -> None:
    _, tokenizer = tiny
    lines = pair_lines(12)
    swapped = json.loads(json.dumps(lines[0]))
    swapped["preferred_output"], swapped["non_preferred_output"] = (
        lines[0]["non_preferred_output"],
        lines[0]["preferred_output"],
    )
    lines += [swapped, lines[1]]
    report = validate_feedback_file(write_jsonl(tmp_path / "p.jsonl", lines), tokenizer)
    s = report.stats
    assert not report.errors and s["pairs"] == 14 and s["distinct_prompts"] == 12
    assert s["contradicting_labels"] == 1 and s["duplicates"] == 1
    problems = {(p.line, p.key) for p in report.problems}
    assert (13, "contradicting_labels") in problems and (14, "duplicate_example") in problems
    # the good answers are shorter than the rambling ones and longer than the curt ones
    expected = sum(len(p.chosen_ids) > len(p.rejected_ids) for p in report.chats) / 14
    assert s["chosen_longer_fraction"] == round(expected, 3) and 0 < expected < 1

    thumbs = validate_feedback_file(write_jsonl(tmp_path / "t.jsonl", thumbs_lines(11)), tokenizer)
    assert thumbs.stats["ratings"] == 11 and thumbs.stats["thumbs_up_fraction"] == round(6 / 11, 3)

    mixed = validate_feedback_file(
        write_jsonl(tmp_path / "m.jsonl", pair_lines(10) + thumbs_lines(2)), tokenizer
    )
    assert "mixed_formats" in [p.key for p in mixed.errors]
    wrong = validate_feedback_file(
        write_jsonl(tmp_path / "w.jsonl", thumbs_lines(10)), tokenizer, expect="preference"
    )
    assert [p.line for p in wrong.errors if p.key == "wrong_format"] == list(range(1, 11))


def test_cli_validates_preference_files(tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", pair_lines(12))
    assert main(["data", "validate", str(path), "--model", "tiny-random"]) == 0
    out = capsys.readouterr().out
    assert "12 valid examples" in out and "the preferred answer is the longer one" in out
    assert main(["data", "validate", str(path), "--model", "tiny-random", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "preference" and report["stats"]["pairs"] == 12
    bad = write_jsonl(tmp_path / "bad.jsonl", pair_lines(12) + ['{"prompt": "q", "chosen": "a",'])
    assert main(["data", "validate", str(bad), "--model", "none"]) == 1
    assert "line 13: [invalid_json]" in capsys.readouterr().out
