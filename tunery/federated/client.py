"""A site of a federation: Flower's ClientApp, training the global adapter on the site's own data.

Each round the server sends the adapter (LoRA weights only) and the run's config. The site loads them into
its model and trains `local_steps` optimizer steps with the SFT recipe's own step (recipes/sft.py:
packing, masks, bf16, the lr schedule over all rounds' steps), from a fresh AdamW state, then replies with
the adapter, its example count (FedAvg's weight) and its loss. Its data never leaves the process.

The site's state lives in its process across rounds (a Ray worker in simulation, the SuperNode's app
process in deployment): the model, the tokenized data and its run directory, where it screens its data
with the run's policies before the first step and logs its own steps (metrics.jsonl). A site whose data a
policy blocks fails its rounds with the screening's reason (line numbers and categories, never the text).

Where the data is: in simulation the message names the site files (one machine, one operator); in
deployment only the SuperNode knows it, from its node config (`data-path`, `site-dir`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from tunery.data.validate import load_chat_data
from tunery.errors import TuneryError
from tunery.models.forward import output_head
from tunery.recipes import sft
from tunery.recipes.configs import FederatedConfig
from tunery.run import lifecycle
from tunery.training import auto

log = logging.getLogger("tunery")

app = ClientApp()

_SITES: dict[str, LocalSite] = {}  # this process's sites, by run and site name


class LocalSite:
    """The site's model, data and run handles, built at its first round and kept for the next ones."""

    def __init__(self, cfg: FederatedConfig, name: str, data_path: str, site_dir: Path) -> None:
        self.name = name
        self.cfg = cfg = dataclasses.replace(
            cfg, data=data_path, clients=[], valid=None, out=str(site_dir), safety_evals="none",
            federation="simulation",  # the site's own steps are a local run
        )  # fmt: skip
        # screens the site's data here; not locked: a round may run in any of the simulation's processes
        opened = lifecycle.open_run(cfg, resume=False, overwrite=True, lock=False)
        self.chats = load_chat_data(opened.train_path, opened.tokenizer, cfg.max_length)
        mean_tokens = sum(c.n_tokens for c in self.chats) / max(len(self.chats), 1)
        plan = lifecycle.resolve_run(
            cfg, len(self.chats), opened.world, auto.chat_batch(mean_tokens, cfg.micro_batch_tokens)
        )
        # the schedule runs over every local step of every round
        plan = dataclasses.replace(plan, total_steps=cfg.rounds * cfg.local_steps, save_every=10**9)
        model = lifecycle.with_lora(opened.model, cfg, plan)
        self.run = lifecycle.start_run(opened, cfg, plan, model, method="federated-site")
        self.head = output_head(self.run.model)
        self.run.energy.__enter__()  # measured from the first round to the process's end
        self.last_metrics: dict[str, Any] = {}

    def train_round(
        self, state: dict[str, torch.Tensor], round_number: int, proximal_mu: float
    ) -> dict[str, Any]:
        """`local_steps` steps from the global adapter `state`; returns the reply's metrics."""
        run, cfg = self.run, self.cfg
        load_trainable(run.model, state)
        run.optimizer = lifecycle.adamw(run.trainable, run.plan.lr, cfg.weight_decay)
        anchor = [p.detach().clone() for p in run.trainable] if proximal_mu > 0 else []

        def proximal() -> None:  # FedProx: the gradient of (mu / 2) ||w - w_global||^2
            for p, p0 in zip(run.trainable, anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - p0, alpha=proximal_mu)

        started, tokens_before = time.monotonic(), run.tokens_seen
        losses = []
        first = (round_number - 1) * cfg.local_steps
        for step in range(first, first + cfg.local_steps):
            record = sft.train_step(run, self.chats, step, cfg, self.head, proximal if anchor else None)
            lifecycle.log_metrics(run, {**record, "round": round_number})
            losses.append(record["train_loss"])
        energy = run.energy.so_far() or {}
        trained = trainable_state(run.model)  # the update's size: what --dp-clip is chosen against
        update_norm = math.sqrt(sum(float(((trained[k] - state[k].float()) ** 2).sum()) for k in trained))
        return {
            "num-examples": len(self.chats),
            "site-weight": 1,  # differential privacy averages the sites' updates unweighted
            "train_loss": sum(losses) / len(losses),
            "tokens": run.tokens_seen - tokens_before,
            "seconds": time.monotonic() - started,
            "kwh": float(energy.get("kwh", 0.0)),
            "update_norm": update_norm,
        }


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a federation exchanges: the trainable ones (LoRA A and B), fp32, by parameter name."""
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(
            f"the adapter does not fit this site's model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, p in params.items():
        p.copy_(state[name].to(p.dtype))


def _where(
    cfg: FederatedConfig, config: dict[str, Any], node_config: dict[str, Any]
) -> tuple[str, str, Path]:
    """The site's name, data file and run directory."""
    if "data-path" in node_config:  # deployment: the SuperNode's owner said where its data is
        data_path = str(node_config["data-path"])
        name = str(node_config.get("site-name") or Path(data_path).stem)
        return name, data_path, Path(str(node_config["site-dir"]))
    entry = json.loads(str(config["sites"]))[int(node_config["partition-id"])]  # simulation
    return str(entry["name"]), str(entry["path"]), Path(cfg.out) / "sites" / str(entry["name"])


