"""Padding-free attention: several conversations packed in one row attend only within themselves.

transformers' own packed-sequence path builds a dense (T, T) block-causal mask and runs attention over the
whole row, so a row of eight 128-token chats pays for 1024² scores of which 1/8 are used. Here each
segment of the row is attended on its own: exact, and attention cost falls with the number of segments.
Segments come in as `cu_seq_lens_q` (cumulative lengths, the name transformers' varlen kernels use),
passed as a model kwarg.

Preference pairs and GRPO groups share their prompt: a segment may hold `prompt | answer 1 | answer 2 |
...`, where each answer attends to the prompt and to itself but never to another answer (its positions
restart where the prompt ends). The prompt is then computed once per pair or group instead of once per
answer. Such segments come in as `prompt_lens` (each segment's shared-prefix length) and `branch_lens`
(each segment's answer lengths, a tuple; a plain sequence is one branch). Conversations or pairs that
begin alike (the same system prompt) share that beginning too: such a segment is a tree of token runs,
`segment_trees` (a run attends to itself and its ancestors; see `Tree`).

On CPU, each segment's attention is two batched matmuls around a softmax, with grouped-query heads
handled by a reshape: ~1.7x faster forward + backward than `scaled_dot_product_attention`'s math kernel
(which copies the key/value heads for GQA) and than its CPU flash kernel (slow backward), measured on
SmolLM2-135M segments of 100-300 tokens in bf16. Elsewhere (GPU, or attention dropout) SDPA runs.

A row of short segments (each attending to at most BATCH_MAX_KEYS keys, padding at most doubling the
scores) goes through as one padded batch instead (`_batch_plan`, `_batched_attention`): the same two
matmuls around a softmax for all of them, where one at a time costs ~8 operators per segment and per
shared-prompt subtree, each layer, forward and backward.

A row's padding tail (`pad_tokens`, data/packing.py), its last segment, gets zeros: it attends to nothing
and nothing attends to it. A segment's scores are computed over its length rounded up to a multiple of
`SEGMENT_MULTIPLE` (the extra keys come after every query, so the causal mask hides them; the extra
queries' outputs are dropped): on CPU oneDNN builds a kernel for each new matrix shape (~1 ms for a
segment's), and rounded lengths repeat.

Without `cu_seq_lens_q` the function is transformers' SDPA attention unchanged (used for sampling with a
KV cache and a 4D padding mask).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tunery.data.packing import Tree, branch_tree, tree_positions

ATTENTION_NAME = "tunery_varlen"
SEGMENT_MULTIPLE = 16  # a segment's scores are computed over its length rounded up to this (see above)


def _is_chain(tree: Tree) -> bool:
    """Whether each run continues the one before it: plain causal attention."""
    return all(parent == i - 1 for i, (_, parent) in enumerate(tree))


@functools.lru_cache(maxsize=4096)
def _blocked(tree: Tree, device: torch.device, window: int | None = None, multiple: int = 1) -> torch.Tensor:
    """(n, n) True where a query may NOT attend: the future, every run that is not its own or an ancestor,
    and with a sliding `window` (Mistral, Gemma) keys `window` or more positions back. n is the segment's
    length rounded up to a `multiple` (the extra keys are every query's future)."""
    real = sum(length for length, _ in tree)
    n = real + -real % multiple
    blocked = torch.ones((n, n), dtype=torch.bool, device=device).triu(1)
    if not _is_chain(tree):
        visible = torch.eye(len(tree), dtype=torch.bool)  # visible[i, j]: run i may attend to run j
        for i, (_, parent) in enumerate(tree):
            if parent >= 0:
                visible[i] |= visible[parent]
        run = torch.repeat_interleave(torch.arange(len(tree)), torch.tensor([length for length, _ in tree]))
        hidden = ~visible[run[:, None], run[None, :]]
        blocked[:real, :real] |= hidden.to(device)
    if window is not None and n > window:
        positions = torch.tensor(tree_positions(tree) + [0] * (n - real), device=device)
        blocked |= (positions[:, None] - positions[None, :]) >= window
    return blocked


def _segment_attention(
    q: torch.Tensor,  # (1, H, n_q, D)
    k: torch.Tensor,  # (1, H_kv, n_k, D)
    v: torch.Tensor,  # (1, H_kv, n_k, D)
    blocked: torch.Tensor,  # (n_q, n_k) bool, or larger: rounded up to SEGMENT_MULTIPLE
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    heads, kv_heads, n, n_k, dim = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    group = heads // kv_heads
    if blocked.shape != (n, n_k):  # rounded up: zero queries and keys after the real ones, hidden by the mask
        q = F.pad(q, (0, 0, 0, blocked.shape[0] - n))
        k, v = (F.pad(t, (0, 0, 0, blocked.shape[1] - n_k)) for t in (k, v))
        out = _segment_attention(q, k, v, blocked, scaling, softcap, dropout)
        return out[:, :, :n]
    scores = torch.bmm(q.reshape(kv_heads, group * n, dim), k.reshape(kv_heads, n_k, dim).transpose(1, 2))
    scores = scores.view(kv_heads, group, n, n_k).mul_(scaling)
    if softcap is not None:  # Gemma 2's logit soft-capping
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill_(blocked, float("-inf"))
    probs = scores.softmax(-1).view(kv_heads, group * n, n_k)  # bf16 in, fp32 sums inside the kernel
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout)
    return torch.bmm(probs, v.reshape(kv_heads, n_k, dim)).view(1, heads, n, dim)


def _subtrees(tree: Tree) -> list[tuple[int, int]] | None:
    """For a tree whose first run is a trunk that every other run descends from, with two or more runs
    hanging from it: each child subtree as (first run, end run), contiguous in row order. Else None."""
    if len(tree) < 3 or tree[0][1] != -1 or tree[0][0] == 0:
        return None
    starts = [i for i, (_, parent) in enumerate(tree) if parent == 0]
    if len(starts) < 2 or starts[0] != 1 or any(parent < 0 for _, parent in tree[1:]):
        return None
    return list(zip(starts, [*starts[1:], len(tree)], strict=True))


@functools.lru_cache(maxsize=512)  # a pair's subtree rarely repeats: a small cache, and no square kept
def _blocked_below(
    subtree: Tree, device: torch.device, window: int | None = None, multiple: int = 1
) -> torch.Tensor:
    """The mask of a subtree's queries over the trunk's keys then its own: `subtree` is the trunk as run 0
    and the subtree's runs after it. Rows and columns each rounded up to a `multiple`: the extra columns
    are hidden from every real query, the extra rows (queries whose outputs are dropped) see everything."""
    trunk = subtree[0][0]
    full = _blocked.__wrapped__(subtree, device, window)[trunk:]  # (L, trunk + L)
    n_q, n_k = full.shape
    rows, cols = n_q + -n_q % multiple, n_k + -n_k % multiple
    if (rows, cols) == (n_q, n_k):
        return full
    out = torch.zeros((rows, cols), dtype=torch.bool, device=device)
    out[:n_q] = True
    out[:n_q, :n_k] = full
    return out


def _tree_attention(
    q: torch.Tensor,  # (1, H, n, D)
    k: torch.Tensor,  # (1, H_kv, n, D)
    v: torch.Tensor,
    tree: Tree,
    parts: list[tuple[int, int]],  # `_subtrees(tree)`
    scaling: float,
    softcap: float | None,
    window: int | None,
    multiple: int,
    dropout: float,
) -> torch.Tensor:
    """A segment of conversations (or pairs) sharing a trunk: the trunk attends to itself, then each child
    subtree's queries attend to the trunk's keys and its own, so no scores are spent between subtrees that
    never see each other (a whole-segment mask would cost (segment length)² instead)."""
    lengths = [length for length, _ in tree]
    trunk = lengths[0]
    sizes = [sum(lengths[a:b]) for a, b in parts]
    q_parts, k_parts, v_parts = (t.split([trunk, *sizes], 2) for t in (q, k, v))
    trunk_blocked = _blocked(((trunk, -1),), q.device, window, multiple)
    outputs = [
        _segment_attention(q_parts[0], k_parts[0], v_parts[0], trunk_blocked, scaling, softcap, dropout)
    ]
    for i, (a, b) in enumerate(parts, start=1):
        subtree = ((trunk, -1), *((length, parent - a + 1 if parent else 0) for length, parent in tree[a:b]))
        blocked = _blocked_below(subtree, q.device, window, multiple)
        keys = torch.cat([k_parts[0], k_parts[i]], 2)
        values = torch.cat([v_parts[0], v_parts[i]], 2)
        outputs.append(_segment_attention(q_parts[i], keys, values, blocked, scaling, softcap, dropout))
    return torch.cat(outputs, 2)


@dataclass(frozen=True)
class _Batch:
    """A row's segments (and a shared trunk's subtrees) attended as one padded batch: item s's queries
    are row positions `queries[s]` and its keys `keys[s]` (padding points at an extra zero row, index T),
    `blocked` (S, 1, 1, Lq, Lk) masks as `_blocked` does (padding keys hidden; padding queries see key 0,
    so no softmax row is empty), and `outputs` (T,) is where each row position's output sits among the
    S * Lq outputs (S * Lq: a zero row, for the padding tail)."""

    queries: torch.Tensor  # (S, Lq) long
    keys: torch.Tensor  # (S, Lk) long
    blocked: torch.Tensor
    outputs: torch.Tensor  # (T,) long


BATCH_MAX_KEYS = 512  # longer items are attended one at a time (their scores dominate, padding costs more)


@functools.lru_cache(maxsize=64)
def _batch_plan(
    lengths: tuple[int, ...],
    trees: tuple[Tree, ...],
    pad_tail: int | None,
    window: int | None,
    device: torch.device,
) -> _Batch | None:
    """The batch for a row of short segments, or None when its padding would cost more than it saves
    (an item over BATCH_MAX_KEYS keys, or padded scores over twice the real ones)."""
    items: list[tuple[range, list[int], torch.Tensor]] = []
    start = 0
    for i, (n, tree) in enumerate(zip(lengths, trees, strict=True)):
        if i == pad_tail:
            start += n
            continue
        parts = _subtrees(tree)
        if parts is None:
            items.append(
                (range(start, start + n), list(range(start, start + n)), _blocked(tree, device, window))
            )
        else:
            trunk = tree[0][0]
            runs = [length for length, _ in tree]
            trunk_keys = list(range(start, start + trunk))
            items.append((range(start, start + trunk), trunk_keys, _blocked(((trunk, -1),), device, window)))
            offset = start + trunk
            for a, b in parts:
                size = sum(runs[a:b])
                subtree = (
                    (trunk, -1),
                    *((length, parent - a + 1 if parent else 0) for length, parent in tree[a:b]),
                )
                own = list(range(offset, offset + size))
                items.append(
                    (range(offset, offset + size), trunk_keys + own, _blocked_below(subtree, device, window))
                )
                offset += size
        start += n
    items = [item for item in items if len(item[0])]
    if not items:
        return None
    n_q = max(len(q) for q, _, _ in items)
    n_k = max(len(k) for _, k, _ in items)
    n_q, n_k = n_q + -n_q % SEGMENT_MULTIPLE, n_k + -n_k % SEGMENT_MULTIPLE
    real = sum(len(q) * len(k) for q, k, _ in items)
    if n_k > BATCH_MAX_KEYS or len(items) * n_q * n_k > 2 * real + 64 * 64:
        return None
    total = start
    queries = torch.full((len(items), n_q), total, dtype=torch.long)
    keys = torch.full((len(items), n_k), total, dtype=torch.long)
    blocked = torch.ones((len(items), n_q, n_k), dtype=torch.bool)
    blocked[:, :, 0] = False  # padding queries see the first key (their outputs are dropped)
    outputs = torch.full((total,), len(items) * n_q, dtype=torch.long)
    for s, (q, k, mask) in enumerate(items):
        queries[s, : len(q)] = torch.tensor(q)
        keys[s, : len(k)] = torch.tensor(k)
        blocked[s, : len(q), : len(k)] = mask.cpu()
        outputs[q.start : q.stop] = torch.arange(s * n_q, s * n_q + len(q))
    return _Batch(queries.to(device), keys.to(device), blocked[:, None, None].to(device), outputs.to(device))


def _batched_attention(
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, H_kv, T, D)
    value: torch.Tensor,
    batch: _Batch,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Every item of `batch` in one pair of batched matmuls; returns (1, T, H, D). A row of short segments
    otherwise pays ~8 operators per segment (and per shared-prompt subtree) per layer, forward and backward:
    for 8 short pairs, ~200 a layer."""
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    group = heads // kv_heads
    items, n_q = batch.queries.shape
    n_k = batch.keys.shape[1]

    # index_select rather than indexing: its backward is an index_add, ~2.4x faster forward and backward
    # than the accumulating index_put of indexing's (measured: 9 items of 80 keys out of 353 rows, bf16)
    def gathered(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (S, heads, L, D)
        rows = F.pad(t[0].transpose(0, 1), (0, 0, 0, 0, 0, 1))  # (T + 1, heads, D), the last row zeros
        return rows.index_select(0, index.flatten()).view(*index.shape, *rows.shape[1:]).transpose(1, 2)

    q = gathered(query, batch.queries).reshape(items * kv_heads, group * n_q, dim)
    k = gathered(key, batch.keys).reshape(items * kv_heads, n_k, dim)
    v = gathered(value, batch.keys).reshape(items * kv_heads, n_k, dim)
    scores = torch.bmm(q, k.transpose(1, 2)).view(items, kv_heads, group, n_q, n_k).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill_(batch.blocked, float("-inf"))
    probs = scores.softmax(-1).view(items * kv_heads, group * n_q, n_k)
    out = torch.bmm(probs, v).view(items, heads, n_q, dim).transpose(1, 2).reshape(items * n_q, heads, dim)
    out = F.pad(out, (0, 0, 0, 0, 0, 1))  # the padding tail's zero row
    return out.index_select(0, batch.outputs).unsqueeze(0)


def _capped_attention(
    query: torch.Tensor,  # (B, H, q, D)
    key: torch.Tensor,  # (B, H_kv, k, D)
    value: torch.Tensor,  # (B, H_kv, k, D)
    mask: torch.Tensor | None,  # (B, 1, q, k) bool, True where a query may attend; None: causal
    scaling: float | None,
    softcap: float,
) -> torch.Tensor:
    """Attention with soft-capped logits over a boolean mask (what SDPA does, plus the cap): sampling for
    Gemma 2. Returns (B, q, H, D)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        n_q, n_k = scores.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    scores = scores.masked_fill(~mask.bool(), float("-inf"))
    return (scores.float().softmax(-1).to(value.dtype) @ value).transpose(1, 2).contiguous()


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    value: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    softcap: float | None = kwargs.get("softcap")
    if cu_seq_lens is None and softcap is not None:  # SDPA cannot soft-cap (Gemma 2 sampling)
        return _capped_attention(query, key, value, attention_mask, scaling, softcap), None
    if cu_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    assert isinstance(cu_seq_lens, torch.Tensor)
    bounds = cu_seq_lens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    trees: list[Tree] | None = kwargs.get("segment_trees")
    if trees is None:
        prompt_lens: list[int] = kwargs.get("prompt_lens") or [0] * len(lengths)
        branch_lens: list[tuple[int, ...]] = kwargs.get("branch_lens") or [
            (n - p,) for n, p in zip(lengths, prompt_lens, strict=True)
        ]
        trees = [branch_tree(p, tuple(b)) for p, b in zip(prompt_lens, branch_lens, strict=True)]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window: int | None = kwargs.get("sliding_window")
    # the math path also serves what SDPA cannot do: soft-capping, and a window without a dense mask
    special = softcap is not None or window is not None
    fast = special or (query.device.type == "cpu" and (dropout == 0.0 or not module.training))
    math_dropout = dropout if special and module.training else 0.0
    multiple = SEGMENT_MULTIPLE if query.device.type == "cpu" else 1
    pad_tokens = kwargs.get("pad_tokens") or 0
    if pad_tokens and lengths[-1] != pad_tokens:
        raise ValueError(f"pad_tokens={pad_tokens} is not the last segment's length ({lengths[-1]})")
    pad_tail = len(lengths) - 1 if pad_tokens else None  # the padding tail's segment
    if fast and math_dropout == 0.0 and query.shape[0] == 1:
        shape = tuple(tuple((int(n), int(parent)) for n, parent in tree) for tree in trees)
        batch = _batch_plan(tuple(lengths), shape, pad_tail, window, query.device)
        if batch is not None:
            return _batched_attention(query, key, value, batch, scale, softcap), None
    outputs = []
    # `split` (not slicing) keeps the backward a cheap concatenation instead of one zero-filled full-size
    # gradient per segment.
    pieces = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    for i, ((q, k, v), tree) in enumerate(zip(pieces, trees, strict=True)):
        if i == pad_tail:
            outputs.append(torch.zeros_like(q))
            continue
        if fast:
            tree = tuple(tree)
            parts = _subtrees(tree)
            if parts is not None:
                outputs.append(
                    _tree_attention(q, k, v, tree, parts, scale, softcap, window, multiple, math_dropout)
                )
                continue
            blocked = _blocked(tree, q.device, window, multiple)
            outputs.append(_segment_attention(q, k, v, blocked, scale, softcap, math_dropout))
            continue
        one_branch = _is_chain(tree)
        outputs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if one_branch else ~_blocked(tuple(tree), q.device),
                dropout_p=dropout,
                scale=scale,
                is_causal=one_branch,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        )
    attn_output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, H, T, D)
    return attn_output.transpose(1, 2).contiguous(), None  # (B, T, H, D), as transformers expects


AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
