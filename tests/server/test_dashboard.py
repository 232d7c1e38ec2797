"""The web app's endpoints under /tunery/v1 (routes/dashboard.py) and its static files, in process on the
fake CLI: the caller's project, jobs with their progress, the metrics cursor, events by type, the run
summary and energy, the model card, project isolation, and how the pages are served."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from tests.server.conftest import TERMINAL, Api
from tunery.server.jobs import add_event
from tunery.server.routes.dashboard import WEB_DIR
from tunery.server.store import Store

ROOT = Path(__file__).resolve().parents[2]
TWO_EPOCHS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}}


def tunery(api: Api, path: str, **kw):  # type: ignore[no-untyped-def]
    return api.client.get("/tunery/v1" + path, headers=api.headers, **kw)


def finished_job(api: Api) -> dict:
    job = api.create_job(method=TWO_EPOCHS, suffix="dash")  # 10 examples, batch 5, 2 epochs: 4 steps
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded", done
    return done


def test_me_names_the_keys_project(client, api: Api, other: Api) -> None:
    me = tunery(api, "/me").json()
    assert me["object"] == "tunery.caller" and me["project"] == "acme"
    assert me["key_id"].startswith("key_") and me["project_id"].startswith("proj_")
    assert tunery(other, "/me").json()["project"] == "globex"
    r = client.get("/tunery/v1/me")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = client.get("/tunery/v1/me", headers={"Authorization": "Bearer sk-tunery-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_jobs_carry_their_progress(api: Api) -> None:
    done = finished_job(api)
    page = tunery(api, "/fine_tuning/jobs").json()
    [listed] = page["data"]
    assert page["has_more"] is False and listed["id"] == done["id"]
    assert listed["progress"]["step"] == 4 and listed["progress"]["total_steps"] == 4
    assert listed["progress"]["started_at"] >= done["created_at"]
    # the OpenAI job object, unchanged, plus `progress`
    assert {k: v for k, v in listed.items() if k != "progress"} == done
    one = tunery(api, f"/fine_tuning/jobs/{done['id']}").json()
    assert one == listed

    second = api.create_job(method=TWO_EPOCHS)
    newest = tunery(api, "/fine_tuning/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in newest["data"]] == [second["id"]] and newest["has_more"] is True
    older = tunery(api, "/fine_tuning/jobs", params={"limit": 1, "after": second["id"]}).json()
    assert [j["id"] for j in older["data"]] == [done["id"]] and older["has_more"] is False


def test_metrics_come_in_order_and_only_once(api: Api, settings) -> None:
    done = finished_job(api)
    path = f"/fine_tuning/jobs/{done['id']}/metrics"
    first = tunery(api, path).json()
    assert [r["step"] for r in first["data"]] == [1, 2, 3, 4]
    assert first["data"][0] == {
        "step": 1,
        "total_steps": 4,
        "train_loss": 2.0,
        "train_mean_token_accuracy": 0.1,
    }
    assert (first["status"], first["last_step"], first["total_steps"], first["has_more"]) == (
        "succeeded",
        4,
        4,
        False,
    )
    again = tunery(api, path, params={"after": first["cursor"]}).json()
    assert again["data"] == [] and again["cursor"] == first["cursor"]

    # A record logged for a step the client already has (the full-validation record after the last
    # training record) still arrives; values a chart cannot plot are left out.
    store = Store(settings.database_url)
    with store.session() as session:
        add_event(
            session,
            done["id"],
            "Step 4/4: full validation loss=0.9",
            type="metrics",
            data={"step": 4, "full_valid_loss": 0.9, "best": True, "note": "x", "nested": {"a": 1}},
        )
        add_event(session, done["id"], "a message, not a metric")
    store.close()
    late = tunery(api, path, params={"after": first["cursor"]}).json()
    assert late["data"] == [{"step": 4, "full_valid_loss": 0.9}] and late["cursor"] > first["cursor"]

    pages, cursor = [], 0
    while True:
        page = tunery(api, path, params={"after": cursor, "limit": 2}).json()
        pages.append([r["step"] for r in page["data"]])
        cursor = page["cursor"]
        if not page["has_more"]:
            break
    assert pages == [[1, 2], [3, 4], [4]]
    assert tunery(api, path, params={"after": -1}).status_code == 400


def test_events_by_type(api: Api) -> None:
    done = finished_job(api)
    path = f"/fine_tuning/jobs/{done['id']}/events"
    messages = tunery(api, path, params={"type": "message"}).json()["data"]
    assert messages and all(e["type"] == "message" for e in messages)
    assert messages[0]["message"] == "The job has successfully completed"  # newest first
    metrics = tunery(api, path, params={"type": "metrics"}).json()["data"]
    assert [e["data"]["step"] for e in metrics] == [4, 3, 2, 1]
    everything = tunery(api, path, params={"limit": 1000}).json()["data"]
    assert len(everything) == len(messages) + len(metrics)
    assert everything == api.events(done["id"])  # the same objects as /v1's, in the same order
    r = tunery(api, path, params={"type": "gossip"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "type"


def test_summary_energy_and_model_card(api: Api, settings) -> None:
    done = finished_job(api)
    run = settings.jobs_dir / done["id"] / "run"
    summary = json.loads((run / "summary.json").read_text())
    energy = {"kwh": 0.0021, "kg_co2e": 0.001, "method": "estimated", "country": "WORLD"}
    (run / "summary.json").write_text(json.dumps(summary | {"energy": energy, "run_dir": str(run), "pid": 1}))
    answer = tunery(api, f"/fine_tuning/jobs/{done['id']}/summary").json()
    assert answer["final"] is True and answer["energy"] == energy
    assert answer["summary"]["trained_tokens"] == 4000
    assert "run_dir" not in answer["summary"] and "pid" not in answer["summary"]  # no server paths

    # before the end, the energy measured up to the newest checkpoint (step 10, not step 9: by number)
    (run / "summary.json").unlink()
    for step, kwh in ((9, 0.5), (10, 0.7)):
        ckpt = run / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step, "counters": {"energy": {"kwh": kwh}}}))
    answer = tunery(api, f"/fine_tuning/jobs/{done['id']}/summary").json()
    assert answer == {"object": "tunery.run_summary", "final": False, "summary": None, "energy": {"kwh": 0.7}}

    card = tunery(api, f"/fine_tuning/jobs/{done['id']}/model_card")
    assert card.status_code == 404 and card.json()["error"]["code"] == "model_card_not_found"
    footer = f"Sources: summary.json in `{run}`; regenerate with `tunery card {run.resolve()}`."
    (run / "final" / "MODEL_CARD.md").write_text(
        f"# Model card: dash\n\n| a | b |\n|---|---|\n| 1 | 2 |\n{footer}\n"
    )
    card = tunery(api, f"/fine_tuning/jobs/{done['id']}/model_card")
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown")
    assert card.text.startswith("# Model card: dash")
    # the card names its run directory; the service shows the job's, not where the server keeps it
    assert str(settings.jobs_dir) not in card.text and str(settings.jobs_dir.resolve()) not in card.text
    assert f"`jobs/{done['id']}/run`" in card.text and f"tunery card jobs/{done['id']}/run`" in card.text


def test_another_projects_job_does_not_exist(api: Api, other: Api) -> None:
    done = finished_job(api)
    for suffix in ("", "/metrics", "/events", "/summary", "/model_card"):
        r = tunery(other, f"/fine_tuning/jobs/{done['id']}{suffix}")
        assert r.status_code == 404, suffix
        assert r.json()["error"]["code"] == "fine-tuning_job_not_found", suffix
    assert tunery(other, "/fine_tuning/jobs").json()["data"] == []
    assert tunery(other, "/fine_tuning/jobs", params={"after": done["id"]}).status_code == 404
    assert tunery(api, "/fine_tuning/jobs/ftjob-nope/metrics").status_code == 404


def test_the_web_app_is_served_without_shadowing_the_api(client, api: Api) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/web/js/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.headers["cache-control"] == "no-cache" and script.headers["etag"]
    cached = client.get("/web/js/app.js", headers={"if-none-match": script.headers["etag"]})
    assert cached.status_code == 304
    assert client.get("/web/vendor/uPlot.iife.min.js").status_code == 200
    # the API's own answers are unchanged: OpenAI's 404 for unknown paths, and the schema (no /docs:
    # its page loaded scripts from a CDN)
    r = api.get("/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"
    r = client.get("/web/nothing.js")
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/web/../pyproject.toml").status_code == 404
    assert client.get("/docs").status_code == 404
    assert "/web" not in client.get("/v1/openapi.json").json()["paths"]


def test_every_asset_is_local_and_packaged() -> None:
    """It works without internet: nothing points outside the server, and every file ships in the wheel."""
    index = (WEB_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"]+)"', index):
        assert not re.match(r"^[a-z]+:|^//", ref), ref
        assert (WEB_DIR.parent / ref).is_file(), ref
    for path in WEB_DIR.rglob("*.js"):
        for spec in re.findall(r'(?:^|\s)(?:import|from)\s*\(?\s*"([^"]+)"', path.read_text(), re.M):
            assert spec.startswith("./") or spec.startswith("../"), (path.name, spec)
            assert (path.parent / spec).resolve().is_file(), (path.name, spec)
        for asset in re.findall(r'"(web/[^"]+)"', path.read_text()):  # loaded on demand (the charts)
            assert (WEB_DIR.parent / asset).is_file(), (path.name, asset)
    for path in WEB_DIR.rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?(?:[a-z]+:|//)", path.read_text()), path.name
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["tunery.server"]
    for path in WEB_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(WEB_DIR.parent).as_posix()
            assert any(
                fnmatch(relative, p) and "/" not in relative[len(p.rsplit("/", 1)[0]) + 1 :] for p in shipped
            ), relative
