"""Request bodies (pydantic, checked field by field: a bad value is a 400 naming its `param`) and the
objects the API returns, shaped as OpenAI's (`shared/reference/openai-fine-tuning-api.md`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema
from sqlalchemy import Row
from starlette.requests import Request

from tunery.server.errors import bad_request
from tunery.server.store import Checkpoint, Event, File, Job

Auto = Literal["auto"]


@dataclass(frozen=True)
class Bounds:
    """A number's range, as `Annotated` metadata: `Annotated[Auto | int, Bounds(ge=1, le=50)]`.

    Checked before pydantic's own validation, so a bad value gets one message naming the whole range
    ("must be 'auto' or an integer from 1 to 50, got 100"), where a union's errors name only the member
    tried first (Literal['auto']); and a JSON boolean, or a number in a string, is refused where a number
    is meant, never read as 1. An integer field takes integers only; a number field takes both."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        members = get_args(source) or (source,)
        auto, integer = Auto in members, float not in members

        kinds = int if integer else (int, float)

        def check(value: Any) -> Any:
            if auto and value == "auto":
                return value
            if isinstance(value, kinds) and not isinstance(value, bool) and self.within(value):
                return value
            raise ValueError(f"must be {self.expected(auto, integer)}, got {_shown(value)}")

        return core_schema.no_info_before_validator_function(check, handler(source))

    def within(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes no bound, yet fails none
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )

    def expected(self, auto: bool, integer: bool) -> str:
        """E.g. "'auto' or an integer from 1 to 50", "a number above 0 and at most 1"."""
        if self.ge is not None and self.le is not None:
            limits = f"from {_number(self.ge)} to {_number(self.le)}"
        else:
            parts = [f"of at least {_number(self.ge)}"] if self.ge is not None else []
            parts += [f"above {_number(self.gt)}"] if self.gt is not None else []
            parts += [f"at most {_number(self.le)}"] if self.le is not None else []
            limits = " and ".join(parts)
        return ("'auto' or " if auto else "") + ("an integer " if integer else "a number ") + limits

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        bounds = {"minimum": self.ge, "exclusiveMinimum": self.gt, "maximum": self.le}
        for member in json_schema.get("anyOf", [json_schema]):
            if member.get("type") in ("integer", "number"):
                member.update({k: v for k, v in bounds.items() if v is not None})
        return json_schema


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _shown(value: Any) -> str:
    """A value as JSON wrote it, shortened; a container by its kind (it may be large or deeply nested)."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "a list"
    shown = json.dumps(value, default=repr)
    return shown if len(shown) <= 40 else shown[:37] + "..."


# --- fine-tuning jobs ------------------------------------------------------------------------------------


class SupervisedHyperparameters(BaseModel):
    batch_size: Annotated[Auto | int, Bounds(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Annotated[Auto | float, Bounds(gt=0, le=100)] = "auto"
    n_epochs: Annotated[Auto | int, Bounds(ge=1, le=50)] = "auto"


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Annotated[Auto | float, Bounds(gt=0, le=2)] = "auto"


class ReinforcementHyperparameters(SupervisedHyperparameters):
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    compute_multiplier: Annotated[Auto | float, Bounds(gt=0.00001, le=10)] = "auto"
    eval_interval: Annotated[Auto | int, Bounds(ge=1)] = "auto"
    eval_samples: Annotated[Auto | int, Bounds(ge=1)] = "auto"


class SupervisedMethod(BaseModel):
    hyperparameters: SupervisedHyperparameters | None = None


class DpoMethod(BaseModel):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementMethod(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. response_format, which the client sends untyped
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^,\x00-\x1f]+$")]


class WandbIntegration(BaseModel):
    """OpenAI's Weights & Biases integration. The run reports through `--report-to wandb`, offline unless the
    service's environment has a WANDB_API_KEY (run/trackers.py)."""

    project: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")] | None = None
    entity: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")] | None = None
    tags: list[Tag] | None = Field(default=None, max_length=20)


class Integration(BaseModel):
    type: Literal["wandb"]
    wandb: WandbIntegration


class JobResources(BaseModel):
    """Tunery's extension of a job: what its training process asks of a node on a Ray cluster."""

    model_config = ConfigDict(extra="forbid")
    cpus: Annotated[float, Bounds(gt=0, le=1024)] | None = None
    gpus: Annotated[float, Bounds(ge=0, le=64)] | None = None
    memory_gb: Annotated[float, Bounds(gt=0, le=4096)] | None = None


def _metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 16:
        raise ValueError("at most 16 key-value pairs")
    if any(len(k) > 64 or not k for k in value):
        raise ValueError("keys must be 1 to 64 characters")
    if any("\x00" in text for pair in value.items() for text in pair):  # PostgreSQL cannot compare it
        raise ValueError("keys and values cannot contain the NUL character")
    return value


# OpenAI's `metadata` on jobs and stored chat completions: at most 16 pairs, keys 1-64, values up to 512
Metadata = Annotated[dict[str, Annotated[str, Field(max_length=512)]], AfterValidator(_metadata)]


