"""Command blocks of the documentation, read the way bash reads them, and the rewrites that make them fast.

Pure functions over text (no subprocess, no tunery import): `test_readme_commands.py` runs what these
return, and `test_markdown_commands.py` checks them on a small sample document. The contract they
implement is in `test_readme_commands.py`'s docstring.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BUNDLED = "smollm2-135m-instruct"
TINY = "tiny-random"
KEY_PLACEHOLDER = "sk-tunery-..."
DEFAULT_PORT = 8000
MAX_STEPS = "2"
RUNNABLE = {"bash": "bash", "python": "python", "py": "python"}
# Fences that look like commands but would not be run: refused rather than skipped in silence.
NOT_RUNNABLE_SHELLS = {"sh", "shell", "console", "zsh", "shell-session", "pycon", "python3"}

REPORT_KEY = pytest.StashKey[list[str]]()  # the collected report, printed by conftest.py at the end

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run\b\s*:?(?P<reason>.*?)-->\s*$", re.IGNORECASE)
_HEREDOC = re.compile(r"(?<!<)<<(?!<)(?P<strip>-?)\s*(?P<q>['\"]?)(?P<word>[A-Za-z_][A-Za-z0-9_]*)(?P=q)")
_KEY = re.compile(r"sk-tunery-[A-Za-z0-9_\-]+")


# --- blocks -----------------------------------------------------------------------------------------------


@dataclass
class Block:
    """A ```bash or ```python block: `index` counts runnable blocks of the file from 1 (ids like README.md:3)."""

    path: str
    index: int
    lang: str
    line: int  # line number of the block's first content line in the markdown file
    text: str
    not_run: str | None = None  # the marker's reason ("" for a marker without one); None: no marker
    name: str = ""  # for blocks the harness adds (set-up), instead of path:index

    @property
    def id(self) -> str:
        return self.name or f"{self.path}:{self.index}"


@dataclass
class Extraction:
    blocks: list[Block] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # misplaced markers, ```sh fences, unclosed fences


def extract_blocks(markdown: str, path: str) -> Extraction:
    """Every ```bash / ```python block in document order, with the `<!-- not run: REASON -->` marker on the
    nearest non-blank line before its fence. Markers anywhere else and shell fences other than ```bash are
    problems: they would be skipped without anyone noticing."""
    out = Extraction()
    lines = markdown.split("\n")
    i = 0
    previous = ""  # the nearest non-blank line before the current one, outside fences
    previous_line = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            if _NOT_RUN.match(lines[i]) and not _next_is_runnable_fence(lines, i):
                out.problems.append(
                    f"{path} line {i + 1}: a `not run` marker that is not just before a block"
                )
            if lines[i].strip():
                previous, previous_line = lines[i], i + 1
            i += 1
            continue
        fence, indent, info = match["fence"], match["indent"], match["info"].lower()
        body, j = [], i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            out.problems.append(f"{path} line {i + 1}: a code fence that is never closed")
        lang = RUNNABLE.get(info)
        if lang:
            marker = _NOT_RUN.match(previous) if previous_line else None
            out.blocks.append(
                Block(
                    path=path,
                    index=len(out.blocks) + 1,
                    lang=lang,
                    line=i + 2,
                    text="\n".join(body),
                    not_run=marker["reason"].strip() if marker else None,
                )
            )
        elif info in NOT_RUNNABLE_SHELLS:
            out.problems.append(
                f"{path} line {i + 1}: a ```{info} block is never run; write ```bash (or ```python), "
                "or mark it <!-- not run: REASON -->"
            )
        previous, previous_line = lines[min(j, len(lines) - 1)], j + 1
        i = j + 1
    return out


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence[0] * len(fence)) and not stripped.lstrip(fence[0])


def _next_is_runnable_fence(lines: list[str], i: int) -> bool:
    for line in lines[i + 1 :]:
        if line.strip():
            match = _FENCE.match(line)
            return bool(match) and match["info"].lower() in RUNNABLE
    return False


