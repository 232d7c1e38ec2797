"""Files: upload (multipart, streamed, size-limited), list with pagination, retrieve, content, delete."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tests.server.conftest import Api, chat_lines, fake_settings, jsonl
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.routes.files import clean_filename
from tunery.server.store import File, Store


def test_upload_retrieve_content_delete(api: Api, settings) -> None:
    content = jsonl(chat_lines(10))
    r = api.post("/files", files={"file": ("train.jsonl", content)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200
    f = r.json()
    assert f["object"] == "file" and f["id"].startswith("file-") and f["bytes"] == len(content)
    assert (f["filename"], f["purpose"], f["status"], f["expires_at"]) == (
        "train.jsonl",
        "fine-tune",
        "processed",
        None,
    )
    assert api.get(f"/files/{f['id']}").json() == f
    assert api.get(f"/files/{f['id']}/content").content == content
    stored = settings.files_dir / f["id"]
    assert stored.read_bytes() == content and not list(settings.files_dir.glob(".tmp-*"))
    assert api.delete(f"/files/{f['id']}").json() == {"id": f["id"], "object": "file", "deleted": True}
    assert not stored.exists()
    for path in (f"/files/{f['id']}", f"/files/{f['id']}/content"):
        r = api.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    assert api.delete(f"/files/{f['id']}").status_code == 404


def test_uploaded_names_never_become_paths(api: Api, settings) -> None:
    file_id = api.upload(b'{"a": 1}\n', name="../../../../etc/evil.jsonl")
    f = api.get(f"/files/{file_id}").json()
    assert f["filename"] == "evil.jsonl"
    assert clean_filename("C:\\x\\..\\a\x00b\nc.jsonl") == "abc.jsonl" and clean_filename("../") == "upload"
    assert [p.name for p in settings.files_dir.iterdir()] == [file_id]
    assert not (settings.data_dir.parent / "etc").exists()


def test_list_pagination_order_and_purpose(api: Api) -> None:
    ids = [api.upload(b"{}\n", name=f"f{i}.jsonl") for i in range(5)]
    batch = api.upload(b"{}\n", name="b.jsonl", purpose="batch")
    page = api.get("/files", params={"limit": 2, "purpose": "fine-tune"}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    assert (page["first_id"], page["last_id"]) == (ids[4], ids[3])
    rest = api.get("/files", params={"after": page["last_id"], "purpose": "fine-tune"}).json()
    assert [f["id"] for f in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    ascending = api.get("/files", params={"order": "asc"}).json()["data"]
    assert [f["id"] for f in ascending] == [*ids, batch]
    assert api.get("/files", params={"after": "file-nope"}).status_code == 404


def test_upload_errors(api: Api) -> None:
    def post(**kw):
        return api.post("/files", **kw)

    r = post(files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "fun"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = post(files={"file": ("x.jsonl", b"{}\n")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    r = post(data={"purpose": "fine-tune"}, files={"other": ("x.jsonl", b"{}")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = post(files={"file": ("x.csv", b"a,b\n")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and "Must be .jsonl" in r.json()["error"]["message"]
    r = post(files={"file": ("x.jsonl", b"")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400
    r = api.post("/files", json={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = post(
        files={"file": ("x.jsonl", b"{}\n")},
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "10"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "expires_after.seconds"
    r = post(
        files={"file": ("x.jsonl", b"{}\n")},
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    )
    assert r.status_code == 200 and r.json()["expires_at"] >= r.json()["created_at"] + 3600
    # a body cut off inside the file part (no closing boundary) is not stored as if it were whole
    before = api.get("/files").json()["data"]
    cut = (
        b'--BB\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--BB\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n\r\n'
    ) + b'{"a": 1}\n' * 100
    multipart = api.headers | {"content-type": "multipart/form-data; boundary=BB"}
    r = api.client.post("/v1/files", content=cut, headers=multipart)
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "file" and api.get("/files").json()["data"] == before
    r = api.client.post("/v1/files", content=cut + b"\r\n--BB--\r\n", headers=multipart)
    assert r.status_code == 200 and r.json()["bytes"] == 900  # the same body, whole


def test_an_uploads_form_fields_are_bounded_together(api: Api) -> None:
    """3,000 form fields of 64 KB each (the bound was per field) had held 1.2 GB of the API process."""
    from tunery.server.routes.files import FIELD_BYTES, MAX_FIELDS

    def post(**fields: str):  # type: ignore[no-untyped-def]
        return api.post(
            "/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "fine-tune", **fields}
        )

    many = {f"f{i}": "x" for i in range(MAX_FIELDS)}  # with purpose, one too many
    r = post(**many)
    assert r.status_code == 400 and f"at most {MAX_FIELDS} form fields" in r.json()["error"]["message"]
    r = post(a="x" * (FIELD_BYTES // 2), b="y" * (FIELD_BYTES // 2))
    assert r.status_code == 400 and "form fields come to more than" in r.json()["error"]["message"]
    assert post(a="x" * 1000).status_code == 200  # (an unknown field is ignored, as before)


def test_an_expired_file_trains_nothing_and_is_removed(api: Api, settings) -> None:
    """An expired file was hidden from the API but stayed on disk for good, could not be deleted (404) and
    could still start a job. It now trains nothing, and the scheduler's sweep removes its row and bytes."""
    r = api.post(
        "/files",
        files={"file": ("train.jsonl", jsonl(chat_lines(10)))},
        data={
            "purpose": "fine-tune",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "3600",
        },
    )
    file_id = r.json()["id"]
    store = Store(settings.database_url)
    with store.session() as session:
        row = session.get(File, file_id)
        row.expires_at = row.created_at - 1  # as if the hour had passed
    store.close()
    r = api.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": file_id})
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_not_found"
    assert (settings.files_dir / file_id).exists()
    api.client.app.state.tunery.scheduler._remove_expired_files()  # type: ignore[attr-defined]
    assert not (settings.files_dir / file_id).exists()
    store = Store(settings.database_url)
    with store.session() as session:
        assert session.get(File, file_id) is None
    store.close()
    audit = [json.loads(x) for x in (settings.audit_dir / "acme.jsonl").read_text().splitlines()]
    assert [r["payload"]["file_id"] for r in audit if r["type"] == "file.expired"] == [file_id]


def test_size_limit_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    settings = fake_settings(tmp_path / "service", max_upload_bytes=1000)
    store = Store(settings.database_url)
    key = create_key(store, "acme")[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, key)
        r = api.post("/files", files={"file": ("big.jsonl", b"x" * 5000)}, data={"purpose": "fine-tune"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
        # a body without a length header is cut off while streaming
        body = b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--B\r\n'
        body += (
            b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
            + b"y" * 5000
            + b"\r\n--B--\r\n"
        )

        def chunks():
            for i in range(0, len(body), 512):
                yield body[i : i + 512]

        r = client.post(
            "/v1/files",
            headers={**api.headers, "content-type": "multipart/form-data; boundary=B"},
            content=chunks(),
        )
        assert r.status_code == 413
        assert api.get("/files").json()["data"] == []
        assert list(settings.files_dir.iterdir()) == []
        assert api.upload(b"z" * 900) is not None
