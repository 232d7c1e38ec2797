"""The alpha grader endpoints: validate and run, in the API process for graders without a model."""

from __future__ import annotations

import subprocess
import sys

from tests.server.conftest import Api

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def test_validate(api: Api) -> None:
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": EXACT})
    assert r.status_code == 200 and r.json() == {"grader": EXACT}
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": {**EXACT, "operation": "contains"}})
    assert r.status_code == 400 and "operation" in r.json()["error"]["message"]
    multi = {"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "2 * a + b"}
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": multi})
    assert r.status_code == 400 and "calculate_output" in r.json()["error"]["message"]
    judge = {
        "type": "score_model",
        "name": "j",
        "input": [{"role": "user", "content": "x"}],
        "model": "o3-2025-04-16",
    }
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": judge})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grader.model"


def test_run(api: Api) -> None:
    r = api.post(
        "/fine_tuning/alpha/graders/run",
        json={"grader": EXACT, "model_sample": "Paris", "item": {"answer": "Paris"}},
    )
    assert r.status_code == 200
    body = r.json()
    assert (
        body["reward"] == 1.0
        and body["metadata"]["name"] == "exact"
        and body["metadata"]["type"] == "string_check"
    )
    assert body["metadata"]["errors"]["invalid_variable_error"] is False
    r = api.post("/fine_tuning/alpha/graders/run", json={"grader": EXACT, "model_sample": "Paris"})
    assert r.json()["reward"] == 0.0 and r.json()["metadata"]["errors"]["invalid_variable_error"] is True
    python = {
        "type": "python",
        "name": "len",
        "source": "def grade(sample, item):\n    return len(sample['output_text']) / 10\n",
    }
    r = api.post("/fine_tuning/alpha/graders/run", json={"grader": python, "model_sample": "abcde"})
    assert r.status_code == 200 and r.json()["reward"] == 0.5
    r = api.post("/fine_tuning/alpha/graders/run", json={"grader": EXACT})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_sample"


def test_graders_without_a_model_import_no_torch() -> None:
    code = (
        "import sys; from tunery.server import graders; "
        "g = {'type': 'multi', 'name': 'm', 'calculate_output': 'a + b', 'graders': {"
        "'a': {'type': 'string_check', 'name': 'a', 'input': '{{sample.output_text}}', 'reference': 'x', 'operation': 'eq'}, "
        "'b': {'type': 'text_similarity', 'name': 'b', 'input': '{{sample.output_text}}', 'reference': 'x y', 'evaluation_metric': 'rouge_l'}}}; "
        "graders.parse_here(g); r = graders.run_here(g, 'x', {}, 30.0); "
        "print(r['reward'], 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert float(out[0]) > 1.0 and out[1] == "False"
