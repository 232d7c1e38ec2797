"""Graders: hand-worked scores for every type and metric, the formula, templates, spec errors that name the
JSON path, OpenAI's run response, local model graders on tiny-random, the CLI, and the docstring examples."""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import math
import time
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunery.cli import main
from tunery.errors import TuneryError
from tunery.graders import build_grader, judges, parse_grader, run_response
from tunery.graders.formula import parse_formula
from tunery.graders.run import BOOL_ERRORS, TEXT_ERRORS
from tunery.graders.template import TemplateError, make_sample, render

GRADERS_DIR = Path(__file__).resolve().parents[2] / "tunery" / "graders"


def check(operation: str, reference: str = "{{item.answer}}") -> dict:
    return {
        "type": "string_check",
        "name": "check",
        "input": "{{sample.output_text}}",
        "reference": reference,
        "operation": operation,
    }


def similarity(metric: str) -> dict:
    return {
        "type": "text_similarity",
        "name": metric,
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference}}",
        "evaluation_metric": metric,
    }


# --- string_check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "output", "answer", "reward"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),  # case-sensitive
        ("eq", "Paris ", "Paris", 0.0),  # exact: no stripping
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "It is Paris.", "Paris", 1.0),  # input contains reference
        ("like", "It is PARIS.", "Paris", 0.0),
        ("like", "Paris", "It is Paris.", 0.0),  # not the other way round
        ("ilike", "It is PARIS.", "paris", 1.0),
        ("ilike", "Lyon", "paris", 0.0),
    ],
)
def test_string_check_operations(operation: str, output: str, answer: str, reward: float) -> None:
    result = build_grader(check(operation))(output, {"answer": answer})
    assert result.reward == reward and result.ok


# --- text_similarity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("fuzzy_match", 1 - 5 / 13),  # kitten -> sitting: 5 insertions/deletions over 13 characters
        ("rouge_1", 2 * 1 * 0.5 / 1.5),  # 3 shared unigrams: P 3/3, R 3/6
        ("rouge_2", 2 * 1 * 0.4 / 1.4),  # 2 shared bigrams: P 2/2, R 2/5
        ("rouge_3", 2 * 1 * 0.25 / 1.25),  # 1 shared trigram: P 1/1, R 1/4
        ("rouge_4", 0.0),  # the output has no 4-gram
        ("rouge_5", 0.0),
        ("rouge_l", 2 / 3),  # LCS 3: same as rouge_1 here
        ("bleu", math.exp(1 - 6 / 3)),  # every n-gram matches; brevity penalty e^(1 - 6/3)
        ("gleu", 6 / 18),  # min(precision 6/6, recall 6/18) over 1..4-grams
    ],
)
def test_text_similarity_hand_worked(metric: str, expected: float) -> None:
    output, reference = (
        ("kitten", "sitting") if metric == "fuzzy_match" else ("the cat sat", "the cat sat on the mat")
    )
    result = build_grader(similarity(metric))(output, {"reference": reference})
    assert result.ok
    assert result.reward == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_l"])
def test_text_similarity_identical_is_one_and_disjoint_is_zero(metric: str) -> None:
    grader = build_grader(similarity(metric))
    text = "the quick brown fox jumps over the lazy dog"
    assert grader(text, {"reference": text}).reward == pytest.approx(1.0)
    assert grader("zzz qqq", {"reference": text}).reward == pytest.approx(0.0, abs=0.15)  # fuzzy: a few chars


def test_text_similarity_refuses_texts_beyond_its_bound() -> None:
    """Each metric's time grows with the product of the lengths (rapidfuzz holding the interpreter): a
    text beyond MAX_CHARS is a per-sample error naming the side and its length, not a long stall."""
    from tunery.graders.metrics import MAX_CHARS

    grader = build_grader(similarity("fuzzy_match"))
    at_bound = "a" * MAX_CHARS
    assert grader(at_bound, {"reference": at_bound}).reward == pytest.approx(1.0)
    beyond = grader("a" * (MAX_CHARS + 1), {"reference": "a" * 1_500_000})  # the metric: 43 s at this size
    assert not beyond.ok and beyond.reward == 0.0 and beyond.errors["other_error"]
    assert f"at most {MAX_CHARS:,} characters; the rendered input has {MAX_CHARS + 1:,}" in beyond.messages[0]
    short = grader("the cat", {"reference": "b" * (MAX_CHARS + 5)})
    assert f"the rendered reference has {MAX_CHARS + 5:,}" in short.messages[0]


