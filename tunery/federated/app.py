"""The ServerApp of a deployed federation: what `tunery federated server` submits to its SuperLink.

Flower runs it in a process of its own (`flwr-serverapp`), with the round loop's Grid; the run config
names the federation's config file (written by the command) and whether to resume. The run is the
federated recipe's, the same as in simulation, on this grid instead of simulated sites.
"""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from tunery.recipes import federated
    from tunery.recipes.configs import FederatedConfig
    from tunery.run.config import build_config

    if not logging.getLogger().handlers:  # the run's log lines go to `flwr run --stream`
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        for name in ("httpx", "flwr", "transformers", "peft"):
            logging.getLogger(name).setLevel(logging.WARNING)
    config = context.run_config
    cfg = build_config(FederatedConfig, str(config["tunery-config"]))
    summary = federated.train(
        cfg, resume=bool(config["resume"]), overwrite=bool(config["overwrite"]), flower=(grid, context)
    )
    print(f"done: {summary['steps']} rounds; run directory {summary['run_dir']}", flush=True)
