"""A merged model as one GGUF file for llama.cpp and Ollama: `tunery export --gguf`.

The file is written with the `gguf` package's writer and llama.cpp's names (`gguf.get_tensor_name_map`),
so llama.cpp, Ollama and transformers' GGUF loader read it as they read a file llama.cpp's own converter
wrote. What each family needs beyond the names, after llama.cpp's conventions:

- Llama and Mistral (both llama.cpp's `llama` architecture): the query and key projections are stored with
  each head's rotary halves interleaved (`_interleave_rotary`), the layout llama.cpp's RoPE reads.
- Gemma 2 and 3: RMSNorm weights are stored as `1 + w`, the factor the model actually multiplies by.
- Phi-3: the fused query-key-value and gate-up projections stay fused (llama.cpp reads them so).

Precision (`--quant`): f32, f16 and bf16 store every matrix so; q8_0, q5_1, q5_0, q4_1 and q4_0 are
quantized here with the `gguf` package's quantizers, keeping the token embedding and output matrix at q8_0
for the 4- and 5-bit types as llama.cpp's own files do. llama.cpp's k-quants (q4_k_m, q5_k_m, q6_k, ...)
need llama.cpp's quantizer: the file is written at f16 and then quantized by `llama_model_quantize` from
the `llama-cpp-python` package (`make llama-cpp` installs it). Vectors (norms, biases) are always f32, and a
matrix whose rows do not split into the type's blocks is stored at f16.

The tokenizer goes in as llama.cpp's `gpt2` (byte-level BPE) vocabulary: every token with its type, the
merges, the special tokens, whether a BOS is added, and the chat template. Its pre-tokenizer name is read
from the tokenizer's own pre-tokenizer, so llama.cpp splits text exactly as Tunery did when it trained.
A SentencePiece-style tokenizer (BPE with byte fallback and "\u2581" for spaces: Llama 2, Mistral, Phi-3,
Gemma) goes in as llama.cpp's `llama` vocabulary instead, each token with a score that makes llama.cpp merge
in the order of the tokenizer's merges; where llama.cpp will still split text differently, the report says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.errors import TuneryError
from tunery.models.llama_cpp_run import LlamaCppFailed

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's architecture name
    interleave_rotary: bool = False
    norm_plus_one: bool = False


# transformers' model_type -> how llama.cpp stores it
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", interleave_rotary=True),
    "mistral": Arch("llama", interleave_rotary=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma2": Arch("gemma2", norm_plus_one=True),
    "gemma3_text": Arch("gemma3", norm_plus_one=True),
    "phi3": Arch("phi3"),
}

# --quant: written here (numpy) or by llama.cpp's quantizer (its ftype numbers, from llama.h)
WRITTEN_HERE = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
BY_LLAMA_CPP = {
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
QUANTS = (*WRITTEN_HERE, *BY_LLAMA_CPP)


@dataclass(frozen=True)
class GgufReport:
    path: Path
    quant: str
    arch: str
    bytes: int
    seconds: float
    tensors: int
    at_f16: list[str]  # matrices whose rows do not split into the type's blocks
    warnings: list[str]  # where llama.cpp will compute differently from the model


def check_quant(quant: str) -> None:
    """Before anything loads: a known type, and llama.cpp's quantizer when the type needs it."""
    if quant not in QUANTS:
        raise TuneryError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if quant in BY_LLAMA_CPP and llama_cpp_missing():
        raise TuneryError(
            f"--quant {quant} is one of llama.cpp's k-quants, made by llama.cpp's own quantizer, which is not "
            f"installed: run `make llama-cpp` (builds llama.cpp through the llama-cpp-python package, ~15 min), "
            f"or choose --quant q8_0, q5_1 or q4_1, which Tunery writes itself"
        )


def llama_cpp_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is None


def export_gguf(
    model: Any, tokenizer: Any, out: Path, quant: str = "f16", name: str | None = None
) -> GgufReport:
    """Write `model` (a merged transformers model) and its tokenizer to `out`, atomically."""
    check_quant(quant)
    model_type = model.config.model_type
    arch = ARCHS.get(model_type)
    if arch is None:
        covered = ", ".join(sorted(ARCHS))
        raise TuneryError(f"GGUF export covers the model types {covered}; this model is {model_type!r}")
    _check_rope(model.config, arch)
    warnings = differences(model.config, arch) + sentencepiece_differences(tokenizer)
    started = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    written_quant = "f16" if quant in BY_LLAMA_CPP else quant
    try:
        at_f16, tensors = _write(model, tokenizer, arch, tmp, written_quant, name or _model_name(model))
        if quant in BY_LLAMA_CPP:
            quantized = out.with_name(f".{out.name}.{quant}.tmp")
            _llama_cpp_quantize(tmp, quantized, quant)
            tmp.unlink()
            tmp = quantized
        os.replace(tmp, out)
    finally:
        for leftover in out.parent.glob(f".{out.name}*.tmp"):
            leftover.unlink(missing_ok=True)
    return GgufReport(
        out, quant, arch.name, out.stat().st_size, time.perf_counter() - started, tensors, at_f16, warnings
    )


