"""OpenAI's moderations endpoint, `POST /v1/moderations`, on the offline classifier of
tunery/safety/content.py, with personal-data findings as a Tunery extension.

What it can and cannot say. The classifier scores one thing: how likely a text is offensive or abusive
(insults, profanity, slurs). That probability is reported as both `harassment` and `hate`, which it cannot
tell apart: the two scores are the same number and the two flags rise together. The other eleven
categories (`sexual`, `sexual/minors`, `self-harm` and its two subcategories, `violence`,
`violence/graphic`, `illicit`, `illicit/violent`, `harassment/threatening`, `hate/threatening`) are not
scored: 0 and never flagged, with no input type in `category_applied_input_types`. A text about self-harm
or weapons written politely passes. The classifier reads English: a text clearly in another language
(tunery/safety/content.py: other_languages; `tunery_language` names it, null otherwise) is checked against
that language's word list instead, for German, Spanish, French, Italian and Portuguese: `harassment` and
`hate` are 1 when it holds a listed insult, slur or obscenity (`tunery_words` names them) and 0 when not.
In any other language it is scored in no category. Image parts are refused (400), not ignored.

Extensions, which OpenAI's client keeps as extra fields: each result's `tunery_personal_data` lists the
personal data in its input (tunery/safety/pii.py: category, start, end, text, detector, fictional,
reason); `tunery_classifier` names the classifier, its threshold and the categories it scores. Personal
data never sets `flagged`: it is not one of OpenAI's categories.

The same classifier filters chat completions when the server runs with `--moderate-completions` or a
request sets `"tunery_content_filter": true` (the openai client's `extra_body`): a flagged answer is
withheld, `content: null` with `finish_reason: "content_filter"`, as OpenAI does. A streamed answer
cannot be recalled once sent, so with the filter on a stream holds each answer back until it is complete
and scored, then sends it as one delta (or withholds it): the stream keeps its shape, not its pace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter

from tunery.server.deps import Auth, State
from tunery.server.errors import bad_request
from tunery.server.schemas import ChatRequest, ModerationRequest
from tunery.server.settings import Settings
from tunery.server.store import new_id

router = APIRouter()

CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
SCORED = ("harassment", "hate")  # both get the one offensive-language probability
TEXT_PART_TYPES = ("text", "input_text")
# One request's text, all inputs together (OpenAI's model reads 32k tokens): the detectors take up to ~10 us
# a character on hostile text, so this bounds a request to about a second of one core.
MAX_CHARACTERS = 131_072
MAX_INPUTS = 32


def input_texts(value: str | list[str | dict[str, Any]]) -> list[str]:
    """The texts to score, one per result: a string, each string of a list, or the text parts of a list of
    content parts joined into one (OpenAI answers a multi-part input with one result)."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise bad_request("'input' must not be empty.", "input", "invalid_value")
    if all(isinstance(item, str) for item in value):
        return [str(item) for item in value]
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise bad_request(
                "'input' must be a string, a list of strings, or a list of content parts, not a mix.",
                f"input[{i}]",
                "invalid_type",
            )
        if part.get("type") not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise bad_request(
                "Only text content parts ({'type': 'text', 'text': ...}) can be moderated here; the "
                "classifier reads text, not images.",
                f"input[{i}]",
                "unsupported_value",
            )
        texts.append(part["text"])
    return ["\n".join(texts)]


def check_size(texts: list[str]) -> None:
    if len(texts) > MAX_INPUTS:
        raise bad_request(f"'input' has {len(texts)} texts; at most {MAX_INPUTS}.", "input", "invalid_value")
    total = sum(len(t) for t in texts)
    if total > MAX_CHARACTERS:
        raise bad_request(
            f"'input' has {total} characters; at most {MAX_CHARACTERS} a request (split the text into "
            "several requests).",
            "input",
            "invalid_value",
        )


