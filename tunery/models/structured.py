"""Structured output: decoding constrained by a grammar, so the answer always parses.

`response_format: {"type": "json_schema", ...}` (and `json_object`, and a forced tool call's arguments) is
compiled by xgrammar into a grammar over the model's tokens; at each decoding step every sequence's matcher
fills a bitmask of the tokens that keep the text valid, the logits of the others become -inf, and the
chosen token advances the matcher. The end-of-turn token is allowed only once the JSON is complete, and a
sequence whose grammar has ended stops.

xgrammar was chosen by measuring the candidates on this CPU (SmolLM2's 49,152-token vocabulary, a 4-field
schema, one sequence): xgrammar 0.29 ms a token for the mask and the advance, llguidance 12 ms,
outlines-core's index gives token lists, not masks. Compiling a schema takes ~0.1-0.2 s; compiled grammars
are kept (per tokenizer, by schema, up to CACHE_BYTES) so a repeated schema costs nothing.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tunery.errors import TuneryError


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:
        raise TuneryError(
            "structured output needs xgrammar: `make install` installs it (or pip install --no-deps "
            "xgrammar==0.2.9 apache-tvm-ffi)"
        ) from exc
    return xgrammar


class InvalidGrammar(TuneryError):
    """A schema xgrammar cannot compile: the request's fault (a 400 naming `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(_SOURCE_PLACE.sub("", message))
        self.param = param


# xgrammar's messages begin with the time and its C++ source file and line: not the client's business
_SOURCE_PLACE = re.compile(r"\[[0-9:]+\] [^\s:]+\.(?:cc|h|cpp):[0-9]+: ")


@dataclass(frozen=True)
class Grammar:
    compiled: Any  # xgrammar.CompiledGrammar
    vocab_size: int
    # Tokens holding a raw control byte (< 0x20): compact JSON never has one (no whitespace is allowed but
    # the separators' spaces). Masked too, since xgrammar 0.2.9 lets them into strings with a maxLength.
    control: torch.Tensor

    def matchers(self, n: int) -> list[Any]:
        xgr = _xgrammar()
        return [xgr.GrammarMatcher(self.compiled) for _ in range(n)]


# A compiled grammar's states grow with the repetitions its regular expressions spell out, and so does the
# time to compile it, which nothing can interrupt: `[a-z]{20000,40000}` took 90 s of the inference worker.
# Character classes cost more than letters and the cost grows faster than the count: measured here with
# SmolLM2's tokenizer, `\S{1,N}` took 0.4 s at N=512, 1.7 s at 1,024 and 6.3 s at 2,048; `\s{1,4096}`
# 10.9 s and `.{1,4096}` 7.9 s, and each alternative of `(a|b|...)` is compiled (ten of `\S{1,100}` 2 s).
# The `pattern`s (and `patternProperties` names) of one schema may spell out this many characters in all
# (`pattern_size`), about 2 s of compiling at most; a longer free text is `maxLength`'s job, which compiles
# in milliseconds at any length.
MAX_PATTERN_SIZE = 1024
# A repetition of something whose own length varies is much dearer: `(\S{1,20}){1,20}` (400 characters)
# took 16.9 s, `([^x]{1,20}){1,20}` 87 s, `(\w{1,8} ?){1,50}` 22.6 s, `\S{1,5}{1,5}{1,5}` 11 s, against 0.6 s
# for `\S{1,400}` and `(\S{20}){1,20}`; with digits or one letter inside it stays cheap, with most classes
# not; so with `?` or a loop inside (`(\S\S?\S?\S?){1,100}` 13.4 s, `(\w+ ?){1,100}` 7.1 s). Those
# repetitions may spell out this many characters in all: `(\d{1,3}\.){3}` is 12,
# `(-[0-9]{1,4}){1,4}` 20. At 32 the dearest measured, `([^x]{1,4}){1,8}`, took 1.8 s; at 64 6.5 s.
MAX_NESTED_REPETITION = 32
# An object's optional properties cost time that grows with their square (each may come or not, in order),
# required ones almost nothing: 500 optional took 0.75 s, 1,000 4.0 s, 1,000 of which 900 required 0.12 s,
# 5,000 required 1.0 s; 1,000 optional in four objects 1.1 s, 2,000 in eight 2.9 s.
MAX_OPTIONAL_IN_OBJECT = 500
MAX_OPTIONAL = 1000
# A string `format` compiles to a grammar of its own for each field: 300 `uri`s took 4.2 s, 600 9.2 s, 300
# `hostname`s 1.6 s, and `ipv6` grows faster (100: 0.3 s, 200: 1.8 s; 1,200 held the worker 98 s). At this
# many `format`s in a schema, at most ~1.4 s.
MAX_FORMATS = 100
# `enum` and `const` values are compiled too: 2,800 enum strings of 20 letters (56,000 characters) took
# 0.67 s, 60,000 of them 33 s. A schema may list this many characters of them in all (their JSON): with
# tool_choice "required" every tool's parameters compile into one grammar, each up to 64 KB.
MAX_LITERAL_CHARS = 64 * 1024
# Compiled grammars kept in memory, per tokenizer, so a repeated schema is not compiled again. Kept here,
# not in xgrammar's own cache: with that one limited to 64 MB, the inference worker still grew ~3 MB for
# each new schema of 600 properties (437 MB to 902 MB over 120), and stayed flat without it.
CACHE_BYTES = 64 * 1024 * 1024


