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
    warnings = differences(model.config, arch)
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
    if arch.name == "phi3" and "</s>" not in tokenizer.get_vocab():
        # llama.cpp sets attributes on Phi-3's `</s>` when the model's name says phi-3, and fails without it
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
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TuneryError(
            "GGUF export covers byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style); this model's is "
            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
        )
    size = len(tokenizer)
    if size > vocab_rows:
        raise TuneryError(f"the tokenizer has {size} tokens but the model's embedding only {vocab_rows} rows")
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
    writer.add_add_eos_token(False)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)


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
        path.parent, gguf_file=path.name, dtype=torch.float32, **overrides
    ).eval()
    same: bool | None = None
    merges = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {}).get("merges")
    if merges and model.config.model_type in BYTE_LEVEL_READERS:
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
