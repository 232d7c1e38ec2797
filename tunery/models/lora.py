"""LoRA through peft, mixed precision for frozen weights, and adapter loading/merging."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
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
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise TuneryError(f"lora_targets={targets!r}: {exc}") from exc


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store frozen weights in `dtype` (bf16 halves their memory and skips autocast's per-step casts);
    trainable weights stay fp32 so optimizer updates keep full precision."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)
    for buffer_name, buffer in model.named_buffers():
        if buffer.is_floating_point() and "inv_freq" not in buffer_name:
            buffer.data = buffer.data.to(dtype)
    # peft casts each LoRA layer's input to the adapter's dtype (fp32) and autocast casts it straight back:
    # two full-activation copies per adapted layer, ~10% of a training step. Autocast alone handles dtypes.
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            setattr(module, "cast_input_dtype_enabled", False)  # noqa: B010 (peft declares no such attribute)


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
    return merged
