"""Screen JSONL training data for offensive content and personal data, line by line, before it trains.

    tunery data screen train.jsonl [--content warn|block|redact] [--pii block|redact|warn] [--json]
    tunery train sft ... --set screen_pii=redact          # every recipe screens its data in setup

Every string of a line is screened wherever it sits (chat messages, preference pairs, ratings, RL prompts
and the extra fields their graders read) and is named by its path, e.g. `messages[2].content` or
`input.messages[1].content`. Offensive content is scored by `content.offensive_probability`, one batched
call per file, or for a string in another language by that language's word list
(`content.offensive_words`); personal data is found by `pii.find_personal_data`.

Policies, set separately for content and for personal data:
    block    the run stops with the file and the lines at fault (and nothing is trained)
    redact   a copy is written (temp file, then rename; the original is untouched) with personal data
             replaced by placeholders such as [EMAIL], and offensive lines dropped: a classifier score
             has no span to mask
    warn     the findings are reported and the data trains as it is
Defaults: content `warn` (the classifier errs both ways), personal data `block` (training on it can leak
it verbatim, so keeping it is an explicit choice). Placeholders (user@example.com, 555-01xx numbers,
test card numbers, documentation IPs; see pii.py) are reported as fictional and never block.

A run directory gets `screening.json`:
    {"classifier", "language_identifier", "word_lists", "threshold", "personal_data_detector",
     "policy": {"content", "pii"},
     "files": {"train": {"path", "lines", "flagged_lines", "by_category", "fictional_by_category",
                         "scored_by_word_list": {language: lines}, "not_scored_for_content": {language: lines},
                         "action": passed|warned|redacted|blocked, "redacted_path", "examples": [...]}}}
`by_category` counts lines (a line with two emails counts once); `flagged_lines` counts lines with
anything that is not fictional. The classifier was trained on English: a string clearly in another
language (`content.other_languages`) is checked against that language's word list instead
(`scored_by_word_list` counts those lines by language; a finding's `words` names what matched), and where
there is no list it is not scored: `not_scored_for_content` counts those lines by language, so nothing
there reads as screened when it was not.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.data.chat import Problem
from tunery.data.jsonl import MAX_FILE_BYTES, read_jsonl
from tunery.errors import TuneryError
from tunery.safety.content import (
    CLASSIFIER,
    LANGUAGE_ID,
    OFFENSIVE_THRESHOLD,
    WORD_LISTS,
    Verdict,
    offensive_probability,
    other_languages,
    verdict,
)
from tunery.safety.pii import PLACEHOLDERS, Finding, find_personal_data, redact
from tunery.training.io import atomic_open, atomic_write_json
from tunery.training.progress import StepProgress

log = logging.getLogger("tunery")

POLICIES = ("warn", "block", "redact")
DEFAULT_CONTENT_POLICY = "warn"
DEFAULT_PII_POLICY = "block"
OFFENSIVE = "offensive"
REPORT_NAME = "screening.json"
PII_DETECTOR = "tunery.safety.pii: patterns with checksums, number plans and keywords (phonenumbers)"
# Strings that name structure, not content: a role, a part type, an id.
STRUCTURAL_KEYS = frozenset({"role", "type", "tool_call_id", "id"})
MAX_EXAMPLES = 20  # findings kept in a report
MAX_LISTED_LINES = 10  # line numbers an error message lists per category
MAX_FINDINGS = 100_000  # findings kept in memory; counts stay exact past it

Scorer = Callable[[Sequence[str]], list[float]]
Languages = Callable[[Sequence[str]], list[str | None]]


@dataclass(frozen=True)
class LineFinding:
    """One finding in one field of one line. `snippet` shows the text around it with personal data
    masked; for offensive content it is the start of the field."""

    line: int
    field: str
    category: str  # a pii category, or "offensive"
    snippet: str
    fictional: bool = False
    reason: str = ""
    score: float | None = None  # offensive: the classifier's probability
    words: tuple[str, ...] = ()  # offensive, in another language: the word list's entries found

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "field": self.field, "category": self.category}
        out["snippet"] = self.snippet
        if self.fictional:
            out |= {"fictional": True, "reason": self.reason}
        if self.score is not None:
            out["score"] = round(self.score, 4)
        if self.words:
            out["words"] = list(self.words)
        return out


@dataclass
class FileScreen:
    path: str
    content_policy: str
    pii_policy: str
    lines: int = 0
    unreadable_lines: int = 0  # not JSON or not UTF-8: `tunery data validate` reports them
    findings: list[LineFinding] = field(default_factory=list)
    lines_by_category: dict[str, set[int]] = field(default_factory=dict)  # real findings only
    fictional_lines: dict[str, set[int]] = field(default_factory=dict)
    action: str = "passed"  # passed | warned | redacted | blocked
    redacted_path: str | None = None
    dropped_lines: list[int] = field(default_factory=list)  # offensive lines left out of the copy
    # lines with a string in another language than the classifier's (English), by language: checked
    # against that language's word list, or not scored where there is none
    word_list_lines: dict[str, set[int]] = field(default_factory=dict)
    unscored_lines: dict[str, set[int]] = field(default_factory=dict)

    def add(self, finding: LineFinding) -> None:
        lines = self.fictional_lines if finding.fictional else self.lines_by_category
        lines.setdefault(finding.category, set()).add(finding.line)
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)

    @property
    def offensive_lines(self) -> set[int]:
        return self.lines_by_category.get(OFFENSIVE, set())

    @property
    def personal_lines(self) -> set[int]:
        return set().union(*(v for k, v in self.lines_by_category.items() if k != OFFENSIVE))

    @property
    def flagged_lines(self) -> set[int]:
        return set().union(*self.lines_by_category.values())

    def report(self) -> dict[str, Any]:
        real = [f for f in self.findings if not f.fictional]
        shown = (real + [f for f in self.findings if f.fictional])[:MAX_EXAMPLES]
        return {
            "path": self.path,
            "lines": self.lines,
            "flagged_lines": len(self.flagged_lines),
            "by_category": {k: len(v) for k, v in sorted(self.lines_by_category.items())},
            "fictional_by_category": {k: len(v) for k, v in sorted(self.fictional_lines.items())},
            "action": self.action,
            "redacted_path": self.redacted_path,
            "dropped_lines": len(self.dropped_lines),
            "unreadable_lines": self.unreadable_lines,
            "scored_by_word_list": {k: len(v) for k, v in sorted(self.word_list_lines.items())},
            "not_scored_for_content": {k: len(v) for k, v in sorted(self.unscored_lines.items())},
            "examples": [f.to_json() for f in sorted(shown, key=lambda f: (f.fictional, f.line))],
        }


def check_policy(name: str, value: str) -> None:
    """A policy name, or an error saying which ones exist."""
    if value not in POLICIES:
        raise TuneryError(f"{name} must be warn, block or redact, got {value!r}")


def check_policies(screen_content: str, screen_pii: str) -> None:
    """What recipe configs' `__post_init__` call for their `screen_content` and `screen_pii` fields."""
    check_policy("screen_content", screen_content)
    check_policy("screen_pii", screen_pii)