def differences(config: Any, arch: Arch) -> list[str]:
    """What llama.cpp assumes of the architecture and this model does otherwise (the file cannot say it)."""
    found = []
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if arch.name in ("gemma2", "gemma3"):
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            found.append(
                f"llama.cpp scales {arch.name} attention by 1/sqrt(head_dim = {head_dim}), this model by "
                f"1/sqrt(query_pre_attn_scalar = {scalar})"
            )
    if arch.name == "gemma3":
        usual = [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
            for i in range(config.num_hidden_layers)
        ]
        if list(getattr(config, "layer_types", usual) or usual) != usual:
            found.append(
                "llama.cpp gives Gemma 3 full attention on every 6th layer; this model's layers differ"
            )
    window = getattr(config, "sliding_window", None)
    if arch.name == "llama" and window and window < config.max_position_embeddings:
        found.append(
            f"llama.cpp attends over the whole context; this model over a sliding window of {window}"
        )
    return found


def _model_name(model: Any) -> str:
    source = str(getattr(model.config, "_name_or_path", "") or "model")
    return Path(source).name or "model"


def _rope_scaling(config: Any) -> dict[str, Any]:
    """The model's RoPE scaling (Gemma 3 keeps one per layer type: its full-attention layers' is the one
    llama.cpp applies), {} for none."""
    scaling = getattr(config, "rope_scaling", None) or {}
    if not isinstance(scaling, dict):
        return {}
    scaling = scaling.get("full_attention", scaling)
    kind = scaling.get("rope_type") or scaling.get("type")
    return {} if kind in (None, "default") else {**scaling, "rope_type": kind}


def _check_rope(config: Any, arch: Arch) -> None:
    """llama.cpp computes two kinds of RoPE scaling from what the file says: linear (positions divided by a
    factor) and Llama 3's (per-frequency factors, in the `rope_freqs` tensor, for the llama architecture)."""
    kind = _rope_scaling(config).get("rope_type")
    if kind not in (None, "linear") and not (kind == "llama3" and arch.name == "llama"):
        raise TuneryError(
            f"GGUF export handles RoPE scaling of the types linear and llama3 (Llama 3.1 and later); this model's "
            f"is {kind!r}"
        )


def rope_freq_factors(config: Any) -> torch.Tensor | None:
    """Llama 3's RoPE scaling as llama.cpp reads it: a factor per rotary frequency, dividing it (1 for high
    frequencies, `factor` for low ones, a smooth blend between), as transformers' llama3 rotary embedding
    scales its inverse frequencies. None for other models."""
    import torch

    scaling = _rope_scaling(config)
    if scaling.get("rope_type") != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary))
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    factors = 1 / (
        (1 - smooth) / factor + smooth
    )  # 1 where wavelength < context / high, factor beyond context / low
    return factors.to(torch.float32)


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters, per layer type for Gemma 3
        params = getattr(config, "rope_parameters", None) or {}
        params = params.get("full_attention", params)
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


# --- tensors --------------------------------------------------------------------------------------------


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half layout (each head's first and second halves) -> llama.cpp's (pairs)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tensor_type(quant: str, name: str, shape: tuple[int, ...]) -> Any:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    kind = {
        "f32": T.F32,
        "f16": T.F16,
        "bf16": T.BF16,
        "q8_0": T.Q8_0,
        "q5_1": T.Q5_1,
        "q5_0": T.Q5_0,
        "q4_1": T.Q4_1,
        "q4_0": T.Q4_0,
    }[quant]
    if quant.startswith(("q4", "q5")) and name in ("token_embd.weight", "output.weight"):
        kind = T.Q8_0
    block = GGML_QUANT_SIZES[kind][0]
    if shape[-1] % block:
        return T.F16
    return kind


def _tensors(model: Any, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    import gguf
    import torch

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    result = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses the token embedding when the file has no output matrix
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TuneryError(f"GGUF export: no llama.cpp name for the {arch.name} tensor {hf_name}")
        tensor = tensor.detach().to(torch.float32)
        if arch.interleave_rotary and hf_name.endswith("q_proj.weight"):
            tensor = _interleave_rotary(tensor, heads)
        elif arch.interleave_rotary and hf_name.endswith("k_proj.weight"):
            tensor = _interleave_rotary(tensor, kv_heads)
        if arch.norm_plus_one and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        result.append((name, tensor))
    factors = rope_freq_factors(config)
    if factors is not None:
        result.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors))
    return result