def _train_site(
    config: dict[str, Any], node_config: dict[str, Any], state: dict[str, torch.Tensor]
) -> LocalSite:
    """The round's local steps at this site, from the global adapter `state`: the site, trained."""
    cfg = FederatedConfig(**json.loads(str(config["tunery"])))
    name, data_path, site_dir = _where(cfg, config, node_config)
    if "data-path" in node_config:  # deployment: Flower starts a process for each message, so each
        site_dir = site_dir / f"round-{config['round']!s}"  # round is a local run of its own
    key = f"{cfg.out}:{name}:{site_dir}"
    try:
        if key not in _SITES:
            _SITES[key] = LocalSite(cfg, name, data_path, site_dir)
        site = _SITES[key]
        site.last_metrics = site.train_round(
            state, int(str(config["round"])), float(str(config.get("proximal-mu", 0.0)))
        )
    except TuneryError as exc:  # told to the server: what is wrong, never where the site keeps its data
        raise TuneryError(f"site {name}: " + str(exc).replace(str(Path(data_path).resolve()), "its data")
                          .replace(data_path, "its data")) from None  # fmt: skip
    return site


@app.train()
def train(msg: Message, context: Context) -> Message:
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    site = _train_site(dict(msg.content["config"]), dict(context.node_config), state)
    content = RecordDict(
        {
            "arrays": ArrayRecord(trainable_state(site.run.model)),
            "metrics": MetricRecord(site.last_metrics),
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content=content, reply_to=msg)


class _SecureSite(NumPyClient):
    """The same round for SecAgg+ (federated/secagg.py), on Flower's legacy client API: arrays in the
    model's parameter order in, the trained ones out; secaggplus_mod masks them before they leave."""

    def __init__(self, context: Context) -> None:
        self.node_config = dict(context.node_config)

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
        names = json.loads(str(config["names"]))
        state = {name: torch.from_numpy(array.copy()) for name, array in zip(names, parameters, strict=True)}
        site = _train_site(config, self.node_config, state)
        trained = trainable_state(site.run.model)
        metrics = dict(site.last_metrics)
        return (
            [trained[name].numpy() for name in names],
            int(metrics.pop("num-examples")),
            {**metrics, "site": site.name},
        )


SECURE_RANGE = 1.0  # federated/secagg.py's CLIPPING_RANGE: what secure aggregation can carry
secure_app = ClientApp(client_fn=lambda context: _SecureSite(context).to_client(), mods=[secaggplus_mod])
