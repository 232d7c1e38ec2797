"""Federated SFT on the bundled model: what a federation costs and what it gives.

    python bench/federated.py                  # both parts, ~15 min on 2 cores
    python bench/federated.py --part speed     # rounds per minute and bytes per round, ~5 min
    python bench/federated.py --part quality   # held-out loss: federated vs each site alone vs pooled
    python bench/federated.py --part privacy   # what differential privacy and secure aggregation cost

The sites are examples/federated/ (the support data split by topic into a workshop, an order desk and a
front desk: non-IID); held-out data is examples/federated/valid.jsonl, which covers every topic.

speed: the same federation (3 sites, ROUNDS rounds of LOCAL steps, batch BATCH) run two ways, each a fresh
process tree timed by the wall clock: simulated (`tunery train federated`, the sites as Flower's virtual
nodes on Ray) and deployed (`tunery federated server` and three `tunery federated client` processes on
127.0.0.1). Rounds per minute counts the rounds after the first (the first includes starting the sites);
bytes per round are the adapters sent and received (metrics.jsonl), against the whole model's weights. The
deployed sites share this machine's cores: each gets cores / sites threads (at least 1), as Ray gives each
simulated site `client_cpus` (1).

quality: final held-out loss (the last weights, `select_best` off) of
- federated FedAvg: 3 sites x ROUNDS x LOCAL steps of BATCH conversations;
- each site alone: `tunery train sft` on its own file for the same ROUNDS x LOCAL x 3 steps (the compute
  the federation spent, all on one site's data);
- pooled: `tunery train sft` on all three files together, ROUNDS x LOCAL x 3 steps: what the sites would
  get if they could pool their data.
- federated FedAvg for 3 x ROUNDS rounds: as many sequential steps as each site alone took (3x the compute).
All with the same LoRA, batch size, learning rate and seed; evaluations off.

privacy: the simulated federation of `quality` (ROUNDS rounds) as plain FedAvg, with differential privacy
(clipping at the median of the plain run's round-1 update norms, noise multipliers --dp-noise; epsilon at
delta 1e-5 from the run's accountant) and with secure aggregation: held-out loss and wall time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("workshop", "orders", "frontdesk")
DATA = REPO / "examples" / "federated"


def common(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--batch-size", str(args.batch), "--lr", str(args.lr), "--seed", "0",
            "--safety-evals", "none", "--no-select-best", "--valid", str(DATA / "valid.jsonl")]  # fmt: skip


def run(cmd: list[str]) -> float:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def precision(out: Path) -> str:
    """The precision the run trained in (auto: bf16 where the CPU has fast bf16, else fp32)."""
    for line in (out / "config.yaml").read_text().splitlines():
        if line.startswith("precision:"):
            return line.split(":", 1)[1].strip()
    return "?"


def rounds_of(out: Path) -> list[dict]:
    return [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"sites"' in line
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_bytes(name: str) -> tuple[int, int]:
    """The whole model's weights (bf16 as trained, unique tensors) and one LoRA adapter's (fp32, r16)."""
    from tunery.models.load import load_model
    from tunery.models.lora import apply_lora

    model, _ = load_model(name)
    whole = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * 2
    model = apply_lora(model, 16, 32, 0.0, "all-linear")
    return whole, sum(p.numel() for p in model.parameters() if p.requires_grad) * 4


def speed(args: argparse.Namespace, work: Path) -> list[str]:
    fed = ["--rounds", str(args.rounds), "--local-steps", str(args.local), *common(args)]
    sim_out = work / "sim"
    sim_wall = run([str(BIN / "tunery"), "train", "federated", "--clients",
                    *[str(DATA / f"{s}.jsonl") for s in SITES], *fed, "--out", str(sim_out)])  # fmt: skip

    dep_out, port = work / "dep", free_port()
    # the sites share this machine: one thread each, as the simulation's Ray gives each simulated site one
    # core (3 sites x 2 threads on 2 cores would oversubscribe them; each site of a real deployment has
    # its own machine)
    site_env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(SITES)))}
    started = time.monotonic()
    server = subprocess.Popen(
        [str(BIN / "tunery"), "federated", "server", "--num-clients", str(len(SITES)), *fed, "--out", str(dep_out),
         "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    sites = [
        subprocess.Popen(
            [
                str(BIN / "tunery"),
                "federated",
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(DATA / f"{s}.jsonl"),
                "--out",
                str(work / f"site-{s}"),
                "--port",
                str(free_port()),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=site_env,
        )  # fmt: skip
        for s in SITES
    ]
    output, _ = server.communicate()
    dep_wall = time.monotonic() - started
    for proc in sites:
        proc.terminate()
        proc.wait(60)
    if server.returncode != 0:
        sys.exit(f"the deployed federation failed:\n{output[-3000:]}")

    whole, lora = model_bytes(args.model)
    lines = [
        f"{args.model}, 3 sites (examples/federated), {args.rounds} rounds x {args.local} local steps x batch "
        f"{args.batch}, LoRA r16 all-linear, {precision(sim_out)}; {os.cpu_count()} cores",
        "",
        "| run | wall s | s per round (after the first) | rounds / min | first round s | bytes sent / round | "
        "bytes received / round |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, out, wall in (("simulation", sim_out, sim_wall), ("deployment", dep_out, dep_wall)):
        rounds = rounds_of(out)
        later = [r["round_seconds"] for r in rounds[1:]] or [rounds[0]["round_seconds"]]
        per_round = sum(later) / len(later)
        lines.append(
            f"| {name} | {wall:.1f} | {per_round:.1f} | {60 / per_round:.1f} | {rounds[0]['round_seconds']:.1f} | "
            f"{rounds[0]['bytes_sent']:,} | {rounds[0]['bytes_received']:,} |"
        )
    lines += [
        "",
        f"adapter (what a site sends or receives): {lora:,} bytes; the whole model in bf16: {whole:,} bytes "
        f"({whole / lora:.0f}x the adapter). A round moves 2 x {len(SITES)} adapters.",
    ]
    return lines


def quality(args: argparse.Namespace, work: Path) -> list[str]:
    steps = args.rounds * args.local * len(SITES)
    rows = []
    fed_out = work / "q-fed"
    wall = run([str(BIN / "tunery"), "train", "federated", "--clients", *[str(DATA / f"{s}.jsonl") for s in SITES],
                "--rounds", str(args.rounds), "--local-steps", str(args.local), *common(args), "--out", str(fed_out)])  # fmt: skip
    rows.append(("federated FedAvg (3 sites)", fed_out, wall))
    for site in SITES:
        out = work / f"q-{site}"
        wall = run([str(BIN / "tunery"), "train", "sft", "--data", str(DATA / f"{site}.jsonl"),
                    "--max-steps", str(steps), "--epochs", "100", *common(args), "--out", str(out)])  # fmt: skip
        rows.append((f"{site} alone", out, wall))
    out = work / "q-fed-long"
    wall = run([str(BIN / "tunery"), "train", "federated", "--clients", *[str(DATA / f"{s}.jsonl") for s in SITES],
                "--rounds", str(3 * args.rounds), "--local-steps", str(args.local), *common(args), "--out", str(out)])  # fmt: skip
    rows.append((f"federated FedAvg, {3 * args.rounds} rounds (3x the compute)", out, wall))
    pooled = work / "pooled.jsonl"
    pooled.write_text("".join((DATA / f"{s}.jsonl").read_text() for s in SITES))
    out = work / "q-pooled"
    wall = run([str(BIN / "tunery"), "train", "sft", "--data", str(pooled), "--max-steps", str(steps),
                "--epochs", "100", *common(args), "--out", str(out)])  # fmt: skip
    rows.append(("pooled (all data in one place)", out, wall))
    lines = [
        f"{args.model}; {steps} steps of batch {args.batch} in each run (federated: 3 sites x {args.rounds} rounds "
        f"x {args.local} local steps), lr {args.lr}, LoRA r16, {precision(fed_out)}; held-out: "
        "examples/federated/valid.jsonl",
        "",
        "| run | held-out loss | held-out token accuracy | trained tokens | wall s |",
        "|---|---|---|---|---|",
    ]
    for name, out, wall in rows:
        s = summary(out)
        final = s["final_metrics"]
        lines.append(
            f"| {name} | {final['full_valid_loss']:.4f} | {final['full_valid_mean_token_accuracy']:.4f} | "
            f"{s['trained_tokens']:,} | {wall:.0f} |"
        )
    return lines


def privacy(args: argparse.Namespace, work: Path) -> list[str]:
    fed = ["train", "federated", "--clients", *[str(DATA / f"{s}.jsonl") for s in SITES], "--rounds",
           str(args.rounds), "--local-steps", str(args.local), *common(args)]  # fmt: skip
    plain = work / "p-plain"
    runs = [("FedAvg, no privacy", plain, run([str(BIN / "tunery"), *fed, "--out", str(plain)]))]
    norms = sorted(s["update_norm"] for s in rounds_of(plain)[0]["sites"])
    clip = norms[len(norms) // 2]
    for noise in args.dp_noise:
        out = work / f"p-dp-{noise}"
        wall = run(
            [
                str(BIN / "tunery"),
                *fed,
                "--dp-noise",
                str(noise),
                "--dp-clip",
                f"{clip:.6g}",
                "--out",
                str(out),
            ]
        )
        runs.append((f"differential privacy, noise {noise}, clip {clip:.3g}", out, wall))
    out = work / "p-secure"
    runs.append(("secure aggregation (SecAgg+)", out,
                 run([str(BIN / "tunery"), *fed, "--secure-aggregation", "--out", str(out)])))  # fmt: skip
    lines = [
        f"{args.model}; 3 sites (examples/federated), {args.rounds} rounds x {args.local} local steps x batch "
        f"{args.batch}, lr {args.lr}, LoRA r16, simulation; round-1 update norms {', '.join(f'{n:.3g}' for n in norms)}",
        "",
        "| run | held-out loss | held-out token accuracy | epsilon (delta 1e-5) | wall s | s per round |",
        "|---|---|---|---|---|---|",
    ]
    for name, out, wall in runs:
        s = summary(out)
        final, fed_info = s["final_metrics"], s["federation"]
        spent = fed_info.get("epsilon_spent")
        per_round = sum(r["round_seconds"] for r in rounds_of(out)) / args.rounds
        lines.append(
            f"| {name} | {final['full_valid_loss']:.4f} | {final['full_valid_mean_token_accuracy']:.4f} | "
            f"{'-' if spent is None else f'{spent:.1f}'} | {wall:.0f} | {per_round:.1f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "quality", "privacy", "all"), default="all")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local", type=int, default=3, help="local steps per round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dp-noise", type=float, nargs="+", default=[1.0], help="privacy: the noise multipliers")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunery-bench-federated-") as tmp:
        work = Path(tmp)
        if args.part in ("speed", "all"):
            print("\n".join(["### Speed", "", "```", *speed(args, work), "```", ""]), flush=True)
        if args.part in ("quality", "all"):
            print("\n".join(["### Quality", "", "```", *quality(args, work), "```", ""]), flush=True)
        if args.part in ("privacy", "all"):
            print("\n".join(["### Privacy", "", "```", *privacy(args, work), "```"]), flush=True)


if __name__ == "__main__":
    main()
