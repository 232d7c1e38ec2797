"""Federated fine-tuning on Flower: one LoRA adapter trained across sites whose data never leaves them.

- sites.py: the sites of a simulated federation (a file each, or one file split IID or by a field);
- client.py: a site's side, Flower's ClientApp: SFT's own steps on the site's data, from the global adapter;
- server.py: the server's side of a round on Flower's strategies (FedAvg, FedProx, FedAdam, FedYogi, with
  differential privacy), the adaptive strategies' state beside each round's checkpoint.

The round loop and the run directory are the recipe's (recipes/federated.py), as for every method.
"""
