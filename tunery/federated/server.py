"""The server's side of a round, on Flower's strategies: sample the sites, send them the adapter, aggregate
their replies. The round loop itself is the federated recipe's (recipes/federated.py).

The strategies are Flower's own (flwr.serverapp.strategy): FedAvg (the mean of the sites' adapters weighted
by their example counts), FedProx (FedAvg, with the sites adding the proximal term), FedAdam and FedYogi
(an adaptive server optimizer on the averaged update; their moments are saved with each round's
checkpoint, so a resumed run continues them). Differential privacy wraps FedAvg or FedProx in Flower's
server-side fixed clipping: each site's update is clipped to `dp_clip`, the clipped updates are averaged
unweighted (a site's weight would otherwise scale what one site can change) and Gaussian noise of
`dp_noise` x `dp_clip` / sites is added to the average; Flower's RDP accountant (Google's dp-accounting)
counts the epsilon spent at `dp_delta`, site-level (adding or removing one site), without amplification by
sampling, and every sampled site must reply for a round to count.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
)

from tunery.errors import TuneryError
from tunery.recipes.configs import FederatedConfig
from tunery.training.io import atomic_open

log = logging.getLogger("tunery")

WEIGHT_KEY = "num-examples"  # the reply metric FedAvg weights a site's adapter by
UNIT_WEIGHT_KEY = "site-weight"  # 1 for every site: differential privacy's unweighted average
REPLY_TIMEOUT_S = 24 * 3600.0  # a round waits this long for its sites at most


def sampled_sites(cfg: FederatedConfig, n_sites: int) -> int:
    """How many sites a round samples: `clients_per_round` of the `n_sites` (0: all)."""
    return min(cfg.clients_per_round or n_sites, n_sites)


def make_strategy(cfg: FederatedConfig, n_sites: int) -> Any:
    """Flower's strategy for `cfg.strategy`, sampling `clients_per_round` of `n_sites` sites a round."""
    sampled = sampled_sites(cfg, n_sites)
    common: dict[str, Any] = {
        "fraction_train": sampled / n_sites,
        "fraction_evaluate": 0.0,  # the global adapter is evaluated on the server's held-out data
        "min_train_nodes": sampled,
        "min_evaluate_nodes": 0,
        "min_available_nodes": n_sites,
        "weighted_by_key": UNIT_WEIGHT_KEY if cfg.dp_noise > 0 else WEIGHT_KEY,
    }
    strategy: Any
    if cfg.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif cfg.strategy == "fedprox":
        strategy = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedadam":
        strategy = FedAdam(eta=cfg.server_lr, **common)
    else:
        strategy = FedYogi(eta=cfg.server_lr, **common)
    if cfg.dp_noise > 0:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=cfg.dp_noise, clipping_norm=cfg.dp_clip, num_sampled_clients=sampled,
            accountant=RdpAccountant(privacy_config(cfg, n_sites)),
        )  # fmt: skip
    return strategy


def privacy_config(cfg: FederatedConfig, n_sites: int) -> PrivacyConfig:
    return PrivacyConfig(
        target_delta=cfg.dp_delta,
        population_size=n_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=cfg.dp_max_epsilon or None,
    )


def epsilon_after(cfg: FederatedConfig, n_sites: int, rounds: int) -> float:
    """The epsilon (at dp_delta) that `rounds` private rounds spend: what a run plans to spend."""
    accountant = RdpAccountant(privacy_config(cfg, n_sites))
    sampled = sampled_sites(cfg, n_sites)
    accountant.compose(GaussianPrivacyEvent(cfg.dp_noise, sampled, n_sites), count=rounds)
    return accountant.get_privacy_spent().epsilon