def test_rouge_l_scores_as_rouge_score_does_at_any_length_within_the_bound() -> None:
    """rouge_l takes rouge-score's tokens and F-measure, the subsequence from rapidfuzz: the same score as
    rouge-score's own scorer, and 10,000 tokens a side (21 s in rouge-score's Python) at once."""
    import random

    from rouge_score import rouge_scorer

    from tunery.graders.metrics import rouge_l

    reference_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "running", "runs", "ran", "dogs", "dog's", "naïve", "42",
             "x-ray", "!!"]  # fmt: skip
    for _ in range(300):
        a, b = (" ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) for _ in range(2))
        assert rouge_l(a, b) == reference_scorer.score(b, a)["rougeL"].fmeasure, (a, b)
    grader = build_grader(similarity("rouge_l"))
    result = grader("a." * 9999, {"reference": "b. a." * 3000})  # 19,998 and 15,000 characters
    precision, recall = 3000 / 9999, 3000 / 6000  # LCS: the reference's 3,000 a's
    assert result.ok and result.reward == pytest.approx(2 * precision * recall / (precision + recall))


def test_meteor_refuses_more_words_than_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """METEOR aligns every word with every other in pure Python: beyond MAX_WORDS a side it is a per-sample
    error before it runs. (Its WordNet data is not installed here: the scorer is replaced.)"""
    from tunery.graders import metrics

    ran: list[int] = []
    monkeypatch.setattr(metrics, "_wordnet_installed", lambda: True)
    monkeypatch.setitem(metrics.SCORERS, "meteor", lambda a, b: ran.append(1) or 1.0)
    grader = build_grader(similarity("meteor"))
    at_bound = " ".join(["a"] * metrics.MAX_WORDS)
    assert grader("a b", {"reference": at_bound}).reward == 1.0 and ran == [1]
    refused = grader("a b", {"reference": at_bound + " a"})
    assert refused.errors["other_error"] and ran == [1]
    assert (
        f"at most {metrics.MAX_WORDS:,} words; the rendered reference has {metrics.MAX_WORDS + 1:,}"
        in (refused.messages[0])
    )


def test_a_template_stops_rendering_at_its_bound() -> None:
    """A template repeating a variable could build gigabytes from a small request: rendering stops with
    TemplateError as soon as the text passes the limit, and a grader reports it for that sample."""
    item = {"x": "0123456789"}
    assert render("{{item.x}}{{item.x}}", make_sample(""), item, limit=20) == "0123456789" * 2
    with pytest.raises(TemplateError, match="more than 19 characters") as raised:
        render("{{item.x}}{{item.x}}", make_sample(""), item, limit=19)
    assert raised.value.too_long
    with pytest.raises(TemplateError, match="the template has 21 characters"):
        render("z" * 21, make_sample(""), item, limit=20)
    grader = build_grader(
        {
            "type": "string_check",
            "name": "amplified",
            "operation": "eq",
            "input": "{{item.x}}" * 10_000,
            "reference": "a",
        }
    )
    result = grader("a", {"x": "y" * 1_000_000})  # would render 10^10 characters
    assert result.errors["other_error"] and "renders to more than" in result.messages[0]


def test_cosine_tokenizes_at_most_max_chars(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model reads 256 tokens; a megabyte-long text is cut before the tokenizer sees it."""
    import torch

    from tunery.graders import metrics

    seen: list[int] = []

    def fake_embed(texts: list[str]) -> torch.Tensor:
        seen.extend(len(t) for t in texts)
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)

    monkeypatch.setattr(metrics, "embed", fake_embed)
    assert metrics.cosine_batch(["b" * 3_000_000, "short"], ["c", "d" * 10]) == pytest.approx([1.0, 1.0])
    assert seen == [metrics.MAX_CHARS, 5, 1, 10]


def test_a_multi_past_its_deadline_fails_the_graders_not_yet_run() -> None:
    """One time budget for a request: sub-graders that would start after it fail without running."""
    from tunery.graders.sandbox import SandboxLimits

    spec = {
        "type": "multi",
        "name": "both",
        "calculate_output": "a + b",
        "graders": {
            "a": {**similarity("fuzzy_match"), "name": "a"},
            "b": {**similarity("rouge_1"), "name": "b"},
        },
    }
    on_time = build_grader(spec, limits=SandboxLimits(deadline=time.monotonic() + 60))(
        "x y", {"reference": "x y"}
    )
    assert on_time.ok and on_time.reward == pytest.approx(2.0)
    late = build_grader(spec, limits=SandboxLimits(deadline=time.monotonic() - 1))(
        "x y", {"reference": "x y"}
    )
    assert late.errors["other_error"] and late.reward == 0.0
    assert late.messages == [f"{n}: the request's time budget ran out before this grader ran" for n in "ab"]


def test_a_judge_still_answering_at_the_deadline_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model grader took the request's budget as given: max_completions_tokens near the context ran for
    minutes past the 120 s. Past the deadline the sampling stops between two steps and the samples fail."""
    from types import SimpleNamespace

    from tunery.graders.sandbox import SandboxLimits

    looks: list[float] = []

    def monotonic() -> float:  # the judge's clock: in time at its first look, past the deadline after
        looks.append(0.0 if not looks else 10.0)
        return looks[-1]

    monkeypatch.setattr(judges, "time", SimpleNamespace(monotonic=monotonic))
    spec = judge(sampling_params={"max_completions_tokens": 2000, "seed": 0, "temperature": 1.0})
    result = build_grader(spec, limits=SandboxLimits(deadline=5.0))("4", {})
    assert not result.ok and result.reward == 0.0
    said = str(result.errors) + str(result.messages)
    assert "TimeoutError: the request's time budget ran out while the judge model was answering" in said
    assert len(looks) == 2  # before the batch, then after its first decoding step: stopped there


def test_a_judge_whose_request_was_given_up_is_stopped() -> None:
    """The inference worker checked a grader request's cancellation only before it started: a judge whose
    client had left answered on to the request's budget. Given up, it stops between two decoding steps."""
    from tunery.graders.sandbox import SandboxLimits

    looks: list[bool] = []

    def stopped() -> bool:  # the client leaves after the judge's first look
        looks.append(bool(looks))
        return looks[-1]

    spec = judge(sampling_params={"max_completions_tokens": 2000, "seed": 0, "temperature": 1.0})
    result = build_grader(spec, limits=SandboxLimits(stopped=stopped))("4", {})
    assert not result.ok and "the request was given up while the judge model was answering" in str(
        result.errors
    ) + str(result.messages)
    assert looks == [False, True]  # before the batch, then after its first decoding step


def test_meteor_without_wordnet_is_refused_when_parsed() -> None:
    from tunery.graders.metrics import unavailable_reason

    if unavailable_reason("meteor") is None:
        pytest.skip("nltk's WordNet data is installed here")
    with pytest.raises(TuneryError, match=r"grader\.evaluation_metric: meteor needs nltk's WordNet"):
        parse_grader(similarity("meteor"))


def test_cosine_uses_the_bundled_minilm() -> None:
    started = time.perf_counter()
    grader = build_grader(similarity("cosine"))
    results = grader.grade_batch(
        ["A man is eating food.", "A man is eating food.", "A man is eating food."],
        [
            {"reference": "A man is eating food."},
            {"reference": "A man is eating a piece of bread."},
            {"reference": "The new movie is awful."},
        ],
    )
    same, related, unrelated = (r.reward for r in results)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert 0.6 < related < 0.9  # 0.755 with this model
    assert unrelated < 0.1
    assert time.perf_counter() - started < 60  # loads once; a few seconds here


# --- formula --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("formula", "value"),
    [
        ("1 + 2 * 3 ^ 2", 19.0),  # ^ before *, * before +
        ("2 ^ 3 ^ 2", 512.0),  # right-associative
        ("-2 ^ 2", -4.0),  # unary minus after ^
        ("(a + b) / 2", 0.5),
        ("a - b - 1", -2.0),  # left-associative: (0 - 1) - 1
        ("min(a, b) + max(a, b, 0.25)", 1.0),
        ("abs(b - a) + floor(2.7) + ceil(0.2)", 4.0),
        ("exp(0) + sqrt(16) + log(exp(2)) + log(8, 2)", 10.0),
        ("0.5 * a + 0.5 * b", 0.5),
    ],
)
def test_formula_values(formula: str, value: float) -> None:
    assert parse_formula(formula, ["a", "b"])({"a": 0.0, "b": 1.0}) == pytest.approx(value)


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("a +* b", r"calculate_output: cannot parse 'a \+\* b' at column 4"),
        ("a + c", "unknown name 'c' in 'a \\+ c'; the sub-graders are: a, b"),
        ("__import__('os').system('x')", "is not an allowed call"),
        ("a.real", "is not allowed in a formula"),
        ("a if b else 1", "is not allowed in a formula"),
        ("'1' + a", "is not a number"),
        ("sqrt(a, b)", r"sqrt\(\) takes 1 arguments, not 2"),
        ("min + a", "'min' is a function"),
        ("a < b", "is not allowed"),
        ("", "must be a formula string"),
        # 990 terms nest 989 additions: once parsed, then a RecursionError (a 500) when evaluated
        ("+".join(["a"] * 990), "nests more than 64 operations"),
    ],
)
def test_formula_errors(formula: str, message: str) -> None:
    with pytest.raises(TuneryError, match=message):
        parse_formula(formula, ["a", "b"], "grader.calculate_output")


