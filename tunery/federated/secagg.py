"""Secure aggregation: rounds through Flower's SecAgg+ protocol, where the server learns only the sum of the
sites' adapters, never one site's.

In Flower 1.42 SecAgg+ runs only on its legacy API (a LegacyContext, the legacy FedAvg, a NumPyClient with
`secaggplus_mod` at the sites), not with the strategies of the rest of the federation (server.py). So this
is the same round as `server.run_round`, on that API: the global adapter goes out as a list of arrays in the
model's parameter order; each site masks its weighted adapter with secrets shared among the sites, and the
server can unmask only the sum. The sites' metrics (loss, examples, tokens, time) still reach the server,
as in the other rounds; their adapters do not.

The masked values are integers: each site's adapter, times its weight (its examples / `max_weight`, the
largest site's examples), is clipped to +-CLIPPING_RANGE and quantized to QUANTIZATION_RANGE levels, a step
of 2 / 2^24 = 1.2e-7. LoRA's weights stay well inside +-1 (a site refuses to send one that does not). A
site's weight must be at most 1: in a deployment, where the server does not know the sites' sizes,
`max_weight` is DEPLOYMENT_MAX_EXAMPLES and a larger site refuses the round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from tunery.federated.server import RoundResult, array_bytes, site_metrics

DEPLOYMENT_MAX_EXAMPLES = 1000
CLIPPING_RANGE = 1.0
QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**40  # room for the sum of many sites' quantized values


class SecureRounds:
    """A federation's rounds over SecAgg+; `close()` when done."""

    def __init__(
        self, grid: Grid, context: Context, names: list[str], n_sites: int, sampled: int, max_weight: int
    ) -> None:
        self.max_weight = max_weight
        self.grid, self.names = grid, names
        self.config: dict[str, Any] = {}
        self.site_metrics: list[tuple[int, dict[str, Any]]] = []

        def keep_site_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
            self.site_metrics = results
            return {}

        self.strategy = LegacyFedAvg(
            fraction_fit=sampled / n_sites,
            fraction_evaluate=0.0,
            min_fit_clients=sampled,
            min_available_clients=n_sites,
            on_fit_config_fn=lambda server_round: dict(self.config),
            fit_metrics_aggregation_fn=keep_site_metrics,
        )
        self.context = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=self.strategy)
        self.thread, self.stop, registered = start_update_client_manager_thread(
            grid, self.context.client_manager
        )
        registered.wait()
        self.round_config = ConfigRecord()
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = self.round_config
        self.workflow = SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled site holds a share of every other's secret
            reconstruction_threshold=0.5,  # half of them can unmask the sum when others drop out
            max_weight=float(max_weight),
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
        )

    def run_round(self, round_number: int, arrays: ArrayRecord, config: dict[str, Any]) -> RoundResult:
        state = arrays.to_torch_state_dict()
        before = [state[name].numpy() for name in self.names]
        record = compat.parameters_to_arrayrecord(ndarrays_to_parameters(before), keep_input=True)
        self.context.state.array_records[MAIN_PARAMS_RECORD] = record
        self.round_config[Key.CURRENT_ROUND] = round_number
        self.config, self.site_metrics = {**config, "max-weight": self.max_weight}, []
        self.workflow(self.grid, self.context)
        after_record = self.context.state.array_records[MAIN_PARAMS_RECORD]
        result = RoundResult(
            arrays=None,
            sites=[site_metrics(metrics, examples) for examples, metrics in self.site_metrics],
            bytes_sent=array_bytes(arrays) * self.strategy.min_fit_clients,
            bytes_received=0,  # masked vectors and key shares: not counted under secure aggregation
        )
        if after_record is record:  # the protocol halted (too few sites): nothing was aggregated
            result.failures = ["secure aggregation halted: too few sites completed the protocol"]
            return result
        after = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after_record, keep_input=True))
        result.arrays = ArrayRecord(
            {
                name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                for name, a in zip(self.names, after, strict=True)
            }
        )
        return result

    def sample_from_connected(self, min_results: int) -> None:
        """As `server.sample_from_connected`, with SecAgg+'s floor of 2 sites."""
        self.strategy.min_available_clients = self.strategy.min_fit_clients = max(2, min_results)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