def epsilon_spent(strategy: Any) -> float | None:
    """The epsilon spent so far (None without differential privacy)."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    return None if spent is None else float(spent.epsilon)


def _inner(strategy: Any) -> Any:
    return getattr(strategy, "strategy", strategy)  # under the DP wrapper


def noise_to_update(cfg: FederatedConfig, n_sites: int, n_parameters: int) -> float:
    """The expected L2 norm of the noise added to a round's average, over the largest norm the average of the
    clipped updates can have (dp_clip): dp_noise * sqrt(parameters) / sampled sites. Above 1 the noise
    outweighs any update and the adapter does not learn; site-level privacy needs many sites or few
    parameters."""
    return cfg.dp_noise * math.sqrt(n_parameters) / sampled_sites(cfg, n_sites)


def sample_from_connected(strategy: Any, min_results: int) -> None:
    """From the second round on, a round starts with whichever sites are connected, as long as there are
    `min_results`: the first round waits for every site, and a site lost for good afterwards must not stall
    the federation (its SuperNode's missed heartbeats end its round with an error, then it is gone from the
    grid). Not for differential privacy: there every sampled site must reply (the noise is calibrated to
    them), so its rounds wait for a lost site to come back."""
    strategy.min_available_nodes = strategy.min_train_nodes = min_results


def privacy_record(cfg: FederatedConfig, n_sites: int, n_parameters: int) -> dict[str, Any]:
    """What the run card and summary say about privacy; `n_parameters` is the adapter's size."""
    if cfg.dp_noise <= 0:
        return {"differential_privacy": None, "secure_aggregation": cfg.secure_aggregation}
    return {
        "differential_privacy": {
            "mechanism": "Flower DifferentialPrivacyServerSideFixedClipping (Gaussian, server-side clipping, "
            "unweighted average)",
            "noise_multiplier": cfg.dp_noise,
            "clipping_norm": cfg.dp_clip,
            "sampled_sites_per_round": sampled_sites(cfg, n_sites),
            "rounds": cfg.rounds,
            "accounting": "RDP (dp-accounting), site-level: adding or removing one site, no sampling amplification",
            "delta": cfg.dp_delta,
            "planned_epsilon": epsilon_after(cfg, n_sites, cfg.rounds),
            "max_epsilon": cfg.dp_max_epsilon or None,
            "adapter_parameters": n_parameters,
            "noise_to_update": noise_to_update(cfg, n_sites, n_parameters),
        },
        "secure_aggregation": False,
    }


# --- a round ---------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    arrays: ArrayRecord | None  # the new global adapter; None when too few sites replied
    sites: list[dict[str, Any]] = field(default_factory=list)  # each replying site's metrics
    failures: list[str] = field(default_factory=list)  # each failed site's reason
    bytes_sent: int = 0
    bytes_received: int = 0


def array_bytes(arrays: ArrayRecord) -> int:
    return sum(len(array.data) for array in arrays.values())


def run_round(
    strategy: Any,
    grid: Grid,
    round_number: int,
    arrays: ArrayRecord,
    config: dict[str, Any],
    min_results: int,
) -> RoundResult:
    """Send `arrays` and `config` to the sampled sites, wait for their replies and aggregate them."""
    messages = list(strategy.configure_train(round_number, arrays, ConfigRecord(config), grid))
    sent = array_bytes(arrays) * len(messages)
    replies = list(grid.send_and_receive(messages=messages, timeout=REPLY_TIMEOUT_S))
    good = [reply for reply in replies if not reply.has_error()]
    failures = [_failure(reply) for reply in replies if reply.has_error()]
    failures += ["no reply"] * (len(messages) - len(replies))
    result = RoundResult(
        arrays=None,
        sites=[_site_metrics(reply) for reply in good],
        failures=failures,
        bytes_sent=sent,
        bytes_received=sum(array_bytes(reply.content.array_records["arrays"]) for reply in good),
    )
    if len(good) < max(min_results, 1):
        if epsilon_spent(strategy) is not None:
            strategy.aggregate_train(round_number, good)  # drops the round's privacy event: nothing released
        return result
    result.arrays, _ = strategy.aggregate_train(round_number, good)
    return result


