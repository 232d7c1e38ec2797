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
(each segment's answer lengths, a tuple; a plain sequence is one branch).

On CPU, each segment's attention is two batched matmuls around a softmax, with grouped-query heads
handled by a reshape: ~1.7x faster forward + backward than `scaled_dot_product_attention`'s math kernel
(which copies the key/value heads for GQA) and than its CPU flash kernel (slow backward), measured on
SmolLM2-135M segments of 100-300 tokens in bf16. Elsewhere (GPU, or attention dropout) SDPA runs.

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
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "tunery_varlen"
SEGMENT_MULTIPLE = 16  # a segment's scores are computed over its length rounded up to this (see above)


@functools.lru_cache(maxsize=4096)
def _blocked(
    n_prompt: int,
    branch_lens: tuple[int, ...],
    device: torch.device,
    window: int | None = None,
    multiple: int = 1,
) -> torch.Tensor:
    """(n, n) True where a query may NOT attend: the future, every answer branch but its own, and with a
    sliding `window` (Mistral, Gemma) keys `window` or more positions back (positions restart per branch).
    n is the segment's length rounded up to a `multiple` (the extra keys are every query's future)."""
    real = n_prompt + sum(branch_lens)
    n = real + -real % multiple
    blocked = torch.ones((n, n), dtype=torch.bool, device=device).triu(1)
    start = n_prompt + branch_lens[0]
    for length in branch_lens[1:]:
        blocked[start : start + length, n_prompt:start] = True
        start += length
    if window is not None and n > window:
        positions = torch.cat(
            [torch.arange(n_prompt + branch_lens[0])]
            + [torch.arange(n_prompt, n_prompt + b) for b in branch_lens[1:]]
            + [torch.zeros(n - real, dtype=torch.long)]
        ).to(device)
        blocked |= (positions[:, None] - positions[None, :]) >= window
    return blocked


def _segment_attention(
    q: torch.Tensor,  # (1, H, n, D)
    k: torch.Tensor,  # (1, H_kv, n, D)
    v: torch.Tensor,  # (1, H_kv, n, D)
    blocked: torch.Tensor,  # (n, n) bool
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    heads, kv_heads, n, dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    group = heads // kv_heads
    if blocked.shape[0] > n:  # rounded up: zero queries and keys after the segment, hidden by the mask
        extra = blocked.shape[0] - n
        q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        out = _segment_attention(q, k, v, blocked, scaling, softcap, dropout)
        return out[:, :, :n]
    scores = torch.bmm(q.reshape(kv_heads, group * n, dim), k.reshape(kv_heads, n, dim).transpose(1, 2))
    scores = scores.view(kv_heads, group, n, n).mul_(scaling)
    if softcap is not None:  # Gemma 2's logit soft-capping
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill_(blocked, float("-inf"))
    probs = scores.softmax(-1).view(kv_heads, group * n, n)  # bf16 in, fp32 sums inside the kernel
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout)
    return torch.bmm(probs, v.reshape(kv_heads, n, dim)).view(1, heads, n, dim)


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
    prompt_lens: list[int] = kwargs.get("prompt_lens") or [0] * len(lengths)
    branch_lens: list[tuple[int, ...]] = kwargs.get("branch_lens") or [
        (n - p,) for n, p in zip(lengths, prompt_lens, strict=True)
    ]
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
    outputs = []
    # `split` (not slicing) keeps the backward a cheap concatenation instead of one zero-filled full-size
    # gradient per segment.
    pieces = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    for i, ((q, k, v), n_prompt, branches) in enumerate(zip(pieces, prompt_lens, branch_lens, strict=True)):
        if i == pad_tail:
            outputs.append(torch.zeros_like(q))
            continue
        if fast:
            blocked = _blocked(n_prompt, tuple(branches), q.device, window, multiple)
            outputs.append(_segment_attention(q, k, v, blocked, scale, softcap, math_dropout))
            continue
        one_branch = len(branches) == 1
        outputs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if one_branch else ~_blocked(n_prompt, tuple(branches), q.device),
                dropout_p=dropout,
                scale=scale,
                is_causal=one_branch,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        )
    attn_output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, H, T, D)
    return attn_output.transpose(1, 2).contiguous(), None  # (B, T, H, D), as transformers expects


AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
