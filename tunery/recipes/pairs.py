"""What the recipes that compare a policy with a frozen reference on packed pairs (dpo.py, kto.py) share:
the reference model's log-probs of every pair, computed once before the first update.

A pair is packed as `prompt | chosen | rejected` (data/packing.py); an unpaired rated example (KTO) is a
pair whose second answer is empty.
"""

from __future__ import annotations

import torch

from tunery.data.feedback import TokenizedPair
from tunery.data.packing import pack_pairs, plan_rows, shard
from tunery.models.forward import output_head, sequence_logps
from tunery.training import distributed
from tunery.training.rundir import autocast


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    micro_batch_tokens: int,
    precision: str,
    world: distributed.World,
) -> dict[int, tuple[float, float]]:
    """{line: (chosen, rejected)} summed log-probs under the model as it is now (the reference); 0 for
    an empty second answer."""
    head = output_head(model)
    was_training = model.training
    model.eval()
    index = {pair.line: i for i, pair in enumerate(pairs)}
    values = [0.0] * (2 * len(pairs))  # each process fills its share; the sum across processes is complete
    rows = plan_rows(shard(pairs, world.rank, world.size), micro_batch_tokens)
    for row_pairs, counted in distributed.even_rows(rows, world, filler=pairs[:1]):
        with autocast(precision, world.device):
            summed, _, _ = sequence_logps(model, head, pack_pairs(row_pairs))
        if not counted:
            continue
        for k, pair in enumerate(row_pairs):
            values[2 * index[pair.line]] = summed[2 * k].item()
            values[2 * index[pair.line] + 1] = summed[2 * k + 1].item()
    values = distributed.all_sum(values, world)
    model.train(was_training)
    return {pair.line: (values[2 * i], values[2 * i + 1]) for i, pair in enumerate(pairs)}
