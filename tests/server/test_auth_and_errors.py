"""API keys and projects, and OpenAI's error object for every failure."""

from __future__ import annotations

from tests.server.conftest import Api
from tunery.cli import main
from tunery.server.auth import hash_key, list_keys, revoke_key
from tunery.server.store import ApiKey, Store


def test_no_key_or_bad_key_is_401(client, api: Api) -> None:
    r = client.get("/v1/files")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = client.get("/v1/files", headers={"Authorization": "Bearer sk-tunery-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "sk-tunery-wrong" not in r.json()["error"]["message"]
    r = client.get("/v1/files", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert api.get("/files").status_code == 200


def test_keys_are_stored_hashed_and_can_be_revoked(settings, keys, api: Api) -> None:
    store = Store(settings.database_url)
    with store.session() as session:
        stored = [k.key_hash for k in session.query(ApiKey).all()]
    assert hash_key(keys["acme"]) in stored and keys["acme"] not in stored
    acme = [k for k in list_keys(store) if k[1] == "acme"][0]
    assert api.get("/files").status_code == 200
    assert revoke_key(store, acme[0])
    assert api.get("/files").status_code == 200  # a recently used key is cached for a few seconds
    api.client.app.state.tunery.keys.ttl = 0
    assert api.get("/files").status_code == 401


def test_keys_cli(settings, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TUNERY_DATA_DIR", str(settings.data_dir))
    assert main(["keys", "create", "--project", "initech"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-tunery-") and len(key) > 40
    assert main(["keys", "list"]) == 0
    assert "initech" in capsys.readouterr().out
    assert main(["keys", "create", "--project", "Bad Name"]) == 2


def test_another_projects_objects_do_not_exist(api: Api, other: Api) -> None:
    file_id = api.upload(b'{"messages": []}\n')
    job = api.create_job()
    for path in (
        f"/files/{file_id}",
        f"/files/{file_id}/content",
        f"/fine_tuning/jobs/{job['id']}",
        f"/fine_tuning/jobs/{job['id']}/events",
        f"/fine_tuning/jobs/{job['id']}/checkpoints",
    ):
        assert other.get(path).status_code == 404, path
    for path in (f"/fine_tuning/jobs/{job['id']}/cancel", f"/fine_tuning/jobs/{job['id']}/pause"):
        assert other.post(path).status_code == 404
    assert other.delete(f"/files/{file_id}").status_code == 404
    assert other.get("/files").json()["data"] == [] and other.get("/fine_tuning/jobs").json()["data"] == []
    r = other.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": file_id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"


def test_error_objects(client, api: Api) -> None:
    r = api.get("/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"
    r = api.client.put("/v1/files", headers=api.headers)
    assert r.status_code == 405 and "error" in r.json()
    r = api.client.post(
        "/v1/fine_tuning/jobs",
        headers={**api.headers, "content-type": "application/json"},
        content=b"{not json",
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = api.post("/fine_tuning/jobs", json={"training_file": "file-x"})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Missing required parameter: 'model'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "missing_required_parameter",
    }
    r = api.get("/fine_tuning/jobs", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    assert r.headers["x-should-retry"] == "false" and r.headers["x-request-id"].startswith("req_")
