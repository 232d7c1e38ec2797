"""Tiny random models built in code, one per model family, for tests and smoke runs.

`tiny-random` is a 2-layer Llama with the SmolLM2 chat template (ChatML with a default system prompt), so
tests exercise the same masking path as the bundled model. `tiny-random-<family>` builds the same size of
model from that family's own transformers config (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3), with a
chat template written here after the family's conventions: its turn markers, its end-of-turn token, and
where it puts a system message (Gemma and Mistral have no system role: it goes into the first user turn).
The architecture's own traits are switched on at sizes a test reaches: Mistral's and Gemma's sliding
windows are 16 tokens, Gemma 2 soft-caps its attention logits, Qwen3 and Gemma 3 normalise queries and
keys, Phi-3 fuses its projections.

Nothing is downloaded or read from disk. The tokenizer is byte-level (every UTF-8 byte a token) plus the
family's special tokens; the same seed gives the same weights on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from tunery.models.locate import TINY

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3: ChatML without a default system prompt
CHATML_NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma: no system role (a system message opens the first user turn), the assistant is 'model'
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{% set prefix = system if loop.first else '' %}"
    "{{ '<start_of_turn>' + role + '\n' + prefix + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Mistral: [INST] ... [/INST] answer</s>; a system message goes into the first instruction
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}{% endif %}"
    "{% endfor %}"
)

# Phi-3: <|role|> tags, each turn closed by <|end|>
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    config: type[PretrainedConfig]
    template: str
    special: tuple[str, ...]  # the first is padding
    bos: str
    eos: str  # the end-of-turn token: training stops there and sampling stops at it
    extra: tuple[tuple[str, Any], ...] = ()  # the family's own config fields


WINDOW = 16  # sliding-window attention, short enough for a test's sequences to cross it

FAMILIES: dict[str, Family] = {
    "llama": Family(
        LlamaConfig,
        CHATML_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
        "<|im_end|>",
    ),
    "qwen2": Family(
        Qwen2Config,
        CHATML_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
        "<|im_end|>",
    ),
    "qwen3": Family(
        Qwen3Config,
        CHATML_NO_SYSTEM_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
        "<|im_end|>",
        (("head_dim", 16),),
    ),
    "mistral": Family(
        MistralConfig,
        MISTRAL_TEMPLATE,
        ("<unk>", "<s>", "</s>"),
        "<s>",
        "</s>",
        (("sliding_window", WINDOW),),
    ),
    "gemma2": Family(
        Gemma2Config,
        GEMMA_TEMPLATE,
        ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<end_of_turn>",
        (("head_dim", 16), ("sliding_window", WINDOW), ("attn_logit_softcapping", 50.0)),
    ),
    "gemma3": Family(
        Gemma3TextConfig,
        GEMMA_TEMPLATE,
        ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<end_of_turn>",
        (
            ("head_dim", 16),
            ("sliding_window", WINDOW),
            ("layer_types", ["sliding_attention", "full_attention"]),
        ),
    ),
    "phi3": Family(
        Phi3Config,
        PHI3_TEMPLATE,
        ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|endoftext|>",
        "<|end|>",
    ),
}


def family_of(name: str) -> str:
    """'tiny-random' -> 'llama', 'tiny-random-qwen3' -> 'qwen3'."""
    return "llama" if name == TINY else name.removeprefix(TINY + "-")


def tiny_tokenizer(family: str = "llama") -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte is one token, plus the family's special tokens."""
    spec = FAMILIES[family]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(list(spec.special) + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(spec.special))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.special[0],
        unk_token=spec.special[0],
    )
    tokenizer.chat_template = spec.template
    return tokenizer


def tiny_config(vocab_size: int, family: str = "llama") -> PretrainedConfig:
    spec = FAMILIES[family]
    return spec.config(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=spec.special.index(spec.bos),  # the special tokens come first in tiny_tokenizer's vocab
        eos_token_id=spec.special.index(spec.eos),
        pad_token_id=0,
        # Wider than the usual 0.02 so the tied output layer can express confident predictions: with
        # 0.02 the logits of a 64-wide model stay near uniform and a LoRA adapter can barely move them.
        initializer_range=0.2,
        **dict(spec.extra),
    )


def tiny_model(vocab_size: int, seed: int = 0, family: str = "llama") -> PreTrainedModel:
    config = tiny_config(vocab_size, family)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]  # type: ignore[attr-defined]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)  # type: ignore[operator]
    return model  # type: ignore[no-any-return]
