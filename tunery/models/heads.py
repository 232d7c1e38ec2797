"""Scalar heads on a language model's final hidden states: a reward model and a policy's value head.

Reward model: the score is read at the answer's end-of-turn token, which has attended to the prompt and
the whole answer. The head is a bias-free linear layer (a bias cancels out of every pairwise loss), kept
in fp32. Saved as the LM part (a LoRA adapter in peft's format, or full weights) plus `score.safetensors`.

Value head (PPO's critic): a linear layer with a bias on the policy's own hidden states, read at every
position that predicts a completion token, so V_t is the value of the state before token t. Saved next
to the policy's adapter as `value_head.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml

from tunery.data.feedback import TokenizedPair
from tunery.data.packing import BranchRow, pack_pairs
from tunery.errors import TuneryError
from tunery.models.forward import final_hidden


class RewardModel(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.score = torch.nn.Linear(hidden_size, 1, bias=False)
        # Its own generator: the head depends on the seed only, not on what drew random numbers before.
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn((1, hidden_size), generator=generator) / (hidden_size + 1) ** 0.5
        self.score.weight.data.copy_(weight)

    def forward(self, row: BranchRow) -> torch.Tensor:
        """Scores (2 * n_pairs,) of every answer in the row: chosen at even indices, rejected at odd."""
        hidden = final_hidden(self.lm, row)[row.last_positions]  # (2n, H)
        with torch.autocast(hidden.device.type, enabled=False):  # scores in fp32, not bf16's 3 digits
            return self.score(hidden.float()).squeeze(-1)

    def get_output_embeddings(self) -> Any:
        return self.lm.get_output_embeddings()  # type: ignore[operator]


class PolicyWithValue(torch.nn.Module):
    """A causal LM (the policy) and a value head on its final hidden states, which share the trunk: the
    value loss trains the LoRA weights too, as in the value-head-on-policy PPO setups."""

    def __init__(self, lm: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Linear(hidden_size, 1)
        # Zero: every value starts at 0, so the first advantages are the plain rewards-to-go. A random
        # head would add noise the size of the hidden states to every advantage until it had learned,
        # and with rewards on a smaller scale that noise is all the policy gets to follow.
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V (N,) in fp32 from final hidden states (N, H)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def get_output_embeddings(self) -> Any:
        return self.lm.get_output_embeddings()  # type: ignore[operator]


@torch.no_grad()
def score_pairs(
    model: RewardModel, pairs: list[TokenizedPair], micro_batch_tokens: int = 2048, bf16: bool = False
) -> list[tuple[float, float | None]]:
    """Scores of each pair's chosen answer and rejected answer (None for a single answer), in order."""
    from tunery.data.packing import plan_rows

    model.eval()
    index = {id(p): i for i, p in enumerate(pairs)}
    out: list[tuple[float, float | None]] = [(0.0, None)] * len(pairs)
    device_type = next(model.parameters()).device.type
    for row_pairs in plan_rows(pairs, micro_batch_tokens):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            scores = model(pack_pairs(row_pairs)).tolist()
        for k, pair in enumerate(row_pairs):
            out[index[id(pair)]] = (scores[2 * k], scores[2 * k + 1] if pair.rejected_ids else None)
    return out


def load_reward_model(path: str | Path) -> tuple[RewardModel, Any, dict[str, Any]]:
    """A trained reward model from a run directory or its `final/`: (model, tokenizer, tunery.yaml)."""
    from tunery.models.load import load_model
    from tunery.models.lora import load_adapter, merge_adapter

    path = Path(path)
    if (path / "final" / "tunery.yaml").is_file():
        path = path / "final"
    meta_path = path / "tunery.yaml"
    meta = yaml.safe_load(meta_path.read_text()) if meta_path.is_file() else None
    if not meta or meta.get("method") != "rm" or not (path / "score.safetensors").is_file():
        raise TuneryError(f"{path} is not a Tunery reward model (train one with `tunery train rm`)")
    lm: Any
    lm, tokenizer = load_model(meta["base_model"])
    if (path / "base_adapter").is_dir():
        lm = merge_adapter(lm, path / "base_adapter")
    if (path / "adapter_config.json").is_file():
        lm = load_adapter(lm, path)
    else:
        safetensors.torch.load_model(lm, str(path / "model.safetensors"))
    model = RewardModel(lm, lm.config.hidden_size)
    safetensors.torch.load_model(model.score, str(path / "score.safetensors"))
    return model, tokenizer, meta