def test_formula_runtime_failure_flags_the_sample() -> None:
    grader = build_grader(
        {"type": "multi", "name": "m", "calculate_output": "1 / a", "graders": {"a": check("eq")}}
    )
    result = grader("no", {"answer": "yes"})  # a = 0: division by zero
    assert result.reward == 0.0 and result.errors == {"formula_parse_error": True}
    assert "division by zero" in result.messages[0]


# --- templates and samples ------------------------------------------------------------------------------


def test_templates_render_nested_paths_and_json() -> None:
    sample = make_sample('{"x": [1, 2], "y": "why"}')
    item = {"a": {"b": ["first", "second"]}, "odd key": 1, "n": 3.5, "flag": True, "none": None}
    text = "{{ item.a.b[0] }}|{{item.a.b[-1]}}|{{item['odd key']}}|{{item.n}}|{{item.flag}}|{{item.none}}"
    assert render(text, sample, item) == "first|second|1|3.5|true|null"
    assert render("{{sample.output_json.x}} {{sample.output_json.y}}", sample, item) == "[1, 2] why"
    assert render("{{sample.choices[0].message.content}}", sample, item) == sample["output_text"]
    assert render("{{item.a}}", sample, item) == '{"b": ["first", "second"]}'


def test_missing_variable_is_a_per_sample_error_not_a_crash() -> None:
    grader = build_grader(check("eq", "{{item.answer}}"))
    ok, missing = grader.grade_batch(["4", "4"], [{"answer": "4"}, {"question": "2+2"}])
    assert ok.reward == 1.0 and ok.ok
    assert missing.reward == 0.0 and missing.errors == {"invalid_variable_error": True}
    assert "item.answer does not exist" in missing.messages[0] and "question" in missing.messages[0]
    with pytest.raises(TemplateError, match=r"item.a\[3\] does not exist \(item.a is a list of 1\)"):
        render("{{item.a[3]}}", make_sample(""), {"a": [1]})