def pattern_size(pattern: str) -> tuple[int, int]:
    """How many characters a regular expression spells out, its repetitions multiplied out, and how many
    of those are in repetitions of something that itself repeats a variable number of times.

    The first: an atom counts 1, a group its content (its alternatives summed: the compiler builds each),
    `{m,n}` multiplies by n (by m when unbounded; a quantifier after a quantifier multiplies again), `*`,
    `+` and `?` by 1 (a loop); `^` and `$` count 0. An upper bound of what a grammar compiler unrolls.
    The second: the size of each bounded repetition of a group (or of a quantified atom) whose own length
    varies (a range `{m,n}`, `?`, `*` or `+` inside, or alternatives of different lengths with a class in
    them), `(\\S{1,20}){1,20}` 400, `(\\S\\S?){1,20}` 40: a
    compiler's cost there grows much faster than the size (see MAX_NESTED_REPETITION).

    >>> pattern_size("[a-z]{3,5}"), pattern_size("(ab|c){10}-[0-9]+"), pattern_size(r"(\\d{1,3}\\.){3}\\d{1,3}")
    ((5, 0), (32, 0), (15, 12))
    """
    stack: list[list[int]] = [[0]]  # per open group: its alternatives' sizes so far
    varies = [False]  # per open group: whether it holds a repetition of variable length
    classes = [False]  # per open group: whether it holds a character class (not only literal characters)
    nested = 0
    last, last_varies = 0, False  # what a quantifier applies to: its size, and whether its length varies
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":  # an escape: a class (\\S, \\w, \\d, \\p{..}, ...) or one literal character
            classes[-1] = classes[-1] or (pattern[i + 1 : i + 2].isalpha() and pattern[i + 1] not in "ntrfv")
            last, last_varies, i = 1, False, i + 2
        elif pattern.startswith("[^]", i):  # any character to xgrammar (not a class holding "]")
            classes[-1] = True
            last, last_varies, i = 1, False, i + 3
        elif char == "[":
            end = i + 1
            end += pattern[end : end + 1] == "^"
            end += pattern[end : end + 1] == "]"
            while end < len(pattern) and pattern[end] != "]":
                end += 2 if pattern[end] == "\\" else 1
            classes[-1] = True
            last, last_varies, i = 1, False, end + 1
        elif char == "(":
            stack.append([0])
            varies.append(False)
            classes.append(False)
            last, last_varies, i = 0, False, i + (3 if pattern.startswith("(?:", i) else 1)
            continue
        elif char == ")" and len(stack) > 1:
            alternatives, holds_class = stack.pop(), classes.pop()
            classes[-1] = classes[-1] or holds_class
            # alternatives of different lengths vary too, when classes make them ambiguous:
            # (\\S|\\S\\S|\\S\\S\\S){1,100} took 15 s, (a|bb|ccc){1,100} 0.04 s
            group_varies = varies.pop() or (holds_class and len(set(alternatives)) > 1)
            last, last_varies, i = sum(alternatives), group_varies, i + 1
        elif char == "|":
            stack[-1].append(0)
            last, last_varies, i = 0, False, i + 1
            continue
        elif char == "{" and (close := pattern.find("}", i)) > 0 and _counts(pattern[i + 1 : close]):
            low, high = _counts(pattern[i + 1 : close])  # type: ignore[misc]
            most = max(high if high is not None else low, 1)
            if last_varies and most > 1:
                nested += last * most
            stack[-1][-1] += last * (most - 1)
            last, last_varies = last * most, last_varies or (high is not None and high != low)
            varies[-1] = varies[-1] or last_varies
            i = close + 1
            continue
        elif char in "*+?":  # a loop, or optional: what it applies to is counted once, and varies
            last_varies, i = True, i + 1
            varies[-1] = True
            continue
        elif char in "^$":  # an anchor, which spells nothing
            last, last_varies, i = 0, False, i + 1
            continue
        else:
            classes[-1] = classes[-1] or char == "."
            last, last_varies, i = 1, False, i + 1
        stack[-1][-1] += last
        varies[-1] = varies[-1] or last_varies
    return sum(sum(alternatives) for alternatives in stack), nested


