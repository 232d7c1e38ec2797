"""Service latency: 50 concurrent clients poll a job and its events while the job trains.

    python bench/service.py [--clients 50] [--seconds 30] [--interval 0.2] [--model tiny-random]
    python bench/service.py --cluster [--jobs 6]      # the service on a cluster (docs/cluster.md)

Starts `tunery serve` on 127.0.0.1 (a free port, a temporary data directory), creates a key, uploads a
small chat file and starts a supervised job long enough to keep training through the measurement.
Each client then loops for `--seconds`: GET /fine_tuning/jobs/{id}, then GET .../events?limit=20, with
`--interval` seconds between requests (what a polling dashboard does), over its own HTTP connection.
Prints p50 / p90 / p99 / max latency per endpoint and overall, the request rate, and whether the job
kept training meanwhile (steps done). Goal: p99 under 50 ms. Stops the server (and the job) at the end.

--cluster measures the service on a cluster, each comparison side by side in one run:
- jobs completed per minute on a Ray cluster on this machine (tests/server/raycluster.py: a head node and
  worker nodes of one CPU each) with one worker node, then with two: `--jobs` tiny-random jobs (one
  project each, so their file checks are not one after another) submitted at once to `tunery serve
  --executor ray`, timed from the first submission to the last success;
- API latency with one replica, then with two `tunery serve` on one PostgreSQL database (the test suite's
  throwaway server, tests/server/pg.py), the clients split evenly over the replicas, while a job trains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import chat_lines  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def client_loop(
    base: str,
    key: str,
    job_id: str,
    until: list[float],
    interval: float,
    out: dict[str, list[float]],
    lockstep: bool,
    rng: random.Random,
    ready: asyncio.Event,
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    paths = {"job": f"/fine_tuning/jobs/{job_id}", "events": f"/fine_tuning/jobs/{job_id}/events?limit=20"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        await http.get(paths["job"])  # connect first: connection set-up is not what is measured
        await ready.wait()
        if not lockstep:  # independent pollers start at different moments
            await asyncio.sleep(rng.uniform(0, interval))
        turn = 0
        while time.monotonic() < until[0]:
            name = "job" if turn % 2 == 0 else "events"
            t0 = time.perf_counter()
            r = await http.get(paths[name])
            out[name].append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                out["errors"].append(float(r.status_code))
            turn += 1
            await asyncio.sleep(interval if lockstep else interval * rng.uniform(0.5, 1.5))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.2, help="pause between one client's requests")
    parser.add_argument(
        "--lockstep",
        action="store_true",
        help="every client starts at once and waits exactly --interval (bursts of --clients requests); "
        "by default each client starts at a random moment and waits interval x U(0.5, 1.5)",
    )
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--examples", type=int, default=400, help="with --epochs: enough to train throughout")
    parser.add_argument(
        "--cluster", action="store_true", help="jobs per minute on Ray; p99 with two replicas"
    )
    parser.add_argument("--jobs", type=int, default=6, help="with --cluster: jobs to run per configuration")
    args = parser.parse_args()
    if args.cluster:
        return cluster(args)

    tmp = Path(tempfile.mkdtemp(prefix="tunery-bench-service-"))
    data_dir, port = tmp / "service", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tunery = [sys.executable, "-m", "tunery"]
    key = subprocess.run(
        [*tunery, "keys", "create", "--project", "bench", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    log = (tmp / "serve.log").open("wb")
    server = subprocess.Popen(
        [*tunery, "serve", "--port", str(port), "--data-dir", str(data_dir), "--stop-grace", "5"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            for _ in range(300):
                try:
                    http.get("/models")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            lines = "".join(json.dumps(line) + "\n" for line in chat_lines(args.examples)).encode()
            file_id = http.post(
                "/files", files={"file": ("train.jsonl", lines)}, data={"purpose": "fine-tune"}
            ).json()["id"]
            hp = {"n_epochs": args.epochs, "batch_size": 2}
            job = http.post(
                "/fine_tuning/jobs",
                json={"model": args.model, "training_file": file_id, "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}},
            ).json()  # fmt: skip
            deadline = time.monotonic() + 120
            while (status := http.get(f"/fine_tuning/jobs/{job['id']}").json()["status"]) != "running":
                assert status in ("validating_files", "queued") and time.monotonic() < deadline, status
                time.sleep(0.2)
            first_step = _last_step(http, job["id"])

            out: dict[str, list[float]] = {"job": [], "events": [], "errors": []}

            async def run_all() -> None:
                ready = asyncio.Event()
                until = [0.0]
                clients = [
                    client_loop(
                        base,
                        key,
                        job["id"],
                        until,
                        args.interval,
                        out,
                        args.lockstep,
                        random.Random(i),
                        ready,
                    )
                    for i in range(args.clients)
                ]
                tasks = [asyncio.ensure_future(c) for c in clients]
                await asyncio.sleep(1.0)  # every client connected
                until[0] = time.monotonic() + args.seconds
                ready.set()
                await asyncio.gather(*tasks)

            started = time.monotonic()
            asyncio.run(run_all())
            elapsed = time.monotonic() - started
            last = http.get(f"/fine_tuning/jobs/{job['id']}").json()
            last_step = _last_step(http, job["id"])
            http.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

    every = out["job"] + out["events"]
    pacing = "in lockstep" if args.lockstep else "x U(0.5, 1.5), random start"
    print(f"{args.clients} clients, {args.seconds:.0f} s, {args.interval} s between a client's requests ({pacing}); "
          f"{len(every)} requests ({len(every) / elapsed:.0f}/s), {len(out['errors'])} errors")  # fmt: skip
    for name, values in (("GET job", out["job"]), ("GET events", out["events"]), ("all", every)):
        print(
            f"  {name:<11} p50 {percentile(values, 0.5):6.1f} ms  p90 {percentile(values, 0.9):6.1f} ms  "
            f"p99 {percentile(values, 0.99):6.1f} ms  max {max(values):6.1f} ms  (mean {statistics.fmean(values):.1f})"
        )
    print(f"  the job trained meanwhile: step {first_step} -> {last_step} (status {last['status']})")
    print(f"  goal p99 < 50 ms: {'met' if percentile(every, 0.99) < 50 else 'NOT met'}")
    return 0


def start_serve(
    data_dir: Path, log_path: Path, *flags: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tunery", "serve", "--port", str(port), "--data-dir", str(data_dir),
             "--stop-grace", "5", *flags],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    with httpx.Client(base_url=base, timeout=10) as http:
        for _ in range(600):
            try:
                http.get("/models")
                return server, base
            except httpx.TransportError:
                assert server.poll() is None, log_path.read_text()
                time.sleep(0.1)
    raise SystemExit(f"tunery serve did not start: {log_path}")


def new_key(data_dir: Path, project: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-m", "tunery", "keys", "create", "--project", project, "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()  # fmt: skip


def jobs_per_minute(workers: int, n_jobs: int, tmp: Path, env: dict[str, str]) -> tuple[float, float]:
    """(jobs per minute, seconds) for `n_jobs` tiny jobs on a Ray cluster of `workers` one-CPU nodes."""
    from tests.server.raycluster import RayCluster

    root = tmp / f"ray-{workers}"
    root.mkdir()
    ray = RayCluster.start(root, workers=workers, env={"OMP_NUM_THREADS": "1"})
    data_dir = root / "service"
    keys = [new_key(data_dir, f"p{i}", env) for i in range(n_jobs)]
    server, base = start_serve(
        data_dir, root / "serve.log", "--executor", "ray", "--ray-address", ray.address, env=env
    )
    try:
        lines = "".join(json.dumps(line) + "\n" for line in chat_lines(40)).encode()
        hp = {"n_epochs": 3, "batch_size": 1}  # 120 steps: most of a job's time is training
        files = []
        for key in keys:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
                files.append(
                    http.post(
                        "/files", files={"file": ("t.jsonl", lines)}, data={"purpose": "fine-tune"}
                    ).json()["id"]
                )
        started = time.monotonic()
        jobs = []
        for key, file_id in zip(keys, files, strict=True):
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
                body = {
                    "model": "tiny-random",
                    "training_file": file_id,
                    "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
                }
                jobs.append((key, http.post("/fine_tuning/jobs", json=body).json()["id"]))
        pending = {job_id: key for key, job_id in jobs}
        while pending:
            for job_id, key in list(pending.items()):
                with httpx.Client(
                    base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
                ) as http:
                    status = http.get(f"/fine_tuning/jobs/{job_id}").json()["status"]
                if status in ("succeeded", "failed", "cancelled"):
                    assert status == "succeeded", (job_id, status)
                    del pending[job_id]
            assert time.monotonic() - started < 1800, pending
            time.sleep(0.5)
        seconds = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=60)
        ray.stop()
    return n_jobs / seconds * 60, seconds


def replica_latency(
    replicas: int, args: argparse.Namespace, tmp: Path, postgres: object, env: dict[str, str]
) -> list[float]:
    """Latencies (ms) of `args.clients` pollers split over `replicas` `tunery serve` on one database."""
    url = postgres.new_database()  # type: ignore[attr-defined]
    root = tmp / f"replicas-{replicas}"
    root.mkdir()
    data_dir = root / "service"
    env = {**env, "TUNERY_DATABASE_URL": url}
    key = new_key(data_dir, "bench", env)
    servers = [
        start_serve(data_dir, root / f"serve-{i}.log", "--database-url", url, env=env)
        for i in range(replicas)
    ]
    try:
        base = servers[0][1]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            lines = "".join(json.dumps(line) + "\n" for line in chat_lines(args.examples)).encode()
            file_id = http.post(
                "/files", files={"file": ("t.jsonl", lines)}, data={"purpose": "fine-tune"}
            ).json()["id"]
            hp = {"n_epochs": args.epochs, "batch_size": 2}
            job = http.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": file_id,
                            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}).json()  # fmt: skip
            while http.get(f"/fine_tuning/jobs/{job['id']}").json()["status"] != "running":
                time.sleep(0.2)
        out: dict[str, list[float]] = {"job": [], "events": [], "errors": []}

        async def run_all() -> None:
            ready, until = asyncio.Event(), [0.0]
            tasks = [
                asyncio.ensure_future(
                    client_loop(
                        servers[i % replicas][1],
                        key,
                        job["id"],
                        until,
                        args.interval,
                        out,
                        False,
                        random.Random(i),
                        ready,
                    )
                )
                for i in range(args.clients)
            ]
            await asyncio.sleep(1.0)
            until[0] = time.monotonic() + args.seconds
            ready.set()
            await asyncio.gather(*tasks)

        asyncio.run(run_all())
        assert not out["errors"], out["errors"][:5]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            http.post(f"/fine_tuning/jobs/{job['id']}/cancel")
        return out["job"] + out["events"]
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(timeout=60)


def cluster(args: argparse.Namespace) -> int:
    from tests.server.pg import PostgresCluster, unavailable

    tmp = Path(tempfile.mkdtemp(prefix="tunery-bench-cluster-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    rates = {}
    for workers in (1, 2):
        rate, seconds = jobs_per_minute(workers, args.jobs, tmp, env)
        rates[workers] = rate
        print(
            f"Ray, {workers} worker node(s) of 1 CPU: {args.jobs} jobs in {seconds:.0f} s = {rate:.2f} jobs/min",
            flush=True,
        )
    print(f"  2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    reason = unavailable()
    if reason is not None:
        print(f"replicas: skipped ({reason})")
        return 0
    postgres = PostgresCluster.start()
    try:
        for replicas in (1, 2):
            every = replica_latency(replicas, args, tmp, postgres, env)
            print(
                f"{replicas} replica(s) on PostgreSQL, {args.clients} clients, {args.seconds:.0f} s: {len(every)} requests, "
                f"p50 {percentile(every, 0.5):.1f} ms  p99 {percentile(every, 0.99):.1f} ms  max {max(every):.1f} ms",
                flush=True,
            )
    finally:
        postgres.stop()
    return 0


def _last_step(http: httpx.Client, job_id: str) -> int:
    events = http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 50}).json()["data"]
    return max((int(e["data"]["step"]) for e in events if e["type"] == "metrics"), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