def test_output_json_of_a_non_json_answer_is_a_sample_parse_error() -> None:
    grader = build_grader(
        {
            "type": "string_check",
            "name": "json",
            "input": "{{sample.output_json.answer}}",
            "reference": "{{item.answer}}",
            "operation": "eq",
        }
    )
    good, bad = grader.grade_batch(['{"answer": "4"}', "four"], [{"answer": "4"}, {"answer": "4"}])
    assert good.reward == 1.0
    assert bad.reward == 0.0 and bad.errors == {"sample_parse_error": True}


@pytest.mark.parametrize(
    ("value", "text", "tools"),
    [
        ("plain", "plain", []),
        ({"output_text": "given"}, "given", []),
        ({"sample": {"output_text": "wrapped"}}, "wrapped", []),
        ({"completion": "generated", "line": 3}, "generated", []),
        (
            {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}}]},
            "",
            [{"id": "1"}],
        ),
    ],
)
def test_make_sample_accepts_every_documented_shape(value: object, text: str, tools: list) -> None:
    sample = make_sample(value)
    assert sample["output_text"] == text and sample["output_tools"] == tools
    assert sample["choices"][0]["message"]["content"] in (text, None)


def test_make_sample_rejects_an_object_without_an_answer() -> None:
    with pytest.raises(TuneryError, match="a sample needs 'output_text'"):
        make_sample({"answer": 1})


