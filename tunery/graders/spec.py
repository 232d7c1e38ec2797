"""Grader JSON (OpenAI's shapes) -> typed specs, checked once, with errors that name the JSON path.

    parse_grader({"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                  "reference": "{{item.answer}}", "operation": "eq"})

Types: string_check, text_similarity, python, score_model, label_model and multi (a formula over named
sub-graders; `graders` may be a dict name -> grader, a list of named graders, or one grader). Departures
from OpenAI, all deliberate:
- `score_model` / `label_model` run a local model: a chat model (`tiny-random`, `smollm2-135m-instruct`,
  a Hugging Face directory or .gguf file) or, for score_model, a Tunery reward model run directory. An
  OpenAI model name is rejected here unless `model_map` maps it to a local one.
- `label_model` is accepted at the top level too (OpenAI allows it only inside `multi` for RFT).
- `pass_threshold` is accepted on every grader; `image_tag` and `reasoning_effort` are accepted and
  ignored (one local Python; no reasoning knob).
- Unknown fields are errors, so a typo cannot silently change what is graded.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunery.errors import TuneryError
from tunery.graders.formula import Formula, parse_formula
from tunery.graders.metrics import METRICS, unavailable_reason
from tunery.graders.template import check_template

OPERATIONS = ("eq", "ne", "like", "ilike")
ROLES = ("user", "assistant", "system", "developer")
MAX_SOURCE_BYTES = 256 * 1024
OPENAI_MODEL = re.compile(r"^(gpt-|chatgpt-|o[1-9](-|$)|ft:|text-|davinci|babbage|omni-|computer-use)")
MAX_SUBGRADERS = (
    16  # each may run code or a model: a grader of thousands of them would hold a worker for days
)
SAMPLING_KEYS = ("seed", "top_p", "temperature", "max_completions_tokens", "max_completion_tokens")
SAMPLING_KEYS_IGNORED = ("reasoning_effort",)
COMMON = ("type", "name", "pass_threshold")


@dataclass(frozen=True)
class StringCheck:
    name: str
    input: str
    reference: str
    operation: str
    pass_threshold: float | None = None
    type: str = "string_check"


@dataclass(frozen=True)
class TextSimilarity:
    name: str
    input: str
    reference: str
    evaluation_metric: str
    pass_threshold: float | None = None
    type: str = "text_similarity"


@dataclass(frozen=True)
class PythonGrader:
    name: str
    source: str
    image_tag: str | None = None
    pass_threshold: float | None = None
    type: str = "python"


@dataclass(frozen=True)
class ModelGrader:
    """score_model (`labels` empty) or label_model. `model` is the local name or path actually loaded."""

    type: str
    name: str
    model: str
    backend: str  # "chat" (a chat model answers) or "reward_model" (a Tunery reward model scores)
    input: list[dict[str, Any]]  # messages: role + content (a template string or text parts)
    range: tuple[float, float] = (0.0, 1.0)
    labels: tuple[str, ...] = ()
    passing_labels: tuple[str, ...] = ()
    sampling_params: dict[str, Any] = field(default_factory=dict)
    requested_model: str = ""  # the name the JSON gave, before `model_map`
    pass_threshold: float | None = None


@dataclass(frozen=True)
class Multi:
    name: str
    graders: dict[str, GraderSpec]
    calculate_output: Formula
    pass_threshold: float | None = None
    type: str = "multi"


GraderSpec = StringCheck | TextSimilarity | PythonGrader | ModelGrader | Multi


def parse_grader(
    value: Any,
    path: str = "grader",
    model_map: dict[str, str] | None = None,
    *,
    _inside_multi: bool = False,
) -> GraderSpec:
    """Check a grader dict and return its typed spec; TuneryError names the bad field and the fix."""
    if not isinstance(value, dict):
        raise TuneryError(f"{path}: a grader must be a JSON object with a 'type', not {_kind(value)}")
    kind = value.get("type")
    parsers: dict[str, Callable[..., GraderSpec]] = {
        "string_check": _string_check,
        "text_similarity": _text_similarity,
        "python": _python,
        "score_model": _model_grader,
        "label_model": _model_grader,
        "multi": _multi,
    }
    if kind not in parsers:
        raise TuneryError(f"{path}.type: must be one of {', '.join(parsers)} (got {kind!r})")
    if kind == "multi" and _inside_multi:
        raise TuneryError(
            f"{path}: a multi grader cannot contain another multi grader; move its sub-graders into the "
            "outer one and combine them in its calculate_output"
        )
    name = value.get("name", kind if not _inside_multi else path.rsplit(".", 1)[-1])
    if not isinstance(name, str) or not name:
        raise TuneryError(f"{path}.name: must be a non-empty string")
    threshold = value.get("pass_threshold")
    if threshold is not None and not _is_number(threshold):
        raise TuneryError(f"{path}.pass_threshold: must be a number, e.g. 0.5")
    return parsers[kind](value, path, name, None if threshold is None else float(threshold), model_map)


# --- one parser per type ---------------------------------------------------------------------------------


def _string_check(
    value: dict[str, Any], path: str, name: str, threshold: float | None, _: Any
) -> StringCheck:
    _check_fields(value, path, required=("input", "reference", "operation"), optional=())
    operation = value["operation"]
    if operation not in OPERATIONS:
        hint = " (OpenAI's enum spells it 'ne')" if operation == "neq" else ""
        raise TuneryError(
            f"{path}.operation: must be one of {', '.join(OPERATIONS)}{hint}; got {operation!r}"
        )
    return StringCheck(
        name, _template(value, "input", path), _template(value, "reference", path), operation, threshold
    )


def _text_similarity(
    value: dict[str, Any], path: str, name: str, threshold: float | None, _: Any
) -> TextSimilarity:
    _check_fields(value, path, required=("input", "reference", "evaluation_metric"), optional=())
    metric = value["evaluation_metric"]
    if metric not in METRICS:
        raise TuneryError(f"{path}.evaluation_metric: must be one of {', '.join(METRICS)}; got {metric!r}")
    reason = unavailable_reason(metric)
    if reason:
        raise TuneryError(f"{path}.evaluation_metric: {reason}")
    return TextSimilarity(
        name, _template(value, "input", path), _template(value, "reference", path), metric, threshold
    )


def _python(value: dict[str, Any], path: str, name: str, threshold: float | None, _: Any) -> PythonGrader:
    _check_fields(value, path, required=("source",), optional=("image_tag",))
    source = value["source"]
    if not isinstance(source, str):
        raise TuneryError(f"{path}.source: must be a string of Python code defining grade(sample, item)")
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        raise TuneryError(f"{path}.source: is {size / 1024:.0f} kB; the limit is 256 kB")
    check_python_source(source, f"{path}.source")
    image_tag = value.get("image_tag")
    if image_tag is not None and not isinstance(image_tag, str):
        raise TuneryError(f'{path}.image_tag: must be a string such as "2025-05-08"')
    return PythonGrader(name, source, image_tag, threshold)


def check_python_source(source: str, path: str) -> None:
    """Compile without running: a syntax error or a missing top-level `grade` is reported here."""
    try:
        tree = ast.parse(source, filename="<grader>")
        compile(tree, "<grader>", "exec")
    except SyntaxError as exc:
        raise TuneryError(f"{path}: line {exc.lineno}: {exc.msg}; fix the Python code") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise TuneryError(f"{path}: cannot compile the code ({exc.__class__.__name__})") from None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "grade":
            params = node.args.posonlyargs + node.args.args
            if len(params) - len(node.args.defaults) > 2 or (len(params) < 2 and node.args.vararg is None):
                raise TuneryError(f"{path}: grade() must take two arguments: grade(sample, item)")
            return
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "grade":
            raise TuneryError(f"{path}: grade must be a plain function (def), not async def")
        targets = [t for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else []
        imported = [a.asname or a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
        if any(t.id == "grade" for t in targets) or "grade" in imported:
            return
    raise TuneryError(
        f"{path}: defines no top-level function grade(sample, item); add `def grade(sample, item) -> float:`"
    )


def _model_grader(
    value: dict[str, Any], path: str, name: str, threshold: float | None, model_map: dict[str, str] | None
) -> ModelGrader:
    kind = value["type"]
    if kind == "score_model":
        _check_fields(value, path, required=("input", "model"), optional=("range", "sampling_params"))
    else:
        _check_fields(
            value,
            path,
            required=("input", "model", "labels", "passing_labels"),
            optional=("sampling_params",),
        )
    requested = value["model"]
    if not isinstance(requested, str) or not requested:
        raise TuneryError(f"{path}.model: must be a model name or path")
    model, backend = resolve_grader_model(requested, f"{path}.model", model_map)
    if backend == "reward_model" and kind == "label_model":
        raise TuneryError(
            f"{path}.model: {model} is a reward model, which gives scores, not labels; use a chat model "
            "for label_model, or a score_model grader for the reward model"
        )
    lo, hi = _range(value.get("range", [0, 1]), f"{path}.range")
    labels: tuple[str, ...] = ()
    passing: tuple[str, ...] = ()
    if kind == "label_model":
        labels = _labels(value["labels"], f"{path}.labels")
        passing = _labels(value["passing_labels"], f"{path}.passing_labels")
        outside = [label for label in passing if label not in labels]
        if outside:
            raise TuneryError(
                f"{path}.passing_labels: {outside[0]!r} is not one of the labels {list(labels)}"
            )
    return ModelGrader(
        kind,
        name,
        model,
        backend,
        _messages(value["input"], f"{path}.input"),
        (lo, hi),
        labels,
        passing,
        _sampling_params(value.get("sampling_params"), f"{path}.sampling_params"),
        requested,
        threshold,
    )


def _multi(
    value: dict[str, Any], path: str, name: str, threshold: float | None, model_map: dict[str, str] | None
) -> Multi:
    _check_fields(value, path, required=("graders", "calculate_output"), optional=())
    raw = value["graders"]
    items: list[tuple[str, Any, str]]
    if isinstance(raw, dict) and isinstance(raw.get("type"), str):  # one grader, as the newest spec types it
        items = [(raw.get("name", "grader"), raw, f"{path}.graders")]
    elif isinstance(raw, dict):
        items = [(key, sub, f"{path}.graders.{key}") for key, sub in raw.items()]
    elif isinstance(raw, list):
        items = []
        for i, sub in enumerate(raw):
            if not isinstance(sub, dict) or not isinstance(sub.get("name"), str):
                raise TuneryError(
                    f"{path}.graders[{i}]: a grader in a list needs a 'name' (the formula refers to it)"
                )
            items.append((sub["name"], sub, f"{path}.graders[{i}]"))
    else:
        raise TuneryError(f"{path}.graders: must be an object of name -> grader (or a list of named graders)")
    if not items:
        raise TuneryError(f"{path}.graders: is empty; add at least one grader")
    if len(items) > MAX_SUBGRADERS:
        raise TuneryError(
            f"{path}.graders: {len(items)} graders; a multi grader combines at most {MAX_SUBGRADERS}"
        )
    graders: dict[str, GraderSpec] = {}
    for key, sub, sub_path in items:
        if key in graders:
            raise TuneryError(f"{sub_path}: the name {key!r} is used twice; names must be unique")
        graders[key] = parse_grader(sub, sub_path, model_map, _inside_multi=True)
    formula = parse_formula(value["calculate_output"], list(graders), f"{path}.calculate_output")
    return Multi(name, graders, formula, threshold)


# --- models ---------------------------------------------------------------------------------------------


def reward_model_dir(name: str) -> Path | None:
    """The directory `tunery.models.heads.load_reward_model` reads, if `name` is a reward model run."""
    path = Path(name).expanduser()
    for candidate in (path / "final", path):
        meta_path = candidate / "tunery.yaml"
        if meta_path.is_file() and (candidate / "score.safetensors").is_file():
            try:
                meta = yaml.safe_load(meta_path.read_text())
            except (OSError, yaml.YAMLError):
                return None
            return candidate if isinstance(meta, dict) and meta.get("method") == "rm" else None
    return None


def resolve_grader_model(name: str, path: str, model_map: dict[str, str] | None = None) -> tuple[str, str]:
    """(local model, backend) for a grader's `model`, or a TuneryError saying what to name instead."""
    name = (model_map or {}).get(name, name)
    if reward_model_dir(name) is not None:
        return name, "reward_model"
    local = Path(name).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "config.json").is_file():
            raise TuneryError(
                f"{path}: {local} is neither a model directory (no config.json) nor a Tunery reward model run"
            )
        if local.is_file() and local.suffix != ".gguf":
            raise TuneryError(f"{path}: {local} is a file but not a .gguf model")
        return name, "chat"
    from tunery.models.locate import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        return name, "chat"
    what = "is an OpenAI model, which is not available offline" if OPENAI_MODEL.match(name) else "is unknown"
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not OPENAI_MODEL.match(name):
        return name, "chat"  # a hub id: loads from the local Hugging Face cache, or fails then with a message
    raise TuneryError(
        f"{path}: '{name}' {what}; name a local chat model ({', '.join(BUILTIN_MODELS)}, a Hugging Face "
        "model directory or a .gguf file) or a Tunery reward model run directory (`tunery train rm`), "
        f"or map it to one (--model-map {name}=smollm2-135m-instruct)"
    )


