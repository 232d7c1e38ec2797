"""The bounds on what a schema makes the grammar compiler build: its regular expressions unrolled, its
optional properties; and the compiled grammars' cache."""

from __future__ import annotations

import doctest

import pytest

from tunery.models import structured
from tunery.models.structured import (
    MAX_FORMATS,
    MAX_LITERAL_CHARS,
    MAX_NESTED_REPETITION,
    MAX_OPTIONAL,
    MAX_OPTIONAL_IN_OBJECT,
    MAX_PATTERN_SIZE,
    InvalidGrammar,
    check_cost,
    pattern_size,
)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(structured, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.parametrize(
    ("pattern", "size", "nested"),
    [
        ("abc", 3, 0),
        ("[a-z]{3,5}", 5, 0),
        ("[a-z]{7,}", 7, 0),  # unbounded: a loop, counted at its minimum
        ("(ab|cde){4}", 20, 0),  # each alternative is compiled
        ("(" + "|".join([r"\S{1,100}"] * 10) + ")", 1000, 0),  # ten alternatives: 2 s of compiling
        ("((x){10}){10}", 100, 0),  # fixed lengths inside: no varying part
        (r"\d+-\S*", 3, 0),
        ("[]a]{2}", 2, 0),
        ("[^a]{1,50}", 50, 0),
        ("a{b", 3, 0),  # a literal brace
        ("^[a-z]{4}$", 4, 0),
        (r"^[^]\S{1,900}]$", 902, 0),  # `[^]` is any character to xgrammar, and what follows is counted
        # a quantifier after a quantifier multiplies again (it had counted 20: 16 s of compiling)
        (r"\S{1,20}{1,20}", 400, 400),
        (r"(\S{1,20}){1,20}", 400, 400),  # 16.9 s, where \S{1,400} takes 0.6
        (r"\S{1,5}{1,5}{1,5}", 125, 150),  # 11 s: each level of repetition counted
        (r"(\S{20}){1,20}", 400, 0),  # a fixed length inside: 0.6 s
        (r"(\d{1,3}\.){3}\d{1,3}", 15, 12),
        (r"(\S\S?\S?\S?){1,25}", 100, 100),  # `?` varies the length too: 3.2 s (at {1,100}: 13.4 s)
        (r"(\w+ ?){1,100}", 200, 200),  # a loop inside: 7.1 s
        (r"[a-z]+(-[a-z]+)*", 3, 0),  # loops around loops are not unrolled
        # alternatives of different lengths vary too where classes make them ambiguous: 15 s; literals 0.04 s
        (r"(\S|\S\S|\S\S\S){1,100}", 600, 600),
        (r"(a|bb|ccc){1,100}", 600, 0),
        ("(?:ab){10}", 20, 0),  # a non-capturing group: its `?:` is neither a quantifier nor characters
    ],
)
def test_pattern_size(pattern: str, size: int, nested: int) -> None:
    assert pattern_size(pattern) == (size, nested)


def test_repetitions_of_something_of_varying_length_are_bounded_in_all() -> None:
    """`(\\S{1,20}){1,20}` passed the bound on 400 characters and compiled for 16 s (three such in one
    schema: 51 s); `([^x]{1,20}){1,20}` for 87 s."""

    def schema(*patterns: str) -> dict:
        names = [f"p{i}" for i in range(len(patterns))]
        properties = {name: {"type": "string", "pattern": x} for name, x in zip(names, patterns, strict=True)}
        return {"type": "object", "properties": properties, "required": names}

    quarter = MAX_NESTED_REPETITION // 4  # ([^x]{1,2}){1,q} and ([^x]{1,q}){1,2} spell out 2q each
    check_cost(schema(f"([^x]{{1,2}}){{1,{quarter}}}", f"([^x]{{1,{quarter}}}){{1,2}}"), "response_format")
    past = schema(f"([^x]{{1,2}}){{1,{quarter}}}", f"([^x]{{1,{quarter + 1}}}){{1,2}}")
    with pytest.raises(InvalidGrammar, match=f"up to {MAX_NESTED_REPETITION + 2:,} characters") as raised:
        check_cost(past, "response_format")
    assert "(\\S{20}){1,20}" in str(raised.value)
    for pattern in [r"(\S{1,20}){1,20}", r"\S{1,20}{1,20}", r"\S{1,5}{1,5}{1,5}", r"([^x]{1,20}){1,20}",
                    r"(\S\S?\S?\S?){1,100}", r"(\w+ ?){1,100}"]:  # fmt: skip
        with pytest.raises(InvalidGrammar):
            check_cost(schema(pattern), "response_format")
    for cheap in [r"(\S{20}){1,20}", r"(\d{1,3}\.){3}\d{1,3}", r"[a-z]+(-[a-z]+)*"]:
        check_cost(schema(cheap), "response_format")


def test_every_pattern_of_a_schema_counts_pattern_properties_names_too() -> None:
    """A `patternProperties` name is a regular expression the compiler unrolls like a `pattern`:
    `^[^a]{1,8192}$` as a name had compiled for 19 s."""
    half = MAX_PATTERN_SIZE // 2
    at_bound = {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": f"[a-z]{{{half}}}"}},
        "required": ["a"],
        "patternProperties": {f"^x{{{MAX_PATTERN_SIZE - half}}}$": {"type": "string"}},
    }
    check_cost(at_bound, "response_format")
    past = {**at_bound, "patternProperties": {f"^x{{{MAX_PATTERN_SIZE - half + 1}}}$": {"type": "string"}}}
    with pytest.raises(InvalidGrammar, match=f"up to {MAX_PATTERN_SIZE + 1:,} characters") as raised:
        check_cost(past, "response_format")
    assert raised.value.param == "response_format"
    nested = [{"items": {"anyOf": [{"pattern": f"y{{{MAX_PATTERN_SIZE}}}"}, {"pattern": "z"}]}}]
    with pytest.raises(InvalidGrammar):
        check_cost(nested, "tools")


def test_optional_properties_are_bounded_in_an_object_and_in_all() -> None:
    """Optional properties cost time that grows with their square in one object (1,000: 4 s); required ones
    almost nothing (5,000: 1 s), so they do not count."""

    def obj(n: int, required: int = 0, prefix: str = "p") -> dict:
        names = [f"{prefix}{i}" for i in range(n)]
        return {"type": "object", "properties": {x: {} for x in names}, "required": names[:required]}

    check_cost(obj(MAX_OPTIONAL_IN_OBJECT), "response_format")
    check_cost(obj(3000, required=3000 - MAX_OPTIONAL_IN_OBJECT), "response_format")
    with pytest.raises(InvalidGrammar, match=f"{MAX_OPTIONAL_IN_OBJECT + 1:,} optional properties"):
        check_cost(obj(MAX_OPTIONAL_IN_OBJECT + 1), "response_format")
    parts = MAX_OPTIONAL // MAX_OPTIONAL_IN_OBJECT
    spread = {"type": "object", "properties": {f"o{j}": obj(MAX_OPTIONAL_IN_OBJECT) for j in range(parts)}}
    spread["required"] = list(spread["properties"])
    check_cost(spread, "tools")
    spread["properties"]["one_more"] = obj(1)  # required itself, holding one optional property
    spread["required"].append("one_more")
    with pytest.raises(InvalidGrammar, match=f"{MAX_OPTIONAL + 1:,} optional properties") as raised:
        check_cost(spread, "tools")
    assert raised.value.param == "tools"
    odd = {"type": "object", "properties": {"a": {}}, "required": [{"not": "a name"}, ["x"], "a"]}
    check_cost(odd, "response_format")  # xgrammar's to refuse, not a crash here


def test_enum_and_const_values_are_bounded_across_tools() -> None:
    """60,000 enum strings compiled for 33 s; a tool's parameters are at most 64 KB, but with tool_choice
    "required" every tool compiles into one grammar, so the values are counted over all of them."""
    words = [f"w{i:05d}" for i in range(MAX_LITERAL_CHARS // 9)]  # '"w00000", ' is 10 characters
    check_cost([{"enum": words[: len(words) // 2]}, {"const": "x" * 1000}], "tools")
    with pytest.raises(InvalidGrammar, match="`enum` and `const` values come to") as raised:
        check_cost([{"enum": words}, {"enum": words}], "tools")
    assert raised.value.param == "tools"


def test_the_bounds_share_one_budget() -> None:
    """Each bound alone is about two seconds of compiling; a schema at all of them at once had compiled in
    5.3 s. Their shares of the bounds add up to at most the whole."""

    def schema(pattern_chars: int, formats: int, optional: int) -> dict:
        properties: dict = {"p": {"type": "string", "pattern": f"[a-z]{{{pattern_chars}}}"}}
        properties |= {f"f{i}": {"type": "string", "format": "uri"} for i in range(formats)}
        properties |= {f"o{i}": {"type": "string"} for i in range(optional)}
        return {
            "type": "object",
            "properties": properties,
            "required": ["p", *(f"f{i}" for i in range(formats))],
        }

    check_cost(schema(MAX_PATTERN_SIZE // 2, MAX_FORMATS // 4, MAX_OPTIONAL // 4), "response_format")
    with pytest.raises(
        InvalidGrammar, match="pattern characters 50.0%, string formats 26.0%, optional properties 25.0%"
    ):
        check_cost(schema(MAX_PATTERN_SIZE // 2, MAX_FORMATS // 4 + 1, MAX_OPTIONAL // 4), "response_format")


def test_string_formats_are_bounded() -> None:
    """Each `format` is a grammar of its own (1,200 `ipv6` fields had held the worker 98 s)."""

    def fields(n: int) -> dict:
        names = [f"f{i}" for i in range(n)]
        return {"type": "object", "properties": {x: {"type": "string", "format": "ipv6"} for x in names},
                "required": names}  # fmt: skip

    check_cost(fields(MAX_FORMATS), "response_format")
    with pytest.raises(InvalidGrammar, match=f"{MAX_FORMATS + 1:,} string formats"):
        check_cost(fields(MAX_FORMATS + 1), "response_format")


def test_the_grammar_cache_keeps_the_recently_used_within_its_bytes() -> None:
    """Kept by Tunery, not xgrammar (whose capped cache still grew the worker ~3 MB a schema)."""
    from types import SimpleNamespace

    from tunery.models.structured import GrammarCache

    compiled: list[str] = []

    def make(key: str, size: int):  # noqa: ANN202
        def compile() -> SimpleNamespace:
            compiled.append(key)
            return SimpleNamespace(memory_size_bytes=size, key=key)

        return compile

    cache = GrammarCache(limit=100)
    assert cache.get("a", make("a", 40)).key == "a"
    cache.get("b", make("b", 40))
    assert cache.get("a", make("a", 40)).key == "a" and compiled == ["a", "b"]  # a hit, and now the newest
    cache.get("c", make("c", 40))  # 120 bytes: the least recently used (b) goes
    assert len(cache) == 2 and cache.size == 80
    cache.get("b", make("b", 40))
    assert compiled == ["a", "b", "c", "b"]
    cache.get("huge", make("huge", 101))  # larger than the whole cache: used, not kept
    assert len(cache) == 2 and cache.size == 80
    with pytest.raises(ValueError):
        cache.get("bad", lambda: (_ for _ in ()).throw(ValueError("cannot compile")))
    assert len(cache) == 2