class JobCreate(BaseModel):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: SupervisedHyperparameters | None = None  # deprecated: use method
    method: Method | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    seed: Annotated[int, Bounds(ge=0, le=2**31 - 1)] | None = None
    metadata: Metadata | None = None
    integrations: list[Integration] | None = Field(default=None, max_length=5)
    resources: JobResources | None = None  # Tunery's (the openai client: extra_body={"resources": {...}})


# --- chat completions ------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. strict
    name: FunctionName
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: FunctionName


class ToolChoiceFunction(BaseModel):
    type: Literal["function"]
    function: NamedFunction


MAX_STOP_CHARS = 1000
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the many parameters that do not apply here are ignored
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    temperature: Annotated[float, Bounds(ge=0, le=2)] | None = None
    top_p: Annotated[float, Bounds(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Bounds(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Bounds(ge=1)] | None = None
    n: Annotated[int, Bounds(ge=1, le=16)] | None = None
    # at most 4 stop sequences (OpenAI's), each at most MAX_STOP_CHARS (4 of 2 MB, in the audit log whole, had
    # written 46 MB a second)
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    seed: Annotated[int, Bounds(ge=-(2**63), le=2**63 - 1)] | None = None  # OpenAI's: a signed 64-bit int
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Bounds(ge=0, le=20)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[float, Bounds(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Bounds(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Bounds(ge=-100, le=100)]] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    store: bool | None = None  # keep the completion: GET /v1/chat/completions, POST /tunery/v1/ratings
    metadata: Metadata | None = None  # kept with a stored completion; lists filter on it


# --- graders ---------------------------------------------------------------------------------------------


class GraderValidate(BaseModel):
    grader: dict[str, Any]


class GraderRun(BaseModel):
    grader: dict[str, Any]
    model_sample: str
    item: dict[str, Any] | None = None
    reference_answer: Any = None  # the 2025-05 form, before `item`


# --- moderations -----------------------------------------------------------------------------------------


class ModerationRequest(BaseModel):
    # a string, strings (one result each), or content parts (one result for all); checked in the route
    input: str | list[str | dict[str, Any]]
    model: str = "omni-moderation-latest"  # any name; echoed back


# --- response objects ------------------------------------------------------------------------------------


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": row.expires_at,
        "status_details": None,
    }


def echoed_integrations(job_id: str, integrations: list[Any] | None) -> list[Any] | None:
    """The job's integrations as OpenAI returns them: the W&B one (the first; a job makes one run) with its
    run's id, which is the job's."""
    if not integrations:
        return integrations
    echoed, tracked = [], False
    for integration in integrations:
        if integration.get("type") == "wandb" and not tracked:
            integration = {**integration, "wandb": {**integration["wandb"], "run_id": job_id}}
            tracked = True
        echoed.append(integration)
    return echoed


def job_object(row: Job, organization_id: str) -> dict[str, Any]:
    method = row.method
    kind = method["type"]
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": row.created_at,
        "error": row.error,
        "fine_tuned_model": row.fine_tuned_model,
        "finished_at": row.finished_at,
        "hyperparameters": row.hyperparameters,
        "model": row.model,
        "organization_id": organization_id,
        "result_files": list(row.result_files or []),
        "seed": row.seed,
        "status": row.status,
        "trained_tokens": row.trained_tokens,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "estimated_finish": row.estimated_finish if row.status == "running" else None,
        "integrations": echoed_integrations(row.id, row.integrations),
        "metadata": row.job_metadata,
        "method": {"type": kind, kind: method.get(kind, {})},
        "user_provided_suffix": row.suffix,
        "usage_metrics": None,
        "shared_with_openai": False,
        "resources": row.resources,  # Tunery's: what the job asked of a node (None: the defaults)
    }


def event_object(row: Event | Row[Any]) -> dict[str, Any]:
    """From an Event, or a row of its columns (the events endpoint reads plain rows)."""
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data if row.data is not None else {},
    }


def checkpoint_object(row: Checkpoint) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": row.created_at,
        "fine_tuned_model_checkpoint": row.name,
        "fine_tuning_job_id": row.job_id,
        "step_number": row.step_number,
        "metrics": row.metrics,
    }


def model_object(name: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def metadata_filter(request: Request) -> tuple[bool, dict[str, str] | None]:
    """(filter on metadata?, required pairs or None for `metadata=null`) from `metadata[k]=v` params."""
    params = request.query_params
    pairs = {
        k[len("metadata[") : -1]: v
        for k, v in params.multi_items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    if params.get("metadata") == "null":
        if pairs:
            raise bad_request(
                "metadata=null asks for objects without metadata; it cannot go with metadata[key]=value.",
                "metadata",
                "invalid_value",
            )
        return True, None
    if len(pairs) > 16:  # what an object can hold; more is no filter, only work for the database
        raise bad_request("metadata filters at most 16 key-value pairs.", "metadata", "invalid_value")
    return bool(pairs), pairs


def cursor_page(data: list[dict[str, Any]], has_more: bool, with_ids: bool = False) -> dict[str, Any]:
    page: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if with_ids:
        page["first_id"] = data[0]["id"] if data else None
        page["last_id"] = data[-1]["id"] if data else None
    return page