# --- spec validation: errors name the JSON path --------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"type": "multi", "calculate_output": "accuracy", "graders": {"accuracy": check("neq")}},
            r"grader\.graders\.accuracy\.operation: must be one of eq, ne, like, ilike \(OpenAI's enum spells it 'ne'\)",
        ),
        ({**check("eq"), "operaton": "eq"}, r"grader\.operaton: unknown field; a string_check grader takes"),
        (
            {"type": "string_check", "name": "x", "input": "a", "operation": "eq"},
            r"grader\.reference: is required",
        ),
        ({"type": "regex"}, r"grader\.type: must be one of string_check, text_similarity, python"),
        ([], r"grader: a grader must be a JSON object"),
        ({**check("eq"), "input": 3}, r"grader\.input: must be a string"),
        ({**check("eq"), "input": "{{answer}}"}, r"grader\.input: unknown template namespace 'answer'"),
        ({**check("eq"), "input": "{{item.}}"}, r"grader\.input: bad template variable"),
        ({**check("eq"), "pass_threshold": "high"}, r"grader\.pass_threshold: must be a number"),
        (similarity("edit_distance"), r"grader\.evaluation_metric: must be one of fuzzy_match, bleu"),
        (
            {
                "type": "multi",
                "calculate_output": "inner",
                "graders": {
                    "inner": {"type": "multi", "calculate_output": "a", "graders": {"a": check("eq")}}
                },
            },
            r"grader\.graders\.inner: a multi grader cannot contain another multi grader",
        ),
        (
            {"type": "multi", "calculate_output": "a", "graders": [{**check("eq"), "name": None}]},
            r"grader\.graders\[0\]: a grader in a list needs a 'name'",
        ),
        (
            {"type": "multi", "calculate_output": "a", "graders": {}},
            r"grader\.graders: is empty",
        ),
        (
            {"type": "python", "name": "p", "source": "def score(sample, item):\n    return 1.0\n"},
            r"grader\.source: defines no top-level function grade\(sample, item\)",
        ),
        (
            {"type": "python", "name": "p", "source": "def grade(sample, item)\n    return 1.0\n"},
            r"grader\.source: line 1: expected ':'",
        ),
        (
            {"type": "python", "name": "p", "source": "def grade(sample):\n    return 1.0\n"},
            r"grader\.source: grade\(\) must take two arguments",
        ),
        (
            {"type": "python", "name": "p", "source": "def grade(s, i):\n    return 1\n" + "#" * 300_000},
            r"grader\.source: is 293 kB; the limit is 256 kB",
        ),
        (
            {
                "type": "score_model",
                "name": "j",
                "model": "gpt-4o-2024-08-06",
                "input": "{{sample.output_text}}",
            },
            r"grader\.model: 'gpt-4o-2024-08-06' is an OpenAI model, which is not available offline; name a "
            r"local chat model",
        ),
        (
            {"type": "score_model", "name": "j", "model": "o4-mini", "input": "x", "range": [1, 0]},
            r"grader\.model: 'o4-mini' is an OpenAI model",
        ),
        (
            {"type": "score_model", "name": "j", "model": "tiny-random", "input": "x", "range": [1, 0]},
            r"grader\.range: low must be below high",
        ),
        (
            {
                "type": "score_model",
                "name": "j",
                "model": "tiny-random",
                "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
            },
            r"grader\.input\[0\]\.content\[0\]: input_image parts are not supported",
        ),
        (
            {
                "type": "score_model",
                "name": "j",
                "model": "tiny-random",
                "input": [{"role": "robot", "content": ""}],
            },
            r"grader\.input\[0\]\.role: must be one of user, assistant, system, developer",
        ),
        (
            {
                "type": "score_model",
                "name": "j",
                "model": "tiny-random",
                "input": "x",
                "sampling_params": {"temperature": 0, "beam_width": 4},
            },
            r"grader\.sampling_params\.beam_width: unknown sampling parameter",
        ),
        (
            {
                "type": "label_model",
                "name": "l",
                "model": "tiny-random",
                "input": "x",
                "labels": ["yes", "no"],
                "passing_labels": ["maybe"],
            },
            r"grader\.passing_labels: 'maybe' is not one of the labels",
        ),
    ],
)
def test_spec_errors_name_the_json_path(spec: object, message: str) -> None:
    with pytest.raises(TuneryError, match=message):
        parse_grader(spec)


def test_spec_accepts_openai_extras_and_every_graders_form() -> None:
    python = {
        "type": "python",
        "name": "p",
        "source": "def grade(s, i):\n    return 1.0\n",
        "image_tag": "2025-05-08",
    }
    as_dict = parse_grader(
        {
            "type": "multi",
            "name": "m",
            "calculate_output": "p + c",
            "graders": {"p": python, "c": check("eq")},
        }
    )
    as_list = parse_grader(
        {"type": "multi", "name": "m", "calculate_output": "p + check", "graders": [python, check("eq")]}
    )
    single = parse_grader({"type": "multi", "name": "m", "calculate_output": "p", "graders": python})
    assert list(as_dict.graders) == ["p", "c"] and list(as_list.graders) == ["p", "check"]
    assert list(single.graders) == ["p"]
    label = parse_grader(  # label_model at the top level: Tunery accepts it (OpenAI RFT: only inside multi)
        {
            "type": "label_model",
            "name": "tone",
            "model": "gpt-4o-mini",
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]}
            ],
            "labels": ["polite", "rude"],
            "passing_labels": ["polite"],
        },
        model_map={"gpt-4o-mini": "tiny-random"},
    )
    assert label.model == "tiny-random" and label.requested_model == "gpt-4o-mini" and label.backend == "chat"
    assert parse_grader({**similarity("bleu"), "pass_threshold": 0.5}).pass_threshold == 0.5


