"""A decoding engine for Llama-family models: the forward pass re-laid out for generating tokens fast.

transformers' forward is written for training and for every architecture at once; one decoding step of
SmolLM2-135M runs ~600 small operators, and each linear layer sends its weight through oneDNN's
reorder on every call. On this CPU that reorder costs more than the multiply: a 576x576 bf16 projection
at batch 1 takes ~40 us through `F.linear` and ~18 us with the weight packed once in oneDNN's blocked
layout. So this engine:

- reads each linear layer's effective weight (a LoRA adapter merged in, without touching the model),
  fuses q|k|v and gate|up into one matrix each and lays every weight out once: as AMX tiles where the CPU
  has them (`native.py`: ~1.3x oneDNN's packed calls at 1-16 rows), else packed for oneDNN;
- keeps the KV cache in one static tensor (layers, batch, 2 x kv-heads, length, head dim), written in
  place, so a step allocates nothing that grows with the sequence;
- folds 1/sqrt(head_dim) into the query weights, applies rotary embeddings as one fused multiply-add
  with precomputed tables, and attends to the cache with a native kernel for bf16 on CPUs with AVX-512
  BF16 (`native.py`), else with SDPA's fused kernel (bf16 in, fp32 sums);
- with the weights as AMX tiles, runs a step's decoder layers in one native call (`native.decode_layers`:
  the same kernels in the same order as the per-operator step, without its ~8 Python calls a layer).

At batch 1 a step is bound by reading the weights: on a 2-core AVX-512/AMX host SmolLM2-135M's step
takes ~12 ms, of which the linear layers ~10-11 ms (268 MB of bf16 weights at 25-27 GB/s, this host's
streaming rate); batch 16 ~17 ms. Through oneDNN and torch's operators it took ~21 ms at batch 1, the
linear layers ~15.5 ms of it at ~17.5 GB/s and ~5.4 ms the dispatch of ~600 small operators.

It covers Llama, Mistral, Qwen2 and Qwen3 (query/key norms, folded with the scale), Phi-3 (fused q|k|v
and gate|up projections, split here) and sliding-window layers (a windowed layer reads only its last
`window` cache slots). Log-probabilities from this engine agree with the training forward pass
(`tunery.losses.logps`) to within bf16 rounding; a test checks it per family. Architectures it does not
cover (Gemma's scaled embeddings, offset norms and soft-capping; partial rotary; biased MLPs) report why
through `unsupported_reason`, and the sampler falls back to the model's own forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tunery.models import native
from tunery.models.locate import ENGINE_FALLBACK
from tunery.models.quantize import is_quantized
from tunery.models.warmup import warm_math_kernels

if TYPE_CHECKING:
    from tunery.models.lora import LoraUpdates

# --shard: a context in which a sharded module's own weights are whole (sharding.gathered)
Gather = Callable[[torch.nn.Module], contextlib.AbstractContextManager[Any]]

_SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
_WHY_NOT = {"gemma2": ENGINE_FALLBACK["gemma2"], "gemma3_text": ENGINE_FALLBACK["gemma3"]}


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None when `model` (a causal LM, optionally wrapped by peft) can run on this engine."""
    base = _causal_lm(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type not in _SUPPORTED:
        return _WHY_NOT.get(str(model_type), f"model type {model_type!r} is not one of {sorted(_SUPPORTED)}")
    if is_quantized(base):
        return "quantized base weights (--quantize): sampling runs the quantized layers themselves"
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        return "partial rotary embeddings"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if any(any((getattr(m, "use_dora", None) or {}).values()) for m in model.modules()):
        return "a DoRA adapter (the engine merges plain LoRA updates)"
    return None


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (keys a query sees, itself included), None for full attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" and window else None for kind in types]
    use = window and getattr(config, "use_sliding_window", True)
    return [window if use else None] * config.num_hidden_layers


def _causal_lm(model: torch.nn.Module) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def effective_weight(linear: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a linear layer as the forward pass applies it: base plus any active LoRA delta."""
    base = getattr(linear, "base_layer", linear)
    weight, bias = base.weight, base.bias
    lora_a = getattr(linear, "lora_A", None)
    if base is not linear and lora_a is not None and not linear.disable_adapters and not linear.merged:
        for name in linear.active_adapters:
            if name in lora_a:
                weight = weight.float() + linear.get_delta_weight(name).float()
    return weight, bias


def engine_dtype(model: torch.nn.Module) -> torch.dtype:
    """What the engine computes in: the precision the weights are stored in (bf16 for inference and RL
    policies), fp32 where that is neither bf16 nor fp32, or bf16 the CPU cannot run."""
    base = _causal_lm(model)
    down = base.model.layers[0].mlp.down_proj
    dtype = getattr(down, "base_layer", down).weight.dtype
    cpu = base.lm_head.weight.device.type == "cpu"
    bf16_ok = not cpu or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype not in (torch.bfloat16, torch.float32) or (dtype == torch.bfloat16 and not bf16_ok):
        return torch.float32
    return dtype


def weights_version(model: torch.nn.Module) -> tuple[int, ...]:
    """Changes whenever a parameter is updated in place (optimizer steps) or an adapter is toggled."""
    versions = [p._version for p in model.parameters()]
    versions += [int(bool(m.disable_adapters)) for m in model.modules() if hasattr(m, "lora_A")]
    return tuple(versions)


Update = tuple[torch.Tensor, torch.Tensor]  # (A^T (in, rank), B^T scaled (rank, out)): out += x @ A^T @ B^T


@dataclass(frozen=True)
class LoraFactors:
    """A LoRA adapter as the engine applies it beside the base weights it shares with other adapters:
    per decoder layer, for each fused projection ("qkv", "o", "gate_up", "down") that it changes, one
    low-rank update (the factors of q, k and v stacked along the rank, B's rows placed at each one's
    output columns and the query scale folded in), and one for the LM head. An adapter trained on top
    of another adds that one's factors along the rank too. A few MB where a merged copy of the model is
    the model's whole size."""

    layers: list[dict[str, Update]]
    head: Update | None
    # the engine's native stack with these updates (`DecodeModel._adapter_stack`), made on first use
    native: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        updates = [u for layer in self.layers for u in layer.values()] + ([self.head] if self.head else [])
        return sum(t.numel() * t.element_size() for u in updates for t in u)


class DecodeModel:
    """Packed weights and the forward pass for prefill and single-token steps. See the module docstring."""

    def __init__(
        self, model: torch.nn.Module, dtype: torch.dtype | None = None, gather: Gather | None = None
    ) -> None:
        warm_math_kernels()  # before the rotary tables' cos and sin (models/warmup.py says why)
        base = _causal_lm(model)
        config = base.config
        self.model = model
        self.device = base.lm_head.weight.device
        cpu = self.device.type == "cpu"
        self.dtype = dtype or engine_dtype(model)
        self.packed = cpu and torch.backends.mkldnn.is_available()
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.windows = layer_windows(config)
        # native attention, norms and SwiGLU (models/native.py), where this CPU and precision can have them
        self.kernels = native.decode_kernels() if cpu and self.dtype == torch.bfloat16 else None
        # linear layers on AMX tiles where the CPU has them (~1.3x oneDNN's packed weights at batch 1-16)
        self.tiled = self.kernels is not None and self.kernels.tiles
        self.version: tuple[int, ...] = ()
        self.sharded = gather is not None  # re-read only with `gather`, by every process together
        self.refresh(gather)

    # --- weights --------------------------------------------------------------------------------------

    def _own(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` in the engine's dtype; a copy when the model is sharded, whose gathered weights are
        freed once read."""
        return weight.detach().to(self.dtype, copy=self.sharded)

    def _linear_weight(self, weight: torch.Tensor) -> torch.Tensor | native.TiledWeight:
        """`weight` laid out for `_linear`: as AMX tiles multiply it (models/native.py), else in oneDNN's
        packed layout, else as it is."""
        weight = self._own(weight).contiguous()
        if self.tiled and native.tiles_fit(*weight.shape):
            assert self.kernels is not None
            return self.kernels.tile_weight(weight)
        return torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.packed else weight

    def refresh(self, gather: Gather | None = None) -> None:
        """Re-read every weight from the model (after an optimizer step). A no-op if nothing changed.
        `gather(module)`: for a sharded model (--shard), a context in which `module`'s own weights are
        whole; the model's root is gathered throughout and each decoder layer in turn, every process
        together (`sharding.engine_weights`). A sharded model's engine re-reads only then."""
        version = () if gather is not None else weights_version(self.model)
        if gather is None and (self.sharded or version == self.version):
            return
        gather = gather or (lambda _: contextlib.nullcontext())
        base = _causal_lm(self.model)
        scale = 1.0 / math.sqrt(self.head_dim)
        layers = []
        with torch.no_grad(), gather(self.model):
            for layer in base.model.layers:
                with gather(layer):
                    layers.append(self._layer_weights(layer, scale))
            self.layers = layers
            # the whole stack in one native call a step, where the kernels take these layers
            self.stack = (
                self.kernels.layer_stack(layers, self.windows, self._shape())
                if self.kernels is not None and self.tiled
                else None
            )
            self.embed = self._own(base.model.embed_tokens.weight)
            self.final_norm = self._own(base.model.norm.weight)
            self.head = self._linear_weight(effective_weight(base.lm_head)[0])
            self._rope_tables(base, 4096)
        self.version = version

    def _shape(self) -> native.StackShape:
        inner = _causal_lm(self.model).model.layers[0].mlp.down_proj.in_features
        return native.StackShape(self.hidden, self.n_heads, self.n_kv_heads, self.head_dim, inner, self.eps)

    def _layer_weights(self, layer: Any, scale: float) -> dict[str, Any]:
        """One decoder layer's weights as the engine applies them (query scale folded in, fused)."""
        attn, mlp = layer.self_attn, layer.mlp
        q_width = self.n_heads * self.head_dim
        if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection
            fused, fused_bias = effective_weight(attn.qkv_proj)
            widths = [q_width, *(2 * [self.n_kv_heads * self.head_dim])]
            wq, wk, wv = fused.float().split(widths)
            bq, bk, bv = fused_bias.split(widths) if fused_bias is not None else (None, None, None)
        else:
            (wq, bq), (wk, bk), (wv, bv) = (
                effective_weight(attn.q_proj),
                effective_weight(attn.k_proj),
                effective_weight(attn.v_proj),
            )
        # the scale goes into the query weights, or into the query norm where one follows them
        q_norm = getattr(attn, "q_norm", None)
        q_scale = 1.0 if q_norm is not None else scale
        qkv_bias = None
        if bq is not None and bk is not None and bv is not None:
            qkv_bias = torch.cat([bq.float() * q_scale, bk.float(), bv.float()]).to(self.dtype)
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up fused, gate first
            gate, up = effective_weight(mlp.gate_up_proj)[0].chunk(2, 0)
        else:
            gate, up = effective_weight(mlp.gate_proj)[0], effective_weight(mlp.up_proj)[0]
        return {
            "qkv": self._linear_weight(torch.cat([wq.float() * q_scale, wk.float(), wv.float()])),
            "qkv_bias": qkv_bias,
            "q_norm": None if q_norm is None else (q_norm.weight.detach().float() * scale).to(self.dtype),
            "k_norm": None if q_norm is None else self._own(attn.k_norm.weight),
            "o": self._linear_weight(effective_weight(attn.o_proj)[0]),
            "gate_up": self._linear_weight(torch.cat([gate, up])),  # one read of both (~6% of a step)
            "down": self._linear_weight(effective_weight(mlp.down_proj)[0]),
            "norm1": self._own(layer.input_layernorm.weight),
            "norm2": self._own(layer.post_attention_layernorm.weight),
        }

    def _rope_tables(self, base: Any, length: int) -> None:
        """cos and signed-sin tables, so rotation is `x * cos + roll(x, d/2) * sin` (one fused op)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = base.model.rotary_emb(probe, positions)  # (1, T, D), any rope scaling applied
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype)
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1).to(self.dtype)

    def _ensure_rope(self, length: int) -> None:
        if length > self.cos.shape[0]:
            self._rope_tables(_causal_lm(self.model), max(length, 2 * self.cos.shape[0]))

    # --- adapters served beside the base weights ---------------------------------------------------------

    def adapter(self, updates: LoraUpdates) -> LoraFactors | str:
        """`updates` (`lora.read_lora`) as this engine applies them on its own (unmerged) weights, or why
        they do not fit: a module the engine has no place for, or factors of the wrong width."""
        base = _causal_lm(self.model)
        if self.sharded or any(getattr(m, "lora_A", None) is not None for m in base.modules()):
            return "the engine's weights are not the plain base model's"
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        names = {id(module): name for name, module in base.named_modules()}
        parts = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
        slot_of = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "o_proj": "o"}
        slot_of |= {
            "gate_proj": "gate_up",
            "up_proj": "gate_up",
            "gate_up_proj": "gate_up",
            "down_proj": "down",
        }
        slots: dict[str, tuple[int, str, int]] = {}  # module path -> (layer, projection, part or -1: whole)
        for i, layer in enumerate(base.model.layers):
            for parent in (layer.self_attn, layer.mlp):
                for name, slot in slot_of.items():
                    if hasattr(parent, name):
                        slots[names[id(getattr(parent, name))]] = (i, slot, parts.get(name, -1))
        slots[names[id(base.lm_head)]] = (-1, "head", -1)
        widths = {
            "qkv": [q_width, kv_width, kv_width],
            "gate_up": 2 * [base.model.layers[0].mlp.down_proj.in_features],
        }
        gathered: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        head: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for module, factors in updates.items():
            if module not in slots:
                return f"the adapter changes {module}, which the decoding engine does not apply updates to"
            layer_index, slot, part = slots[module]
            target = base.get_submodule(module)
            out_widths = widths.get(slot, [target.out_features])
            total = sum(out_widths)
            offset = sum(out_widths[:part]) if part >= 0 else 0
            width = out_widths[part] if part >= 0 else total
            for a, b, scaling in factors:
                if a.shape[1] != target.in_features or b.shape[0] != width:
                    return f"the adapter's {module} factors do not fit the model ({tuple(a.shape)}, {tuple(b.shape)})"
                placed = torch.zeros(total, b.shape[1], dtype=torch.float32)
                placed[offset : offset + width] = b.float() * scaling
                lists = head if slot == "head" else gathered.setdefault((layer_index, slot), ([], []))
                lists[0].append(a.float())
                lists[1].append(placed)
        scale = 1.0 / math.sqrt(self.head_dim)
        q_scale = 1.0 if getattr(base.model.layers[0].self_attn, "q_norm", None) is not None else scale
        layers: list[dict[str, Update]] = [{} for _ in base.model.layers]
        for (layer_index, slot), (a_list, b_list) in gathered.items():
            b = torch.cat(b_list, 1)
            if slot == "qkv":
                b[:q_width] *= q_scale
            layers[layer_index][slot] = self._update(torch.cat(a_list), b)
        head_update = self._update(torch.cat(head[0]), torch.cat(head[1], 1)) if head[0] else None
        return LoraFactors(layers, head_update)

    def _adapter_stack(self, adapter: LoraFactors, stack: native.LayerStack) -> native.LayerStack:
        """The native stack with `adapter`'s updates, made once per adapter and base stack (again after
        `refresh` makes a new base stack; the adapter holds the base stack only weakly)."""
        made: native.LayerStack | None = adapter.native.get("stack")
        if made is None or made.base is None or made.base() is not stack:
            assert self.kernels is not None
            made = self.kernels.adapter_stack(stack, adapter.layers)
            adapter.native["stack"] = made
        return made

    def _update(self, a: torch.Tensor, b: torch.Tensor) -> Update:
        # fp32 on CPUs: a (1, 576) x (576, 48) product takes ~3 us in fp32 and ~20 us in bf16, whose small
        # products pay oneDNN's set-up each time (and fp32 keeps the update's precision: merged into bf16
        # weights, most of a small update's bits are rounded away)
        dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        return a.t().contiguous().to(self.device, dtype), b.t().contiguous().to(self.device, dtype)

    # --- forward --------------------------------------------------------------------------------------

    def _linear(self, x: torch.Tensor, weight: torch.Tensor | native.TiledWeight) -> torch.Tensor:
        if isinstance(weight, native.TiledWeight):
            assert self.kernels is not None
            return self.kernels.linear(x, weight)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return F.linear(x, weight)

    def _project(
        self, x: torch.Tensor, weight: torch.Tensor | native.TiledWeight, update: Update | None
    ) -> torch.Tensor:
        """x's projection by a packed weight, plus an adapter's low-rank update where one is served."""
        out = self._linear(x, weight)
        return out if update is None else out.add_(x.to(update[0].dtype).mm(update[0]).mm(update[1]))

    def new_cache(self, batch: int, length: int) -> torch.Tensor:
        """(layers, batch, 2 x kv-heads, length, head dim): keys in the first kv-heads, values after."""
        self._ensure_rope(length)
        shape = (self.n_layers, batch, 2 * self.n_kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _rotate(self, qk: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of (..., heads, D) queries and keys at `positions` (same leading shape)."""
        cos, sin = self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)
        return torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, -1), sin)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """RMS norm of x's rows; with `delta`, first `x += delta` in place (the residual stream)."""
        if self.kernels is not None:
            return self.kernels.add_rms_norm(x, delta, weight, self.eps)
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x, (self.hidden,), weight, self.eps)

    def _mlp(self, h: torch.Tensor, layer: dict[str, Any], lora: dict[str, Update]) -> torch.Tensor:
        """The MLP's output for the normed rows `h` (to be added to the residual stream)."""
        gate_up = self._project(h, layer["gate_up"], lora.get("gate_up"))
        if self.kernels is not None:
            act = self.kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, -1)
            act = F.silu(gate).mul_(up)
        return self._project(act, layer["down"], lora.get("down"))

    def _next_norm(self, x: torch.Tensor, delta: torch.Tensor, i: int) -> torch.Tensor | None:
        """After layer i: `x += delta`, and the next layer's normed input (None after the last layer)."""
        if i + 1 < self.n_layers:
            return self._norm(x, self.layers[i + 1]["norm1"], delta)
        x.add_(delta)
        return None

    def _qkv(self, h: torch.Tensor, layer: dict[str, Any], lora: dict[str, Update]) -> torch.Tensor:
        qkv = self._project(h, layer["qkv"], lora.get("qkv"))
        return qkv if layer["qkv_bias"] is None else qkv.add_(layer["qkv_bias"])

    def _norm_qk(self, qk: torch.Tensor, layer: dict[str, Any], axis: int = -2) -> torch.Tensor:
        """Qwen3's per-head query and key RMS norms, the scale in the query's, on heads along `axis`:
        queries, then keys, then (where given) values, which stay as they are."""
        if layer["q_norm"] is None:
            return qk
        heads, kv, dim = self.n_heads, self.n_kv_heads, self.head_dim
        q = F.rms_norm(qk.narrow(axis, 0, heads), (dim,), layer["q_norm"], self.eps)
        k = F.rms_norm(qk.narrow(axis, heads, kv), (dim,), layer["k_norm"], self.eps)
        return torch.cat([q, k, qk.narrow(axis, heads + kv, qk.shape[axis] - heads - kv)], axis)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,  # (B, T), left-padded
        positions: torch.Tensor,  # (B, T)
        key_valid: torch.Tensor,  # (B, T) bool, False on padding
        cache: torch.Tensor,
        adapter: LoraFactors | None = None,
    ) -> torch.Tensor:
        """Run the prompts, fill cache[:, :, :, :T]; returns the last position's logits (B, V), fp32.
        `adapter`: a LoRA adapter applied beside the weights (`adapter()`)."""
        batch, length = input_ids.shape
        heads, kv, dim = self.n_heads, self.n_kv_heads, self.head_dim
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        # A padding query attends to itself so its row stays finite (a fully masked row would be NaN).
        eye = torch.eye(length, dtype=torch.bool, device=self.device)
        masks: dict[int | None, torch.Tensor] = {}
        for window in set(self.windows):  # a windowed layer: only the last `window` keys, itself included
            near = causal if window is None else causal & ~causal.tril(-window)
            masks[window] = ((near & key_valid[:, None, :]) | eye)[:, None]  # (B, 1, T, T)
        x = self.embed[input_ids].view(batch * length, self.hidden)
        updates = adapter.layers if adapter is not None else [{}] * self.n_layers
        h: torch.Tensor | None = self._norm(x, self.layers[0]["norm1"])
        for i, (layer, lora) in enumerate(zip(self.layers, updates, strict=True)):
            mask = masks[self.windows[i]]
            assert h is not None
            qkv = self._qkv(h, layer, lora).view(batch, length, heads + 2 * kv, dim)
            qk = self._rotate(self._norm_qk(qkv[:, :, : heads + kv], layer), positions)
            k, v = qk[:, :, heads:].transpose(1, 2), qkv[:, :, heads + kv :].transpose(1, 2)
            cache[i, :, :kv, :length] = k
            cache[i, :, kv:, :length] = v
            out = F.scaled_dot_product_attention(
                qk[:, :, :heads].transpose(1, 2), k, v, attn_mask=mask, scale=1.0, enable_gqa=True
            )  # (B, H, T, D)
            out = out.transpose(1, 2).reshape(batch * length, heads * dim)
            h = self._norm(x, layer["norm2"], self._project(out, layer["o"], lora.get("o")))
            h = self._next_norm(x, self._mlp(h, layer, lora), i)
        last = x.view(batch, length, self.hidden)[:, -1]
        return self._logits(last, adapter)

    def _logits(self, x: torch.Tensor, adapter: LoraFactors | None) -> torch.Tensor:
        x = self._norm(x.contiguous(), self.final_norm)
        return self._project(x, self.head, adapter.head if adapter is not None else None).float()

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,  # (B,) the newest token of each row
        positions: torch.Tensor,  # (B,) its position
        cache: torch.Tensor,
        index: int,  # cache slot to write; attention covers slots [0, index]
        key_bias: torch.Tensor,  # (B, 1, 1, >index) fp32: 0 for visible slots, -inf for padding
        adapter: LoraFactors | None = None,
    ) -> torch.Tensor:
        """One decoding step for every row; returns logits (B, V) in fp32.

        At batch 1 a step is mostly dispatch besides the weights' reads, so the views every layer needs
        (its cache slot to write, the keys and values it reads, the mask) are made once a step for all
        layers, and the new key and value go into the cache in one copy: the rotation runs over q, k and v
        together, with cos 1 and sin 0 on v (exact: v * 1 + roll(v) * 0)."""
        batch = input_ids.shape[0]
        heads, kv, dim = self.n_heads, self.n_kv_heads, self.head_dim
        x = self.embed[input_ids]  # (B, C)
        if self.stack is not None:
            assert self.kernels is not None  # every layer in one native call (models/native.py)
            cos, sin = self.cos[positions], self.sin[positions]
            stack = self.stack if adapter is None else self._adapter_stack(adapter, self.stack)
            self.kernels.decode_layers(x, cos, sin, cache, index, key_bias, stack)
            return self._logits(x, adapter)
        if self.kernels is not None:  # the rows' tables (B, D)
            cos, sin = self.cos[positions], self.sin[positions]
        else:
            cos, sin = self._step_rotation(positions)  # (B, heads + 2 kv, 1, D)
        slots = cache[:, :, :, index : index + 1].unbind(0)  # per layer (B, 2 kv, 1, D): this step's k, v
        seen: dict[int | None, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]] = {}
        for window in set(self.windows):
            # rows are left-padded, so a slot's distance from `index` is its distance in positions
            first = 0 if window is None else max(0, index + 1 - window)
            visible = cache[:, :, :, first : index + 1]
            seen[window] = (
                visible[:, :, :kv].unbind(0),
                visible[:, :, kv:].unbind(0),
                key_bias[..., first : index + 1],
            )
        updates = adapter.layers if adapter is not None else [{}] * self.n_layers
        native_attention = False
        h: torch.Tensor | None = self._norm(x, self.layers[0]["norm1"])
        for i, (layer, lora) in enumerate(zip(self.layers, updates, strict=True)):
            assert h is not None
            qkv = self._qkv(h, layer, lora).view(batch, heads + 2 * kv, 1, dim)
            if self.kernels is not None and layer["q_norm"] is not None:  # in place, as the one-call step
                self.kernels.head_norms(qkv, layer["q_norm"], layer["k_norm"], heads, self.eps)
            else:
                qkv = self._norm_qk(qkv, layer, -3)
            if self.kernels is not None:  # the rotation and the cache's new key and value in one pass
                queries = self.kernels.rope_store(qkv, cos, sin, slots[i])
            else:
                qkv = torch.addcmul(qkv * cos, qkv.roll(dim // 2, -1), sin)
                slots[i].copy_(qkv[:, heads:])
                queries = qkv[:, :heads]
            keys, values, bias = seen[self.windows[i]]
            # The queries that share a key/value head are that head's query rows, (B, kv, group, D): head h
            # is kv-head h // group's query h % group, as the weights order them.
            queries = queries.view(batch, kv, heads // kv, dim)
            if i == 0:  # every layer's tensors are laid out alike
                native_attention = self.kernels is not None and native.fits(queries, keys[i], values[i], bias)
            if native_attention:  # models/native.py: 1.2-2.5x SDPA here
                assert self.kernels is not None
                out = self.kernels.attend(queries, keys[i], values[i], bias)
            else:
                # SDPA's fused CPU kernel (bf16 in, fp32 accumulation) with the additive fp32 mask: 2-2.5x
                # faster here than fp32 matmuls over a converted copy of the cache (torch 2.13); the
                # queries as rows rather than `enable_gqa`, whose CPU path is 3.6-7x slower (160-400 keys,
                # batch 1 and 16: 88 -> 24 us and 1.22 -> 0.26 ms a layer, the same output).
                out = F.scaled_dot_product_attention(queries, keys[i], values[i], attn_mask=bias, scale=1.0)
            out = out.view(batch, heads * dim)
            h = self._norm(x, layer["norm2"], self._project(out, layer["o"], lora.get("o")))
            h = self._next_norm(x, self._mlp(h, layer, lora), i)
        return self._logits(x, adapter)

    def _step_rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's cos and signed-sin over (B, heads + 2 kv-heads, 1, D): the positions' rotation on
        queries and keys, the identity (cos 1, sin 0) on values."""
        rotated = self.n_heads + self.n_kv_heads
        shape = (positions.shape[0], rotated + self.n_kv_heads, 1, self.head_dim)
        cos = torch.ones(shape, dtype=self.dtype, device=self.device)
        sin = torch.zeros(shape, dtype=self.dtype, device=self.device)
        cos[:, :rotated] = self.cos[positions][:, None, None]
        sin[:, :rotated] = self.sin[positions][:, None, None]
        return cos, sin


def decode_model_for(model: torch.nn.Module, gather: Gather | None = None) -> DecodeModel | None:
    """The engine attached to `model`, built on first use and refreshed when its weights change
    (`gather`: see `DecodeModel.refresh`)."""
    if unsupported_reason(model) is not None:
        return None
    engine: DecodeModel | None = getattr(model, "_tunery_decode", None)
    if engine is None:
        engine = DecodeModel(model, gather=gather)
        object.__setattr__(model, "_tunery_decode", engine)
    else:
        engine.refresh(gather)
    return engine