def _failure(reply: Message) -> str:
    """A failed site's reason in one line: its exception's message (Flower wraps it in the class's repr)."""
    reason = reply.error.reason or ""
    if "Message:" in reason:  # simulation: "Exception ClientAppException occurred. Message: ..."
        reason = reason.split("Message:", 1)[1]
    reason = re.sub(r"^\s*<class '[\w.]+'>:<'", "", reason)  # deployment: "<class 'X'>:<'...'>"
    reason = " ".join(line.strip() for line in reason.strip().rstrip(">'\"").splitlines() if line.strip())
    return reason[:500] or f"error code {reply.error.code}"


def _site_metrics(reply: Message) -> dict[str, Any]:
    site = reply.content.config_records.get("site")
    name = str(site["name"]) if site is not None else str(reply.metadata.src_node_id)
    metrics = dict(reply.content.metric_records["metrics"])
    return site_metrics({**metrics, "site": name}, metrics[WEIGHT_KEY])


def site_metrics(metrics: dict[str, Any], examples: Any) -> dict[str, Any]:
    """A site's reply metrics as a round's record keeps them."""

    def number(key: str) -> float:
        value = metrics.get(key)
        return float(value) if isinstance(value, int | float) else float("nan")

    return {
        "site": str(metrics.get("site", "?")),
        "train_loss": number("train_loss"),
        "examples": int(examples) if isinstance(examples, int | float) else 0,
        "tokens": int(number("tokens")),
        "seconds": round(number("seconds"), 3),
        "kwh": number("kwh"),
        "update_norm": number("update_norm"),  # L2 norm of the site's adapter minus the one it was sent
    }


# --- the adaptive strategies' state, beside each round's checkpoint ----------------------------------------


def save_strategy_state(strategy: Any, run_dir: Path, round_number: int) -> None:
    """FedAdam's / FedYogi's moments and the privacy accountant's releases after `round_number` (nothing
    for the stateless strategies)."""
    inner = _inner(strategy)
    moments = {f"m.{k}": v for k, v in (getattr(inner, "m_t", None) or {}).items()}
    moments |= {f"v.{k}": v for k, v in (getattr(inner, "v_t", None) or {}).items()}
    accountant = getattr(strategy, "accountant", None)
    folder = run_dir / "strategy"
    if moments:
        with atomic_open(folder / f"round-{round_number}.npz", "wb") as fh:
            np.savez(fh, **moments)
    if accountant is not None:
        with atomic_open(folder / f"privacy-round-{round_number}.json", "w") as fh:
            json.dump(accountant.state_dict(), fh)
    for old in [*folder.glob("round-*.npz"), *folder.glob("privacy-round-*.json")]:  # this round's, the last
        if int(old.name.split(".")[0].rsplit("-", 1)[1]) < round_number - 1:
            old.unlink(missing_ok=True)


def restore_strategy_state(strategy: Any, run_dir: Path, round_number: int) -> None:
    if round_number == 0:
        return
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        path = run_dir / "strategy" / f"privacy-round-{round_number}.json"
        if not path.is_file():  # never start the count again: it would under-report what was spent
            raise TuneryError(f"cannot resume a differentially private run without {path}")
        accountant.load_state_dict(json.loads(path.read_text()))
    inner = _inner(strategy)
    path = run_dir / "strategy" / f"round-{round_number}.npz"
    if not hasattr(inner, "m_t"):
        return
    if not path.is_file():
        log.warning("%s is missing: the server optimizer's moments start again from zero", path)
        return
    with np.load(path) as saved:
        inner.m_t = {k[2:]: saved[k] for k in saved.files if k.startswith("m.")}
        inner.v_t = {k[2:]: saved[k] for k in saved.files if k.startswith("v.")}


def round_config(
    cfg: FederatedConfig, round_number: int, sites: list[dict[str, str]] | None
) -> dict[str, Any]:
    """What a round's message tells the sites: the run's config, the round and, in simulation, the site files
    (FedProx adds `proximal-mu` itself)."""
    config: dict[str, Any] = {"tunery": json.dumps(_site_fields(cfg)), "round": round_number}
    if sites is not None:
        config["sites"] = json.dumps(sites)
    return config


def _site_fields(cfg: FederatedConfig) -> dict[str, Any]:
    from tunery.run.config import to_dict

    return to_dict(cfg)
