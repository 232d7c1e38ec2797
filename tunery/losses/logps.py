"""Per-token log-probabilities of target tokens, fused with the output projection.

Every method here needs log p(target | prefix) at a few positions of long rows: SFT sums them, DPO sums
them per sequence, KTO and GRPO weight them. Computing `hidden @ W.T` for the whole vocabulary at once
builds a (tokens x 49k) tensor per row; this computes it in chunks, keeps only the log-probs, and works
out the gradient with respect to the hidden states while each chunk's softmax is at hand:

    d logp_i / d hidden_i = W[target_i] - softmax(hidden_i @ W.T) @ W

so the backward pass is one multiply by the incoming per-token gradients. When the output weight is
trained too (full fine-tuning), its gradient depends on those incoming gradients, so the backward
recomputes each chunk's softmax from the saved log-sum-exp.

The logits are those the model samples from (`OutputHead`): Gemma 2 caps them, z = c tanh(a / c) for
a = hidden @ W.T, and a sampling temperature divides them. Each logit's gradient then carries the
derivative dz/da = (1 - tanh(a / c)^2) / T.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

# Rows of logits computed at once. Their scratch buffers are kept between calls: on CPU, page-faulting in
# fresh 50 MB buffers every step costs more than the arithmetic done in them (measured ~8x on the
# bf16 -> fp32 copy), and 256 rows keep the projection matmul at full speed.
CHUNK_ROWS = 256
# On CPU the rows are padded to a multiple of this: oneDNN builds a kernel for each new matrix shape (~20 ms
# for a chunk's two projections on SmolLM2-135M, against ~2 ms for 16 rows of padding), and a step's
# trained-token count changes every step. Padded rows get target 0 and no gradient.
ROW_MULTIPLE = 32
_scratch: dict[tuple[Any, ...], torch.Tensor] = {}


@dataclass(frozen=True)
class OutputHead:
    """A model's output layer as its logits are sampled from: z = c tanh((hidden @ W.T) / c) / T."""

    weight: torch.Tensor  # (V, H): the output projection (the tied embeddings for SmolLM2)
    softcap: float | None = None  # c: the model's final-logit soft-capping (Gemma 2), None when it has none
    temperature: float = 1.0  # T: the distribution a policy samples from is softmax(z)

    def at(self, temperature: float) -> OutputHead:
        """This head with logits divided by a sampling temperature."""
        return replace(self, temperature=temperature)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, V) fp32 logits of (N, H) hidden states, unfused: for the few places that need them all."""
        return _to_logits_((hidden @ self.weight.T.to(hidden.dtype)).float(), self)

    @property
    def linear(self) -> bool:
        """Whether the logits are linear in the hidden states (no soft-capping)."""
        return not self.softcap


def _to_logits_(raw: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """z from a = hidden @ W.T, in place."""
    if head.softcap:
        raw.div_(head.softcap).tanh_().mul_(head.softcap)
    if head.temperature != 1.0:
        raw.div_(head.temperature)
    return raw


def _chain_(grad: torch.Tensor, raw: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """d/da from d/dz, in place in `grad`: times (1 - tanh(a / c)^2) / T. Overwrites `raw` (a)."""
    if head.softcap:
        grad.mul_(raw.div_(head.softcap).tanh_().square_().neg_().add_(1.0))
    if head.temperature != 1.0:
        grad.div_(head.temperature)
    return grad


def _buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device, role: str = "") -> torch.Tensor:
    """Scratch (rows, cols); fp32 raw logits and probabilities share one unless `role` sets them apart."""
    key = (cols, dtype, device, role)
    buf = _scratch.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _scratch[key] = torch.empty((rows, cols), dtype=dtype, device=device)
    return buf[:rows]


def _raw_role(head: OutputHead) -> str:
    """Soft-capping needs the raw logits a after the probabilities are formed: their own fp32 scratch."""
    return "" if head.linear else "raw"


def _dz_da_times_softmax_minus_onehot(
    h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, logsumexp: torch.Tensor, head: OutputHead
) -> torch.Tensor:
    """(softmax(z) - onehot(target)) dz/da, i.e. -d logp / d a, for one chunk (fp32 scratch)."""
    n = h.shape[0]
    raw = torch.mm(h, w.T, out=_buffer(n, w.shape[0], h.dtype, h.device, _raw_role(head)))
    probs = _to_logits_(_buffer(n, w.shape[0], torch.float32, h.device).copy_(raw), head)
    probs.sub_(logsumexp[:, None]).exp_()
    probs[torch.arange(n, device=h.device), target] -= 1.0
    return _chain_(probs, raw, head)


class _LinearLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        head: OutputHead,
        want_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(hidden.dtype)  # (V, H); the frozen bf16 weight is used as is
        chunk_rows = min(CHUNK_ROWS, max(n_rows, 1))
        raw_buf = _buffer(chunk_rows, vocab, hidden.dtype, hidden.device, _raw_role(head))
        probs_buf = _buffer(chunk_rows, vocab, torch.float32, hidden.device)
        logps = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(n_rows, dtype=torch.bool, device=hidden.device)
        entropy = torch.empty(n_rows if want_entropy else 0, dtype=torch.float32, device=hidden.device)
        grad_unit = torch.empty_like(hidden) if need_hidden else None  # d logp_i / d hidden_i
        for start in range(0, n_rows, CHUNK_ROWS):
            h = hidden[start : start + CHUNK_ROWS]  # (n, H)
            target = targets[start : start + CHUNK_ROWS]  # (n,)
            n = h.shape[0]
            raw = torch.mm(h, w.T, out=raw_buf[:n])  # (n, V): a
            probs = _to_logits_(probs_buf[:n].copy_(raw), head)  # z
            row_max = probs.amax(dim=-1)  # (n,)
            target_logit = probs.gather(1, target[:, None]).squeeze(1)
            sum_exp = probs.sub_(row_max[:, None]).exp_().sum(dim=-1)
            lse = row_max + sum_exp.log()
            logsumexp[start : start + n] = lse
            logps[start : start + n] = target_logit - lse
            correct[start : start + n] = target_logit >= row_max
            if want_entropy and (grad_unit is None or not head.linear):
                p = probs.div_(sum_exp[:, None]) if grad_unit is None else probs / sum_exp[:, None]
                entropy[start : start + n] = -torch.special.xlogy(p, p, out=p).sum(-1)
            if grad_unit is not None:
                probs.div_(sum_exp[:, None])  # softmax
                probs[torch.arange(n, device=probs.device), target] -= 1.0
                _chain_(probs, raw, head)
                unit = torch.mm(raw.copy_(probs), w, out=grad_unit[start : start + n]).neg_()
                if want_entropy and head.linear:
                    # unit = (W[target] - softmax @ W) / T, so sum_v p_v z_v = z_target - h . unit and
                    # the entropy lse - sum_v p_v z_v costs one dot product per row.
                    dot = (h.float() * unit.float()).sum(-1)
                    entropy[start : start + n] = lse - target_logit + dot
        ctx.save_for_backward(grad_unit, hidden if need_weight else None, targets, logsumexp)
        ctx.need_weight = need_weight
        ctx.weight = weight if need_weight else None
        ctx.head = head
        ctx.mark_non_differentiable(correct, entropy)
        return logps, correct, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logps: torch.Tensor, _grad_correct: Any, _grad_entropy: Any
    ) -> tuple[Any, Any, None, None, None]:
        grad_unit, hidden, targets, logsumexp = ctx.saved_tensors
        grad_hidden = grad_unit * grad_logps[:, None].to(grad_unit.dtype) if grad_unit is not None else None
        grad_weight = None
        if ctx.need_weight:
            weight = ctx.weight
            w = weight.to(hidden.dtype)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, hidden.shape[0], CHUNK_ROWS):
                h = hidden[start : start + CHUNK_ROWS]
                g = grad_logps[start : start + CHUNK_ROWS]
                probs = _dz_da_times_softmax_minus_onehot(
                    h, w, targets[start : start + CHUNK_ROWS], logsumexp[start : start + CHUNK_ROWS], ctx.head
                )
                probs.mul_(-g[:, None])  # d loss / d a
                grad_weight.addmm_(probs.T, h.float())
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def token_logps(
    hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(z)[target] per row, and whether the target is the argmax (ties count).

    hidden:  (N, H) final hidden states at the N positions that predict a target
    head:    the output layer; z = hidden @ W.T for most models (W: (V, H))
    targets: (N,)   the token each position predicts
    returns  (N,) fp32 log-probabilities, (N,) bool

    Logits are computed in the dtype of `hidden` (bf16 under autocast) and reduced in fp32.
    """
    n = hidden.shape[0]
    hidden, head = _linear_temperature(hidden, head)
    hidden, targets = _padded(hidden, targets)
    logps, correct, _ = _LinearLogSoftmax.apply(hidden, head.weight, targets, head, False)
    return logps[:n], correct[:n]


def token_logps_and_entropy(
    hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` plus the entropy of each position's next-token distribution, (N,) fp32 with no
    gradient: what RL logs to see whether the policy is collapsing onto few answers."""
    n = hidden.shape[0]
    hidden, head = _linear_temperature(hidden, head)
    hidden, targets = _padded(hidden, targets)
    logps, _, entropy = _LinearLogSoftmax.apply(hidden, head.weight, targets, head, True)
    return logps[:n], entropy[:n]


def _linear_temperature(hidden: torch.Tensor, head: OutputHead) -> tuple[torch.Tensor, OutputHead]:
    """Without capping, (h / T) @ W.T is z / T: dividing the (N, H) hidden states costs far less than
    dividing the (N, V) logits and their gradients."""
    if head.linear and head.temperature != 1.0:
        return hidden / head.temperature, replace(head, temperature=1.0)
    return hidden, head


def _padded(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and targets with rows added up to a multiple of ROW_MULTIPLE on CPU (zeros; target 0)."""
    pad = -hidden.shape[0] % ROW_MULTIPLE if hidden.device.type == "cpu" else 0
    if pad:
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, pad))
        targets = torch.nn.functional.pad(targets, (0, pad))
    return hidden, targets