def _write(
    model: Any, tokenizer: Any, arch: Arch, path: Path, quant: str, name: str
) -> tuple[list[str], int]:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer announces each file at INFO
    writer = gguf.GGUFWriter(path, arch.name)
    if arch.name == "phi3" and not _strips_as_llama_cpp_phi3(tokenizer):
        name = re.sub(r"phi-?3", "phi", name, flags=re.IGNORECASE)
    tensors = _tensors(model, arch)
    vocab_rows = next(t.shape[0] for n, t in tensors if n == "token_embd.weight")
    _write_config(writer, model.config, arch, name, quant)
    _write_tokenizer(writer, tokenizer, vocab_rows)
    at_f16 = []
    for tensor_name, tensor in tensors:
        kind = _tensor_type(quant, tensor_name, tuple(tensor.shape))
        data = tensor.numpy()
        if kind == T.F32:
            writer.add_tensor(tensor_name, data.astype(np.float32))
        elif kind == T.F16:
            if quant not in ("f16", "f32") and data.ndim > 1:
                at_f16.append(tensor_name)
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return at_f16, len(tensors)


# the special tokens llama.cpp leaves unstripped when the model's name says phi-3
PHI3_UNSTRIPPED = ("<unk>", "<s>", "<|endoftext|>")


def _strips_as_llama_cpp_phi3(tokenizer: Any) -> bool:
    """When a model's name says phi-3, llama.cpp makes `</s>` and every special token but PHI3_UNSTRIPPED
    strip the spaces after it, as Phi-3's own tokenizer does, and fails to load when one of these four tokens
    is missing. Whether llama.cpp handles this tokenizer so; if not, the name must not say phi-3."""
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    if not {"</s>", *PHI3_UNSTRIPPED} <= set(tokenizer.get_vocab()) or "</s>" not in added:
        return False
    return all(t.rstrip == (t.content not in PHI3_UNSTRIPPED) for t in added.values())


FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
}


def _write_config(writer: Any, config: Any, arch: Arch, name: str, quant: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[quant]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    rotary = int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    writer.add_rope_dimension_count(rotary)
    scaling = _rope_scaling(config)
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if getattr(config, "head_dim", None) or arch.name.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    window = getattr(config, "sliding_window", None)
    if window and arch.name in ("gemma2", "gemma3", "phi3"):
        writer.add_sliding_window(int(window))
    if arch.name == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    writer.add_vocab_size(config.vocab_size)


# --- tokenizer ------------------------------------------------------------------------------------------

# The pre-tokenizers llama.cpp knows by name, by what the tokenizer.json says
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex"):
        return "smollm"
    patterns = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if kinds == ["Split", "ByteLevel"] and patterns:
        pattern = patterns[0]
        if "\\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if "\\p{N}|" in pattern or "\\p{N}]" in pattern:
            return "qwen2"
    raise TuneryError(
        "GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp knows by name "
        f"({json.dumps(pre)[:200]}); llama.cpp would split text differently from the model's training"
    )


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_rows: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TuneryError(
            f"GGUF export covers {COVERED_TOKENIZERS}; this model's tokenizer is {model.get('type')}"
        )
    size = len(tokenizer)
    if size > vocab_rows:
        raise TuneryError(f"the tokenizer has {size} tokens but the model's embedding only {vocab_rows} rows")
    if model.get("byte_fallback"):
        _write_sentencepiece_vocab(writer, tokenizer, spec, vocab_rows)
        ids = tokenizer("a")["input_ids"]
        _write_special_tokens(writer, tokenizer, add_eos=bool(ids) and ids[-1] == tokenizer.eos_token_id)
    else:
        _write_byte_level_vocab(writer, tokenizer, spec, vocab_rows)
        _write_special_tokens(writer, tokenizer, add_eos=False)


COVERED_TOKENIZERS = (
    "BPE tokenizers: byte-level ones (Llama 3, Qwen, SmolLM, GPT-2 style) and SentencePiece-style ones, with "
    "byte fallback and \u2581 for spaces (Llama 2, Mistral, Phi-3, Gemma style)"
)


