"""OpenAI's error object for every failure: `{"error": {"message", "type", "param", "code"}}`.

The official client retries 408, 409, 429 and 5xx, so errors that a retry cannot fix are 4xx, never
409 or 5xx. An unexpected exception is logged with its traceback and answered with a plain 500 error
object; the traceback never reaches the client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tunery.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def not_found(what: str, object_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {what}: '{object_id}'", param, f"{what.replace(' ', '_')}_not_found")


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model '{name}' does not exist or you do not have access to it.", "model", "model_not_found"
    )


def too_many_requests(message: str) -> APIError:
    """OpenAI's 429: the official client waits and retries it by itself."""
    return APIError(429, message, None, "rate_limit_exceeded", type="requests")


def error_response(error: APIError) -> JSONResponse:
    headers = {"x-should-retry": "false"} if error.status < 500 and error.status != 429 else None
    if error.status == 429:
        headers = {"retry-after": "1"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p is not None and p not in ("body", "query", "path", "header")]
    # pydantic names union members in the location ("int", "literal['auto']", "list[str]"): not part of
    # the field path
    members = ("literal[", "function-", "list[", "dict[", "union[", "constrained-")
    parts = [p for p in parts if not p.startswith(members) and p not in ("int", "float", "str")]
    return ".".join(parts) or None


def _most_useful(errors: Sequence[Any]) -> Any:
    """The error to report. A value that fits no member of a union gets an error from each, the first often
    the least useful ("Input should be a valid string" for five `stop` strings): of the first field's
    errors, prefer one about a limit the value broke to one that only names a type it is not."""
    param = _param(tuple(errors[0].get("loc", ())))
    for error in errors:
        kind = str(error.get("type", ""))
        here = _param(tuple(error.get("loc", ()))) or ""
        if (here == param or here.startswith(f"{param}.")) and not (
            kind.endswith("_type") or kind == "literal_error"
        ):
            return error
    return errors[0]


def validation_error(exc: RequestValidationError, body: type[BaseModel] | None = None) -> APIError:
    """OpenAI's error for a request that does not fit its route; `body` is the route's JSON body model, so a
    request without a body hears which parameters it needs (its error's location is the body itself, with
    no parameter name: formatted as it came, that read "Missing required parameter: 'None'")."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    first = _most_useful(errors)
    param = _param(tuple(first.get("loc", ())))
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            None,
            "invalid_json",
        )
    if param is None and (kind == "missing" or isinstance(first.get("input"), bytes)):
        return _no_json_body(body, sent=kind != "missing")
    if kind == "missing":  # every one missing, as an empty object `{}` misses them all
        missing = list(
            dict.fromkeys(_param(tuple(e.get("loc", ()))) for e in errors if e.get("type") == kind)
        )
        return _missing([str(name) for name in missing if name is not None])
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:  # the body itself, e.g. a JSON list where an object is meant
        return bad_request(f"Invalid request body: {message}", None, "invalid_value")
    return bad_request(f"Invalid value for '{param}': {message}", param, "invalid_value")


def _no_json_body(body: type[BaseModel] | None, sent: bool) -> APIError:
    """No body, or one that is not JSON (sent without `Content-Type: application/json`, as `curl -d` does):
    name the parameters the route needs."""
    required = [f.alias or name for name, f in (body.model_fields if body else {}).items() if f.is_required()]
    how = "send a JSON object with the header Content-Type: application/json"
    if sent:
        return bad_request(f"The request body is not JSON: {how}.", None, "invalid_json")
    if not required:
        return bad_request(
            f"This request needs a body: {how} ({{}} takes the defaults).", None, "missing_body"
        )
    return _missing(required, f" ({how})")


def _missing(names: list[str], hint: str = "") -> APIError:
    listed = ", ".join(f"'{name}'" for name in names)
    plural = "s" if len(names) > 1 else ""
    return bad_request(
        f"Missing required parameter{plural}: {listed}{hint}.", names[0], "missing_required_parameter"
    )


def _body_model(request: Request) -> type[BaseModel] | None:
    """The pydantic model of the matched route's JSON body, if it has one."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc, _body_model(request)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(
            APIError(500, "The server had an error while processing your request.", type="server_error")
        )
