"""Padding-free packing: several conversations in one row, each with its own positions and attention.

A packed row carries `position_ids` that restart at 0 for every conversation and `cu_seq_lens`, the
cumulative lengths that `models/attention.py` uses to keep attention inside each conversation. Targets are
shifted per conversation before concatenation, so the last token of one conversation never predicts the
first token of the next. The loss of a packed row is therefore exactly the sum of the per-conversation
losses (tests/unit/test_packing.py checks it against unpacked forward passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from tunery.data.feedback import TokenizedPair
from tunery.data.template import TokenizedChat

IGNORE = -100


class _Sized(Protocol):
    @property
    def n_tokens(self) -> int: ...


Item = TypeVar("Item", bound=_Sized)


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    cu_seq_lens: torch.Tensor  # (n + 1,) cumulative lengths, starting at 0
    targets: torch.Tensor  # (T,) next-token ids, IGNORE where not trained

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_trained(self) -> int:
        return int((self.targets != IGNORE).sum())


def shifted_targets(chat: TokenizedChat) -> list[int]:
    """targets[j] is the token position j must predict: input_ids[j + 1] where that token is trained."""
    ids, mask = chat.input_ids, chat.label_mask
    return [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]


def pack(chats: list[TokenizedChat]) -> PackedRow:
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for chat in chats:
        input_ids += chat.input_ids
        position_ids += range(chat.n_tokens)
        targets += shifted_targets(chat)
        bounds.append(len(input_ids))
    return PackedRow(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
    )


def plan_rows(chats: list[Item], token_budget: int) -> list[list[Item]]:
    """Group chats into rows of at most `token_budget` tokens (first-fit decreasing; long chats sit alone)."""
    rows: list[list[Item]] = []
    room: list[int] = []
    for chat in sorted(chats, key=lambda c: -c.n_tokens):
        n = chat.n_tokens
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(chat)
                room[r] -= n
                break
        else:
            rows.append([chat])
            room.append(token_budget - n)
    return rows


def shard(chats: list[Item], rank: int, world_size: int) -> list[Item]:
    """This rank's share of a step's chats, balanced by token count. Every rank computes the same split."""
    loads = [0] * world_size
    owned: list[list[Item]] = [[] for _ in range(world_size)]
    for chat in sorted(chats, key=lambda c: -c.n_tokens):
        r = loads.index(min(loads))
        owned[r].append(chat)
        loads[r] += chat.n_tokens
    return owned[rank]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A fixed shuffle per (seed, epoch): the data order needs no saved state to resume exactly."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def step_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step `step` (0-based): `batch_size` examples, the last batch of an epoch
    may be smaller, as OpenAI counts steps (`ceil(n / batch_size) * n_epochs`)."""
    steps_per_epoch = -(-n // batch_size)
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(n, seed, epoch)
    return order[within * batch_size : (within + 1) * batch_size]


# --- preference pairs ------------------------------------------------------------------------------------


@dataclass
class PairRow:
    """Pairs packed as `prompt | chosen | rejected` segments; the prompt runs once for both answers.

    Sequence 2k is pair k's chosen answer and 2k + 1 its rejected one (empty for unpaired feedback).
    `positions[i]` is a row position whose output predicts `targets[i]`, a trained token of sequence
    `sequence[i]`; summing token log-probs by sequence gives each answer's log-probability.
    """

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    cu_seq_lens: torch.Tensor  # (n + 1,)
    branch_starts: list[int]  # per segment: where the rejected branch starts in the row
    prompt_lens: list[int]  # per segment: shared prompt length
    positions: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    sequence: torch.Tensor  # (N,)
    last_positions: torch.Tensor  # (2n,) each sequence's last token (a reward model's score is read there)
    n_pairs: int

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def model_kwargs(self) -> dict[str, object]:
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "branch_starts": self.branch_starts,
            "prompt_lens": self.prompt_lens,
            "use_cache": False,
        }


def pack_pairs(pairs: list[TokenizedPair]) -> PairRow:
    input_ids: list[int] = []
    position_ids: list[int] = []
    bounds, branch_starts, prompt_lens = [0], [], []
    positions: list[int] = []
    targets: list[int] = []
    sequence: list[int] = []
    last_positions: list[int] = []
    for k, pair in enumerate(pairs):
        start, n_prompt = len(input_ids), len(pair.prompt_ids)
        branch_starts.append(start + n_prompt + len(pair.chosen_ids))
        prompt_lens.append(n_prompt)
        input_ids += pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        position_ids += range(n_prompt + len(pair.chosen_ids))
        position_ids += range(n_prompt, n_prompt + len(pair.rejected_ids))
        for seq, ids, mask, offset in (
            (2 * k, pair.chosen_ids, pair.chosen_mask, start + n_prompt),
            (2 * k + 1, pair.rejected_ids, pair.rejected_mask, branch_starts[-1]),
        ):
            for j, (token, trained) in enumerate(zip(ids, mask, strict=True)):
                if trained:
                    # The token before answer token j: the prompt's last token for j = 0.
                    positions.append(offset + j - 1 if j else start + n_prompt - 1)
                    targets.append(token)
                    sequence.append(seq)
            last_positions.append(offset + len(ids) - 1 if ids else start + n_prompt - 1)
        bounds.append(len(input_ids))
    return PairRow(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.long),
        branch_starts=branch_starts,
        prompt_lens=prompt_lens,
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        sequence=torch.tensor(sequence, dtype=torch.long),
        last_positions=torch.tensor(last_positions, dtype=torch.long),
        n_pairs=len(pairs),
    )
