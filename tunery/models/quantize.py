"""A quantized frozen base under LoRA (QLoRA): `--quantize int8|int4`.

The base model's linear layers (every projection; not the embeddings, norms or the output layer) are
replaced by bitsandbytes' quantized layers, which hold their weights in 8 bits (LLM.int8's row-wise
absmax) or 4 bits (QLoRA's NF4 in blocks of 64, the block scales themselves quantized), on CPU and GPU
alike. The LoRA matrices on top train in the run's precision; gradients flow through the quantized layers
to the layers below (lora.py's `_QuantizedLoraFunction`: the backward dequantizes one weight at a time).
Everything that runs the model afterwards (evaluations, RL rollouts, the DPO reference with the adapter
switched off) runs these same quantized weights: the decoding engine declines a quantized model
(`decode.unsupported_reason`) and sampling takes the model's own forward.

The adapter saved in `final/` is a normal LoRA adapter. Loaded on the full-precision base (what
`tunery chat`, the service and `tunery export --merge` do) it computes what it learnt up to the
quantization error of the base, as QLoRA adapters are used in the field.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from tunery.errors import TuneryError

log = logging.getLogger(__name__)

KEEP = ("lm_head",)  # the output layer stays in full precision (reward and value heads come after)


def _bitsandbytes() -> Any:
    from tunery._imports import allow_bitsandbytes

    allow_bitsandbytes()  # the CLI's process defers it until a run quantizes
    try:
        import bitsandbytes
    except ImportError as exc:
        raise TuneryError(
            "--quantize needs the bitsandbytes package: `pip install -e '.[quantize]'` (make install has it)"
        ) from exc
    return bitsandbytes


def quantized_linear(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized (quantization happens on `.to(device)`)."""
    bnb = _bitsandbytes()
    device = linear.weight.device
    weight = linear.weight.data
    has_bias = linear.bias is not None
    layer: Any
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if device.type in ("cpu", "xpu"):
            layer.forward = functools.partial(_weight_only_int8, layer)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
        )
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(device)  # type: ignore[no-any-return]


def _weight_only_int8(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """An int8 layer's forward on CPU, the same in eval mode as in training. bitsandbytes computes a CPU
    layer in training mode from its dequantized weight, and in eval mode with the input quantized to int8
    as well: a DPO reference computed in eval mode then differs from the policy it must equal at step 0
    (first loss 0.679 instead of ln 2 on a tiny model). Always the first, which bitsandbytes notes is also
    the faster one on CPU."""
    training = layer.training
    layer.training = True
    try:
        return type(layer).forward(layer, x)  # type: ignore[no-any-return]
    finally:
        layer.training = training


def quantize_base(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace `model`'s linear layers by quantized ones, one at a time (each full-precision weight is freed
    as its quantized copy is made), and put the rest in `compute_dtype`. Returns how many layers were
    quantized."""
    if kind == "none":
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name not in KEEP:
                setattr(parent, name, quantized_linear(child, kind, compute_dtype))
                count += 1
    if not count:
        raise TuneryError(f"quantize={kind}: the model has no linear layers to quantize")
    for param in model.parameters():  # what stays unquantized (embeddings, norms, output layer) computes
        if param.is_floating_point():  # in the run's precision, whatever precision it was loaded in
            param.data = param.data.to(compute_dtype)
    # peft reads these to wrap bitsandbytes layers with its matching LoRA layers
    setattr(model, f"is_loaded_in_{kind[3]}bit", True)  # noqa: B010
    log.info("quantize %s: %d linear layers of the frozen base stored in %s bits", kind, count, kind[3:])
    return count


def dequantized_weight(layer: Any, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes layer's weight as the full-precision (out, in) matrix its forward computes with."""
    bnb = _bitsandbytes()
    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)  # type: ignore[no-any-return]
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    rows = weight.CB if getattr(weight, "CB", None) is not None else weight.data
    return (rows.to(dtype) * (scales.to(dtype) / 127).unsqueeze(1)).contiguous()


def is_quantized(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())
