"""Forward passes over packed preference rows: per-answer log-probabilities and last-token states."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from tunery.data.packing import BranchRow
from tunery.losses.logps import OutputHead, token_logps


def final_hidden(model: torch.nn.Module, row: BranchRow) -> torch.Tensor:
    """(T, H) final hidden states (after the last norm) of a packed row; the output layer is skipped."""
    out = model(**row.model_kwargs(), logits_to_keep=row.positions[:0], output_hidden_states=True)
    return out.hidden_states[-1][0]  # type: ignore[no-any-return]


def sequence_logps(
    model: torch.nn.Module, head: OutputHead, row: BranchRow
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of every answer in the row, their trained-token counts and the number of
    argmax-correct tokens, each (n_sequences,); for pairs, chosen answers at even indices."""
    hidden = final_hidden(model, row)[row.positions]  # (N, H): only positions that predict an answer token
    logps, correct = token_logps(hidden, head, row.targets)  # (N,), (N,)
    n_seq = row.n_sequences
    summed = torch.zeros(n_seq, dtype=logps.dtype, device=logps.device).index_add(0, row.sequence, logps)
    counts = torch.bincount(row.sequence, minlength=n_seq)
    n_correct = torch.bincount(row.sequence, weights=correct.float(), minlength=n_seq)
    return summed, counts, n_correct


def output_head(model: torch.nn.Module) -> OutputHead:
    """The output layer (through DDP and peft wrappers): its weight (V, H), and the soft-capping of its
    logits where the model has one (Gemma 2's `final_logit_softcapping`)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    weight = inner.get_output_embeddings().weight  # type: ignore[operator,union-attr]
    config = getattr(getattr(inner, "lm", inner), "config", None)  # a reward model's or policy's trunk
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(weight, float(softcap) if softcap else None)
