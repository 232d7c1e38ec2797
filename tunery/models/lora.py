"""LoRA through peft, mixed precision for frozen weights, and adapter loading/merging."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from tunery.errors import TuneryError
from tunery.models.locate import adapter_dir  # torch-free, so the CLI checks --adapter before loading


def apply_lora(model: PreTrainedModel, rank: int, alpha: int, dropout: float, targets: str) -> PeftModel:
    """Wrap `model` with LoRA adapters. `targets` is 'all-linear' (every linear layer but the LM head) or a
    comma-separated list of module names such as 'q_proj,v_proj'."""
    target_modules: str | list[str] = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    from tunery.models.quantize import is_quantized

    quantized = is_quantized(model)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise TuneryError(f"lora_targets={targets!r}: {exc}") from exc
    over_quantized = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear:
            module.forward = MethodType(_lora_linear_forward, module)  # type: ignore[method-assign]
        elif type(module).__module__ == "peft.tuners.lora.bnb":  # over a quantized base (--quantize)
            module.forward = MethodType(_quantized_lora_forward, module)  # type: ignore[method-assign]
            over_quantized += 1
    if quantized and not over_quantized:
        # peft took bitsandbytes for absent (its availability checks are cached): its plain LoRA layers
        # would run on the quantized weights' raw storage
        raise TuneryError("LoRA over a quantized base: peft did not find bitsandbytes; report this as a bug")
    return peft_model


class _LoraLinearFunction(torch.autograd.Function):
    """`y = x W^T + b + s (x A^T) B^T` for a frozen base weight W (and bias b), with its backward written
    out so that each sum is accumulated inside a GEMM: the input's gradient `g W + s (g B) A` is one
    `addmm`, where autograd would compute the base and the adapter contributions into two full
    (tokens x in_features) tensors and add them. Those adds, and the forward's scale and add, were ~25% of
    a LoRA step of SmolLM2-135M on CPU (measured: a step of 536 tokens 0.98 s with peft's LoRA layers on
    all linear layers, against 0.69 s with LoRA on q_proj alone)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        down = flat @ lora_a.t()  # (tokens, r)
        # the base layer's own op, so that with B = 0 the output is the base model's to the bit (a DPO or
        # PPO reference computed with the adapter switched off then equals the policy at the start)
        base = torch.nn.functional.linear(x, weight, bias)
        out = base.view(-1, base.shape[-1]).addmm_(down, lora_b.t(), alpha=scaling)  # in place: no copy
        ctx.save_for_backward(flat, down, weight, lora_a, lora_b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(base.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        flat, down, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_down = (g @ lora_b).mul_(ctx.scaling)  # (tokens, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(g_down, lora_a).view(ctx.x_shape)
        grad_a = g_down.t() @ flat if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ down).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None


class _QuantizedLoraFunction(torch.autograd.Function):
    """`_LoraLinearFunction` over a bitsandbytes layer (models/quantize.py): the forward runs the quantized
    layer as it is, keeping nothing for the backward, and the backward dequantizes its weight once for the
    input's gradient. peft's own path for these layers adds the adapter's output as separate tensors and
    copies the base output; on a 1.1B model a step's working memory was ~25% above the unquantized
    model's (bench/RESULTS.md)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, base: Any
    ) -> torch.Tensor:
        with torch.no_grad():
            out = base(x)
        flat = x.reshape(-1, x.shape[-1])
        down = flat @ lora_a.t()
        out = out.reshape(-1, out.shape[-1]).addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, down, lora_a, lora_b)
        ctx.scaling, ctx.x_shape, ctx.base = scaling, x.shape, base
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        from tunery.models.quantize import dequantized_weight

        flat, down, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_down = (g @ lora_b).mul_(ctx.scaling)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantized_weight(ctx.base, g.dtype)
            grad_x = (g @ weight).addmm_(g_down, lora_a).view(ctx.x_shape)
        grad_a = g_down.t() @ flat if ctx.needs_input_grad[1] else None
        grad_b = (g.t() @ down).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None


class _JoinedLoraFunction(torch.autograd.Function):
    """`_LoraLinearFunction` for adapted linear layers that read one input (q|k|v, gate|up) as one layer
    whose output is theirs side by side: one GEMM for the frozen weights (stacked), one for the adapters'
    down-projections (their A stacked), then each adapter's up-projection added into its own columns; the
    backward's input gradient is again one GEMM through each. Where each layer ran its own GEMMs and
    autograd node, a decoder layer's seven adapted layers now run as four. With `split`, the outputs come
    back one per layer (views of the joined output); else joined (a gate|up projection's, for SwiGLU)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,  # (sum of outs, in): the layers' frozen weights stacked
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,  # (layers x rank, in)
        scaling: float,
        split: bool,
        *lora_bs: torch.Tensor,  # each (out, rank)
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        flat = x.reshape(-1, x.shape[-1])
        down = flat @ lora_a.t()  # (tokens, layers x rank)
        out = torch.nn.functional.linear(flat, weight, bias)  # (tokens, sum of outs)
        sizes = [b.shape[0] for b in lora_bs]
        rank = lora_a.shape[0] // len(lora_bs)
        for i, (part, lora_b) in enumerate(zip(out.split(sizes, 1), lora_bs, strict=True)):
            part.addmm_(down[:, i * rank : (i + 1) * rank], lora_b.t(), alpha=scaling)  # in place
        ctx.save_for_backward(flat, down, weight, lora_a, *lora_bs)
        ctx.scaling, ctx.x_shape, ctx.split, ctx.sizes = scaling, x.shape, split, sizes
        lead = x.shape[:-1]
        if split:
            return tuple(part.view(*lead, part.shape[1]) for part in out.split(sizes, 1))
        return out.view(*lead, out.shape[1])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        flat, down, weight, lora_a, *lora_bs = ctx.saved_tensors
        rank = lora_a.shape[0] // len(lora_bs)
        if ctx.split:  # an output nothing used has no gradient
            parts = [
                g.reshape(-1, g.shape[-1]) if g is not None else flat.new_zeros(flat.shape[0], n)
                for g, n in zip(grads, ctx.sizes, strict=True)
            ]
            g_all = torch.cat(parts, 1)
        else:
            assert grads[0] is not None
            g_all = grads[0].reshape(-1, grads[0].shape[-1])
            parts = list(g_all.split(ctx.sizes, 1))
        g_down = torch.cat([g @ lora_b for g, lora_b in zip(parts, lora_bs, strict=True)], 1).mul_(
            ctx.scaling
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_all @ weight).addmm_(g_down, lora_a).view(ctx.x_shape)
        grad_a = g_down.t() @ flat if ctx.needs_input_grad[3] else None
        grad_bs = [
            (g.t() @ down[:, i * rank : (i + 1) * rank]).mul_(ctx.scaling)
            if ctx.needs_input_grad[6 + i]
            else None
            for i, g in enumerate(parts)
        ]
        return grad_x, None, None, grad_a, None, None, *grad_bs


def _plain_adapter(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The one active adapter of a peft LoRA layer when the fused functions can compute it: a plain LoRA
    (no variant), no dropout, not merged or disabled, no per-example adapters, a frozen bias; else None."""
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    bias = layer.base_layer.bias
    if (
        args
        or kwargs
        or name is None
        or layer.disable_adapters
        or layer.merged
        or name not in layer.lora_A
        or name in layer.lora_variant
        or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
        or (bias is not None and bias.requires_grad)
    ):
        return None
    return name  # type: ignore[no-any-return]


def _quantized_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA over a bitsandbytes layer through `_QuantizedLoraFunction`, in the common case (as
    `_lora_linear_forward`); anything else takes peft's own path."""
    base = self.base_layer
    own_path = type(self).forward
    name = _plain_adapter(self, args, kwargs)
    if name is None:
        return own_path(self, x, *args, **kwargs)  # type: ignore[no-any-return]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, lora_a, lora_b = (t.to(dtype) for t in (x, lora_a, lora_b))
    if not x.dtype == lora_a.dtype == lora_b.dtype:
        return own_path(self, x, *args, **kwargs)  # type: ignore[no-any-return]
    with torch.autocast(device, enabled=False):
        out = _QuantizedLoraFunction.apply(x, lora_a, lora_b, self.scaling[name], base)
    return out  # type: ignore[no-any-return]


def _lora_linear_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA linear through `_LoraLinearFunction` in the common case: one active plain adapter, no
    dropout, a frozen base layer. Anything else (merged or disabled adapters, DoRA-like variants, dropout,
    per-example adapters, a trainable base) takes peft's own path."""
    ready = self.__dict__.get(_READY)
    if ready is not None and ready[0] is x and not args and not kwargs:  # computed joined with its siblings
        return ready[1]  # type: ignore[no-any-return]
    base = self.base_layer
    name = _plain_adapter(self, args, kwargs)
    if name is None or not isinstance(base, torch.nn.Linear) or base.weight.requires_grad:
        return LoraLinear.forward(self, x, *args, **kwargs)
    weight: torch.Tensor = base.weight
    bias: torch.Tensor | None = base.bias
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    assert isinstance(lora_a, torch.Tensor) and isinstance(lora_b, torch.Tensor)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # autocast's casts, done here (they are differentiable)
        dtype = torch.get_autocast_dtype(device)
        x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(dtype) if bias is not None else None
    if not x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype:
        return LoraLinear.forward(self, x, *args, **kwargs)
    with torch.autocast(device, enabled=False):
        out = _LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, self.scaling[name])
    return out  # type: ignore[no-any-return]


# --- adapted layers that read one input, run as one (q|k|v, gate|up) -------------------------------------

# The decoder classes whose attention computes `q_proj`, `k_proj` and `v_proj` of its input first, and whose
# MLP is `down(silu(gate(x)) * up(x))`, each projection called once on the same tensor.
JOINED_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
JOINED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
_READY = "_tunery_ready"  # a layer's output computed joined, with the input it was computed from
_STACKED = "_tunery_stacked"  # the stacked frozen weights, kept on the first layer
_UNJOINED = "_tunery_unjoined"  # a block's forward before joining (the class's, or native.py's)


def _joinable(layers: tuple[Any, ...]) -> tuple[str, bool] | None:
    """The adapter name the layers share and whether it is switched on, when their outputs can be computed
    joined: each a peft LoRA linear over a frozen `nn.Linear`, one active plain adapter (no variant,
    dropout, merge or trainable bias), the same scaling and rank; with the adapter switched off (a DPO
    reference) the frozen weights alone, joined as well, so that at the start the reference and the
    policy compute the same bits."""
    first = layers[0]
    names = first.active_adapters
    if len(names) != 1:
        return None
    name = names[0]
    for layer in layers:
        base = layer.base_layer
        if (
            type(layer) is not LoraLinear
            or not isinstance(base, torch.nn.Linear)
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or (base.bias is None) != (first.base_layer.bias is None)
            or layer.active_adapters != names
            or layer.merged
            or name not in layer.lora_A
            or name in layer.lora_variant
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
            or layer.disable_adapters != first.disable_adapters
            or layer.scaling[name] != first.scaling[name]
            or layer.r[name] != first.r[name]
        ):
            return None
    return name, not first.disable_adapters


def _stacked(layers: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers' frozen weights (and biases) stacked along the output. Stacked once: the layers' own
    weights then become views of the stack (no second copy of the model's weights); stacked again if a
    weight was replaced since (moved, cast)."""
    bases = [layer.base_layer for layer in layers]
    cached = layers[0].__dict__.get(_STACKED)
    if cached is not None:
        weight, bias, pointers = cached
        if pointers == [(b.weight.data_ptr(), None if b.bias is None else b.bias.data_ptr()) for b in bases]:
            return weight, bias
    with torch.no_grad():
        weight = torch.cat([b.weight for b in bases])
        bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
        start = 0
        for b in bases:
            n = b.weight.shape[0]
            b.weight.data = weight[start : start + n]
            if bias is not None:
                b.bias.data = bias[start : start + n]
            start += n
    pointers = [(b.weight.data_ptr(), None if b.bias is None else b.bias.data_ptr()) for b in bases]
    layers[0].__dict__[_STACKED] = (weight, bias, pointers)
    return weight, bias


def joined_outputs(
    layers: tuple[Any, ...], x: torch.Tensor, split: bool
) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
    """The layers' outputs for `x` computed joined (`_JoinedLoraFunction`; with `split`, one per layer,
    else side by side), or None when they cannot be (then each layer runs on its own)."""
    joinable = _joinable(layers)
    if joinable is None:
        return None
    name, enabled = joinable
    weight, bias = _stacked(layers)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        x = x.to(dtype)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        if not enabled:
            out = torch.nn.functional.linear(x, weight, bias)
            return tuple(out.split([layer.base_layer.out_features for layer in layers], -1)) if split else out
        lora_a = torch.cat([layer.lora_A[name].weight for layer in layers]).to(dtype)
        lora_bs = [layer.lora_B[name].weight.to(dtype) for layer in layers]
        return _JoinedLoraFunction.apply(x, weight, bias, lora_a, layers[0].scaling[name], split, *lora_bs)  # type: ignore[no-any-return]


def _joined_attention_forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The attention's own forward, its q, k and v projections computed joined beforehand (each hands
    back its part when the forward calls it on the same tensor)."""
    layers = (self.q_proj, self.k_proj, self.v_proj)
    unjoined = self.__dict__[_UNJOINED]
    outputs = joined_outputs(layers, hidden_states, split=True)
    if outputs is None:
        return unjoined(hidden_states, *args, **kwargs)
    for layer, out in zip(layers, outputs, strict=True):
        layer.__dict__[_READY] = (hidden_states, out)
    try:
        return unjoined(hidden_states, *args, **kwargs)
    finally:
        for layer in layers:
            layer.__dict__.pop(_READY, None)


def _joined_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU with gate|up computed joined, and the product on the native kernels where they run it."""
    from tunery.models.native import joined_swiglu

    gate_up = joined_outputs((self.gate_proj, self.up_proj), x, split=False)
    if gate_up is None:
        return self.__dict__[_UNJOINED](x)  # type: ignore[no-any-return]
    assert isinstance(gate_up, torch.Tensor)
    product = joined_swiglu(gate_up)
    if product is None:
        gate, up = gate_up.chunk(2, -1)
        product = self.act_fn(gate) * up
    return self.down_proj(product)  # type: ignore[no-any-return]


def join_projections(model: torch.nn.Module) -> int:
    """Compute the q|k|v and gate|up projections of a LoRA model's decoder layers joined
    (`_JoinedLoraFunction`) in the families whose layers read as `JOINED_ATTENTIONS` and `JOINED_MLPS`
    say, their frozen weights stacked now (called once the model is on its device); layers that cannot
    be joined at a given call (merged, dropout, several adapters) run on their own as before. Returns how
    many attention and MLP blocks were switched.

    Measured on SmolLM2-135M (bf16, LoRA r16 on every linear layer, `tunery train` on 8 steps of 8 short
    examples, with and without, interleaved, 3-6 runs each): SFT 566 -> 586 tokens/s, reward model 564 ->
    587 (bench/RESULTS.md). In bf16 the input's gradient is summed inside one GEMM instead of rounded to
    bf16 once per layer."""
    switched = 0
    joined: Callable[..., Any]
    names: tuple[str, ...]
    for module in model.modules():
        name = type(module).__name__
        if name in JOINED_ATTENTIONS:
            joined, names = _joined_attention_forward, ("q_proj", "k_proj", "v_proj")
        elif name in JOINED_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
            joined, names = _joined_mlp_forward, ("gate_proj", "up_proj")
        else:
            continue
        layers = tuple(getattr(module, n, None) for n in names)
        if not all(
            type(layer) is LoraLinear and type(layer.base_layer) is torch.nn.Linear for layer in layers
        ):
            continue
        _stacked(layers)  # now, before anything else holds the weights (the decoding engine)
        if _UNJOINED not in module.__dict__:
            module.__dict__[_UNJOINED] = module.forward
            module.forward = MethodType(joined, module)
            switched += 1
    return switched


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store frozen weights in `dtype` (bf16 halves their memory and skips autocast's per-step casts);
    trainable weights stay fp32 so optimizer updates keep full precision."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():  # (not a quantized weight)
            param.data = param.data.to(dtype)
    for buffer_name, buffer in model.named_buffers():
        if buffer.is_floating_point() and "inv_freq" not in buffer_name:
            buffer.data = buffer.data.to(dtype)
    # peft casts each LoRA layer's input to the adapter's dtype (fp32) and autocast casts it straight back:
    # two full-activation copies per adapted layer, ~10% of a training step. Autocast alone handles dtypes.
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            setattr(module, "cast_input_dtype_enabled", False)  # noqa: B010 (peft declares no such attribute)


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 or fp32: `precision` as given, or for "auto" bf16 where the hardware runs it fast."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off on GPUs and on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX); elsewhere it is slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checker = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((checker and checker()) or (amx and amx()))


def load_adapter(model: PreTrainedModel, path: str | Path) -> PeftModel:
    """Apply a saved adapter (a run directory, a checkpoint or the adapter directory itself)."""
    path = adapter_dir(path)
    if (path / "base_adapter").is_dir():  # trained on top of another adapter (e.g. DPO after SFT)
        model = merge_adapter(model, path / "base_adapter")
    return PeftModel.from_pretrained(model, path)


def merge_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> PreTrainedModel:
    """The base model with an adapter merged into its weights: the starting point (and the reference) of
    a method that trains on top of a fine-tuned model, such as DPO after SFT."""
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    assert isinstance(merged, PreTrainedModel)
    merged.requires_grad_(True)  # as loaded (peft froze it): full fine-tuning trains every weight
    return merged


# LoraConfig fields that leave an adapter plain low-rank updates whatever their value (read_lora refuses
# any other field set away from its default: DoRA, patterns, biases, other variants, fields of newer peft)
PLAIN_LORA_FIELDS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "target_modules",
    "exclude_modules",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",  # checked apart: some initialisations change the base weights
    "layers_to_transform",
    "layers_pattern",
    "runtime_config",
    "ensure_weight_tying",
}

# An adapter's low-rank updates by module: (A (rank, in), B (out, rank), scaling); the module's output
# gains scaling * x @ A^T @ B^T.
LoraUpdates = dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]


def read_lora(path: str | Path) -> LoraUpdates | str:
    """A saved adapter's updates by module path (e.g. `model.layers.0.self_attn.q_proj`), those of the
    adapter it was trained on top of (its `base_adapter`) included, without touching a model; or why
    they cannot be applied as plain low-rank updates (DoRA, trained embeddings or other modules saved
    whole, per-module ranks), in which case the adapter has to be loaded into a model of its own."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    path = adapter_dir(path)
    updates: LoraUpdates = {}
    if (path / "base_adapter").is_dir():
        inner = read_lora(path / "base_adapter")
        if isinstance(inner, str):
            return inner
        updates = inner
    try:
        config = PeftConfig.from_pretrained(str(path))
        weights = load_peft_weights(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 (loading it into a model says what is wrong, to the user)
        return f"the adapter could not be read ({type(exc).__name__})"
    if type(config) is not LoraConfig:
        return f"a {config.peft_type} adapter, not plain LoRA"
    defaults = LoraConfig()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in PLAIN_LORA_FIELDS and value != getattr(defaults, field.name):
            return f"the adapter sets {field.name}={value!r}"
    if config.init_lora_weights not in (True, False, "gaussian"):
        return f"the adapter's initialisation {config.init_lora_weights!r} changes the base weights"
    rank = int(config.r)
    scaling = config.lora_alpha / (rank**0.5 if config.use_rslora else rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for half in ("lora_A", "lora_B"):
            if key.endswith(f".{half}.weight"):
                module = key.removesuffix(f".{half}.weight").removeprefix("base_model.model.")
                pairs.setdefault(module, {})[half] = tensor
                break
        else:
            return f"the adapter holds {key}, which is not a LoRA factor of a linear layer"
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            return f"the adapter's {module} has only {sorted(pair)}"
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            return f"the adapter's {module} factors have shapes {tuple(a.shape)} and {tuple(b.shape)}"
        updates.setdefault(module, []).append((a, b, scaling))
    return updates