# --- one file --------------------------------------------------------------------------------------------


def text_fields(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every (field path, string) of a parsed line, in order, skipping structural keys (`role`, `type`)."""
    if isinstance(value, str):
        yield path or "(line)", value
    elif isinstance(value, dict):
        for key, item in value.items():
            if not (key in STRUCTURAL_KEYS and isinstance(item, str)):
                yield from text_fields(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from text_fields(item, f"{path}[{i}]")


def screen_file(
    path: str | Path,
    content_policy: str = DEFAULT_CONTENT_POLICY,
    pii_policy: str = DEFAULT_PII_POLICY,
    redacted_out: str | Path | None = None,
    score: Scorer = offensive_probability,
    languages: Languages = other_languages,
    threshold: float = OFFENSIVE_THRESHOLD,
    max_bytes: int = MAX_FILE_BYTES,
    write: bool = True,
) -> FileScreen:
    """Screen one file and apply the policies: a `redact` policy with something to redact writes the
    copy to `redacted_out` (default: FILE.redacted.jsonl beside it), unless `write` is False (a check
    that only reports). A blocked file writes nothing."""
    check_policy("content policy", content_policy)
    check_policy("personal data policy", pii_policy)
    result = FileScreen(str(path), content_policy, pii_policy)
    texts: dict[str, int] = {}  # each distinct string is scored and searched once (system prompts repeat)
    refs: list[tuple[int, str, int]] = []  # (line, field, text index)
    for line in read_jsonl(path, max_bytes):
        result.lines += 1
        if line.error is not None:
            result.unreadable_lines += 1
            continue
        for name, text in text_fields(line.value):
            if text.strip():
                refs.append((line.number, name, texts.setdefault(text, len(texts))))
    unique = list(texts)
    scores = score(unique) if unique else []
    foreign = languages(unique) if unique else []  # the classifier reads English: other languages by list
    found: dict[int, list[Finding]] = {}
    judged: dict[int, Verdict] = {}
    # ~7,000 lines/s: a bar (or a log line every 10 s) from about ten seconds of work up
    with StepProgress(
        result.lines, description=f"screening {Path(path).name}", enabled=len(refs) > 200_000
    ) as bar:
        for k, (number, name, index) in enumerate(refs):
            text = unique[index]
            if index not in found:
                found[index] = find_personal_data(text)
            for f in found[index]:
                snippet = _snippet(text, found[index], f)
                result.add(LineFinding(number, name, f.category, snippet, f.fictional, f.reason))
            if index not in judged:
                judged[index] = verdict(text, scores[index], foreign[index])
            judgement = judged[index]
            if judgement.language is None:
                if judgement.score is not None and judgement.score >= threshold:
                    snippet = _snippet(text, found[index], None)
                    result.add(LineFinding(number, name, OFFENSIVE, snippet, score=judgement.score))
            elif judgement.score is None:
                result.unscored_lines.setdefault(judgement.language, set()).add(number)
            else:
                result.word_list_lines.setdefault(judgement.language, set()).add(number)
                if judgement.words:
                    snippet = _snippet(text, found[index], None)
                    result.add(LineFinding(number, name, OFFENSIVE, snippet, words=judgement.words))
            if k % 10_000 == 0 or k == len(refs) - 1:
                bar.update(number, "lines")
    by_text = {unique[i]: findings for i, findings in found.items()}

    def mask(text: str) -> str:  # what the first pass found, not a second search
        findings = by_text.get(text)
        return redact(text) if findings is None else _masked(text, findings)

    out = Path(redacted_out) if redacted_out else _default_redacted_path(Path(path))
    _apply_policies(result, out, mask if write else None)
    return result


def _default_redacted_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.redacted{path.suffix or '.jsonl'}")


def _apply_policies(result: FileScreen, redacted_out: Path, mask_text: Callable[[str], str] | None) -> None:
    offensive, personal = bool(result.offensive_lines), bool(result.personal_lines)
    if (result.content_policy == "block" and offensive) or (result.pii_policy == "block" and personal):
        result.action = "blocked"
        return
    drop = result.offensive_lines if result.content_policy == "redact" else set()
    mask = result.personal_lines if result.pii_policy == "redact" else set()
    if drop or mask:
        if mask_text is not None:
            write_redacted(Path(result.path), redacted_out, drop, mask - drop, mask_text)
            result.redacted_path = str(redacted_out)
        result.action, result.dropped_lines = "redacted", sorted(drop)
    elif offensive or personal:
        result.action = "warned"


def write_redacted(
    source: Path, out: Path, drop: set[int], mask: set[int], mask_text: Callable[[str], str] = redact
) -> None:
    """Copy `source` to `out` without the lines in `drop` and with personal data masked (`mask_text` on
    each string) in the lines in `mask`; other lines are copied byte for byte. Written to a temp name,
    then renamed."""
    if out.resolve() == source.resolve():
        raise TuneryError(f"{out}: the redacted copy must not replace the original; choose another path")
    with atomic_open(out, "wb") as dst, source.open("rb") as src:
        for number, raw in enumerate(src, start=1):
            if number in drop:
                continue
            if number in mask:
                raw = _redact_line(raw, mask_text)
            dst.write(raw)


def _redact_line(raw: bytes, mask_text: Callable[[str], str]) -> bytes:
    value = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))

    def walk(item: Any, key: str | None = None) -> Any:
        if isinstance(item, str):
            return item if key in STRUCTURAL_KEYS else mask_text(item)
        if isinstance(item, dict):
            return {k: walk(v, k) for k, v in item.items()}
        if isinstance(item, list):
            return [walk(v) for v in item]
        return item

    return (json.dumps(walk(value), ensure_ascii=False) + "\n").encode()


def _masked(text: str, findings: list[Finding]) -> str:
    for f in reversed([f for f in findings if not f.fictional]):
        text = text[: f.start] + PLACEHOLDERS[f.category] + text[f.end :]
    return text


def _snippet(text: str, findings: list[Finding], around: Finding | None, width: int = 40) -> str:
    """The text near `around` (or the start of the text), personal data masked, on one line."""
    start, end = (around.start, around.end) if around else (0, 0)
    lo, hi = max(0, start - width), min(len(text), end + width if around else 2 * width)
    pieces, at = [], lo
    for f in findings:
        if f.fictional or f.end <= lo or f.start >= hi:
            continue
        pieces.append(text[at : max(at, f.start)])
        pieces.append(PLACEHOLDERS[f.category])
        at = max(at, f.end)
    pieces.append(text[at:hi] if at < hi else "")
    body = re.sub(r"\s+", " ", "".join(pieces)).strip()
    return ("..." if lo > 0 else "") + body + ("..." if hi < len(text) else "")


# --- messages --------------------------------------------------------------------------------------------


def _lines_text(lines: set[int]) -> str:
    shown = sorted(lines)[:MAX_LISTED_LINES]
    more = f" and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    return ("line " if len(lines) == 1 else "lines ") + ", ".join(map(str, shown)) + more


def summary(result: FileScreen) -> str:
    """One line: what was found where, e.g. `personal data on 3 lines (email 2, phone 1); ...`."""
    parts = []
    personal = {k: v for k, v in result.lines_by_category.items() if k != OFFENSIVE}
    if personal:
        counts = ", ".join(f"{k} {len(v)}" for k, v in sorted(personal.items()))
        parts.append(f"personal data on {_n_lines(len(result.personal_lines))} ({counts})")
    if result.offensive_lines:
        parts.append(f"offensive content on {_n_lines(len(result.offensive_lines))}")
    placeholders = set().union(*result.fictional_lines.values())
    if placeholders:
        parts.append(f"placeholders (not personal data) on {_n_lines(len(placeholders))}")
    if result.unscored_lines:
        parts.append(unscored_text(result))
    return "; ".join(parts) or "nothing found"


def unscored_text(result: FileScreen) -> str:
    """e.g. `not scored for offensive content (the classifier reads English, and there is no word list
    for these languages): 40 lines (ja 12, zh 28)`."""
    lines = set().union(*result.unscored_lines.values())
    counts = ", ".join(f"{k} {len(v)}" for k, v in sorted(result.unscored_lines.items()))
    return (
        "not scored for offensive content (the classifier reads English, and there is no word list for"
        f" these languages): {_n_lines(len(lines))} ({counts})"
    )


def _n_lines(n: int) -> str:
    return f"{n} line" if n == 1 else f"{n} lines"


def block_message(result: FileScreen) -> str:
    """Why a file is blocked, the lines at fault, and the ways forward."""
    out = [f"{result.path} is blocked by data screening:"]
    if result.pii_policy == "block" and result.personal_lines:
        for category, lines in sorted(result.lines_by_category.items()):
            if category != OFFENSIVE:
                out.append(f"  personal data ({category}) on {_lines_text(lines)}")
        out.append(
            "  Remove it, or train on a copy with it masked (screen_pii=redact; `tunery data screen FILE "
            "--pii redact` writes one), or keep it knowingly (screen_pii=warn)."
        )
    if result.content_policy == "block" and result.offensive_lines:
        by = f"{CLASSIFIER}; other languages: their word lists" if result.word_list_lines else CLASSIFIER
        out.append(f"  offensive content ({by}) on {_lines_text(result.offensive_lines)}")
        out.append(
            "  Review those lines: drop them (screen_content=redact) or keep them (screen_content=warn)."
        )
    return "\n".join(out)


def validation_problems(result: FileScreen) -> list[Problem]:
    """The screen as `tunery data validate` problems: one per category, an error where it blocks."""
    problems = []
    for category, lines in sorted(result.lines_by_category.items()):
        offensive = category == OFFENSIVE
        blocking = (result.content_policy if offensive else result.pii_policy) == "block"
        what = "offensive content" if offensive else f"personal data ({category})"
        problems.append(
            Problem(
                min(lines),
                "offensive_content" if offensive else "personal_data",
                f"{what} on {_lines_text(lines)}",
                "error" if blocking else "warning",
            )
        )
    if result.unscored_lines:
        lines = set().union(*result.unscored_lines.values())
        problems.append(Problem(min(lines), "content_not_scored", unscored_text(result), "warning"))
    return problems


# --- a training run --------------------------------------------------------------------------------------


def screen_run_data(
    files: dict[str, str | None], content_policy: str, pii_policy: str, run_dir: str | Path
) -> dict[str, str]:
    """Screen a run's data files ({"train": path, "valid": path}; None is skipped) before training: raise
    TuneryError when a policy blocks, else write RUN/screening.json (and RUN/screened/<role>.jsonl
    copies under `redact`) and return the paths to train on, by role."""
    run_dir = Path(run_dir)
    results = {
        role: screen_file(path, content_policy, pii_policy, run_dir / "screened" / f"{role}.jsonl")
        for role, path in files.items()
        if path
    }
    blocked = [r for r in results.values() if r.action == "blocked"]
    if blocked:
        raise TuneryError("\n".join(block_message(r) for r in blocked))
    for role, result in results.items():
        if result.action != "passed" or result.unscored_lines:
            log.warning("screening %s (%s): %s; %s", role, result.path, summary(result), result.action)
    atomic_write_json(run_dir / REPORT_NAME, run_report(results, content_policy, pii_policy))
    return {role: r.redacted_path or r.path for role, r in results.items()}


def run_report(results: dict[str, FileScreen], content_policy: str, pii_policy: str) -> dict[str, Any]:
    return {
        "classifier": CLASSIFIER,
        "language_identifier": LANGUAGE_ID,
        "word_lists": WORD_LISTS,
        "threshold": OFFENSIVE_THRESHOLD,
        "personal_data_detector": PII_DETECTOR,
        "policy": {"content": content_policy, "pii": pii_policy},
        "files": {role: r.report() for role, r in results.items()},
    }


def screened_paths(run_dir: str | Path, files: dict[str, str | None]) -> dict[str, str]:
    """The paths a run trains on, by role (roles without a file left out): the redacted copies
    RUN/screening.json records, else the originals. A resumed run reads them here, not screening again."""
    report_path = Path(run_dir) / REPORT_NAME
    recorded = json.loads(report_path.read_text())["files"] if report_path.is_file() else {}
    paths: dict[str, str] = {}
    for role, path in files.items():
        if not path:
            continue
        copy = (recorded.get(role) or {}).get("redacted_path")
        if copy and not Path(copy).is_file():
            raise TuneryError(
                f"{copy}: the redacted copy of {path} this run trains on is missing; start a new run"
            )
        paths[role] = copy or path
    return paths
