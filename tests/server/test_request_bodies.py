"""Requests without a body, with an empty one, or with one that is not JSON: every route answers 400 with
the parameters it needs (never "Missing required parameter: 'None'"), and an export, whose parameters all
have defaults, exports with them."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.server.conftest import Api

JSON = "Content-Type: application/json"


def test_every_route_names_what_a_request_without_a_body_misses(api: Api, client: TestClient) -> None:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    schemas = spec["components"]["schemas"]
    checked = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if "requestBody" not in operation or method != "post":
                continue
            url = re.sub(r"\{[^}]+\}", "x", path)
            content = operation["requestBody"]["content"]
            if "application/json" not in content:
                continue  # an upload (multipart): routes/files.py names its own missing fields
            schema = content["application/json"]["schema"]
            required = (
                schemas[schema["$ref"].rsplit("/", 1)[-1]].get("required", []) if "$ref" in schema else []
            )
            for body in (
                {},
                {"content": b"", "headers": {**api.headers, "content-type": "application/json"}},
            ):
                r = client.post(url, **({"headers": api.headers} | body))
                error = r.json().get("error") or {"message": ""}  # a body of defaults may succeed
                assert "'None'" not in error["message"], (url, error)
                if required:
                    assert r.status_code == 400, (url, r.text)
                    names = ", ".join(f"'{name}'" for name in required)
                    assert error["message"].startswith(
                        f"Missing required parameter{'s' * (len(required) > 1)}: {names} "
                    )
                    assert (error["param"], error["code"]) == (required[0], "missing_required_parameter")
            checked += 1
    assert checked >= 10


def test_an_empty_object_names_every_missing_parameter(api: Api) -> None:
    r = api.post("/fine_tuning/jobs", json={})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Missing required parameters: 'model', 'training_file'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "missing_required_parameter",
    }
    r = api.post("/fine_tuning/jobs")
    assert r.json()["error"]["message"] == (
        f"Missing required parameters: 'model', 'training_file' (send a JSON object with the header {JSON})."
    )
    r = api.client.post("/tunery/v1/feedback/queues/x/train", headers=api.headers, json={})
    assert r.json()["error"]["message"] == "Missing required parameter: 'method'."


def test_a_body_that_is_not_json_says_how_to_send_it(api: Api) -> None:
    # `curl -d '{...}'` without -H sends the JSON as a form: it must not read as a missing parameter
    r = api.client.post(
        "/v1/fine_tuning/jobs",
        content=b'{"model": "tiny-random", "training_file": "file-x"}',
        headers={**api.headers, "content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": f"The request body is not JSON: send a JSON object with the header {JSON}.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }


def test_the_studio_exports_without_a_body(api: Api) -> None:
    studio = api.client
    queue = studio.post("/tunery/v1/feedback/queues", headers=api.headers, json={"name": "q"}).json()
    items = [{"prompt": f"Question {i}?", "answers": [f"good {i}", f"bad {i}"]} for i in range(2)]
    r = studio.post(
        f"/tunery/v1/feedback/queues/{queue['id']}/items", headers=api.headers, json={"items": items}
    )
    assert r.status_code == 200, r.text
    export = f"/tunery/v1/feedback/queues/{queue['id']}/export"
    r = studio.post(export, headers=api.headers)
    assert r.status_code == 400 and "nothing to export yet" in r.json()["error"]["message"]  # no labels yet
    for i in range(2):
        item = studio.get(f"/tunery/v1/feedback/queues/{queue['id']}/next", headers=api.headers).json()[
            "item"
        ]
        side = "left" if item["left"] == f"good {i}" else "right"
        labelled = studio.post(
            f"/tunery/v1/feedback/items/{item['id']}/labels", headers=api.headers, json={"choice": side}
        )
        assert labelled.status_code == 200, labelled.text
    bare = studio.post(export, headers=api.headers)
    assert bare.status_code == 200, bare.text
    defaults = studio.post(export, headers=api.headers, json={}).json()
    assert bare.json()["format"] == defaults["format"] == "preference"
    assert bare.json()["counts"] == defaults["counts"] == {"items": 2, "exported_items": 2, "lines": 2}
    r = studio.post("/tunery/v1/ratings/export", headers=api.headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "nothing_to_export"  # no ratings: defaults