# --- commands ---------------------------------------------------------------------------------------------


@dataclass
class Command:
    """One logical command line: `#` comments stripped, `\\` continuations joined (bash's own rules)."""

    text: str
    line: int  # line in the markdown file where it starts
    comment: str = ""  # its trailing comment, without the '#'

    @property
    def expect_failure(self) -> bool:
        return "fails:" in self.comment


def split_commands(text: str, first_line: int = 1) -> list[Command]:
    """The commands of a bash block. As in bash: a `#` at the start of a word outside quotes starts a
    comment; a backslash at the very end of a line (not in a comment) joins the next line; a newline inside
    quotes continues the command; a here-document's lines belong to the command that opens it."""
    lines = text.split("\n")
    commands: list[Command] = []
    pending, start, quote = "", 0, ""
    i = 0
    while i < len(lines):
        code, comment, continued, quote = _scan_line(lines[i], quote)
        if not pending:
            start = first_line + i
        pending += code
        if continued:
            i += 1
            continue
        if quote:  # a quoted string spans the newline
            pending += "\n"
            i += 1
            continue
        i += 1
        heredoc = _HEREDOC.search(pending)
        if heredoc and pending.strip():
            body = []
            while i < len(lines):
                line = lines[i]
                i += 1
                if (line.lstrip("\t") if heredoc["strip"] else line) == heredoc["word"]:
                    body.append(line)
                    break
                body.append(line)
            pending += "\n" + "\n".join(body)
        if pending.strip():
            commands.append(Command(pending.strip(), start, comment or ""))
        pending = ""
    if pending.strip():
        commands.append(Command(pending.strip(), start, ""))
    return commands


def _scan_line(line: str, quote: str) -> tuple[str, str | None, bool, str]:
    """(code without its comment, the comment, ends with a continuation, quote still open at the end)."""
    out: list[str] = []
    j = 0
    while j < len(line):
        c = line[j]
        last = j == len(line) - 1
        if quote == "'":
            out.append(c)
            quote = "" if c == "'" else quote
        elif c == "\\" and last:
            return "".join(out), None, True, quote
        elif quote == '"':
            out.append(c)
            if c == "\\":
                out.append(line[j + 1])
                j += 1
            elif c == '"':
                quote = ""
        elif c == "\\":
            out += [c, line[j + 1]]
            j += 1
        elif c in "'\"":
            quote = c
            out.append(c)
        elif c == "#" and (j == 0 or line[j - 1] in " \t;|&("):
            return "".join(out).rstrip(), line[j + 1 :].strip(), False, quote
        else:
            out.append(c)
        j += 1
    return "".join(out), None, False, quote


# --- the command line interface, as data ------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A `tunery` subcommand: its option strings and the default of its --model (if it has one)."""

    options: frozenset[str]
    model_default: str | None = None


def cli_spec(parser: argparse.ArgumentParser) -> dict[tuple[str, ...], Leaf | None]:
    """Every command path of an argparse parser: leaves map to their Leaf, inner commands to None."""
    spec: dict[tuple[str, ...], Leaf | None] = {}

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            spec[path] = None
            for name, child in subs[0].choices.items():
                walk(child, (*path, name))
            return
        options = frozenset(s for a in p._actions for s in a.option_strings)
        model = next((a.default for a in p._actions if "--model" in a.option_strings), None)
        spec[path] = Leaf(options, model if isinstance(model, str) else None)

    walk(parser, ())
    return spec


@dataclass
class Invocation:
    """Where `tunery` is called inside a command: the words of that simple command and its subcommand."""

    words: list[str]
    path: tuple[str, ...]
    leaf: Leaf | None
    insert_at: int  # where flags may be appended: the end of that simple command's words

    def has(self, flag: str, config_field: str | None = None) -> bool:
        given = any(w == flag or w.startswith(flag + "=") for w in self.words)
        return given or bool(config_field and any(w.startswith(config_field + "=") for w in self.words))