def _counts(text: str) -> tuple[int, int | None] | None:
    """`m`, `m,` or `m,n` of a `{...}` quantifier, else None (a literal brace)."""
    low, comma, high = text.partition(",")
    if not low.strip().isdigit() or (high.strip() and not high.strip().isdigit()):
        return None
    return int(low), (int(high) if high.strip() else None) if comma else int(low)


def check_cost(schema: Any, param: str) -> None:
    """Refuse, before compiling, a schema whose grammar would take seconds to compile: its regular
    expressions (`pattern`s and `patternProperties` names) spelling out more than MAX_PATTERN_SIZE
    characters in all, or more than MAX_NESTED_REPETITION in repetitions of something whose length varies
    (`pattern_size`), more optional properties (not in their object's `required`) than
    MAX_OPTIONAL_IN_OBJECT in one object or MAX_OPTIONAL in all, more than MAX_FORMATS `format`s, or
    `enum` and `const` values of more than MAX_LITERAL_CHARS; and one whose pattern characters, varying
    repetitions, formats, optional properties and enum characters, each as a share of its bound, add up to
    more than the whole.

    >>> check_cost({"patternProperties": {"^[a-z]{1,2000}$": {"type": "string"}}}, "tools")
    Traceback (most recent call last):
    ...
    tunery.models.structured.InvalidGrammar: the JSON schema's patterns spell out up to 2,000 characters ...
    """
    total = nested = optional = formats = literal = 0
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            formats += isinstance(node.get("format"), str)
            literal += sum(len(json.dumps(node[key])) for key in ("enum", "const") if key in node)
            patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
            if isinstance(node.get("patternProperties"), dict):
                patterns += [str(name) for name in node["patternProperties"]]
            for size, in_nested in map(pattern_size, patterns):
                total, nested = total + size, nested + in_nested
            if isinstance(node.get("properties"), dict):
                required = node.get("required")
                named = {x for x in required if isinstance(x, str)} if isinstance(required, list) else set()
                here = sum(1 for name in node["properties"] if name not in named)
                optional += here
                if here > MAX_OPTIONAL_IN_OBJECT:
                    raise InvalidGrammar(
                        f"an object of the JSON schema has {here:,} optional properties (not in its `required`); "
                        f"constrained decoding takes at most {MAX_OPTIONAL_IN_OBJECT:,} in one object: list more "
                        "of them in `required`, or group them in nested objects",
                        param,
                    )
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    if total > MAX_PATTERN_SIZE:
        raise InvalidGrammar(
            f"the JSON schema's patterns spell out up to {total:,} characters with their repetitions; "
            f"constrained decoding takes at most {MAX_PATTERN_SIZE:,} (e.g. [a-z]{{1,{MAX_PATTERN_SIZE}}})",
            param,
        )
    if nested > MAX_NESTED_REPETITION:
        raise InvalidGrammar(
            f"the JSON schema's patterns repeat something of varying length (such as (\\S{{1,20}}){{1,20}}) to up to "
            f"{nested:,} characters; constrained decoding takes at most {MAX_NESTED_REPETITION:,} of those in all: "
            "use one repetition (\\S{1,400}) or a fixed length inside (\\S{20}){1,20}",
            param,
        )
    if formats > MAX_FORMATS:
        raise InvalidGrammar(
            f"the JSON schema has {formats:,} string formats (`format`); constrained decoding takes at most "
            f"{MAX_FORMATS:,}: use `pattern` or plain strings for the rest",
            param,
        )
    if literal > MAX_LITERAL_CHARS:
        raise InvalidGrammar(
            f"the JSON schema's `enum` and `const` values come to {literal:,} characters; constrained decoding "
            f"takes at most {MAX_LITERAL_CHARS:,} in all",
            param,
        )
    if optional > MAX_OPTIONAL:
        raise InvalidGrammar(
            f"the JSON schema has {optional:,} optional properties (not in their object's `required`); "
            f"constrained decoding takes at most {MAX_OPTIONAL:,}: list more of them in `required`",
            param,
        )
    # Each bound alone is about two seconds of compiling; together they share those two seconds (a schema at
    # all of them at once had compiled in 5.3 s)
    shares = {
        "pattern characters": max(0, total - nested) / MAX_PATTERN_SIZE,  # the others' are counted next
        "repetitions of varying length": nested / MAX_NESTED_REPETITION,
        "string formats": formats / MAX_FORMATS,
        "optional properties": optional / MAX_OPTIONAL,
        "enum and const characters": literal / MAX_LITERAL_CHARS,
    }
    if sum(shares.values()) > 1.0:
        parts = ", ".join(f"{name} {share:.1%}" for name, share in shares.items() if share)
        raise InvalidGrammar(
            f"the JSON schema would take too long to compile for constrained decoding: its parts use {parts} "
            "of what one schema may have, more than 100% together; drop or simplify some of them",
            param,
        )


