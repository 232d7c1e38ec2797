"""Sharded full fine-tuning (`--shard` under torchrun), on PyTorch's FSDP2 (`fully_shard`).

Each decoder layer's weights, gradients and AdamW moments are split across the processes: a process holds
1/N of them and gathers a layer's weights only while that layer runs (forward and backward), and gradients
are reduce-scattered back to their owners. Gloo on CPU, NCCL on GPU, as torchrun's process group has it.

The input embedding and the output layer stay whole on every process, like DDP: the recipes' losses apply
the output layer to the final hidden states themselves, outside the model's forward (no tokens x vocabulary
logits are ever built), which needs its weight in hand. Their gradients are averaged over the processes
before the optimizer step (`average_replicated`). On SmolLM2-135M that is a fifth of the weights (its
embedding is large for its size); on an 8B Llama about an eighth.

Checkpoints are PyTorch's distributed checkpoints (DCP): every process writes its shards into
`checkpoints/step-N/sharded/`, and `--resume` reads them back. `final/` is an ordinary model directory,
gathered on the main process.

Sampling (GRPO) runs on the decoding engine, which keeps its own whole copy of the weights while a step
samples: every process builds it together, gathering one decoder layer at a time (`engine_weights`), and
drops it before training on the samples.

Every process must run the same number of forward passes, since each gathers the sharded weights with the
others: the recipes pass their rows through `distributed.even_rows`, which pads a process that has fewer
with copies that count for nothing. SFT, DPO (with IPO and SimPO), KTO, the reward model and GRPO do
(`SHARDS` in their configs); PPO trains LoRA only and refuses --shard with a message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from tunery.errors import TuneryError

SHARDED = "sharded"  # the directory of a checkpoint's (or best weights') shards


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (`model.layers` in every family Tunery covers)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module):
            return module
    raise TuneryError(f"--shard: no decoder layers found in {type(model).__name__}")


def shard_model(model: torch.nn.Module, device: torch.device) -> list[torch.nn.Parameter]:
    """Shard `model` in place: each decoder layer a unit, the rest (final norm) with the root. Returns the
    weights that stay whole on every process (embedding, output layer, a reward model's score head),
    whose gradients `average_replicated` averages.

    Only the main process has read the weights: the others hold the model's structure on the meta device
    (`load_model(empty=True)`), make room for their shards on `device` once sharded, and receive them from
    the main process, one tensor at a time. A machine running N processes so holds the model once while
    loading, not N times."""
    empty = any(p.is_meta for p in model.parameters())
    full = {} if empty else model.state_dict()  # kept whole past sharding, to send
    buffers = {(id(m), name): b for m in model.modules() for name, b in m._buffers.items() if b is not None}
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model, ignored_params=set(whole_weights(model)))
    if empty:
        places: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for m in model.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    places.setdefault(id(p), []).append((m, name))
        model.to_empty(device=device)
        for m in model.modules():  # the buffers were real (rotary tables): put them back
            for name in m._buffers:
                if (id(m), name) in buffers:
                    m._buffers[name] = buffers[id(m), name].to(device)
        for (first, first_name), *others in places.values():  # and tie again what was tied (to_empty
            for m, name in others:  # makes a weight per module: the embedding and the output layer)
                m._parameters[name] = first._parameters[first_name]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    del full
    return [p for p in whole_weights(model) if p.requires_grad]  # (to_empty made new ones)


def whole_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights sharding leaves whole: the embedding, the output layer, a reward model's score head."""
    whole: dict[int, torch.nn.Parameter] = {}
    lm: Any = getattr(model, "lm", model)  # a head over an LM (models/heads.py)
    for module in (lm.get_input_embeddings(), lm.get_output_embeddings(), getattr(model, "score", None)):
        if module is not None:
            whole |= {id(p): p for p in module.parameters()}
    return list(whole.values())


def average_replicated(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of the whole (unsharded) weights over the processes: one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over sharded (DTensor) and whole gradients together: the norm of the full
    gradient, which every process computes alike. Returns it, before clipping."""
    sharded = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().double().pow(2).sum().cpu()
        else:
            whole += g.double().pow(2).sum().cpu()
    device = grads[0].device if grads else torch.device("cpu")
    sharded = sharded.to(device)
    dist.all_reduce(sharded)
    norm = float((sharded.cpu() + whole).sqrt())
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return norm


def save_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every process writes its shards of the weights (and optimizer state) into `directory`."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(directory))


def load_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every process reads its shards from `directory`, whatever the number of processes that wrote them."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the main process's CPU (every process takes part; the others get an
    empty dict)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_model_state_dict(model, options=options))  # type: ignore[arg-type]


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """Inside, an FSDP unit's own weights are whole on this process (every process enters together);
    any other module as it is."""
    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


@contextlib.contextmanager
def engine_weights(model: torch.nn.Module) -> Iterator[None]:
    """Around sampling from `model` (every process together): a sharded model's decoding engine reads its
    weights, one decoder layer gathered at a time, and is dropped after, so its whole copy of the weights
    does not stay beside the shards through training. Nothing for a model that is not sharded."""
    if not isinstance(model, FSDPModule):
        yield
        return
    from tunery.models.decode import decode_model_for, unsupported_reason

    if decode_model_for(model, gather=gathered) is None:
        raise TuneryError(
            f"--shard samples on Tunery's decoding engine, which does not run this model "
            f"({unsupported_reason(model)}): drop --shard, or train with LoRA"
        )
    try:
        yield
    finally:
        model.__dict__.pop("_tunery_decode", None)
