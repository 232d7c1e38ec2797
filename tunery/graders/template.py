"""`{{ item.field }}` / `{{ sample.output_text }}` templates, and the `sample` dict graders see.

A template holds text and `{{ namespace.path }}` references. The namespace is `item` (the dataset row)
or `sample` (the model's answer); the path is dotted keys and `[index]` steps, e.g.
`{{ sample.output_json.answer }}` or `{{ item.choices[0]["text"] }}`. A string value renders as is,
anything else as JSON. The namespace and path syntax are checked when a grader is parsed
(`check_template`); whether the value exists is known only per sample, and a missing one raises
`TemplateError` for that sample alone.

A rendered text is at most `MAX_RENDERED` characters (or the caller's smaller `limit`), checked while it is
built: a template repeating one variable ten thousand times would otherwise build gigabytes from a few
kilobytes of request before any length check ran.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunery.errors import TuneryError

NAMESPACES = ("item", "sample")
_VARIABLE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_STEP = re.compile(r"""\.([A-Za-z_][\w-]*)|\[\s*(-?\d+)\s*\]|\[\s*(["'])(.*?)\3\s*\]""")
_NAME = re.compile(r"[A-Za-z_]\w*")

# The longest text a template renders to: the service's whole JSON body (8 MB) holds at most this many
# characters, so no honest sample and item fill a template past it.
MAX_RENDERED = 8 * 2**20


class TemplateError(Exception):
    """A variable is missing from this sample or item, or the text rendered too long (`too_long`).
    `parse_error` marks an unparsable output_json."""

    def __init__(self, message: str, parse_error: bool = False, too_long: bool = False) -> None:
        super().__init__(message)
        self.parse_error, self.too_long = parse_error, too_long


def parse_variable(expression: str) -> tuple[str, list[str | int]]:
    """`item.a.b[0]` -> ("item", ["a", "b", 0]); raises ValueError on bad syntax."""
    text = expression.strip()
    head = _NAME.match(text)
    if head is None:
        raise ValueError(f"'{{{{{expression}}}}}' does not start with a name")
    steps: list[str | int] = []
    pos = head.end()
    while pos < len(text):
        step = _STEP.match(text, pos)
        if step is None:
            raise ValueError(f"cannot read '{text[pos:]}' in '{{{{{expression}}}}}'")
        key, index, _, quoted = step.groups()
        steps.append(key if key is not None else int(index) if index is not None else quoted)
        pos = step.end()
    return head.group(), steps


def check_template(text: str, path: str) -> None:
    """Raise TuneryError (naming the JSON path) for a reference with bad syntax or an unknown namespace."""
    for match in _VARIABLE.finditer(text):
        try:
            namespace, _ = parse_variable(match.group(1))
        except ValueError as exc:
            raise TuneryError(
                f"{path}: bad template variable: {exc}; write it as {{{{item.field}}}}, "
                "{{sample.output_text}} or {{item.list[0].key}}"
            ) from None
        if namespace not in NAMESPACES:
            raise TuneryError(
                f"{path}: unknown template namespace '{namespace}' in '{match.group(0)}'; "
                "only {{item.<field>}} (the dataset row) and {{sample.<field>}} (the answer) exist"
            )


def lookup(namespaces: dict[str, Any], expression: str) -> Any:
    """The value `expression` (e.g. `sample.output_json.x`) names; TemplateError when it is missing."""
    namespace, steps = parse_variable(expression)
    value = namespaces[namespace]
    walked = namespace
    for step in steps:
        if namespace == "sample" and walked == "sample.output_json" and value is None:
            raise TemplateError("sample.output_json is empty: the answer is not valid JSON", parse_error=True)
        if isinstance(value, list) and isinstance(step, int) and -len(value) <= step < len(value):  # noqa: SIM114
            value = value[step]
        elif isinstance(value, dict) and isinstance(step, str) and step in value:
            value = value[step]
        else:
            shown = f"[{step}]" if isinstance(step, int) else f".{step}"
            raise TemplateError(f"{walked}{shown} does not exist ({walked} is {_describe(value)})")
        walked += f"[{step}]" if isinstance(step, int) else f".{step}"
    return value


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(list(value)[:8])
        return f"an object with keys: {keys}" if keys else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__ if value is not None else "null"


def render(text: str, sample: dict[str, Any], item: dict[str, Any], limit: int = MAX_RENDERED) -> str:
    """Fill every `{{...}}` in `text`. Strings render as is, other values as JSON. TemplateError (too_long)
    as soon as the text passes `limit` characters.

    >>> render("Q: {{ item.q }} A: {{sample.output_text}} {{item.tags[1]}} {{item.n}}",
    ...        make_sample("4"), {"q": "2+2?", "tags": ["a", "b"], "n": {"x": 1}})
    'Q: 2+2? A: 4 b {"x": 1}'
    """
    namespaces = {"item": item, "sample": sample}
    size = len(text)

    def fill(match: re.Match[str]) -> str:
        nonlocal size
        value = lookup(namespaces, match.group(1))
        filled = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        size += len(filled) - len(match.group(0))
        if size > limit:
            raise TemplateError(
                f"the template renders to more than {limit:,} characters (at '{match.group(0)[:80]}'); "
                "refer to each long field once",
                too_long=True,
            )
        return filled

    rendered = _VARIABLE.sub(fill, text)
    if len(rendered) > limit:  # the template's own text
        raise TemplateError(
            f"the template has {len(rendered):,} characters, more than {limit:,}", too_long=True
        )
    return rendered


def make_sample(value: Any) -> dict[str, Any]:
    """The `sample` namespace from a model's answer, filling what the answer implies.

    Accepts the answer text, a dict with `output_text`, an OpenAI chat completion (`choices[0].message`),
    a `tunery generate` line (`completion`), or any of these wrapped as `{"sample": ...}`. `output_json`
    holds the parsed `output_text` when it is JSON (else None); `output_tools` the first choice's tool
    calls; `choices` a one-choice list when none was given.

    >>> s = make_sample('{"answer": 4}')
    >>> s["output_json"], s["choices"][0]["message"]["content"]
    ({'answer': 4}, '{"answer": 4}')
    """
    if isinstance(value, dict) and set(value) == {"sample"}:
        value = value["sample"]
    if isinstance(value, str):
        sample: dict[str, Any] = {"output_text": value}
    elif isinstance(value, dict):
        sample = dict(value)
        if "output_text" not in sample:
            message = _first_message(sample)
            if isinstance(sample.get("completion"), str):
                sample["output_text"] = sample["completion"]
            elif message is not None:
                sample["output_text"] = message.get("content") or ""
                sample.setdefault("output_tools", message.get("tool_calls") or [])
            else:
                raise TuneryError(
                    "a sample needs 'output_text' (or is the answer string, an OpenAI chat completion with "
                    f"'choices', or has 'completion'); got keys: {', '.join(sample) or 'none'}"
                )
    else:
        raise TuneryError(f"a sample must be a string or an object, not {type(value).__name__}")
    if not isinstance(sample["output_text"], str):
        raise TuneryError("a sample's output_text must be a string")
    if "output_json" not in sample:
        try:
            sample["output_json"] = json.loads(sample["output_text"])
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            sample["output_json"] = None
    sample.setdefault("output_tools", [])
    sample.setdefault(
        "choices",
        [
            {
                "index": 0,
                "message": {"role": "assistant", "content": sample["output_text"]},
                "finish_reason": "stop",
            }
        ],
    )
    return sample


def _first_message(sample: dict[str, Any]) -> dict[str, Any] | None:
    choices = sample.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            return message
    return None