class GrammarCache:
    """Compiled grammars by key, the least recently used dropped once they pass `limit` bytes together."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit, self.size = limit, 0
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, compile: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        compiled = compile()  # outside the lock: another thread's cached schema need not wait for it
        size = int(compiled.memory_size_bytes)
        with self._lock:
            if key not in self._entries and size <= self.limit:
                self._entries[key] = compiled
                self.size += size
                while self.size > self.limit:
                    _, dropped = self._entries.popitem(last=False)
                    self.size -= int(dropped.memory_size_bytes)
        return compiled

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class _Compiler:
    compiler: Any  # xgrammar.GrammarCompiler, its own cache off
    control: torch.Tensor
    grammars: GrammarCache


@functools.lru_cache(maxsize=4)
def _compiler(tokenizer: Any, vocab_size: int, stops: tuple[int, ...]) -> _Compiler:
    xgr = _xgrammar()

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stops))
    control = torch.zeros(vocab_size, dtype=torch.bool)
    for i, piece in enumerate(info.decoded_vocab):
        if i < vocab_size and i not in stops and any(b < 0x20 for b in piece):
            control[i] = True
    return _Compiler(xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False), control, GrammarCache())


def json_grammar(
    tokenizer: Any,
    vocab_size: int,
    stops: set[int],
    schema: dict[str, Any] | None,
    param: str = "response_format",
) -> Grammar:
    """A grammar for a JSON value matching `schema` (None: any JSON object)."""
    check_cost(schema, param)
    made = _compiler(tokenizer, vocab_size, tuple(sorted(stops)))
    text = json.dumps(schema if schema is not None else {"type": "object"})
    try:
        compiled = made.grammars.get(
            ("json", text),
            lambda: made.compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True),
        )
    except Exception as exc:  # noqa: BLE001 (xgrammar raises RuntimeError and ValueError for bad schemas)
        raise InvalidGrammar(
            f"the JSON schema cannot be used for constrained decoding: {exc}", param
        ) from exc
    return Grammar(compiled, vocab_size, made.control)


def tool_call_grammar(
    tokenizer: Any, vocab_size: int, stops: set[int], tools: list[dict[str, Any]], names: list[str]
) -> Grammar:
    """A grammar for one `<tool_call>{"name": N, "arguments": {...}}</tool_call>` of a function in `names`,
    its arguments matching the function's parameters schema (any JSON object when it has none)."""
    xgr = _xgrammar()

    made = _compiler(tokenizer, vocab_size, tuple(sorted(stops)))
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    check_cost([schemas[name] for name in names], "tools")
    texts = tuple((name, json.dumps(schemas[name])) for name in names)

    def compile() -> Any:
        options = []
        for name, text in texts:
            head = xgr.Grammar.from_ebnf(
                "root ::= " + json.dumps('<tool_call>{"name": ' + json.dumps(name) + ', "arguments": ')
            )
            body = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
            tail = xgr.Grammar.from_ebnf('root ::= "}</tool_call>"')
            options.append(xgr.Grammar.concat(head, body, tail))
        grammar = options[0] if len(options) == 1 else xgr.Grammar.union(*options)
        return made.compiler.compile_grammar(grammar)

    try:
        compiled = made.grammars.get(("tools", texts), compile)
    except Exception as exc:  # noqa: BLE001
        raise InvalidGrammar(
            f"a function's parameters cannot be used for constrained decoding: {exc}", "tools"
        ) from exc
    return Grammar(compiled, vocab_size, made.control)


class Constraint:
    """The matchers of a batch's sequences, applied to each step's logits."""

    def __init__(self, grammar: Grammar, batch: int) -> None:
        xgr = _xgrammar()

        self.matchers = grammar.matchers(batch)
        self.bitmask = xgr.allocate_token_bitmask(batch, grammar.vocab_size)
        self.control = grammar.control

    def mask_(self, logits: torch.Tensor, live: list[int]) -> None:
        """Set to -inf, in place, the logits of tokens that would break row r's text (sequence live[r])."""
        xgr = _xgrammar()

        for row, i in enumerate(live):
            if i < 0:  # a finished sequence (its row is kept but not used): anything goes
                self.bitmask[row].fill_(-1)
            else:
                self.matchers[i].fill_next_token_bitmask(self.bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask[: len(live)].to(logits.device))
        logits[:, self.control.to(logits.device)] = float("-inf")

    def advance(self, i: int, token: int) -> bool:
        """Sequence i chose `token`; True when its grammar has ended (the answer is complete)."""
        matcher = self.matchers[i]
        if not matcher.is_terminated():
            matcher.accept_token(token)
        return bool(matcher.is_terminated())
