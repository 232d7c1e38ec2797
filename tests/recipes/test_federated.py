"""Federated SFT on Flower (simulation, tiny-random): the strategies' arithmetic, one site equal to `train
sft`, a failing site left out, exact resume of a killed server, the sites' data kept at the sites."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.conftest import chat_lines, write_jsonl
from tunery.recipes import sft
from tunery.recipes.configs import FederatedConfig
from tunery.run.files import read_metrics, read_summary

REPO = Path(__file__).resolve().parents[2]
SHARED = {"model": "tiny-random", "lora_rank": 8, "seed": 0, "batch_size": 4, "lr": 2e-2, "micro_batch_tokens": 256,
          "select_best": False}  # fmt: skip


def federated(
    args: list[str], fault: str | None = None, returncode: int = 0
) -> subprocess.CompletedProcess[str]:
    """`tunery train federated ARGS` as a user runs it (a fresh process: Flower starts its Ray backend)."""
    env = {**os.environ, **({"TUNERY_FAULT": fault} if fault else {})}
    proc = subprocess.run(
        [sys.executable, "-m", "tunery", "train", "federated", *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


def flags(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "final" / "adapter_model.safetensors"))


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Path, Path, Path]:
    lines = chat_lines(40)
    a = write_jsonl(tmp_path / "clinic_a.jsonl", lines[:12])
    b = write_jsonl(tmp_path / "clinic_b.jsonl", lines[12:28])
    valid = write_jsonl(tmp_path / "valid.jsonl", lines[28:34])
    return a, b, valid


def test_fedavg_weights_each_site_by_its_examples(monkeypatch) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from tunery.federated.server import make_strategy

    def reply(value: float, examples: int) -> Message:
        arrays = ArrayRecord({"w": torch.full((2, 3), value), "b": torch.full((4,), -value)})
        metrics = MetricRecord({"num-examples": examples, "train_loss": 1.0})
        content = RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"name": "x"})})
        return Message(content=content, dst_node_id=1, message_type="train")

    for name in ("_run_id", "_node_id", "_task_id"):  # a message outside a running federation needs them
        monkeypatch.setattr(TaskIdentity, name, 1)
    strategy = make_strategy(FederatedConfig(clients=["a", "b"], out="x"), n_sites=2)
    merged, _ = strategy.aggregate_train(1, [reply(1.0, 3), reply(5.0, 1)])
    assert merged is not None
    arrays = merged.to_numpy_ndarrays()
    assert np.allclose(arrays[0], (1.0 * 3 + 5.0 * 1) / 4) and np.allclose(arrays[1], -2.0)


@pytest.mark.system
def test_one_site_for_one_round_is_train_sft(sites, tmp_path: Path) -> None:
    """The site's local steps are SFT's steps: same data order, schedule, LoRA start and optimizer."""
    a, _, valid = sites
    ref = tmp_path / "sft"
    # the simulation gives a site client_cpus (1) threads, so the reference gets one too: on some CPUs a GEMM's
    # sums are ordered by the number of threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft.run(None, {**SHARED, "data": str(a), "valid": str(valid), "out": str(ref), "max_steps": 3,
                       "safety_evals": "none"})  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    fed = tmp_path / "fed"
    federated(["--clients", str(a), "--valid", str(valid), "--rounds", "1", "--local-steps", "3",
               "--out", str(fed), "--safety-evals", "none", *flags(SHARED)])  # fmt: skip
    ref_state, fed_state = adapter(ref), adapter(fed)
    assert ref_state.keys() == fed_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], fed_state[key]), key
    site_steps = [r for r in read_metrics(fed / "sites" / "clinic_a") if "train_loss" in r]
    assert [r["train_loss"] for r in site_steps] == [
        r["train_loss"] for r in read_metrics(ref) if "train_loss" in r
    ]
    assert (
        read_summary(fed).final_metrics["full_valid_loss"]
        == read_summary(ref).final_metrics["full_valid_loss"]
    )


@pytest.mark.system
def test_the_run_contract_and_a_failing_site_left_out(sites, tmp_path: Path) -> None:
    a, b, valid = sites
    broken = write_jsonl(tmp_path / "broken.jsonl", chat_lines(3))  # too few examples: the site refuses
    leaky = chat_lines(12)  # personal data: the site's screening blocks it (screen_pii=block, the default)
    leaky[4]["messages"][1]["content"] = "Write to me at jane.doe@northwind-mail.com about my order"
    leaky_path = write_jsonl(tmp_path / "leaky.jsonl", leaky)
    out = tmp_path / "fed"
    proc = federated(["--clients", str(a), str(b), str(broken), str(leaky_path), "--valid", str(valid),
                      "--rounds", "2", "--local-steps", "2", "--out", str(out), *flags(SHARED)])  # fmt: skip
    assert "2 site(s) failed and are left out" in proc.stderr
    for path in (broken, leaky_path):  # a site's error names its data by the site, not by its path
        assert str(path) not in proc.stderr
    rounds = [r for r in read_metrics(out) if r.get("round")]
    assert [r["round"] for r in rounds if "sites" in r] == [1, 2]
    for record in rounds[:2]:
        assert sorted(s["site"] for s in record["sites"]) == ["clinic_a", "clinic_b"]
        failed = sorted(record["failed_sites"])
        assert len(failed) == 2 and "site broken" in failed[0] and "site leaky" in failed[1]
        # the server learns why (the category and the line), never the text
        assert "blocked by data screening" in failed[1] and "line 5" in failed[1]
        assert "jane.doe" not in json.dumps(record)
        assert record["valid_loss"] > 0 and record["bytes_sent"] == 4 * record["bytes_received"] / 2
        assert {s["examples"] for s in record["sites"]} == {12, 16}
        assert "dp_epsilon" not in record
    assert "jane.doe" not in proc.stderr + proc.stdout
    summary = read_summary(out)
    federation = summary.extra["federation"]
    assert federation["sites"] == ["clinic_a", "clinic_b", "broken", "leaky"]
    assert federation["differential_privacy"] is None and federation["epsilon_spent"] is None
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "## Federation" in card and "| differential privacy | off |" in card
    assert (out / "final" / "adapter_config.json").is_file()
    assert (out / "evals.json").is_file()  # the base-vs-tuned evaluations run on the global adapter
    config = (out / "config.yaml").read_text()
    assert "clinic_a" in config and str(a) not in json.dumps(summary.extra)
    for site in ("clinic_a", "clinic_b"):  # each site screened its own data
        assert (out / "sites" / site / "screening.json").is_file()


@pytest.mark.system
def test_differential_privacy_clips_counts_epsilon_and_stops_at_its_budget(sites, tmp_path: Path) -> None:
    from tunery.federated.server import epsilon_after

    a, b, valid = sites
    cfg = FederatedConfig(clients=[str(a), str(b)], dp_noise=2.0, dp_clip=1e-6, out="x")
    spent = [epsilon_after(cfg, 2, rounds) for rounds in (1, 2, 3)]
    budget = (spent[1] + spent[2]) / 2  # two rounds fit, a third would pass it
    out = tmp_path / "dp"
    args = ["--clients", str(a), str(b), "--valid", str(valid), "--rounds", "3", "--local-steps", "1",
            "--out", str(out), "--dp-noise", "2", "--dp-clip", "1e-6", "--dp-max-epsilon", str(budget),
            "--safety-evals", "none", *flags(SHARED)]  # fmt: skip
    too_small = [*args[: -len(flags(SHARED))], "--dp-max-epsilon", str(spent[0] / 2), *flags(SHARED)]
    refused = federated(too_small, returncode=2)  # not even one round fits: refused before training
    assert "more than dp_max_epsilon" in refused.stderr and not (out / "final").exists()
    federated(args, fault="after_step:1", returncode=-9)  # killed after round 1: its releases are resumed
    proc = federated(["--resume", str(out)])
    assert "would spend more than dp_max_epsilon" in proc.stderr
    rounds = [r for r in read_metrics(out) if "sites" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["dp_epsilon"] for r in rounds] == pytest.approx(spent[:2])
    federation = read_summary(out).extra["federation"]
    dp = federation["differential_privacy"]
    assert (dp["noise_multiplier"], dp["clipping_norm"], dp["delta"]) == (2.0, 1e-6, 1e-5)
    assert dp["planned_epsilon"] == pytest.approx(spent[2]) and federation["epsilon_spent"] == pytest.approx(
        spent[1]
    )
    # the updates were clipped to a norm of 1e-6: LoRA's B, zero at the start, stayed (almost) zero, where
    # two rounds at this learning rate move it to ~0.05 without privacy (measured: 0.050)
    state = adapter(out)
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k) < 1e-5
    # the noise's expected norm against the clip: dp_noise x sqrt(adapter parameters) / sites, far above 1
    n_parameters = sum(v.numel() for v in state.values())
    assert dp["adapter_parameters"] == n_parameters
    assert dp["noise_to_update"] == pytest.approx(2.0 * n_parameters**0.5 / 2)
    assert "the adapter will not learn" in proc.stderr
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "noise multiplier 2.0, clipping norm 1e-06" in card and "| privacy spent | epsilon " in card
    assert f"{dp['noise_to_update']:.3g}x the clipping norm" in card and "outweighs what the sites" in card


@pytest.mark.system
def test_a_killed_server_resumes_exactly_with_fedadam(sites, tmp_path: Path) -> None:
    a, b, valid = sites
    args = ["--clients", str(a), str(b), "--valid", str(valid), "--rounds", "3", "--local-steps", "1",
            "--strategy", "fedadam", "--safety-evals", "none", *flags(SHARED)]  # fmt: skip
    ref = tmp_path / "ref"
    federated([*args, "--out", str(ref)])
    killed = tmp_path / "killed"
    federated([*args, "--out", str(killed)], fault="after_step:2", returncode=-9)
    assert not (killed / "final").exists()
    federated(["--resume", str(killed)])
    ref_state, resumed = adapter(ref), adapter(killed)
    for key in ref_state:
        assert torch.equal(ref_state[key], resumed[key]), key
    valid_losses = [[r["valid_loss"] for r in read_metrics(run) if "round" in r] for run in (ref, killed)]
    assert valid_losses[0] == valid_losses[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deployment(
    sites, tmp_path: Path, rounds: int, output: int = subprocess.PIPE, server_flags: tuple[str, ...] = ()
) -> tuple[int, Path, list[subprocess.Popen[str]]]:
    """`tunery federated server` (with `server_flags`) and two `tunery federated client` processes on
    127.0.0.1: (the server's port, its run directory, [server, site a, site b]); the server's output to
    `output`, the sites' dropped."""
    a, b, valid = sites
    port, out = free_port(), tmp_path / "fed"
    tunery = [sys.executable, "-m", "tunery", "federated"]
    server = subprocess.Popen(
        [*tunery, "server", "--valid", str(valid), "--num-clients", "2", "--rounds", str(rounds),
         "--local-steps", "1", "--out", str(out), "--port", str(port), "--safety-evals", "none", *flags(SHARED),
         *server_flags],
        cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    site_procs = [
        subprocess.Popen(
            [
                *tunery,
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(data),
                "--out",
                str(tmp_path / f"site_{name}"),
                "--port",
                str(free_port()),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        for name, data in (("a", a), ("b", b))
    ]
    return port, out, [server, *site_procs]


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(60)


@pytest.mark.system
def test_deployment_a_server_and_two_site_processes(sites, tmp_path: Path) -> None:
    """The server and each site as processes of their own, as on separate machines: a site's data path
    is given to its own process only, and never reaches the server's output or run directory. With secure
    aggregation, whose masks the sites exchange through the server (plain rounds are the simulation's
    code, and a deployment's plain round runs in the next test)."""
    a, b, _ = sites
    port, out, procs = deployment(sites, tmp_path, rounds=2, server_flags=("--secure-aggregation",))
    server = procs[0]
    try:
        output, _ = server.communicate(timeout=400)
    finally:
        stop(procs)
    assert server.returncode == 0, output[-3000:]
    rounds = [r for r in read_metrics(out) if r.get("sites")]
    assert [r["round"] for r in rounds] == [1, 2]
    assert sorted(s["site"] for s in rounds[0]["sites"]) == ["clinic_a", "clinic_b"]
    assert {s["examples"] for s in rounds[0]["sites"]} == {12, 16}
    assert (out / "final" / "adapter_config.json").is_file()
    assert read_summary(out).extra["federation"]["secure_aggregation"] is True
    assert max(float(v.abs().max()) for k, v in adapter(out).items() if "lora_B" in k) > 1e-4  # it learned
    server_side = output + "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert str(a) not in server_side and str(b) not in server_side and "clinic_a.jsonl" not in server_side
    assert (tmp_path / "site_a" / "round-2" / "screening.json").is_file()  # each site screened its own data
    # no Flower process outlives the commands that started it (its apps run in sessions of their own)
    assert not flower_processes(port)


@pytest.mark.system
def test_a_stopped_deployment_leaves_no_flower_process(sites, tmp_path: Path) -> None:
    """Flower's daemons start their apps in sessions of their own; a stopped server or site takes them down."""
    port, out, procs = deployment(sites, tmp_path, rounds=50, output=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(r.get("round") == 1 for r in read_metrics(out)) and time.monotonic() < deadline:
            assert procs[0].poll() is None
            time.sleep(1)
        assert any(r.get("round") == 1 for r in read_metrics(out))  # mid-run: the apps are running
        assert [c for c in flower_processes(port) if "flwr-serverapp" in c]
    finally:
        stop(procs)
    deadline = time.monotonic() + 30
    while flower_processes(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not flower_processes(port)


def flower_processes(port: int) -> list[str]:
    """Every process whose command line has this federation's port (a SuperLink's apps, a site's daemons)."""
    return [
        c
        for c in map(cmdline, Path("/proc").glob("[0-9]*/cmdline"))
        if str(port) in c and ("flwr" in c or "flower" in c)
    ]


def cmdline(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.system
def test_secure_aggregation_gives_fedavgs_adapter_within_its_quantization(sites, tmp_path: Path) -> None:
    """SecAgg+ (the server unmasks only the sum) against plain FedAvg: the same round, up to the integer
    quantization of the masked values (a step of 1.2e-7 of a weighted value)."""
    a, b, valid = sites
    args = ["--clients", str(a), str(b), str(a), "--valid", str(valid), "--rounds", "1", "--local-steps", "2",
            "--safety-evals", "none", *flags(SHARED)]  # fmt: skip
    federated([*args, "--out", str(tmp_path / "plain")])
    federated([*args, "--out", str(tmp_path / "secure"), "--secure-aggregation"])
    plain, secure = adapter(tmp_path / "plain"), adapter(tmp_path / "secure")
    moved = max(float(v.abs().max()) for k, v in plain.items() if "lora_B" in k)
    assert moved > 1e-3  # the round changed the adapter, so equality below is not the start's
    assert max(float((plain[k] - secure[k]).abs().max()) for k in plain) < 1e-5
    record = [r for r in read_metrics(tmp_path / "secure") if r.get("round") == 1][0]
    assert sorted(s["site"] for s in record["sites"]) == ["clinic_a", "clinic_a-2", "clinic_b"]
    assert read_summary(tmp_path / "secure").extra["federation"]["secure_aggregation"] is True
    assert (
        "secure aggregation | on (SecAgg+)" in (tmp_path / "secure" / "final" / "MODEL_CARD.md").read_text()
    )


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.system
def test_a_site_lost_mid_round_is_left_out_and_the_run_goes_on(sites, tmp_path: Path) -> None:
    """A site's machine goes away while it trains (its command and every process under it killed): the
    SuperLink reports the node unavailable once its heartbeats stop (~1 min), the round is aggregated from
    the other site, and the next round runs without it."""
    port, out, procs = deployment(sites, tmp_path, rounds=2)
    server, _, site_b = procs
    try:
        deadline = time.monotonic() + 300
        while not any(
            "flwr-clientapp" in cmdline(Path(f"/proc/{p}/cmdline")) for p in descendants(site_b.pid)
        ):
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)
        for pid in [site_b.pid, *descendants(site_b.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        output, _ = server.communicate(timeout=600)
    finally:
        stop(procs)
    assert server.returncode == 0, output[-3000:]
    rounds = [r for r in read_metrics(out) if "sites" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [s["site"] for s in rounds[0]["sites"]] == ["clinic_a"]
    assert rounds[0]["failed_sites"] and "unavailable" in rounds[0]["failed_sites"][0].lower()
    assert [s["site"] for s in rounds[1]["sites"]] == ["clinic_a"]
    assert (out / "final" / "adapter_config.json").is_file()