def find_invocation(command: str, spec: dict[tuple[str, ...], Leaf | None]) -> Invocation | None:
    """The first simple command that runs `tunery` (`tunery ...`, `VAR=x tunery ...`, `.venv/bin/tunery`,
    `python -m tunery ...`, `torchrun ... -m tunery ...`), or None."""
    for start, end in _simple_commands(command):
        try:
            words = shlex.split(command[start:end])
        except ValueError:
            continue
        for k, word in enumerate(words):
            is_program = word == "tunery" or word.endswith("/tunery")
            first = all(re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w) for w in words[:k])
            if not (is_program and (first or (k and words[k - 1] == "-m"))):
                continue
            path: tuple[str, ...] = ()
            for w in words[k + 1 :]:
                if (*path, w) in spec:
                    path = (*path, w)
                elif w.startswith("-") and not path:
                    continue  # a global flag (-v)
                else:
                    break
            return Invocation(words[k:], path, spec.get(path), end)
    return None


def _simple_commands(command: str) -> list[tuple[int, int]]:
    """(start, end of words) of each simple command, split at | || && ; & outside quotes; a simple command's
    words end at its first redirection (an fd number before it included)."""
    spans: list[tuple[int, int]] = []
    start, words_end, quote, j = 0, None, "", 0
    while j < len(command):
        c = command[j]
        if quote:
            if c == "\\" and quote == '"':
                j += 1
            elif c == quote:
                quote = ""
        elif c == "\\":
            j += 1
        elif c in "'\"":
            quote = c
        elif c in "<>" and words_end is None:
            k = j
            while k > start and command[k - 1].isdigit():
                k -= 1
            words_end = k if k == start or command[k - 1].isspace() else j
        elif c in "|;&\n" and not (c == "&" and j and command[j - 1] in "<>"):
            spans.append((start, words_end if words_end is not None else j))
            while j + 1 < len(command) and command[j + 1] in "|&":
                j += 1
            start, words_end = j + 1, None
        j += 1
    spans.append((start, words_end if words_end is not None else len(command)))
    return [(s, e) for s, e in spans if command[s:e].strip()]