def _write_byte_level_vocab(writer: Any, tokenizer: Any, spec: dict[str, Any], vocab_rows: int) -> None:
    import gguf

    model = spec["model"]
    size = len(tokenizer)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    for i in range(size, vocab_rows):  # the embedding is padded past the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:
        # A byte-level vocabulary with no merges (Tunery's tiny test models): llama.cpp requires the key and
        # the writer cannot write an empty list, so it gets one merge of two control tokens, which are split
        # off before merging and so never merge.
        control = [tokens[i] for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL]
        if len(control) < 2:
            raise TuneryError("GGUF export: the tokenizer has no merges, which llama.cpp cannot read")
        merges = [f"{control[0]} {control[1]}"]
    writer.add_token_merges(merges)


def _write_special_tokens(writer: Any, tokenizer: Any, add_eos: bool) -> None:
    for kind, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(add_eos)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)


# SentencePiece writes a space as "\u2581", and a byte it has no token for as the byte's token (<0x0A>)
SPACE = "\u2581"
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _write_sentencepiece_vocab(writer: Any, tokenizer: Any, spec: dict[str, Any], vocab_rows: int) -> None:
    """llama.cpp's `llama` (SentencePiece) vocabulary, from the tokenizer.json transformers converts Llama 2,
    Mistral, Phi-3 and Gemma tokenizers to: BPE with byte fallback, "\u2581" for spaces."""
    import gguf

    add_space_prefix = _space_prefix(spec)
    model = spec["model"]
    for key, usual in (
        ("ignore_merges", False),
        ("continuing_subword_prefix", None),
        ("end_of_word_suffix", None),
    ):
        if (model.get(key) or usual) != usual:
            raise TuneryError(
                f"GGUF export: llama.cpp's SentencePiece tokenizer has no {key}; this tokenizer sets it to "
                f"{model[key]!r}, so llama.cpp would split text differently"
            )
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model.get("vocab", {})]
    if missing:
        raise TuneryError(
            f"GGUF export: the tokenizer falls back to bytes but has no token for {len(missing)} of them "
            f"({', '.join(missing[:4])}, ...); llama.cpp needs one for every byte"
        )
    tokens, scores, types, _ = _sentencepiece_vocab(tokenizer, spec)
    for i in range(len(tokens), vocab_rows):  # the embedding is padded past the tokenizer
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    if len(set(tokens)) < len(tokens):
        twice = next(t for t, n in Counter(tokens).items() if n > 1)
        raise TuneryError(f"GGUF export: llama.cpp refuses a vocabulary with the token {twice!r} twice")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)


