"""The feedback studio's tables (on store.py's `Base`, so `Store` creates them): labelling queues and their
items, labels, who was shown what, completions an application stored to be rated, ratings, and each
project's current model.

A queue's item holds a prompt and one answer (thumbs) or two (pairwise), with the model that wrote each;
labellers never see the models, and see the two answers in an order of their own (`shown_flipped`).
A label is one row per (item, labeller), written when it is given: nothing a labeller did waits in a
browser.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from tunery.server.store import Base


class FeedbackQueue(Base):
    __tablename__ = "feedback_queues"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)  # creation order (newest-first listing)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # labelling | comparison
    mode: Mapped[str] = mapped_column(String(16))  # pairwise | thumbs
    instructions: Mapped[str] = mapped_column(Text, default="")
    prompts_file: Mapped[str | None] = mapped_column(String(64), default=None)
    model_a: Mapped[str | None] = mapped_column(Text, default=None)  # a comparison's candidate
    model_b: Mapped[str | None] = mapped_column(Text, default=None)  # a comparison's baseline
    labels_per_item: Mapped[int] = mapped_column(Integer, default=1)
    max_tokens: Mapped[int] = mapped_column(Integer, default=256)
    temperature: Mapped[float] = mapped_column(Float, default=1.0)
    # the sampler's seed for item k is seed + k (added after the first release; null: unseeded)
    seed: Mapped[int | None] = mapped_column(BigInteger, default=None)
    status: Mapped[str] = mapped_column(String(16))  # generating | ready | failed
    error: Mapped[str | None] = mapped_column(Text, default=None)  # the last generation error
    job_id: Mapped[str | None] = mapped_column(String(64), default=None)  # a comparison made from a job
    created_by: Mapped[str] = mapped_column(String(64))  # key id
    created_at: Mapped[int] = mapped_column(BigInteger)
    # the secret that orders each labeller's two answers (`shown_flipped`); null for queues made before it
    order_key: Mapped[str | None] = mapped_column(String(64), default=None)


class FeedbackItem(Base):
    __tablename__ = "feedback_items"
    __table_args__ = (Index("ix_feedback_items_queue_position", "queue_id", "position"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    queue_id: Mapped[str] = mapped_column(ForeignKey("feedback_queues.id"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # labelled oldest first
    messages: Mapped[list[Any]] = mapped_column()  # the prompt: chat messages ending with the user's turn
    answer_1: Mapped[str | None] = mapped_column(Text, default=None)
    answer_2: Mapped[str | None] = mapped_column(Text, default=None)  # None in thumbs mode
    model_1: Mapped[str | None] = mapped_column(Text, default=None)  # who wrote answer_1 (never shown)
    model_2: Mapped[str | None] = mapped_column(Text, default=None)
    status: Mapped[str] = mapped_column(String(16))  # pending | ready | failed
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[int] = mapped_column(BigInteger)


class FeedbackLabel(Base):
    __tablename__ = "feedback_labels"
    __table_args__ = (UniqueConstraint("item_id", "labeller_key_id", name="uq_feedback_label_item_labeller"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("feedback_items.id"), index=True)
    queue_id: Mapped[str] = mapped_column(ForeignKey("feedback_queues.id"), index=True)
    labeller_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    choice: Mapped[str] = mapped_column(String(16))  # answer_1 | answer_2 | tie | both_bad | up | down
    shown_flipped: Mapped[bool] = mapped_column(Boolean, default=False)  # answer_1 was shown on the right
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)  # time spent on the item
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class FeedbackAssignment(Base):
    """An item shown to a labeller: while it is fresh and unlabelled it holds one of the item's label slots,
    so two labellers are not both sent the last one, and a reload shows the labeller the same item."""

    __tablename__ = "feedback_assignments"
    item_id: Mapped[str] = mapped_column(ForeignKey("feedback_items.id"), primary_key=True)
    labeller_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    queue_id: Mapped[str] = mapped_column(ForeignKey("feedback_queues.id"), index=True)
    served_at: Mapped[float] = mapped_column(Float)  # Unix seconds, fractional: labelling speed


class StoredCompletion(Base):
    """A chat completion requested with `store: true`, kept so that the application can rate it."""

    __tablename__ = "stored_completions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # chatcmpl-...
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(Text)
    messages: Mapped[list[Any]] = mapped_column()
    choices: Mapped[list[Any]] = mapped_column()  # the answers' texts, by choice index
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    # added after the first release (null in older rows): the order within a second (time.time_ns()), the
    # request's `metadata`, and the chat.completion object as the client got it (GET /v1/chat/completions)
    seq: Mapped[int | None] = mapped_column(BigInteger, default=None)
    completion_metadata: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSON(none_as_null=True), default=None
    )  # SQL NULL when there is none, so that `metadata=null` finds it
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (
        UniqueConstraint("completion_id", "choice_index", "key_id", "end_user", name="uq_rating_per_user"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    completion_id: Mapped[str] = mapped_column(ForeignKey("stored_completions.id"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    end_user: Mapped[str] = mapped_column(String(256), default="")  # the application's end user, if it says
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    rating: Mapped[str] = mapped_column(String(8))  # up | down
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class ProjectModel(Base):
    """The model a project serves as its current one, and how it got there (promotions, newest last)."""

    __tablename__ = "project_models"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    current_model: Mapped[str | None] = mapped_column(Text, default=None)
    history: Mapped[list[Any]] = mapped_column(default=list)
    updated_at: Mapped[int] = mapped_column(BigInteger)