# --- what the harness runs --------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to do with one command. kind: run | serve (in the background) | make demo (expand the recipe) |
    noop (source .venv/bin/activate) | not run (make targets other than demo)."""

    kind: str
    text: str  # the command as run
    why: str = ""  # for noop / not run
    stdin: str = ""
    doc_port: int = DEFAULT_PORT  # serve: the port the documentation talks about


@dataclass
class Rewriter:
    """The substitutions of the contract, with what earlier commands left: ports of started servers (the
    documented port -> the free port used) and the API key `tunery keys create` printed."""

    spec: dict[tuple[str, ...], Leaf | None]
    workdir: Path | None = None  # where --config files are read from (None: assume they name no model)
    ports: dict[int, int] = field(default_factory=dict)
    api_key: str | None = None

    def text(self, source: str) -> str:
        """The plain-text substitutions, for bash lines and python blocks alike."""
        source = source.replace(BUNDLED, TINY)
        if self.api_key:
            source = source.replace(KEY_PLACEHOLDER, self.api_key)
        for documented, actual in self.ports.items():
            source = re.sub(rf"\b(127\.0\.0\.1|localhost):{documented}\b", rf"\g<1>:{actual}", source)
        return source

    def plan(self, command: Command, free_port: int | None = None) -> Plan:
        words = command.text.split()
        if words in (["source", ".venv/bin/activate"], [".", ".venv/bin/activate"]):
            return Plan("noop", command.text, why="PATH already has the venv first")
        if words and words[0] == "make":
            if [w for w in words[1:] if "=" not in w] == ["demo"]:
                return Plan("make demo", command.text)  # the runner plans each line of the recipe
            return Plan("not run", command.text, why="only `make demo` is run; other make targets are not")
        text = self.text(command.text)
        found = find_invocation(text, self.spec)
        if found is None or found.leaf is None:
            return Plan("run", text)
        flags: list[str] = []
        if found.path[:1] == ("train",) and not found.has("--resume"):
            if "--max-steps" in found.leaf.options:  # argparse keeps the last one; --set wins over flags
                given_by_set = found.has("--set-only", "max_steps")
                flags += ["--set", f"max_steps={MAX_STEPS}"] if given_by_set else ["--max-steps", MAX_STEPS]
            if "--safety-evals" in found.leaf.options and not found.has("--safety-evals", "safety_evals"):
                flags += ["--safety-evals", "none"]
        if self._bundled_by_default(found):
            flags += ["--model", TINY]  # the bundled model by default is the bundled model by name
        plan = Plan("run", text)
        if found.path == ("serve",) and not command.expect_failure:
            plan = Plan("serve", text, doc_port=_port(found.words))
            # argparse keeps the last --port; jobs the service trains get the same speed-ups as `tunery train`
            flags += ["--port", str(free_port or plan.doc_port)]
            flags += ["--train-set", f"max_steps={MAX_STEPS}", "--train-set", "safety_evals=none"]
        if found.path == ("chat",):
            plan.stdin = "Where is my order?\n/exit\n"
        if flags:
            head, tail = text[: found.insert_at].rstrip(), text[found.insert_at :]
            plan.text = f"{head} {' '.join(flags)}" + (f" {tail.lstrip()}" if tail.strip() else "")
        return plan

    def _bundled_by_default(self, found: Invocation) -> bool:
        """No --model, and the command would load the bundled model: its --model default, or (training, not
        resuming) the recipes' config default unless a --config file names a model."""
        if found.leaf is None or found.has("--model"):
            return False
        if found.leaf.model_default == BUNDLED:
            return True
        if found.path[:1] != ("train",) or found.has("--resume"):
            return False
        configs = [nxt for w, nxt in zip(found.words, [*found.words[1:], ""], strict=True) if w == "--config"]
        configs += [w.split("=", 1)[1] for w in found.words if w.startswith("--config=")]
        for config in configs:
            path = Path(config) if self.workdir is None else self.workdir / config
            if path.is_file() and re.search(r"^model\s*:", path.read_text(), re.MULTILINE):
                return False
        return True

    def keep_key(self, plan: Plan, stdout: str) -> None:
        """Remember the key a `tunery keys create` printed; a labeller's key can only label, so the project
        key stays the one snippets get."""
        found = find_invocation(plan.text, self.spec)
        key = _KEY.search(stdout)
        if found and found.path == ("keys", "create") and key and not found.has("--labeller"):
            self.api_key = key.group(0)


def _port(words: list[str]) -> int:
    """The last --port N / --port=N of a command (argparse keeps the last), else the default."""
    port = str(DEFAULT_PORT)
    for word, following in zip(words, [*words[1:], ""], strict=True):
        if word == "--port":
            port = following
        elif word.startswith("--port="):
            port = word.split("=", 1)[1]
    return int(port) if port.isdigit() else DEFAULT_PORT


def make_target(makefile: str, target: str, venv_bin: str, python: str) -> list[str]:
    """The recipe lines of a Makefile target, with $(VENV)/bin/ and $(PY) made concrete. Prerequisites are
    not run: the venv they would build is the one the test uses."""
    lines = makefile.split("\n")
    starts = [i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:(?!=)", line)]
    assert starts, f"the Makefile has no `{target}` target"
    recipe: list[str] = []
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("\t"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        if recipe and recipe[-1].endswith("\\"):
            recipe[-1] = recipe[-1][:-1] + line.strip()
        else:
            recipe.append(line.strip().lstrip("@-").strip())
    out = []
    for line in recipe:
        line = line.replace("$(VENV)/bin/", venv_bin.rstrip("/") + "/").replace("$(PY)", python)
        assert "$(" not in line, f"make {target}: a Makefile variable this test cannot expand: {line}"
        out.append(line)
    return out