def _sentencepiece_vocab(
    tokenizer: Any, spec: dict[str, Any]
) -> tuple[list[str], list[float], list[Any], list[tuple[str, ...]]]:
    """Each token as llama.cpp reads it (text, score, type), and the tokenizer's merges.

    llama.cpp keeps no merge list for a SentencePiece vocabulary: it joins the adjacent pair whose joined text
    is the token of highest score, where tokenizers joins the pair listed first in its merges. So a token's
    score is minus the rank of the first merge that makes it, and both join in the same order. (The gguf
    package's `LlamaHfVocab`, with which llama.cpp's converter reads such a tokenizer.json, scores every token
    -1000, a placeholder with which llama.cpp joins pairs left to right instead: it is not used here.)"""
    import gguf

    model = spec["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for i, (left, right) in enumerate(merges):
        rank.setdefault(left + right, i)
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        text, kind = token, gguf.TokenType.NORMAL
        if i in added:
            text = added[i].content
            if added[i].special:
                kind = gguf.TokenType.UNKNOWN if i == tokenizer.unk_token_id else gguf.TokenType.CONTROL
            else:
                kind = gguf.TokenType.USER_DEFINED
                if added[i].normalized:
                    # tokenizers finds it in the text once spaces are "\u2581", llama.cpp in the text as typed
                    text = text.replace(SPACE, " ")
        elif i == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif BYTE_TOKEN.fullmatch(token):
            kind = gguf.TokenType.BYTE
        tokens.append(text)
        scores.append(-float(rank[token]) if token in rank else 0.0)
        types.append(kind)
    return tokens, scores, types, merges


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether llama.cpp puts a "\u2581" before the text (its `add_space_prefix`).

    llama.cpp's SentencePiece tokenizer replaces each space by "\u2581" and, with the flag, puts one before
    the text and after each special token, as the Prepend normalizer of Llama 2's, Mistral's and Phi-3's
    tokenizer.json does; Gemma's puts none. A Metaspace pre-tokenizer (transformers' non-legacy Llama layout)
    puts none before text that starts with a space, nor, with prepend_scheme "first", after a special token.
    llama.cpp has no flag for either. With "first" the file gets none: a chat prompt starts with a special
    token, and what follows each one is then split as the model was trained; only raw text at the very
    start loses its "▁". `sentencepiece_differences` names what differs."""
    normalizer = spec.get("normalizer") or {}
    pre = spec.get("pre_tokenizer") or {}
    kinds = _space_steps(normalizer, "normalizers") + _space_steps(pre, "pretokenizers")
    if kinds in (["prepend", "replace"], ["replace", "prepend"], ["metaspace always"]):
        return True
    # Gemma's Split on " " comes after its normalizer has left no spaces: it splits nothing
    if kinds in (["replace"], ["replace", "split on space"], ["metaspace never"], ["metaspace first"]):
        return False
    raise TuneryError(
        "GGUF export: llama.cpp's SentencePiece tokenizer only replaces spaces by \u2581 and may put one "
        "before the text; this tokenizer's normalizer and pre-tokenizer do otherwise "
        f"({json.dumps(normalizer, ensure_ascii=False)[:150]}; {json.dumps(pre, ensure_ascii=False)[:150]}), "
        "so llama.cpp would split text differently from the model's training"
    )


def _space_steps(step: dict[str, Any], children: str) -> list[str]:
    if not step:
        return []
    if step.get("type") == "Sequence":
        return [kind for child in step.get(children, []) for kind in _space_steps(child, children)]
    kind = step.get("type")
    if kind == "Prepend" and step.get("prepend") == SPACE:
        return ["prepend"]
    if kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == SPACE:
        return ["replace"]
    if kind == "Split" and step.get("pattern") == {"String": " "}:
        return ["split on space"]
    if kind == "Metaspace" and step.get("replacement") == SPACE and not step.get("split"):
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        return [f"metaspace {scheme}"]
    return [str(kind)]


def sentencepiece_differences(tokenizer: Any) -> list[str]:
    """Where llama.cpp's SentencePiece tokenizer may split text differently from `tokenizer` (none for a
    byte-level one): a Metaspace pre-tokenizer's rules for the "\u2581" before the text, and pairs of tokens
    that make a token without the merges listing them, which llama.cpp joins anyway (tokenizers converted
    from a SentencePiece model list every such pair; one trained by `tokenizers` need not)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec.get("model", {}).get("type") != "BPE" or not spec["model"].get("byte_fallback"):
        return []
    found = []
    kinds = _space_steps(spec.get("pre_tokenizer") or {}, "pretokenizers")
    if "metaspace always" in kinds:
        found.append(
            "llama.cpp puts a \u2581 before text that starts with a space; this tokenizer (Metaspace) doesn't"
        )
    if "metaspace first" in kinds:
        found.append(
            "llama.cpp puts no \u2581 before raw text at the very start, where this tokenizer (Metaspace, "
            "prepend_scheme first) puts one; prompts that start with a special token (chat templates) split "
            "the same"
        )
    tokens, _, _, merges = _sentencepiece_vocab(tokenizer, spec)
    known, listed = set(tokens), set(merges)
    unlisted = [
        (token[:cut], token[cut:])
        for token in tokens
        for cut in range(1, len(token))
        if token[:cut] in known and token[cut:] in known and (token[:cut], token[cut:]) not in listed
    ]
    if unlisted:
        (left, right), more = unlisted[0], len(unlisted) - 1
        found.append(
            f"llama.cpp joins any two adjacent tokens that make a token; this tokenizer's merges leave out "
            f"{left!r} + {right!r}{f' and {more} more such pairs' if more else ''}, so some text may split "
            "differently"
        )
    return found


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """llama.cpp writes a line per tensor to the process's stdout and stderr: send them to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _llama_cpp_quantize(source: Path, target: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = BY_LLAMA_CPP[quant]
    params.nthread = os.cpu_count() or 1
    with _quiet_native_output():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise TuneryError(f"llama.cpp's quantizer failed on {source} ({quant}, status {status})")


# --- reading the file back ------------------------------------------------------------------------------

# the families whose GGUF tokenizer transformers reads as byte-level BPE (it reads Gemma's and Phi-3's as
# SentencePiece, which their GGUF files from llama.cpp's converter are)
BYTE_LEVEL_READERS = ("llama", "mistral", "qwen2", "qwen3")

SAMPLE_CHATS = (
    [{"role": "user", "content": "Summarise the refund policy in one sentence."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "What is 12 + 30?"}],
)


@dataclass
class Agreement:
    reader: str
    max_abs: float
    mean_abs: float
    top1: float  # share of positions whose most likely next token is the same
    same_tokens: bool | None  # the reader's tokenizer splits the texts as the model's does (None: not read)

    def line(self) -> str:
        tokens = (
            "" if self.same_tokens is None else f", tokens {'identical' if self.same_tokens else 'DIFFER'}"
        )
        return (
            f"{self.reader}: logits max |diff| {self.max_abs:.3g}, mean {self.mean_abs:.3g}, "
            f"top-1 agreement {self.top1:.1%}{tokens}"
        )


@dataclass
class LogitCheck:
    readers: list[Agreement]
    skipped: list[str]

    def lines(self) -> list[str]:
        return [a.line() for a in self.readers] + self.skipped


def _texts(tokenizer: Any, texts: list[str] | None) -> list[str]:
    if texts:
        return texts
    if tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in SAMPLE_CHATS
        ]
    return ["The refund policy allows returns within 30 days.", "What is 12 + 30?"]


def _agreement(
    reader: str, expected: list[torch.Tensor], got: list[torch.Tensor], same: bool | None
) -> Agreement:
    import torch

    diffs = [(a - b).abs() for a, b in zip(expected, got, strict=True)]
    top1 = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(expected, got, strict=True)])
    return Agreement(
        reader,
        max(float(d.max()) for d in diffs),
        float(torch.cat([d.flatten() for d in diffs]).mean()),
        float(top1.mean()),
        same,
    )


def compare_logits(path: Path, model: Any, tokenizer: Any, texts: list[str] | None = None) -> LogitCheck:
    """Read `path` back with transformers' GGUF loader (and llama.cpp's, when installed) and compare each
    position's logits with `model`'s on the same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.models.load import FROM_PRETRAINED

    texts = _texts(tokenizer, texts)
    ids = [tokenizer(t, add_special_tokens=True, return_tensors="pt").input_ids for t in texts]
    with torch.no_grad():
        expected = [model(i).logits[0].float() for i in ids]
    path = Path(path)
    # what the file means and transformers' reader does not read: the check tests the file's meaning
    overrides: dict[str, Any] = {}
    head_dim = getattr(model.config, "head_dim", None)
    if model.config.model_type == "qwen3" and head_dim:
        overrides["head_dim"] = head_dim  # written as qwen3.attention.key_length
    if model.config.model_type in ("gemma2", "gemma3_text"):
        overrides["query_pre_attn_scalar"] = head_dim  # llama.cpp scales attention by 1/sqrt(head_dim)
    if _rope_scaling(
        model.config
    ):  # llama.cpp's rope_freqs tensor or rope.scaling keys; transformers reads neither
        overrides["rope_parameters"] = dict(model.config.rope_parameters)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **overrides, **FROM_PRETRAINED
    ).eval()
    same: bool | None = None
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    # transformers' reader builds a SentencePiece tokenizer's spacing from the architecture, not from the file
    # (Metaspace "first" for llama), so only llama.cpp's tokens are compared for one
    if spec.get("merges") and not spec.get("byte_fallback") and model.config.model_type in BYTE_LEVEL_READERS:
        theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        same = all(
            theirs(t, return_tensors="pt").input_ids.tolist() == i.tolist()
            for t, i in zip(texts, ids, strict=True)
        )
    with torch.no_grad():
        got = [loaded(i).logits[0].float() for i in ids]
    readers = [_agreement("transformers", expected, got, same)]
    skipped = []
    if llama_cpp_missing():
        skipped.append("llama.cpp: not installed (`make llama-cpp`), not compared")
    else:
        try:
            readers.append(_llama_cpp_agreement(path, expected, ids, texts))
        except LlamaCppFailed as e:
            skipped.append(f"llama.cpp: {e}")
    return LogitCheck(readers, skipped)


def _llama_cpp_agreement(
    path: Path, expected: list[torch.Tensor], ids: list[torch.Tensor], texts: list[str]
) -> Agreement:
    import torch

    from tunery.models.llama_cpp_run import scores

    got, same = scores(path, [i[0].tolist() for i in ids], texts)
    return _agreement("llama.cpp", expected, [torch.from_numpy(g) for g in got], same)
