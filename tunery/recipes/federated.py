"""Federated fine-tuning: one LoRA adapter trained across sites whose data never leaves them (Flower).

    tunery train federated --clients a.jsonl b.jsonl c.jsonl --valid v.jsonl --rounds 3 --local-steps 2 --out runs/fed
    tunery train federated --data all.jsonl --partition field:site --valid v.jsonl --out runs/fed   # non-IID split
    tunery train federated --resume runs/fed                # a killed server continues from its last round

This is the simulation: the sites are virtual Flower SuperNodes on this machine (Flower's Ray backend),
each with its own data file. In a round the server samples `clients_per_round` sites and sends them the
global adapter; each trains it for `local_steps` with the SFT recipe's step (federated/client.py) and
returns it with its example count; the strategy (federated/server.py) aggregates. The server evaluates
the new adapter on its held-out data, logs the round and checkpoints it. A round with fewer results than
`min_results` (a site crashed, its data was blocked) is redone, at most MAX_RETRIES times in a row.

The run directory is any recipe's: config.yaml, one metrics.jsonl record per round (`round`, `valid_loss`,
each site's loss, examples and time, bytes sent and received), checkpoints per round, final/ (a peft
adapter), summary.json, the model card (with the federation: sites, rounds, strategy, privacy; never the
sites' data) and evals.json. Each site's own directory (RUN/sites/NAME/) holds its screening report and
its local steps' metrics.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tunery.federated import OFFLINE_ENV  # noqa: E402

for _name, _value in OFFLINE_ENV.items():  # before Flower and Ray are imported
    os.environ.setdefault(_name, _value)
# Flower keeps a little state (an id file) in FLWR_HOME, ~/.flwr by default: a simulation has no use for it
os.environ.setdefault("FLWR_HOME", os.path.join(tempfile.gettempdir(), f"tunery-flower-{os.getuid()}"))

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.exception import PrivacyBudgetExhausted  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from tunery.data.template import TokenizedChat  # noqa: E402
from tunery.data.validate import load_chat_data  # noqa: E402
from tunery.errors import TuneryError  # noqa: E402
from tunery.federated import client  # noqa: E402
from tunery.federated.secagg import DEPLOYMENT_MAX_EXAMPLES, SecureRounds  # noqa: E402
from tunery.federated.server import (  # noqa: E402
    epsilon_after,
    epsilon_spent,
    make_strategy,
    privacy_record,
    restore_strategy_state,
    round_config,
    run_round,
    sample_from_connected,
    sampled_sites,
    save_strategy_state,
)
from tunery.federated.sites import Site, given_sites, partitioned_sites  # noqa: E402
from tunery.models.lora import bf16_is_fast  # noqa: E402
from tunery.recipes.configs import FederatedConfig  # noqa: E402
from tunery.recipes.sft import evaluate  # noqa: E402
from tunery.run import files, lifecycle  # noqa: E402
from tunery.run.config import Resolved  # noqa: E402
from tunery.training.rundir import file_digest  # noqa: E402

log = logging.getLogger("tunery")
if not log.isEnabledFor(logging.DEBUG):  # Flower logs each message it routes; a site's failure is told below
    logging.getLogger("flwr").setLevel(logging.CRITICAL)

MAX_RETRIES = 3  # a round redone this many times in a row without enough results ends the run


def _examples(path: str) -> int:
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def opened_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def server_plan(cfg: FederatedConfig) -> Resolved:
    """The server's numbers: a step is a round. Batch size and learning rate are each site's own (resolved
    from its data at the site); config.yaml records the configured values."""
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if bf16_is_fast(opened_device()) else "fp32")
    )
    return Resolved(
        epochs=0,
        batch_size=int(cfg.batch_size) if cfg.batch_size != "auto" else 0,
        learning_rate_multiplier=(
            float(cfg.learning_rate_multiplier) if cfg.learning_rate_multiplier != "auto" else 0.0
        ),
        lr=cfg.lr if cfg.lr is not None else 0.0,
        precision=precision,
        eval_every=1,
        save_every=1,
        total_steps=cfg.rounds,
        world_size=1,
        data_sha256=file_digest(cfg.data or None),
        valid_sha256=file_digest(cfg.valid),
    )


def train(
    cfg: FederatedConfig,
    resume: bool = False,
    overwrite: bool = False,
    flower: tuple[Grid, Context] | None = None,
) -> dict[str, Any]:
    """The run, on Flower's deployment runtime when it gives its grid (federated/app.py), else simulated."""
    opened = lifecycle.open_run(cfg, resume, overwrite, single_process=True, train_here=False)
    sites: list[Site] = []  # a deployment's server never learns where the sites' data is
    if cfg.clients:
        sites = given_sites(cfg.clients)
    elif cfg.federation == "simulation":
        sites = partitioned_sites(cfg.data, cfg.partition, cfg.num_clients, cfg.seed, opened.run_dir)
    n_sites = len(sites) or cfg.num_clients
    site_files = [{"name": s.name, "path": os.path.abspath(s.path)} for s in sites] if sites else None
    digests = {s.name: file_digest(s.path) for s in sites}
    saved = files.read_config(opened.run_dir) if resume else None
    if saved is not None and saved.fields.get("site_sha256") not in (None, digests):
        raise TuneryError(f"cannot resume {opened.run_dir}: a site's data changed since the run started")
    valid_chats = (
        load_chat_data(opened.valid_path, opened.tokenizer, cfg.max_length, min_examples=1)
        if opened.valid_path
        else []
    )
    plan = server_plan(cfg)
    sampled = sampled_sites(cfg, n_sites)
    # differential privacy's noise is calibrated to the sampled sites' average: all of them must reply
    min_results = sampled if cfg.dp_noise > 0 else min(cfg.min_results or -(-sampled // 2), sampled)
    if (
        cfg.dp_noise > 0
        and cfg.dp_max_epsilon
        and (first := epsilon_after(cfg, n_sites, 1)) > cfg.dp_max_epsilon
    ):
        raise TuneryError(
            f"one round at dp_noise {cfg.dp_noise} spends epsilon {first:.3g}, more than dp_max_epsilon "
            f"{cfg.dp_max_epsilon:g}: raise dp_noise or the budget"
        )
    # the sites resolve epochs, batch size and learning rate from their own data: config.yaml keeps the
    # configured values (a resumed run sends the sites the same config again)
    configured = {
        name: getattr(cfg, name) for name in ("epochs", "batch_size", "lr", "learning_rate_multiplier")
    }
    model = lifecycle.with_lora(opened.model, cfg, plan)
    privacy = privacy_record(cfg, n_sites, sum(p.numel() for p in model.parameters() if p.requires_grad))
    dp = privacy["differential_privacy"]
    if dp and dp["noise_to_update"] > 1:
        log.warning(
            "differential privacy: each round's noise has an expected L2 norm %.0fx dp_clip, the most the "
            "average update can move the adapter, so the adapter will not learn (dp_noise x sqrt(%d adapter "
            "parameters) / %d sites a round). Site-level privacy needs many more sites, or fewer parameters "
            "(lora_rank, lora_targets); see docs/federated.md",
            dp["noise_to_update"], dp["adapter_parameters"], dp["sampled_sites_per_round"],
        )  # fmt: skip
    run = lifecycle.start_run(
        opened, cfg, plan, model, method="federated",
        config_extra={**configured, "sites": [s.name for s in sites] or None, "site_sha256": digests or None,
                      "min_results_resolved": min_results, "privacy": privacy},
    )  # fmt: skip
    model = run.model

    def held_out(chats: list[TokenizedChat], prefix: str = files.VALID_PREFIX) -> dict[str, float]:
        loss, accuracy = evaluate(model, chats, cfg.micro_batch_tokens, plan.precision, run.world)
        return {prefix + "loss": loss, prefix + "mean_token_accuracy": accuracy}

    strategy = make_strategy(cfg, n_sites)
    restore_strategy_state(strategy, run.run_dir, run.start_step)
    lifecycle.announce(
        run, "federated %s: %d sites (%d a round, at least %d results), %d rounds of %d local steps; %d validation",
        cfg.strategy, n_sites, sampled, min_results, cfg.rounds, cfg.local_steps, len(valid_chats),
    )  # fmt: skip
    if valid_chats and run.start_step == 0:
        lifecycle.log_metrics(
            run, {files.STEP: 0, files.TOTAL_STEPS: cfg.rounds, "round": 0, **held_out(valid_chats)}
        )

    done = {"round": run.start_step}
    site_energy: dict[str, float] = {s.name: 0.0 for s in sites}

    def rounds(grid: Grid, context: Context) -> None:
        arrays = ArrayRecord(client.trainable_state(model))
        names = list(client.trainable_state(model))
        largest = max((_examples(s.path) for s in sites), default=0)
        max_weight = (
            largest or DEPLOYMENT_MAX_EXAMPLES
        )  # a deployment's server does not know the sites' sizes
        secure = (
            SecureRounds(grid, context, names, n_sites, sampled, max_weight)
            if cfg.secure_aggregation
            else None
        )
        try:
            rounds_on(grid, secure, arrays, names)
        finally:
            if secure is not None:
                secure.close()

    def rounds_on(grid: Grid, secure: SecureRounds | None, arrays: ArrayRecord, names: list[str]) -> None:
        step, retries = run.start_step, 0
        while step < cfg.rounds:
            t0 = time.monotonic()
            config = round_config(cfg, step + 1, site_files)
            if secure is not None:
                result = secure.run_round(step + 1, arrays, {**config, "names": json.dumps(names)})
            else:
                try:
                    result = run_round(strategy, grid, step + 1, arrays, config, min_results)
                except PrivacyBudgetExhausted:
                    log.warning("round %d would spend more than dp_max_epsilon %g: training stops after "
                                "round %d (epsilon %.3f)", step + 1, cfg.dp_max_epsilon, step,
                                epsilon_spent(strategy) or 0.0)  # fmt: skip
                    break
            if result.arrays is None:
                retries += 1
                log.warning("round %d: %d of %d sites replied (%s); at least %d needed, redoing the round",
                            step + 1, len(result.sites), len(result.sites) + len(result.failures),
                            "; ".join(result.failures) or "no reason given", min_results)  # fmt: skip
                if retries > MAX_RETRIES:
                    raise TuneryError(
                        f"round {step + 1} failed {retries} times in a row: {'; '.join(result.failures)}; "
                        f"fix the sites, then continue with: tunery train federated --resume {run.run_dir}"
                    )
                continue
            if result.failures:
                log.warning("round %d: %d site(s) failed and are left out of its aggregate: %s", step + 1,
                            len(result.failures), "; ".join(result.failures))  # fmt: skip
            retries = 0
            if secure is not None:
                secure.sample_from_connected(min_results)
            elif cfg.dp_noise <= 0:
                sample_from_connected(strategy, min_results)
            client.load_trainable(model, result.arrays.to_torch_state_dict())
            # what the next round sends is the model's weights (fp32), also after a resume: FedAdam's
            # arithmetic returns float64 arrays, which a resumed run would no longer have
            arrays = ArrayRecord(client.trainable_state(model))
            step += 1
            done["round"] = step
            examples = sum(s["examples"] for s in result.sites)
            tokens = sum(s["tokens"] for s in result.sites)
            run.tokens_seen += tokens
            run.train_seconds += time.monotonic() - t0
            site_energy.update({s["site"]: s["kwh"] for s in result.sites})
            record: dict[str, Any] = {
                files.STEP: step,
                files.TOTAL_STEPS: cfg.rounds,
                "round": step,
                files.TRAIN_LOSS: sum(s["train_loss"] * s["examples"] for s in result.sites)
                / max(examples, 1),
                "sites": result.sites,
                "failed_sites": result.failures,
                "bytes_sent": result.bytes_sent,
                "bytes_received": result.bytes_received,
                "tokens": run.tokens_seen,
                "round_seconds": time.monotonic() - t0,
            }
            if (epsilon := epsilon_spent(strategy)) is not None:
                record["dp_epsilon"] = epsilon
            if valid_chats:
                record.update(held_out(valid_chats[: cfg.eval_examples]))
            save_strategy_state(strategy, run.run_dir, step)
            shown = ("loss {train_loss:.3f}", "valid {valid_loss:.3f}", "{round_seconds:.1f} s/round")
            lifecycle.end_step(run, record, "federated", shown)

    with run.stop, run.progress, run.energy:
        if flower is not None:
            rounds(*flower)
        else:
            server_app = ServerApp()
            server_app.main()(rounds)
            run_simulation(
                server_app=server_app,
                client_app=client.secure_app if cfg.secure_aggregation else client.app,
                num_supernodes=n_sites,
                backend_config={
                    "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
                    "init_args": {"num_cpus": max(os.cpu_count() or 1, cfg.client_cpus), "include_dashboard": False,
                                  "log_to_driver": False},
                },
            )  # fmt: skip
    step = done["round"]

    # --- finish: final weights (the best round's), full validation, summary, model card --------------------
    return lifecycle.finish_run(
        run, cfg, step, method="federated", metric_prefixes=(files.TRAIN_PREFIX, files.VALID_PREFIX),
        final_eval=(lambda: held_out(valid_chats, files.FULL_VALID_PREFIX)) if valid_chats else None,
        counts={"federation": {"mode": cfg.federation, "sites": list(site_energy), "rounds": step, "strategy": cfg.strategy,
                               "local_steps": cfg.local_steps, "sites_per_round": sampled,
                               "min_results": min_results, **privacy, "epsilon_spent": epsilon_spent(strategy)},
                "site_energy_kwh": site_energy, "valid_examples": len(valid_chats)},
    )  # fmt: skip


# the entry point of `tunery train`: the config from YAML then flags (or the resumed run's), then train()
run = lifecycle.entry_point(FederatedConfig, train)
