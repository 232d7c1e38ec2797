"""Service latency: 50 concurrent clients poll a job and its events while the job trains.

    python bench/service.py [--clients 50] [--seconds 30] [--interval 0.2] [--model tiny-random]

Starts `tunery serve` on 127.0.0.1 (a free port, a temporary data directory), creates a key, uploads a
small chat file and starts a supervised job long enough to keep training through the measurement.
Each client then loops for `--seconds`: GET /fine_tuning/jobs/{id}, then GET .../events?limit=20, with
`--interval` seconds between requests (what a polling dashboard does), over its own HTTP connection.
Prints p50 / p90 / p99 / max latency per endpoint and overall, the request rate, and whether the job
kept training meanwhile (steps done). Goal: p99 under 50 ms. Stops the server (and the job) at the end.
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
    args = parser.parse_args()

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


def _last_step(http: httpx.Client, job_id: str) -> int:
    events = http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 50}).json()["data"]
    return max((int(e["data"]["step"]) for e in events if e["type"] == "metrics"), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
