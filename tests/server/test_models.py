"""Models: base models, a project's fine-tuned models and checkpoints; retrieve and delete."""

from __future__ import annotations

from tests.server.conftest import Api


def test_models_list_retrieve_delete(api: Api, other: Api, settings) -> None:
    base = api.get("/models").json()
    assert base["object"] == "list" and [m["id"] for m in base["data"]] == [
        "smollm2-135m-instruct",
        "tiny-random",
    ]
    assert all(m["owned_by"] == "system" and m["object"] == "model" for m in base["data"])
    job = api.wait_status(api.create_job(suffix="s")["id"], "succeeded")
    name = job["fine_tuned_model"]
    ckpts = [
        c["fine_tuned_model_checkpoint"]
        for c in api.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    ]
    assert ckpts[0] == name and all(
        c.startswith("ft:tiny-random:acme:s:") and ":ckpt-step-" in c for c in ckpts[1:]
    )
    listed = [m["id"] for m in api.get("/models").json()["data"]]
    assert listed == [
        "smollm2-135m-instruct",
        "tiny-random",
        name,
        *sorted(ckpts[1:], key=lambda c: int(c.rsplit("-", 1)[1])),
    ]
    model = api.get(f"/models/{name}").json()
    assert model == {"id": name, "object": "model", "created": job["finished_at"], "owned_by": "acme"}
    assert api.get(f"/models/{ckpts[1]}").json()["owned_by"] == "acme"
    assert api.get("/models/tiny-random").json()["owned_by"] == "system"

    assert [m["id"] for m in other.get("/models").json()["data"]] == ["smollm2-135m-instruct", "tiny-random"]
    for path in (f"/models/{name}", f"/models/{ckpts[1]}"):
        r = other.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert other.delete(path).status_code == 404
    r = other.post("/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert api.get("/models/ft:tiny-random:acme:s:nope").status_code == 404
    assert api.get("/models/gpt-4o").status_code == 404

    r = api.delete("/models/tiny-random")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_deletable"
    assert api.delete(f"/models/{name}").json() == {"id": name, "object": "model", "deleted": True}
    assert api.get(f"/models/{name}").status_code == 404 and api.delete(f"/models/{name}").status_code == 404
    assert not (settings.jobs_dir / job["id"] / "run" / "final").exists()
    assert api.get(f"/fine_tuning/jobs/{job['id']}").json()["fine_tuned_model"] == name
    assert api.delete(f"/models/{ckpts[1]}").json()["deleted"] is True
    remaining = [
        c["fine_tuned_model_checkpoint"]
        for c in api.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    ]
    assert remaining == ckpts[2:]
    assert [m["id"] for m in api.get("/models").json()["data"]][2:] == sorted(
        ckpts[2:], key=lambda c: int(c.rsplit("-", 1)[1])
    )
    r = api.post("/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