def moderate(texts: list[str]) -> list[dict[str, Any]]:
    """One OpenAI moderation result per text (sklearn runs here: call it off the event loop). A text
    clearly in another language than English is read by its language's word list, or not scored where
    there is none: then no category applies to it. `tunery_language` names its language."""
    from tunery.safety.content import judge
    from tunery.safety.pii import find_personal_data

    results = []
    for text, verdict in zip(texts, judge(texts), strict=True):
        scored = set(SCORED) if verdict.score is not None else set()
        score = verdict.score or 0.0
        results.append(
            {
                "flagged": verdict.flagged,
                "categories": {c: verdict.flagged and c in scored for c in CATEGORIES},
                "category_scores": {c: score if c in scored else 0.0 for c in CATEGORIES},
                "category_applied_input_types": {c: ["text"] if c in scored else [] for c in CATEGORIES},
                "tunery_personal_data": [dataclasses.asdict(f) for f in find_personal_data(text)],
                "tunery_language": verdict.language,
                "tunery_words": list(verdict.words),
            }
        )
    return results


def classifier_info() -> dict[str, Any]:
    from tunery.safety.content import CLASSIFIER, OFFENSIVE_THRESHOLD, WORD_LIST_FILES, WORD_LISTS

    return {
        "name": CLASSIFIER,
        "threshold": OFFENSIVE_THRESHOLD,
        "scored_categories": list(SCORED),
        "word_lists": WORD_LISTS,
        "word_list_languages": sorted(WORD_LIST_FILES),
    }


@router.post("/moderations")
async def create_moderation(body: ModerationRequest, state: State, caller: Auth) -> dict[str, Any]:
    texts = input_texts(body.input)
    check_size(texts)
    # on the request workers' threads, with other projects' turns and the caps (workers.py)
    results: list[dict[str, Any]] = await state.workers.run(caller.project_id, lambda: moderate(texts))
    response = {
        "id": new_id("modr-"),
        "model": body.model,
        "results": results,
        "tunery_classifier": classifier_info(),
    }
    if state.audit is not None:  # the audit log (tunery/safety/audit.py), off the event loop
        audited = {
            "id": response["id"],
            "model": body.model,
            "input": texts,
            "flagged": [r["flagged"] for r in results],
            "scores": [r["category_scores"]["harassment"] for r in results],
            "personal_data": [sorted({f["category"] for f in r["tunery_personal_data"]}) for r in results],
        }
        await to_thread.run_sync(
            state.audit.append, caller.project_name, "moderation", audited, caller.key_id
        )
    return response


# --- the chat completions output filter ------------------------------------------------------------------


def content_filter_on(settings: Settings, body: ChatRequest) -> bool:
    """On for every request with the server setting; a request can turn it on, never off."""
    return settings.moderate_completions or (body.model_extra or {}).get("tunery_content_filter") is True


def withhold_flagged(result: dict[str, Any]) -> dict[str, Any]:
    """The worker's chat result with each flagged answer withheld (text None, `content_filter`); an answer
    in another language than English is judged by its word list, and never withheld where there is none."""
    from tunery.safety.content import judge

    choices = result["choices"]
    for choice, verdict in zip(choices, judge([c["text"] or "" for c in choices]), strict=True):
        if verdict.flagged:
            choice.update(text=None, finish_reason="content_filter", logprobs=None)
    return result


async def filtered_stream(replies: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """The worker's stream with deltas held back: at `done`, each answer that passes is sent as one delta,
    then `done` with flagged answers withheld."""
    try:
        async for message in replies:
            if message.get("event") == "delta":
                continue
            if message.get("event") == "done":
                result = await to_thread.run_sync(withhold_flagged, message["result"])
                for choice in result["choices"]:
                    if choice["text"]:
                        yield {"event": "delta", "index": choice["index"], "text": choice["text"]}
                yield {**message, "result": result}
                return
            yield message
    finally:
        await replies.aclose()  # type: ignore[attr-defined]
