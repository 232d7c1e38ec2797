"""The feedback studio's working parts (its HTTP side: routes/feedback.py lists the route files):

prompts        a prompts file (JSONL: `messages`, `prompt` or OpenAI's `input.messages`) -> chat prompts
generation     answers for a queue's items, one item at a time, through the inference worker, in the
               background (`QueueGenerators`: started with the app, resumed after a restart)
assignment     the next item for a labeller, and the order in which that labeller sees its two answers
objects        what the API returns: a labeller never sees which model wrote an answer
files          an export becomes a File (purpose fine-tune), which a training job can start from; the
               project's current model, the default start of one
completions    chat completions stored with `store: true`, which an application can then rate
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from anyio import to_thread
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.catalog import ResolvedModel, refuse_reward_model, resolve
from tunery.server.deps import AppState
from tunery.server.errors import APIError, bad_request
from tunery.server.feedback_store import (
    FeedbackAssignment,
    FeedbackItem,
    FeedbackLabel,
    FeedbackQueue,
    StoredCompletion,
)
from tunery.server.store import File, Project, new_id, now

log = logging.getLogger("tunery.server")

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_PROMPTS = 10_000  # items per queue
HOLD_SECONDS = 600.0  # an item shown to a labeller holds a label slot this long
# One next-item choice or label at a time per queue (this process serves every labeller): locks striped by
# queue, so a queue with a crowd of labellers never slows down another project's
_ASSIGNING = tuple(threading.Lock() for _ in range(64))


def _assigning(queue_id: str) -> threading.Lock:
    return _ASSIGNING[zlib.crc32(queue_id.encode()) % len(_ASSIGNING)]


# --- prompts ---------------------------------------------------------------------------------------------


def prompt_messages(value: Any) -> list[dict[str, str]]:
    """The prompt of one prompts-file line or one imported item, as chat messages ending with the turn the
    answers reply to. A chat training line works too: its trailing assistant turns are dropped. Raises
    ValueError with a message a user can act on."""
    raw: Any = None
    if isinstance(value, dict):
        if isinstance(value.get("messages"), list):
            raw = value["messages"]
        elif "prompt" in value:
            raw = value["prompt"]
        elif isinstance(value.get("input"), dict):
            raw = value["input"].get("messages")
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise ValueError(
            "expected an object with 'messages' (a list), 'prompt' (a string or messages) or 'input'"
        )
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {i} needs a 'role' among {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict) and "text" in part
            )
        if not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' must be text")
        role = "system" if message["role"] == "developer" else str(message["role"])
        messages.append({"role": role, "content": content})
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] == "system":
        raise ValueError("the prompt has no user turn to answer")
    return messages


MAX_PROMPT_LINE = 2**20  # bytes: a prompt longer than this is longer than any model's context anyway


def read_prompts(path: Path, file_id: str, limit: int) -> list[list[dict[str, str]]]:
    """The first `limit` prompts of a file, read a line at a time: the API process never holds more of the
    file than that (a 512 MB upload read whole once took gigabytes per request)."""
    prompts: list[list[dict[str, str]]] = []
    try:
        with path.open("rb") as fh:
            number = 0
            while len(prompts) < limit and (raw := fh.readline(MAX_PROMPT_LINE + 1)):
                number += 1
                where = f"File {file_id}, line {number}"
                if len(raw) > MAX_PROMPT_LINE:
                    raise bad_request(
                        f"{where}: longer than {MAX_PROMPT_LINE // 2**20} MB; a prompt must fit a model's "
                        "context",
                        "prompts_file",
                        "invalid_file",
                    )
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    prompts.append(prompt_messages(json.loads(line)))
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    raise bad_request(f"{where}: {exc}", "prompts_file", "invalid_file") from None
                except RecursionError:  # thousands of arrays or objects inside each other
                    raise bad_request(
                        f"{where}: nested too deeply; a prompt is an object with 'messages' (or 'prompt'), a "
                        "few levels deep",
                        "prompts_file",
                        "invalid_file",
                    ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise bad_request(f"File {file_id} cannot be read as UTF-8 text: {exc}", "prompts_file") from None
    if not prompts:
        raise bad_request(f"File {file_id} holds no prompts.", "prompts_file", "invalid_file")
    return prompts


def project_file(session: Session, caller: Caller, file_id: str, param: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.project_id != caller.project_id or row.expired:
        raise bad_request(f"invalid {param}: no such file '{file_id}'", param, "file_not_found")
    return row


# --- models ----------------------------------------------------------------------------------------------


def chat_model(session: Session, state: AppState, caller: Caller, name: str, param: str) -> ResolvedModel:
    """A model that can answer chats: it exists for the caller, and is not a reward model."""
    try:
        model = resolve(session, state.settings, caller, name)
    except APIError as exc:
        exc.param = param
        raise
    refuse_reward_model(session, model, param)
    return model


# --- generation ------------------------------------------------------------------------------------------


class QueueGenerators:
    """Background tasks that write the answers of queues' pending items, one item at a time per queue. An
    item whose model cannot answer (a 4xx) fails alone; a worker failure (5xx) stops the queue, which keeps
    its pending items (`POST .../generate` starts it again). Queues still generating when the server
    stopped resume when it starts. A project writes `generating_queues_per_project` queues at a time (the
    others wait their turn), and its requests meet the inference worker's per-project cap like chat's: a
    project with many queues cannot crowd out other projects' chat."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's, set by resume() at start-up
        self._turns: dict[str, asyncio.Semaphore] = {}  # project id -> its generating queues' places

    def start(self, queue_id: str) -> None:
        """Start generating `queue_id`'s pending items (from any thread: routes run in a thread pool)."""
        if self.loop is None:
            raise RuntimeError("QueueGenerators.resume() runs at start-up, before any queue starts")
        self.loop.call_soon_threadsafe(self._start, queue_id)

    def _start(self, queue_id: str) -> None:
        if queue_id in self.tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(queue_id), name=f"feedback-{queue_id}")
        self.tasks[queue_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(queue_id, None))

    async def resume(self) -> None:
        self.loop = asyncio.get_running_loop()

        def generating() -> list[str]:
            with self.state.store.session() as session:
                return list(
                    session.scalars(select(FeedbackQueue.id).where(FeedbackQueue.status == "generating"))
                )

        for queue_id in await to_thread.run_sync(generating):
            self._start(queue_id)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self, queue_id: str) -> None:
        project = await to_thread.run_sync(self._project_of, queue_id)
        if project is None:
            return
        turns = self._turns.setdefault(
            project, asyncio.Semaphore(max(1, self.state.settings.generating_queues_per_project))
        )
        async with turns:
            await self._generate(queue_id)

    def _project_of(self, queue_id: str) -> str | None:
        with self.state.store.session() as session:
            queue = session.get(FeedbackQueue, queue_id)
            return queue.project_id if queue is not None else None

    async def _generate(self, queue_id: str) -> None:
        try:
            while True:
                work = await to_thread.run_sync(self._next_pending, queue_id)
                if work is None:
                    return
                queue, item, caller = work
                try:
                    answers = await self._answers(queue, item, caller)
                except APIError as exc:
                    if exc.status >= 500:
                        await to_thread.run_sync(self._stopped, queue_id, exc.message)
                        return
                    await to_thread.run_sync(self._item_failed, item.id, exc.message)
                    continue
                await to_thread.run_sync(self._item_ready, item.id, answers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave the queue looking busy forever
            log.exception("feedback queue %s: generation failed", queue_id)
            await to_thread.run_sync(self._stopped, queue_id, f"generation failed: {exc}")

    def _next_pending(self, queue_id: str) -> tuple[FeedbackQueue, FeedbackItem, Caller] | None:
        with self.state.store.session() as session:
            queue = session.get(FeedbackQueue, queue_id)
            if queue is None or queue.status != "generating":
                return None
            item = session.scalar(
                select(FeedbackItem)
                .where(FeedbackItem.queue_id == queue_id, FeedbackItem.status == "pending")
                .order_by(FeedbackItem.position)
                .limit(1)
            )
            if item is None:
                failed = session.scalar(
                    select(func.count()).where(
                        FeedbackItem.queue_id == queue_id, FeedbackItem.status == "failed"
                    )
                )
                total = session.scalar(select(func.count()).where(FeedbackItem.queue_id == queue_id))
                queue.status = "failed" if total and failed == total else "ready"
                return None
            project = session.get(Project, queue.project_id)
            assert project is not None
            return queue, item, Caller(project.id, project.name, queue.created_by)

    async def _answers(
        self, queue: FeedbackQueue, item: FeedbackItem, caller: Caller
    ) -> list[tuple[str, str]]:
        """(model, answer) for answer_1 (and answer_2): two models, or two samples of one."""
        assert queue.model_a is not None
        if queue.mode == "thumbs":
            return [(queue.model_a, (await self._ask(queue, item, caller, queue.model_a, 1))[0])]
        if queue.model_b is None:
            first, second = await self._ask(queue, item, caller, queue.model_a, 2)
            if first.strip() == second.strip():
                raise APIError(400, "the model gave the same answer twice: nothing to compare")
            return [(queue.model_a, first), (queue.model_a, second)]
        first = (await self._ask(queue, item, caller, queue.model_a, 1))[0]
        second = (await self._ask(queue, item, caller, queue.model_b, 1))[0]
        return [(queue.model_a, first), (queue.model_b, second)]

    async def _ask(
        self, queue: FeedbackQueue, item: FeedbackItem, caller: Caller, name: str, n: int
    ) -> list[str]:
        def resolved() -> ResolvedModel:
            with self.state.store.session() as session:
                return chat_model(session, self.state, caller, name, "model")

        model = await to_thread.run_sync(resolved)
        request: dict[str, Any] = {
            "op": "chat",
            "model": model.local_model,
            "adapter": model.adapter,
            "base_adapter": model.base_adapter,
            "messages": item.messages,
            "n": n,
            "params": {
                "max_new_tokens": queue.max_tokens,
                "temperature": queue.temperature,
                "top_p": 1.0,
                "stop": [],
                "seed": None if queue.seed is None else queue.seed + item.position,
            },
            "logprobs": False,
            "stream": False,
        }
        while True:  # background work waits for a place rather than failing on the per-project cap
            try:
                result = await self.state.inference.call(request, caller.project_id)
                break
            except APIError as exc:
                if exc.status != 429:
                    raise
                await asyncio.sleep(1.0)
        texts = [str(c["text"]) for c in sorted(result["choices"], key=lambda c: int(c["index"]))]
        if self.state.audit is not None:
            record = {"queue_id": queue.id, "item_id": item.id, "model": name, "messages": item.messages}
            await to_thread.run_sync(
                self.state.audit.append,
                caller.project_name,
                "feedback.answers",
                record | {"answers": texts},
                caller.key_id,
            )
        return texts

    def _item_ready(self, item_id: str, answers: list[tuple[str, str]]) -> None:
        with self.state.store.session() as session:
            item = session.get(FeedbackItem, item_id)
            if item is None:
                return
            (item.model_1, item.answer_1), *rest = answers
            if rest:
                item.model_2, item.answer_2 = rest[0]
            item.status, item.error = "ready", None

    def _item_failed(self, item_id: str, message: str) -> None:
        with self.state.store.session() as session:
            item = session.get(FeedbackItem, item_id)
            if item is not None:
                item.status, item.error = "failed", message[:2000]
                queue = session.get(FeedbackQueue, item.queue_id)
                if queue is not None:
                    queue.error = f"item {item.position + 1}: {message}"[:2000]

    def _stopped(self, queue_id: str, message: str) -> None:
        with self.state.store.session() as session:
            queue = session.get(FeedbackQueue, queue_id)
            if queue is not None:
                queue.status = "failed"
                queue.error = (
                    f"{message} Generation stopped; the items without answers wait: "
                    f"POST /tunery/v1/feedback/queues/{queue_id}/generate starts it again."
                )[:2000]


# --- assignment -------------------------------------------------------------------------------------------


def shown_flipped(item_id: str, key_id: str, order_key: str | None) -> bool:
    """Whether this labeller sees answer_1 on the right: random per (item, labeller), and the same on every
    reload. A keyed hash with the queue's secret `order_key`: a labeller knows the item's id and their own
    key's, and a comparison's candidate is answer_1, so a plain hash of the two would unblind them. Queues
    made before the key keep the plain hash (changing it would misread labels of items already shown)."""
    message = f"{item_id}|{key_id}".encode()
    if order_key is None:
        return hashlib.sha256(message).digest()[0] & 1 == 1
    return hmac.new(order_key.encode(), message, hashlib.sha256).digest()[0] & 1 == 1


def next_item(session: Session, queue: FeedbackQueue, key_id: str) -> FeedbackItem | None:
    """The labeller's next item: the one they were shown and have not labelled (a reload shows it again),
    else the oldest ready item they have not labelled that still needs labels, preferring items whose
    missing labels are not already being given by others (items shown to someone in the last
    HOLD_SECONDS). None when nothing is left for them."""
    with _assigning(queue.id):
        labelled = session.execute(
            select(FeedbackLabel.item_id, FeedbackLabel.labeller_key_id).where(
                FeedbackLabel.queue_id == queue.id
            )
        ).all()
        done = {(item_id, key) for item_id, key in labelled}
        counts: dict[str, int] = {}
        for item_id, _ in labelled:
            counts[item_id] = counts.get(item_id, 0) + 1
        ready = session.execute(
            select(FeedbackItem.id)
            .where(FeedbackItem.queue_id == queue.id, FeedbackItem.status == "ready")
            .order_by(FeedbackItem.position)
        ).scalars()
        open_items = [
            i for i in ready if (i, key_id) not in done and counts.get(i, 0) < queue.labels_per_item
        ]
        if not open_items:
            return None
        shown = session.execute(
            select(
                FeedbackAssignment.item_id, FeedbackAssignment.labeller_key_id, FeedbackAssignment.served_at
            ).where(FeedbackAssignment.queue_id == queue.id)
        ).all()
        mine = {item_id for item_id, key, _ in shown if key == key_id}
        fresh = time.time() - HOLD_SECONDS
        held: dict[str, int] = {}
        for item_id, key, served_at in shown:
            if key != key_id and served_at > fresh and (item_id, key) not in done:
                held[item_id] = held.get(item_id, 0) + 1
        choice = next((i for i in open_items if i in mine), None)
        if choice is None:
            free = [i for i in open_items if counts.get(i, 0) + held.get(i, 0) < queue.labels_per_item]
            choice = (free or open_items)[0]
        if choice not in mine:
            session.add(
                FeedbackAssignment(
                    item_id=choice, labeller_key_id=key_id, queue_id=queue.id, served_at=time.time()
                )
            )
            session.flush()
        return session.get(FeedbackItem, choice)


def save_label(
    session: Session,
    item: FeedbackItem,
    queue: FeedbackQueue,
    key_id: str,
    choice: str,
    comment: str | None,
    seconds: float | None,
) -> FeedbackLabel:
    """Store (or change) this labeller's label of `item`; `choice` is what they pressed: left / right (mapped
    to answer_1 / answer_2 through the order they saw), tie, both_bad, up or down."""
    flipped = shown_flipped(item.id, key_id, queue.order_key)
    if choice in ("left", "right"):
        stored = "answer_1" if (choice == "left") != flipped else "answer_2"
    else:
        stored = choice
    with _assigning(item.queue_id):
        label = session.scalar(
            select(FeedbackLabel).where(
                FeedbackLabel.item_id == item.id, FeedbackLabel.labeller_key_id == key_id
            )
        )
        if seconds is None:
            served = session.get(FeedbackAssignment, (item.id, key_id))
            if served is not None and label is None:
                seconds = round(max(0.0, time.time() - served.served_at), 2)
        stamp = now()
        if label is None:
            label = FeedbackLabel(
                id=new_id("fl_"),
                item_id=item.id,
                queue_id=item.queue_id,
                labeller_key_id=key_id,
                choice=stored,
                shown_flipped=flipped,
                comment=comment,
                seconds=seconds,
                created_at=stamp,
                updated_at=stamp,
            )
            session.add(label)
        else:
            label.choice, label.shown_flipped, label.updated_at = stored, flipped, stamp
            label.comment = comment if comment is not None else label.comment
            if seconds is not None:
                label.seconds = (label.seconds or 0.0) + seconds
        session.flush()
    return label


# --- objects --------------------------------------------------------------------------------------------


def shown_choice(label: FeedbackLabel) -> str:
    """A stored choice as the labeller saw it (left / right)."""
    if label.choice not in ("answer_1", "answer_2"):
        return label.choice
    return "left" if (label.choice == "answer_1") != label.shown_flipped else "right"


def labeller_item(
    item: FeedbackItem, queue: FeedbackQueue, key_id: str, label: FeedbackLabel | None
) -> dict[str, Any]:
    """An item as a labeller sees it: the prompt and the answers in their order, never the models."""
    shown: dict[str, Any] = {
        "object": "tunery.feedback_item",
        "id": item.id,
        "queue_id": item.queue_id,
        "mode": queue.mode,
        "position": item.position,
        "messages": item.messages,
    }
    if queue.mode == "thumbs":
        shown["answer"] = item.answer_1
    else:
        flipped = shown_flipped(item.id, key_id, queue.order_key)
        shown["left"], shown["right"] = (
            (item.answer_2, item.answer_1) if flipped else (item.answer_1, item.answer_2)
        )
    shown["label"] = (
        {"choice": shown_choice(label), "comment": label.comment, "updated_at": label.updated_at}
        if label is not None
        else None
    )
    return shown


def admin_item(item: FeedbackItem, labels: list[FeedbackLabel], names: dict[str, str]) -> dict[str, Any]:
    return {
        "object": "tunery.feedback_item",
        "id": item.id,
        "queue_id": item.queue_id,
        "position": item.position,
        "status": item.status,
        "error": item.error,
        "messages": item.messages,
        "answer_1": item.answer_1,
        "answer_2": item.answer_2,
        "model_1": item.model_1,
        "model_2": item.model_2,
        "labels": [
            {
                "id": label.id,
                "labeller": names.get(label.labeller_key_id, label.labeller_key_id),
                "key_id": label.labeller_key_id,
                "choice": label.choice,
                "shown_flipped": label.shown_flipped,
                "comment": label.comment,
                "seconds": label.seconds,
                "created_at": label.created_at,
                "updated_at": label.updated_at,
            }
            for label in labels
        ],
    }


def queue_counts(session: Session, queue_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per queue: items by status, labels, and items with at least one label."""
    counts: dict[str, dict[str, int]] = {
        q: {"pending": 0, "ready": 0, "failed": 0, "labels": 0, "labelled": 0} for q in queue_ids
    }
    if not queue_ids:
        return counts
    for queue_id, status, n in session.execute(
        select(FeedbackItem.queue_id, FeedbackItem.status, func.count())
        .where(FeedbackItem.queue_id.in_(queue_ids))
        .group_by(FeedbackItem.queue_id, FeedbackItem.status)
    ):
        counts[queue_id][status] = n
    for queue_id, n, items in session.execute(
        select(FeedbackLabel.queue_id, func.count(), func.count(FeedbackLabel.item_id.distinct()))
        .where(FeedbackLabel.queue_id.in_(queue_ids))
        .group_by(FeedbackLabel.queue_id)
    ):
        counts[queue_id]["labels"], counts[queue_id]["labelled"] = n, items
    return counts


def queue_object(queue: FeedbackQueue, counts: dict[str, int], admin: bool) -> dict[str, Any]:
    total = counts["pending"] + counts["ready"] + counts["failed"]
    shown: dict[str, Any] = {
        "object": "tunery.feedback_queue",
        "id": queue.id,
        "name": queue.name,
        "kind": queue.kind,
        "mode": queue.mode,
        "instructions": queue.instructions,
        "status": queue.status,
        "labels_per_item": queue.labels_per_item,
        "created_at": queue.created_at,
        "items": {
            "total": total,
            "ready": counts["ready"],
            "pending": counts["pending"],
            "failed": counts["failed"],
        },
        "labels": counts["labels"],
        "labels_needed": counts["ready"] * queue.labels_per_item,
        "items_labelled": counts["labelled"],
    }
    if admin:  # which models wrote the answers: admins only, labellers label blind
        shown |= {
            "model_a": queue.model_a,
            "model_b": queue.model_b,
            "prompts_file": queue.prompts_file,
            "max_tokens": queue.max_tokens,
            "temperature": queue.temperature,
            "seed": queue.seed,
            "error": queue.error,
            "job_id": queue.job_id,
        }
    return shown


# --- files --------------------------------------------------------------------------------------------------


def write_file(
    session: Session, state: AppState, project_id: str, filename: str, lines: list[dict[str, Any]]
) -> File:
    """A new File (purpose fine-tune) holding `lines` as JSONL, written to a temp name and renamed."""
    content = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    file_id = new_id("file-")
    files_dir = state.settings.files_dir
    files_dir.mkdir(parents=True, exist_ok=True)
    tmp = files_dir / f".tmp-{file_id}"
    tmp.write_bytes(content)
    os.replace(tmp, files_dir / file_id)
    row = File(
        id=file_id,
        project_id=project_id,
        seq=int(session.scalar(select(func.max(File.seq))) or 0) + 1,
        filename=filename,
        purpose="fine-tune",
        bytes=len(content),
        created_at=now(),
    )
    session.add(row)
    return row


# --- stored completions ------------------------------------------------------------------------------------


async def store_completion(
    state: AppState,
    caller: Caller,
    messages: list[dict[str, Any]],
    texts: list[str],
    completion: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> None:
    """Keep a chat completion requested with `store: true`: the request's messages, each choice's text as
    the model wrote it (what ratings train on) and the chat.completion object answered, so the application
    can list it (routes/stored_completions.py) and rate it."""

    def save() -> None:
        with state.store.session() as session:
            session.add(
                StoredCompletion(
                    id=completion["id"],
                    project_id=caller.project_id,
                    key_id=caller.key_id,
                    model=completion["model"],
                    messages=messages,
                    choices=texts,
                    created_at=completion["created"],
                    seq=time.time_ns(),
                    completion_metadata=metadata,
                    response=completion,
                )
            )

    await to_thread.run_sync(save)