# --- multi, python, plain functions ---------------------------------------------------------------------


def test_multi_combines_sub_rewards_and_merges_errors() -> None:
    grader = build_grader(
        {
            "type": "multi",
            "name": "m",
            "calculate_output": "0.5 * exact + 0.5 * has",
            "graders": {"exact": check("eq"), "has": check("ilike", "{{item.keyword}}")},
        }
    )
    full, half, broken = grader.grade_batch(
        ["Paris", "It is paris", "Paris"],
        [
            {"answer": "Paris", "keyword": "paris"},
            {"answer": "Paris", "keyword": "PARIS"},
            {"answer": "Paris"},
        ],
    )
    assert (full.reward, full.sub_rewards) == (1.0, {"exact": 1.0, "has": 1.0})
    assert (half.reward, half.sub_rewards) == (0.5, {"exact": 0.0, "has": 1.0})
    assert broken.reward == 0.5 and broken.errors == {"invalid_variable_error": True}
    assert broken.messages[0].startswith("has: item.keyword does not exist")


def test_python_grader_grades_a_batch_in_one_process() -> None:
    source = "import json, math, re\nCALLS = []\n\ndef grade(sample, item):\n    CALLS.append(1)\n    return float(len(CALLS))\n"
    grader = build_grader({"type": "python", "name": "count", "source": source})
    assert grader.rewards(["a", "b", "c"], [{}, {}, {}]) == [1.0, 2.0, 3.0]  # one module state: one process


def test_python_grader_errors_score_zero_with_details() -> None:
    source = "def grade(sample, item):\n    return {'1/0': lambda: 1 / 0, 'nan': lambda: float('nan'), 'ok': lambda: 0.25}[sample['output_text']]()\n"
    grader = build_grader({"type": "python", "name": "p", "source": source})
    crash, nan, ok = grader.grade_batch(["1/0", "nan", "ok"], [{}, {}, {}])
    assert ok.reward == 0.25 and ok.ok
    for result, detail in ((crash, "ZeroDivisionError: division by zero"), (nan, "returned nan")):
        assert result.reward == 0.0 and result.errors["python_grader_runtime_error"] is True
        assert detail in result.errors["python_grader_runtime_error_details"]


def test_plain_reward_functions_are_graders() -> None:
    def reward(sample: dict, item: dict) -> float:
        if sample["output_text"] == "boom":
            raise RuntimeError("boom")
        return 1.0 if sample["output_text"] == item["answer"] else "no"  # type: ignore[return-value]

    grader = build_grader(reward)
    good, wrong_type, boom = grader.grade_batch(["4", "5", "boom"], [{"answer": "4"}] * 3)
    assert (grader.name, grader.type, good.reward) == ("reward", "python", 1.0)
    assert wrong_type.errors["python_grader_runtime_error"] and "not a number" in wrong_type.messages[0]
    assert boom.errors["python_grader_runtime_error_details"] == "RuntimeError: boom"


def test_run_response_has_every_openai_field() -> None:
    grader = build_grader(
        {"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": check("eq")}}
    )
    response = run_response(grader("4", {"answer": "4"}), grader, sampled_model_name="tiny-random")
    assert set(response) == {"reward", "metadata", "sub_rewards", "model_grader_token_usage_per_model"}
    metadata = response["metadata"]
    assert set(metadata) == {
        "name",
        "type",
        "execution_time",
        "scores",
        "token_usage",
        "sampled_model_name",
        "errors",
    }
    assert set(metadata["errors"]) == set(BOOL_ERRORS) | set(TEXT_ERRORS) and len(metadata["errors"]) == 14
    assert all(metadata["errors"][k] is False for k in BOOL_ERRORS)
    assert all(metadata["errors"][k] is None for k in TEXT_ERRORS)
    assert (response["reward"], response["sub_rewards"], metadata["scores"]) == (1.0, {"a": 1.0}, {"a": 1.0})
    assert (metadata["name"], metadata["type"], metadata["token_usage"]) == ("m", "multi", None)
    json.dumps(response)


# --- score_model / label_model on local models --------------------------------------------------------------


def judge(kind: str = "score_model", **fields: object) -> dict:
    spec = {
        "type": kind,
        "name": "judge",
        "model": "tiny-random",
        "input": [
            {"role": "developer", "content": "Grade answers."},
            {"role": "user", "content": "{{sample.output_text}}"},
        ],
        "sampling_params": {"max_completions_tokens": 6, "seed": 0},
        **fields,
    }
    if kind == "label_model":
        spec.pop("sampling_params")
        spec.update(labels=["good", "bad"], passing_labels=["good"])
    return spec