def _messages(value: Any, path: str) -> list[dict[str, Any]]:
    if isinstance(value, str):  # a bare prompt: one user message
        check_template(value, path)
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise TuneryError(f"{path}: must be a non-empty list of messages {{role, content}}")
    messages = []
    for i, message in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(message, dict):
            raise TuneryError(f"{where}: a message must be an object with 'role' and 'content'")
        _check_fields(message, where, required=("role", "content"), optional=("type",), common=())
        if message.get("type", "message") != "message":
            raise TuneryError(f"{where}.type: must be 'message'")
        if message["role"] not in ROLES:
            raise TuneryError(f"{where}.role: must be one of {', '.join(ROLES)}; got {message['role']!r}")
        messages.append(
            {"role": message["role"], "content": _content(message["content"], f"{where}.content")}
        )
    return messages


def _content(value: Any, path: str) -> str:
    """Message content as one template string; text parts are joined, images and audio are refused."""
    if isinstance(value, str):
        check_template(value, path)
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise TuneryError(f"{path}: must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(value):
        where = f"{path}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            check_template(part["text"], f"{where}.text")
            texts.append(part["text"])
        elif kind in ("input_image", "input_audio", "image_url"):
            raise TuneryError(f"{where}: {kind} parts are not supported: local grader models read text only")
        else:
            raise TuneryError(f'{where}: must be {{"type": "input_text", "text": "..."}}')
    return "\n".join(texts)


def _sampling_params(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TuneryError(f'{path}: must be an object, e.g. {{"temperature": 0, "seed": 1}}')
    params: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{path}.{key}"
        if key in SAMPLING_KEYS_IGNORED:
            continue
        if key not in SAMPLING_KEYS:
            raise TuneryError(f"{where}: unknown sampling parameter; use {', '.join(SAMPLING_KEYS)}")
        if item is None:
            continue
        if key in ("seed", "max_completions_tokens", "max_completion_tokens"):
            if not isinstance(item, int) or isinstance(item, bool) or (key != "seed" and item < 1):
                raise TuneryError(
                    f"{where}: must be {'an integer' if key == 'seed' else 'a positive integer'}"
                )
            params["max_new_tokens" if key != "seed" else "seed"] = item
        elif key == "temperature":
            if not _is_number(item) or not 0 <= item <= 2:
                raise TuneryError(f"{where}: must be a number from 0 to 2")
            params["temperature"] = float(item)
        else:
            if not _is_number(item) or not 0 < item <= 1:
                raise TuneryError(f"{where}: must be a number in (0, 1]")
            params["top_p"] = float(item)
    return params


# --- small checks ---------------------------------------------------------------------------------------


def _check_fields(
    value: dict[str, Any],
    path: str,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    common: tuple[str, ...] = COMMON,
) -> None:
    for key in required:
        if key not in value:
            raise TuneryError(f"{path}.{key}: is required")
    allowed = set(required) | set(optional) | set(common)
    for key in value:
        if key not in allowed:
            kind = f"a {value['type']} grader" if "type" in common else "this object"
            raise TuneryError(
                f"{path}.{key}: unknown field; {kind} takes {', '.join([*common, *required, *optional])}"
            )


def _template(value: dict[str, Any], key: str, path: str) -> str:
    text = value[key]
    if not isinstance(text, str):
        raise TuneryError(f'{path}.{key}: must be a string (a template such as "{{{{item.answer}}}}")')
    check_template(text, f"{path}.{key}")
    return text


def _range(value: Any, path: str) -> tuple[float, float]:
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise TuneryError(f"{path}: must be two numbers [low, high], e.g. [0, 1]")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise TuneryError(f"{path}: low must be below high; got [{lo}, {hi}]")
    return lo, hi


def _labels(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise TuneryError(f"{path}: must be a non-empty list of strings")
    if len(set(value)) != len(value):
        raise TuneryError(f"{path}: has duplicates")
    return tuple(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"
