"""Federated fine-tuning on Flower: one LoRA adapter trained across sites whose data never leaves them.

- sites.py: the sites of a simulated federation (a file each, or one file split IID or by a field);
- client.py: a site's side, Flower's ClientApp: SFT's own steps on the site's data, from the global adapter;
- server.py: the server's side of a round on Flower's strategies (FedAvg, FedProx, FedAdam, FedYogi, with
  differential privacy), the adaptive strategies' state beside each round's checkpoint.

The round loop and the run directory are the recipe's (recipes/federated.py), as for every method.
"""

# Flower and Ray reach for the network unless told not to (checked with strace): Flower's telemetry and its
# update check; Ray's usage stats, a UDP probe of 8.8.8.8 for its node address (off with the cluster flag,
# which makes it use 127.0.0.1), and its dashboard's cloud-metadata probe (169.254.169.254, sent to a closed
# local port through the proxy setting). Set for the processes of a federation, before either is imported.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}