def test_model_graders_on_tiny_random_record_parse_errors() -> None:
    score = build_grader(judge())
    first, second = score.grade_batch(["4", "5"], [{}, {}])
    for result in (first, second):  # random weights do not write {"result": ...}
        assert result.reward == 0.0 and result.errors == {"model_grader_parse_error": True}
        usage = result.token_usage["tiny-random"]
        assert (
            usage["completion_tokens"] <= 6
            and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        )
    response = run_response(first, score)
    assert (
        response["metadata"]["token_usage"]["completion_tokens"]
        == first.token_usage["tiny-random"]["completion_tokens"]
    )
    label = build_grader(judge("label_model"))("4", {})
    assert label.reward == 0.0 and label.errors == {"model_grader_parse_error": True}


def test_model_grader_replies_are_parsed_clipped_and_labelled(monkeypatch: pytest.MonkeyPatch) -> None:
    replies = iter(['{"result": 7}', 'Score: {"result": 2.5, "steps": []}', '{"result": "good"}', "Bad."])
    monkeypatch.setattr(judges, "complete", lambda spec, convs, *_: [(next(replies), 10, 2) for _ in convs])
    score = build_grader(judge(range=[0, 5]))
    assert score.rewards(["a", "b"], [{}, {}]) == [5.0, 2.5]  # 7 clipped to the range
    label = build_grader(judge("label_model"))
    assert label.rewards(["a", "b"], [{}, {}]) == [1.0, 0.0]


