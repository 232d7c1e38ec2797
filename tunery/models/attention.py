"""Padding-free attention: several conversations packed in one row attend only within themselves.

transformers' own packed-sequence path builds a dense (T, T) block-causal mask and runs attention over the
whole row, so a row of eight 128-token chats pays for 1024² scores of which 1/8 are used. Here each
segment of the row goes through `scaled_dot_product_attention(is_causal=True)` on its own: exact,
no mask to build, and attention cost falls with the number of segments. Segments come in as
`cu_seq_lens_q` (cumulative lengths, the name transformers' varlen kernels use), passed as a model kwarg.

Preference pairs share their prompt: a segment may hold `prompt | chosen | rejected`, where the rejected
branch attends to the prompt and to itself but never to the chosen branch (its positions restart where
the prompt ends). The prompt is then computed once per pair instead of twice. Such segments come in as
`branch_starts`: for each segment, the index in the row where its second branch begins (equal to the
segment's end when it has one branch only); `prompt_lens` gives each segment's shared-prefix length.

Without `cu_seq_lens_q` the function is transformers' SDPA attention unchanged (used for sampling with a
KV cache and a 4D padding mask).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "tunery_varlen"


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
    if cu_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    assert isinstance(cu_seq_lens, torch.Tensor)
    bounds = cu_seq_lens.tolist()
    branch_starts: list[int] | None = kwargs.get("branch_starts")
    prompt_lens: list[int] | None = kwargs.get("prompt_lens")
    enable_gqa = query.shape[1] != key.shape[1]

    def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=enable_gqa
        )

    # `split` (not slicing) keeps the backward a cheap concatenation instead of one zero-filled full-size
    # gradient per segment. The math kernel beats CPU flash attention here: its backward is ~3x slower
    # for chat-length segments (measured on SmolLM2-135M, 8 x 128 tokens, bf16).
    kernel = sdpa_kernel(SDPBackend.MATH) if query.device.type == "cpu" else contextlib.nullcontext()
    outputs: list[torch.Tensor] = []
    with kernel:
        if branch_starts is None:
            lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
            pieces = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
            outputs = [causal(q, k, v) for q, k, v in pieces]
        else:
            assert prompt_lens is not None
            lengths = []  # alternating: prompt + first branch, second branch (possibly empty)
            for start, fork, end in zip(bounds[:-1], branch_starts, bounds[1:], strict=True):
                lengths += [fork - start, end - fork]
            qs, ks, vs = query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)
            for i, n_prompt in enumerate(prompt_lens):
                q1, k1, v1, q2, k2, v2 = (
                    qs[2 * i],
                    ks[2 * i],
                    vs[2 * i],
                    qs[2 * i + 1],
                    ks[2 * i + 1],
                    vs[2 * i + 1],
                )
                outputs.append(causal(q1, k1, v1))
                if q2.shape[2]:
                    outputs.append(_second_branch(q2, k1, v1, k2, v2, n_prompt, dropout, scaling, enable_gqa))
    attn_output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, H, T, D)
    return attn_output.transpose(1, 2).contiguous(), None  # (B, T, H, D), as transformers expects


def _second_branch(
    q: torch.Tensor,  # (B, H, R, D) the second branch's queries
    k1: torch.Tensor,  # (B, H_kv, P + C, D) prompt and first branch
    v1: torch.Tensor,
    k2: torch.Tensor,  # (B, H_kv, R, D)
    v2: torch.Tensor,
    n_prompt: int,
    dropout: float,
    scaling: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """The second branch attends to the shared prompt (all of it) and causally to itself."""
    keys = torch.cat([k1[:, :, :n_prompt], k2], dim=2)  # (B, H_kv, P + R, D)
    values = torch.cat([v1[:, :, :n_prompt], v2], dim=2)
    n = q.shape[2]
    mask = torch.ones((n, n_prompt + n), dtype=torch.bool, device=q.device)
    mask[:, n_prompt:] = torch.ones((n, n), dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=enable_gqa
    )


AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
