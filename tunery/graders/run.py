"""Graders as plain callables: `grader(sample, item) -> GradeResult`, and a whole group at once.

    grader = build_grader(json.load(open("grader.json")))      # or load_grader("grader.json")
    grader({"output_text": "Paris"}, {"answer": "Paris"}).reward   # 1.0
    results = grader.grade_batch(samples, items)                  # the RL loop's call: one per group

`sample` is the model's answer (a string, `{"output_text": ...}`, or an OpenAI chat completion; see
`template.make_sample`); `item` is the dataset row. Nothing a sample does raises: a missing template
variable, a crashing Python grader or an unparsable judge reply scores 0 and sets the OpenAI error flag
in `GradeResult.errors` (`run_response` turns a result into OpenAI's run-grader response). Bad grader
JSON raises TuneryError when the grader is built.

A plain function `def reward(sample: dict, item: dict) -> float` is a grader too (`build_grader(fn)`);
it runs in this process, unsandboxed: it is your code, imported by you. Python graders given as JSON
`source` run in the sandbox (`sandbox.py`), one process per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunery.graders import judges, metrics
from tunery.graders.sandbox import SandboxLimits, require_sandbox, run_python_batch
from tunery.graders.spec import (
    GraderSpec,
    ModelGrader,
    Multi,
    PythonGrader,
    StringCheck,
    TextSimilarity,
    parse_grader,
)
from tunery.graders.template import MAX_RENDERED, TemplateError, make_sample, render

BOOL_ERRORS = (
    "formula_parse_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
    "invalid_variable_error",
    "other_error",
    "python_grader_server_error",
    "python_grader_runtime_error",
    "model_grader_server_error",
    "model_grader_refusal_error",
    "model_grader_parse_error",
)
TEXT_ERRORS = (
    "python_grader_server_error_type",
    "python_grader_runtime_error_details",
    "model_grader_server_error_details",
)


@dataclass
class GradeResult:
    reward: float
    sub_rewards: dict[str, float] = field(default_factory=dict)  # multi: each sub-grader's reward
    errors: dict[str, bool | str] = field(default_factory=dict)  # only the OpenAI error keys that fired
    execution_time: float = 0.0  # seconds
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> token counts
    messages: list[str] = field(default_factory=list)  # what went wrong, for people

    @property
    def ok(self) -> bool:
        return not self.errors


BatchFn = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[GradeResult]]


class Grader:
    """A built grader: call it on one (sample, item), or `grade_batch` a group; never raises per sample."""

    def __init__(self, name: str, type: str, batch: BatchFn, spec: GraderSpec | None = None) -> None:
        self.name, self.type, self.spec = name, type, spec
        self.pass_threshold = getattr(spec, "pass_threshold", None)
        self._batch = batch

    def __call__(self, sample: dict[str, Any] | str, item: dict[str, Any] | None = None) -> GradeResult:
        [result] = self.grade_batch([sample], [item or {}])
        return result

    def grade_batch(self, samples: list[Any], items: list[dict[str, Any]]) -> list[GradeResult]:
        if len(samples) != len(items):
            raise ValueError(f"grade_batch got {len(samples)} samples but {len(items)} items")
        return self._batch([make_sample(s) for s in samples], items) if samples else []

    def rewards(self, samples: list[Any], items: list[dict[str, Any]]) -> list[float]:
        return [r.reward for r in self.grade_batch(samples, items)]

    def __repr__(self) -> str:
        return f"Grader({self.name!r}, type={self.type!r})"


def build_grader(
    spec: dict[str, Any] | GraderSpec | Callable[[dict[str, Any], dict[str, Any]], float],
    model_map: dict[str, str] | None = None,
    limits: SandboxLimits | None = None,
) -> Grader:
    """A Grader from OpenAI grader JSON (a dict), a parsed spec, or a plain reward function."""
    if isinstance(spec, dict):
        spec = parse_grader(spec, model_map=model_map)
    elif not isinstance(spec, StringCheck | TextSimilarity | PythonGrader | ModelGrader | Multi):
        return from_function(spec)
    return Grader(spec.name, spec.type, _batch_fn(spec, limits or SandboxLimits()), spec)


def from_function(fn: Callable[[dict[str, Any], dict[str, Any]], float], name: str | None = None) -> Grader:
    """Wrap `reward(sample, item) -> float`; an exception or a non-finite value scores 0 with an error.

    >>> def exact(sample, item):
    ...     return float(sample["output_text"].strip() == item["answer"])
    >>> build_grader(exact)("Paris ", {"answer": "Paris"}).reward
    1.0
    """

    def score(sample: dict[str, Any], item: dict[str, Any]) -> float:
        value = fn(sample, item)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise TypeError(f"{getattr(fn, '__name__', 'reward')}() returned {value!r}, not a number")
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"{getattr(fn, '__name__', 'reward')}() returned {value}")
        return float(value)

    return Grader(name or str(getattr(fn, "__name__", "reward")), "python", _per_sample(score, python=True))


def _batch_fn(spec: GraderSpec, limits: SandboxLimits) -> BatchFn:
    if isinstance(spec, StringCheck):
        return _per_sample(lambda s, i: string_check(spec, s, i))
    if isinstance(spec, TextSimilarity):
        if spec.evaluation_metric == "cosine":
            return lambda samples, items: _cosine_batch(spec, samples, items)
        return _per_sample(lambda s, i: text_similarity(spec, s, i))
    if isinstance(spec, PythonGrader):
        require_sandbox()  # refused here, when the grader is built, on a machine that cannot confine it
        return lambda samples, items: _python_batch(spec, samples, items, limits)
    if isinstance(spec, ModelGrader):
        return lambda samples, items: _model_batch(spec, samples, items, limits)
    subgraders = {
        name: Grader(name, sub.type, _batch_fn(sub, limits), sub) for name, sub in spec.graders.items()
    }
    return lambda samples, items: _multi_batch(spec, subgraders, samples, items, limits.deadline)


# --- one function per grader type ------------------------------------------------------------------------


def string_check(spec: StringCheck, sample: dict[str, Any], item: dict[str, Any]) -> float:
    """1.0 or 0.0: eq (exact), ne (not equal), like (input contains reference), ilike (ignoring case).

    >>> g = build_grader({"type": "string_check", "name": "city", "operation": "ilike",
    ...                   "input": "{{sample.output_text}}", "reference": "{{item.city}}"})
    >>> g("It is PARIS.", {"city": "paris"}).reward, g("Lyon", {"city": "paris"}).reward
    (1.0, 0.0)
    """
    text, reference = render(spec.input, sample, item), render(spec.reference, sample, item)
    if spec.operation == "eq":
        return float(text == reference)
    if spec.operation == "ne":
        return float(text != reference)
    if spec.operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())


def text_similarity(spec: TextSimilarity, sample: dict[str, Any], item: dict[str, Any]) -> float:
    """A similarity in [0, 1] between the rendered input and reference (metrics in `metrics.py`).

    >>> g = build_grader({"type": "text_similarity", "name": "r1", "evaluation_metric": "rouge_1",
    ...                   "input": "{{sample.output_text}}", "reference": "{{item.summary}}"})
    >>> round(g("the cat sat", {"summary": "the cat sat on the mat"}).reward, 4)  # P 3/3, R 3/6
    0.6667
    """
    output, reference = render(spec.input, sample, item), render(spec.reference, sample, item)
    for side, text in (("input", output), ("reference", reference)):
        if len(text) > metrics.MAX_CHARS:
            raise ValueError(
                f"text_similarity compares texts of at most {metrics.MAX_CHARS:,} characters; the rendered "
                f"{side} has {len(text):,}"
            )
        if spec.evaluation_metric in metrics.QUADRATIC_IN_WORDS and metrics.words(text) > metrics.MAX_WORDS:
            raise ValueError(
                f"{spec.evaluation_metric} compares texts of at most {metrics.MAX_WORDS:,} words; the rendered "
                f"{side} has {metrics.words(text):,} (the other metrics take longer texts)"
            )
    return min(1.0, max(0.0, metrics.SCORERS[spec.evaluation_metric](output, reference)))


def _cosine_batch(
    spec: TextSimilarity, samples: list[dict[str, Any]], items: list[dict[str, Any]]
) -> list[GradeResult]:
    """Cosine similarity, all pairs embedded in one model call."""
    started = time.perf_counter()
    results, texts = _render_all(
        samples, items, lambda s, i: (render(spec.input, s, i), render(spec.reference, s, i))
    )
    ready = [k for k, t in enumerate(texts) if t is not None]
    try:
        scores = metrics.cosine_batch([texts[k][0] for k in ready], [texts[k][1] for k in ready])  # type: ignore[index]
    except Exception as exc:  # a broken embedding model install: every sample says why
        scores = None
        for k in ready:
            results[k] = _failed("other_error", f"cosine: {exc}")
    for k, score in zip(ready, scores or [], strict=False):
        results[k] = GradeResult(score)
    return _timed(results, started)


def python_grader(spec: PythonGrader, sample: dict[str, Any], item: dict[str, Any]) -> float:
    """Run `spec.source`'s grade(sample, item) in the sandbox (a batch runs in one process).

    >>> g = build_grader({"type": "python", "name": "len",
    ...                   "source": "def grade(sample, item):\\n    return min(1.0, len(sample['output_text']) / 10)"})
    >>> g("hello", {}).reward
    0.5
    >>> g.grade_batch(["hello world", "hi"], [{}, {}])[1].reward
    0.2
    """
    [result] = _python_batch(spec, [sample], [item], SandboxLimits())
    return result.reward


def _python_batch(
    spec: PythonGrader, samples: list[dict[str, Any]], items: list[dict[str, Any]], limits: SandboxLimits
) -> list[GradeResult]:
    started = time.perf_counter()
    outcomes = run_python_batch(spec.source, list(zip(samples, items, strict=True)), limits)
    results = []
    for outcome in outcomes:
        if outcome.score is not None:
            results.append(GradeResult(outcome.score))
        elif outcome.kind == "runtime":
            result = _failed("python_grader_runtime_error", outcome.error or "")
            result.errors["python_grader_runtime_error_details"] = outcome.error or ""
            results.append(result)
        else:
            result = _failed("python_grader_server_error", outcome.error or "")
            result.errors["python_grader_server_error_type"] = outcome.kind or "crash"
            if outcome.kind == "timeout":
                result.errors["unresponsive_reward_error"] = True
            results.append(result)
    return _timed(results, started)


def model_grader(spec: ModelGrader, sample: dict[str, Any], item: dict[str, Any]) -> float:
    """score_model / label_model on a local model (see `judges.py`). OpenAI model names are refused
    when the grader is built, unless mapped to a local model:

    >>> build_grader({"type": "score_model", "name": "judge", "model": "gpt-4o-2024-08-06",
    ...               "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}]})
    Traceback (most recent call last):
    tunery.errors.TuneryError: grader.model: 'gpt-4o-2024-08-06' is an OpenAI model, ...
    >>> build_grader({"type": "label_model", "name": "tone", "model": "gpt-4o-mini",
    ...               "input": "Is this polite? {{sample.output_text}}", "labels": ["yes", "no"],
    ...               "passing_labels": ["yes"]}, model_map={"gpt-4o-mini": "tiny-random"}).spec.model
    'tiny-random'
    """
    [result] = _model_batch(spec, [sample], [item])
    return result.reward


def _model_batch(
    spec: ModelGrader,
    samples: list[dict[str, Any]],
    items: list[dict[str, Any]],
    limits: SandboxLimits | None = None,
) -> list[GradeResult]:
    """`limits`: a judge still answering at their deadline (or once their request is given up) is stopped,
    and its samples fail."""
    started = time.perf_counter()

    def conversation(sample: dict[str, Any], item: dict[str, Any]) -> list[dict[str, str]]:
        """The messages rendered, MAX_RENDERED characters for all of them together (800 messages of one
        7.5 MB field each had made the worker hold 6.5 GB before the context check)."""
        left, messages = MAX_RENDERED, []
        for i, m in enumerate(spec.input):
            try:
                content = render(m["content"], sample, item, limit=left)
            except TemplateError as exc:
                if not exc.too_long:
                    raise
                raise TemplateError(
                    f"the grader's messages render to more than {MAX_RENDERED:,} characters together "
                    f"(input[{i}] passed it)",
                    too_long=True,
                ) from None
            left -= len(content)
            messages.append({"role": m["role"], "content": content})
        return messages

    results, conversations = _render_all(samples, items, conversation)
    ready = [k for k, c in enumerate(conversations) if c is not None]
    if not ready:
        return _timed(results, started)
    todo: list[list[dict[str, str]]] = [conversations[k] for k in ready]  # type: ignore[misc]
    try:
        if spec.backend == "reward_model":
            scores = judges.reward_scores(spec, todo, [samples[k]["output_text"] for k in ready])
            for k, score in zip(ready, scores, strict=True):
                results[k] = GradeResult(score)
            return _timed(results, started)
        replies = judges.complete(
            spec, todo, limits.deadline if limits else None, limits.stopped if limits else None
        )
    except Exception as exc:  # the model failed to load or run: OpenAI's "server error" for every sample
        detail = f"{spec.model}: {exc.__class__.__name__}: {exc}"
        for k in ready:
            results[k] = _failed("model_grader_server_error", detail)
            results[k].errors["model_grader_server_error_details"] = detail
        return _timed(results, started)
    for k, (reply, prompt_tokens, completion_tokens) in zip(ready, replies, strict=True):
        result = _judge_result(spec, reply)
        result.token_usage = {
            spec.requested_model: {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "cached_tokens": 0,
            }
        }
        results[k] = result
    return _timed(results, started)


def _judge_result(spec: ModelGrader, reply: str) -> GradeResult:
    if spec.type == "label_model":
        label = judges.parse_label(reply, spec.labels)
        if label is None:
            return _failed(
                "model_grader_parse_error", f"no label from {list(spec.labels)} in: {reply[:200]!r}"
            )
        return GradeResult(float(label in spec.passing_labels))
    score = judges.parse_score(reply)
    if score is None:
        return _failed("model_grader_parse_error", f'no {{"result": <number>}} in: {reply[:200]!r}')
    lo, hi = spec.range
    return GradeResult(min(hi, max(lo, score)))


def multi(spec: Multi, sub_rewards: dict[str, float]) -> float:
    """`calculate_output` over the sub-graders' rewards (a formula, see `formula.py`).

    >>> g = build_grader({"type": "multi", "name": "both", "calculate_output": "0.75 * exact + 0.25 * fuzzy",
    ...     "graders": {"exact": {"type": "string_check", "name": "exact", "operation": "eq",
    ...                           "input": "{{sample.output_text}}", "reference": "{{item.answer}}"},
    ...                 "fuzzy": {"type": "text_similarity", "name": "fuzzy", "evaluation_metric": "fuzzy_match",
    ...                           "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}}})
    >>> result = g("Pariss", {"answer": "Paris"})
    >>> result.sub_rewards["exact"], round(result.sub_rewards["fuzzy"], 4), round(result.reward, 4)
    (0.0, 0.9091, 0.2273)
    """
    return spec.calculate_output(sub_rewards)


def _multi_batch(
    spec: Multi,
    subgraders: dict[str, Grader],
    samples: list[dict[str, Any]],
    items: list[dict[str, Any]],
    deadline: float | None = None,
) -> list[GradeResult]:
    """Each sub-grader over the batch, then the formula per sample. Past `deadline` (the request's time
    budget, shared by its graders) the sub-graders not yet run fail without running."""
    by_grader = {}
    for name, grader in subgraders.items():
        if deadline is not None and time.monotonic() > deadline:
            late = "the request's time budget ran out before this grader ran"
            by_grader[name] = [_failed("other_error", late) for _ in samples]
        else:
            by_grader[name] = grader._batch(samples, items)
    results = []
    for k in range(len(samples)):
        parts = {name: by_grader[name][k] for name in subgraders}
        result = GradeResult(0.0, sub_rewards={name: r.reward for name, r in parts.items()})
        for name, part in parts.items():
            for key, value in part.errors.items():
                if isinstance(value, bool):
                    result.errors[key] = bool(result.errors.get(key)) or value
                else:
                    result.errors.setdefault(key, value)
            result.messages += [f"{name}: {m}" for m in part.messages]
            result.execution_time += part.execution_time
            for model, usage in part.token_usage.items():
                total = result.token_usage.setdefault(model, dict.fromkeys(usage, 0))
                for key, count in usage.items():
                    total[key] = total.get(key, 0) + count
        try:
            result.reward = multi(spec, result.sub_rewards)
        except (ArithmeticError, ValueError) as exc:
            result.errors["formula_parse_error"] = True
            result.messages.append(f"calculate_output '{spec.calculate_output.text}' failed: {exc}")
        results.append(result)
    return results


# --- shared plumbing -------------------------------------------------------------------------------------


def _failed(key: str, message: str) -> GradeResult:
    return GradeResult(0.0, errors={key: True}, messages=[message])


def _template_failure(exc: TemplateError) -> GradeResult:
    if exc.too_long:
        return _failed("other_error", str(exc))
    return _failed("sample_parse_error" if exc.parse_error else "invalid_variable_error", str(exc))


def _render_all(
    samples: list[dict[str, Any]],
    items: list[dict[str, Any]],
    fn: Callable[[dict[str, Any], dict[str, Any]], Any],
) -> tuple[list[GradeResult], list[Any]]:
    """fn(sample, item) for each pair, or None with a failed result where a template variable is missing."""
    results = [GradeResult(0.0) for _ in samples]
    rendered: list[Any] = []
    for k, (sample, item) in enumerate(zip(samples, items, strict=True)):
        try:
            rendered.append(fn(sample, item))
        except TemplateError as exc:
            results[k] = _template_failure(exc)
            rendered.append(None)
    return results, rendered


def _per_sample(score: Callable[[dict[str, Any], dict[str, Any]], float], python: bool = False) -> BatchFn:
    def batch(samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[GradeResult]:
        results = []
        for sample, item in zip(samples, items, strict=True):
            started = time.perf_counter()
            try:
                result = GradeResult(score(sample, item))
            except TemplateError as exc:
                result = _template_failure(exc)
            except Exception as exc:
                message = f"{exc.__class__.__name__}: {exc}"
                result = _failed("python_grader_runtime_error" if python else "other_error", message)
                if python:
                    result.errors["python_grader_runtime_error_details"] = message
            result.execution_time = time.perf_counter() - started
            results.append(result)
        return results

    return batch


def _timed(results: list[GradeResult], started: float) -> list[GradeResult]:
    """Share a batch's wall time evenly among its samples."""
    share = (time.perf_counter() - started) / max(1, len(results))
    for result in results:
        result.execution_time = share
    return results


def run_response(
    result: GradeResult, grader: Grader, sampled_model_name: str | None = None
) -> dict[str, Any]:
    """OpenAI's `POST /fine_tuning/alpha/graders/run` response for one graded sample.

    >>> g = build_grader({"type": "string_check", "name": "x", "operation": "eq",
    ...                   "input": "{{sample.output_text}}", "reference": "{{item.missing}}"})
    >>> response = run_response(g("a", {}), g)
    >>> response["reward"], response["metadata"]["errors"]["invalid_variable_error"], response["sub_rewards"]
    (0.0, True, {})
    """
    errors: dict[str, bool | str | None] = {key: False for key in BOOL_ERRORS}
    errors.update(dict.fromkeys(TEXT_ERRORS))
    errors.update(result.errors)
    usage = None
    if result.token_usage:
        usage = {
            key: sum(u.get(key, 0) for u in result.token_usage.values())
            for key in next(iter(result.token_usage.values()))
        }
    return {
        "reward": result.reward,
        "metadata": {
            "name": grader.name,
            "type": grader.type,
            "execution_time": result.execution_time,
            "scores": dict(result.sub_rewards) if result.sub_rewards else {grader.name: result.reward},
            "token_usage": usage,
            "sampled_model_name": sampled_model_name,
            "errors": errors,
        },
        "sub_rewards": dict(result.sub_rewards),
        "model_grader_token_usage_per_model": {m: dict(u) for m, u in result.token_usage.items()},
    }