def test_a_model_graders_messages_share_one_rendering_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is on the conversation, not each message: 800 messages each repeating a 7.5 MB field had
    made the inference worker hold 6.5 GB. Past it, the sample fails before the judge runs."""
    from tunery.graders import run

    asked: list[list[dict]] = []
    monkeypatch.setattr(
        judges, "complete", lambda spec, convs, *_: asked.extend(convs) or [('{"result": 1}', 1, 1)]
    )
    monkeypatch.setattr(run, "MAX_RENDERED", 33)
    three = [{"role": "user", "content": "{{item.x}}!"}] * 3  # 11 characters each
    assert build_grader(judge(input=three, range=[0, 1]))("a", {"x": "0123456789"}).reward == 1.0
    four = build_grader(judge(input=[*three, three[0]], range=[0, 1]))("a", {"x": "0123456789"})
    assert four.errors["other_error"] and four.messages == [
        "the grader's messages render to more than 33 characters together (input[3] passed it)"
    ]
    assert len(asked) == 1  # only the three-message conversation reached the judge


def test_model_grader_that_fails_to_load_is_a_server_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> None:
        raise OSError("weights are gone")

    monkeypatch.setattr(judges, "chat_model", broken)
    result = build_grader(judge())("a", {})
    assert result.reward == 0.0 and result.errors["model_grader_server_error"] is True
    assert "weights are gone" in result.errors["model_grader_server_error_details"]


def test_score_model_with_a_reward_model_dir_maps_the_score_by_sigmoid(tmp_path: Path) -> None:
    import safetensors.torch
    import yaml

    from tunery.data.feedback import FeedbackExample, tokenize_feedback
    from tunery.models.heads import RewardModel, load_reward_model, score_pairs
    from tunery.models.load import load_model

    lm, _ = load_model("tiny-random")
    head = RewardModel(lm, lm.config.hidden_size, seed=3)
    run = tmp_path / "rm" / "final"
    run.mkdir(parents=True)
    safetensors.torch.save_model(lm, str(run / "model.safetensors"))
    safetensors.torch.save_model(head.score, str(run / "score.safetensors"))
    (run / "tunery.yaml").write_text(yaml.safe_dump({"method": "rm", "base_model": "tiny-random"}))

    grader = build_grader(judge(model=str(tmp_path / "rm"), range=[-1, 3]))
    assert grader.spec.backend == "reward_model"
    result = grader("Paris.", {})
    assert result.ok
    model, tokenizer, _ = load_reward_model(tmp_path / "rm")
    prompt = [{"role": "system", "content": "Grade answers."}, {"role": "user", "content": "Paris."}]
    example = FeedbackExample(0, prompt, [{"role": "assistant", "content": "Paris."}])
    [(raw, _)] = score_pairs(model, [tokenize_feedback(tokenizer, example, 2048)[0]])
    assert result.reward == pytest.approx(-1 + 4 / (1 + math.exp(-raw)), abs=1e-5)
    with pytest.raises(TuneryError, match="is a reward model, which gives scores, not labels"):
        parse_grader(judge("label_model", model=str(tmp_path / "rm")))


def test_judge_reply_parsing() -> None:
    assert judges.parse_score('{"result": 0.5}') == 0.5
    assert judges.parse_score('thinking... {"steps": []} then {"result": 1}') == 1.0
    assert judges.parse_score('{"result": "high"}') is None and judges.parse_score("") is None
    assert judges.parse_score('{"result": true}') is None and judges.parse_score("nan") is None
    assert judges.parse_label('```json\n{"result": "Yes"}\n```', ("yes", "no")) == "yes"
    assert judges.parse_label("maybe", ("yes", "no")) is None


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_graders_run_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grader = tmp_path / "grader.json"
    grader.write_text(
        json.dumps(
            {
                "type": "multi",
                "name": "quiz",
                "calculate_output": "0.5 * exact + 0.5 * code",
                "graders": {
                    "exact": check("eq"),
                    "code": {
                        "type": "python",
                        "name": "code",
                        "source": "def grade(s, i):\n    return 1.0\n",
                    },
                },
            }
        )
    )
    items = write_jsonl(tmp_path / "items.jsonl", [{"answer": "4"}, {"answer": "6"}, {"question": "?"}])
    samples = write_jsonl(
        tmp_path / "samples.jsonl",
        ['"4"', {"output_text": "7"}, {"choices": [{"message": {"role": "assistant", "content": "x"}}]}],
    )
    out = tmp_path / "results.jsonl"
    assert (
        main(
            [
                "graders",
                "run",
                "--grader",
                str(grader),
                "--data",
                str(items),
                "--samples",
                str(samples),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "quiz (multi): mean reward 0.6667 over 3 samples" in printed
    assert "exact: mean 0.3333" in printed and "code: mean 1.0000" in printed
    assert (
        "errors in 1 samples: invalid_variable_error 1" in printed and "row 3: exact: item.answer" in printed
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.5, 0.5] and rows[2]["errors"] == {
        "invalid_variable_error": True
    }

    assert (
        main(["graders", "run", "--grader", str(grader), "--sample-text", "4", "--item", '{"answer": "4"}'])
        == 0
    )
    response = json.loads(capsys.readouterr().out)
    assert response["reward"] == 1.0 and response["sub_rewards"] == {"exact": 1.0, "code": 1.0}

    assert main(["graders", "validate", "--grader", str(grader)]) == 0
    assert "ok, multi grader 'quiz'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("grader_text", "data_lines", "sample_lines", "message"),
    [
        ('{"type": "multi",\n "graders": [}', None, None, "grader.json line 2 column 14: invalid JSON"),
        (
            json.dumps(check("neq")),
            None,
            None,
            "grader.json: grader.operation: must be one of eq, ne, like, ilike",
        ),
        (
            json.dumps(check("eq")),
            ['{"answer": "4"}', "{oops"],
            ['"4"', '"5"'],
            "items.jsonl line 2: invalid JSON",
        ),
        (
            json.dumps(check("eq")),
            ['{"answer": "4"}', "[1]"],
            ['"4"', '"5"'],
            "items.jsonl line 2: a dataset row must be",
        ),
        (
            json.dumps(check("eq")),
            ['{"answer": "4"}'],
            ['{"text": 4}'],
            "samples.jsonl line 1: a sample needs 'output_text'",
        ),
        (
            json.dumps(check("eq")),
            ['{"answer": "4"}'],
            ['"4"', '"5"'],
            "has 1 rows but .*samples.jsonl has 2 samples",
        ),
    ],
)
def test_cli_bad_input_names_the_file_and_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    grader_text: str,
    data_lines: list[str] | None,
    sample_lines: list[str] | None,
    message: str,
) -> None:
    import re

    (tmp_path / "grader.json").write_text(grader_text)
    data = write_jsonl(tmp_path / "items.jsonl", data_lines or ['{"answer": "4"}'])
    samples = write_jsonl(tmp_path / "samples.jsonl", sample_lines or ['"4"'])
    argv = [
        "graders",
        "run",
        "--grader",
        str(tmp_path / "grader.json"),
        "--data",
        str(data),
        "--samples",
        str(samples),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunery: error: ") and "Traceback" not in err
    assert re.search(message, err), err


# --- docstring examples and layout ---------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    attempted = 0
    for path in sorted(GRADERS_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = importlib.import_module(f"tunery.graders.{path.stem}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{path.name}: {result.failed} docstring examples failed"
        attempted += result.attempted
    assert attempted >= 20


def test_graders_never_import_recipes_cli_or_server() -> None:
    for path in GRADERS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.startswith(("tunery.recipes", "tunery.cli", "tunery.server")) for n in names), (
                path
            )
