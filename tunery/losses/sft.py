"""Supervised fine-tuning loss: next-token cross-entropy over the trained positions only, fused with the
output projection so the (tokens x vocabulary) logits never exist in full."""

from __future__ import annotations

from typing import Any

import torch

# Rows of logits computed at once. Their scratch buffers are kept between calls: on CPU, page-faulting in
# fresh 50 MB buffers every step costs more than the arithmetic done in them (measured ~8x on the
# bf16 -> fp32 copy), and 256 rows keep the projection matmul at full speed.
CHUNK_ROWS = 256
_scratch: dict[tuple[Any, ...], torch.Tensor] = {}


def _buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (cols, dtype, device)
    buf = _scratch.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _scratch[key] = torch.empty((rows, cols), dtype=dtype, device=device)
    return buf[:rows]


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`, with all gradients computed chunk by chunk in the
    forward pass (the softmax of a chunk is all the backward needs, and it is at hand then)."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(hidden.dtype)  # (V, H); the frozen bf16 weight is used as is
        chunk_rows = min(CHUNK_ROWS, max(n_rows, 1))
        logits_buf = _buffer(chunk_rows, vocab, hidden.dtype, hidden.device)
        probs_buf = _buffer(chunk_rows, vocab, torch.float32, hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        nll_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, n_rows, CHUNK_ROWS):
            h = hidden[start : start + CHUNK_ROWS]  # (n, H)
            target = targets[start : start + CHUNK_ROWS]  # (n,)
            n = h.shape[0]
            logits = torch.mm(h, w.T, out=logits_buf[:n])  # (n, V)
            probs = probs_buf[:n].copy_(logits)
            row_max = probs.amax(dim=-1)  # (n,)
            target_logit = probs.gather(1, target[:, None]).squeeze(1)
            sum_exp = probs.sub_(row_max[:, None]).exp_().sum(dim=-1)
            nll_sum += (row_max + sum_exp.log() - target_logit).sum()
            n_correct += (target_logit >= row_max).sum()
            if need_hidden or need_weight:
                probs.div_(sum_exp[:, None])  # softmax
                probs[torch.arange(n, device=probs.device), target] -= 1.0  # d nll / d logits
                grad_logits = logits.copy_(probs)  # reuse the logits buffer, in the compute dtype
                if grad_hidden is not None:
                    torch.mm(grad_logits, w, out=grad_hidden[start : start + n])
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(n_correct)
        return nll_sum, n_correct

    @staticmethod
    def backward(ctx: Any, grad_sum: torch.Tensor, _grad_correct: torch.Tensor) -> tuple[Any, Any, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_sum.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_sum).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
        )


def sft_loss(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the targets, and the number of argmax-correct tokens.

    hidden:         (N, H) final hidden states at the N trained positions only
    lm_head_weight: (V, H) output projection (the tied embeddings for SmolLM2)
    targets:        (N,)   the token each position must predict

    nll = sum_i [ logsumexp(hidden_i @ W.T) - (hidden_i @ W.T)[targets_i] ]

    The sum (not the mean) is returned so a step can divide by its total trained-token count across
    micro-batches and processes: every token weighs the same however the batch is split, which avoids the
    gradient-accumulation normalisation bug of per-micro-batch means. Logits are computed in the dtype of
    `hidden` (bf16 under autocast) and reduced in fp32.
    """
    nll_sum, n_correct = _LinearCrossEntropy.apply(hidden, lm_head_weight, targets)
    return nll_sum, n_correct
