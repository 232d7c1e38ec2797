"""Will it fit? The run's peak memory, estimated before the model loads, against what the machine has free.

A run that does not fit should fail in a second with the options that would fit, not after minutes of
loading in the out-of-memory killer. The estimate reads the model's shapes from its config (a model built on
PyTorch's meta device: no weights are read) and adds up, per process:

- the process itself (Python, PyTorch, transformers, the tokenizer): BASELINE;
- loading: the weights in the precision they load in, plus the file's pages while it is read when the
  file's precision differs (transformers reads safetensors through a memory map);
- training: the frozen weights (fp32, bf16 or quantized), the trainable weights with their gradient and
  two Adam moments (LoRA's matrices, or every weight for full fine-tuning), and the activations one
  micro-batch of `micro_batch_tokens` keeps for the backward pass (per token and layer, ACT_HIDDEN x hidden
  + ACT_MLP x the MLP width values);
- sampling (GRPO, PPO): the decoding engine's own whole copy of the weights, in the weights' precision.

The process keeps freed memory for reuse (memory.py), so the peak is the baseline plus the larger of the two
phases. The constants were fitted to measured peaks (tests/unit/test_fit.py checks the estimate against a
real run); a micro-batch shorter than `micro_batch_tokens` (short conversations) needs less than estimated.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.run.config import SamplingFields

log = logging.getLogger(__name__)

GB = 1e9
BASELINE = 0.5 * GB
ACT_HIDDEN = 12  # saved values per token and layer, in units of the hidden size ...
ACT_MLP = 6  # ... and of the MLP's width (gate, up, their product and the activation's input)
ADAM = 16  # bytes per trained parameter: fp32 weight, gradient and two moments
QUANT_BYTES = {"none": None, "int8": 1.0 + 0.02, "int4": 0.5 + 0.04}  # per weight, with the scales


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model, read from its config on the meta device."""

    parameters: int
    projection_parameters: int  # the decoder layers' linear weights: what LoRA targets and --quantize stores
    lora_parameters_per_rank: int  # sum of (in + out) over those projections
    layers: int
    hidden: int
    mlp: int
    file_bytes: int  # the weights on disk (0: built in code)
    file_dtype_bytes: int  # 2 for bf16/fp16 files, 4 for fp32


@dataclass(frozen=True)
class Setup:
    """The config fields the estimate depends on."""

    lora_rank: int
    quantize: str
    precision: str  # bf16 | fp32 (resolved)
    micro_batch_tokens: int  # the longest row one forward pass takes
    shards: int = 1  # --shard: processes the full fine-tuning's decoder layers are split across
    samples: bool = False  # the method samples from the policy (GRPO, PPO)
    adapter: bool = False  # the run starts from an adapter merged into the base (`adapter`)

    @classmethod
    def of(cls, cfg: Any, precision: str, shards: int = 1) -> Setup:
        """From a run config: a row holds at most `micro_batch_tokens`, and at most a step's examples, plus
        its padding tail (data/packing.py)."""
        tokens = cfg.micro_batch_tokens
        if isinstance(cfg.batch_size, int):
            tokens = min(tokens, cfg.batch_size * cfg.max_length)
        from tunery.data.packing import padding_tail  # (torch: imported by the caller's run already)

        tokens += padding_tail(tokens)
        sampling = isinstance(cfg, SamplingFields)
        return cls(cfg.lora_rank, cfg.quantize, precision, tokens, shards, sampling, bool(cfg.adapter))


@dataclass(frozen=True)
class Estimate:
    load: float  # bytes resident while loading (weights and file pages)
    weights: float  # frozen and trained weights while training
    optimizer: float  # gradients and Adam moments of the trained weights
    activations: float
    peak: float

    def describe(self) -> str:
        return (
            f"~{self.peak / GB:.1f} GB at peak (weights {self.weights / GB:.1f} GB, gradients and optimizer "
            f"{self.optimizer / GB:.1f} GB, activations {self.activations / GB:.1f} GB, "
            f"{self.load / GB:.1f} GB while loading, {BASELINE / GB:.1f} GB for the process)"
        )


def loads_in_bf16(lora_rank: int, quantize: str, precision: str, adapter: bool) -> bool:
    """Whether a run loads its base in bf16 rather than fp32: when the base is about to be quantized, or
    when it stays frozen and is stored in bf16 anyway (LoRA in bf16), which halves what loading takes (a
    7B model's 28 GB in fp32). Not when an adapter is merged in first: its update is added to the fp32
    weights, which are then rounded to bf16 once. LoRA's own weights train in fp32 either way (peft casts
    them back up; their random initial values are then rounded to bf16's precision)."""
    return quantize != "none" or (lora_rank > 0 and precision == "bf16" and not adapter)


def estimate(shape: Shape, setup: Setup) -> Estimate:
    wide = 2 if setup.precision == "bf16" else 4
    other = shape.parameters - shape.projection_parameters  # embeddings, norms, output layer
    quant = QUANT_BYTES[setup.quantize]
    weights: float
    optimizer: float
    if setup.lora_rank:
        trained = setup.lora_rank * shape.lora_parameters_per_rank
        projections = shape.projection_parameters * (quant if quant is not None else wide)
        weights = projections + other * wide + trained * 4
        optimizer = trained * (ADAM - 4)
        bf16_load = loads_in_bf16(setup.lora_rank, setup.quantize, setup.precision, setup.adapter)
        load_bytes = 2 if bf16_load else 4
    else:
        # --shard splits the decoder layers; the embedding and output layer stay whole (sharding.py), and
        # a layer being gathered (two, with prefetching) is whole too, with its gradient
        layer = shape.projection_parameters / shape.layers
        held = float(shape.parameters)
        if setup.shards > 1:
            held = shape.projection_parameters / setup.shards + other + 2 * layer
        weights = held * (4 + (2 if setup.precision == "bf16" else 0))  # + autocast's copies
        optimizer = held * (ADAM - 4)
        load_bytes = 4
    if setup.samples and quant is None:  # the engine's copy (a quantized base samples on its own layers)
        weights += shape.parameters * (wide if setup.lora_rank else 4)
    load = shape.parameters * load_bytes
    if shape.file_bytes and load_bytes != shape.file_dtype_bytes:
        load += shape.file_bytes  # the file's pages, while they are converted
    per_token = shape.layers * (ACT_HIDDEN * shape.hidden + ACT_MLP * shape.mlp) * wide
    activations = setup.micro_batch_tokens * per_token
    peak = BASELINE + max(load, weights + optimizer + activations)
    return Estimate(load, weights, optimizer, activations, peak)


def model_shape(name: str) -> Shape | None:
    """The shapes of model `name` without reading its weights; None when its config cannot be read here
    (an unknown name, or a hub id the hub cannot serve: loading will say so)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunery.models.load import load_tokenizer, resolve_model_dir
    from tunery.models.locate import is_tiny
    from tunery.models.tiny import family_of, tiny_config

    file_bytes, file_dtype_bytes = 0, 4
    try:
        if is_tiny(name):
            config = tiny_config(len(load_tokenizer(name)), family_of(name))
        else:
            model_dir = resolve_model_dir(name)
            config = AutoConfig.from_pretrained(model_dir or name)
            if model_dir is not None:
                files = list(Path(model_dir).glob("*.safetensors")) or list(Path(model_dir).glob("*.bin"))
                file_bytes = sum(f.stat().st_size for f in files)
                dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "float32"))
                file_dtype_bytes = 4 if "32" in dtype else 2
    except (OSError, ValueError, TuneryError) as exc:  # an unknown name: loading says so, after screening
        log.info("memory check skipped: the config of %s could not be read (%s)", name, exc)
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    projections = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    text = getattr(config, "text_config", None) or config
    return Shape(
        parameters=parameters,
        projection_parameters=sum(m.weight.numel() for m in projections),
        lora_parameters_per_rank=sum(m.in_features + m.out_features for m in projections),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        mlp=getattr(text, "intermediate_size", 4 * text.hidden_size),
        file_bytes=file_bytes,
        file_dtype_bytes=file_dtype_bytes,
    )


def free_memory(device: Any) -> float:
    """Bytes this process may still use: a GPU's free memory, or the machine's available memory within
    any container (cgroup) limit, shared between the processes torchrun started on this machine."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    available = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None:
        available = min(available, limit)
    return available / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _meminfo_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")  # not Linux: no check


def _cgroup_room() -> float | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return float(limit) - float((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def options_that_fit(shape: Shape, setup: Setup, free: float) -> list[str]:
    """The changes a user can make, each with its estimate, that bring the peak under `free`: LoRA instead
    of full fine-tuning, full fine-tuning sharded over the fewest processes that fit, a quantized base,
    each with the longest micro-batch that then fits."""
    candidates: list[tuple[list[str], Setup]] = [([], setup)]
    lora, to_lora = setup, []
    if not setup.lora_rank:
        lora, to_lora = replace(setup, lora_rank=16), ["--lora-rank 16 instead of --full"]
        candidates.append((to_lora, lora))
    if not setup.lora_rank and setup.shards == 1:  # the fewest processes that fit
        for n in (2, 4, 8, 16, 32, 64):
            sharded = replace(setup, shards=n)
            if estimate(shape, sharded).peak <= free:
                candidates.append(([f"--shard over {n} processes, one per GPU or machine"], sharded))
                break
    for kind in ("int8", "int4"):
        if lora.quantize == "none" or (lora.quantize, kind) == ("int8", "int4"):
            candidates.append(([*to_lora, f"--quantize {kind}"], replace(lora, quantize=kind)))
    options = []
    for changes, candidate in candidates:
        tokens = candidate.micro_batch_tokens
        while tokens >= 128:
            trial = replace(candidate, micro_batch_tokens=tokens)
            peak = estimate(shape, trial).peak
            if peak <= free:
                shorter = [f"--micro-batch-tokens {tokens}"] if tokens != setup.micro_batch_tokens else []
                if changes or shorter:
                    options.append(f"{' '.join(changes + shorter)} (~{peak / GB:.1f} GB)")
                break
            tokens //= 2
    return options


def check_fit(model: str, setup: Setup, device: Any) -> Estimate | None:
    """Refuse, before loading, a run whose estimated peak is above the free memory; log the estimate."""
    shape = model_shape(model)
    if shape is None:
        return None
    result = estimate(shape, setup)
    free = free_memory(device)
    log.info("memory: %s; %.1f GB free", result.describe(), free / GB)
    if result.peak > free:
        options = options_that_fit(shape, setup, free)
        raise TuneryError(
            f"this run will not fit in memory: {model} needs {result.describe()}, and {free / GB:.1f} GB is free. "
            + (f"Options that fit: {'; '.join(options)}. " if options else "No single change fits; use a smaller model. ")
            + "To try anyway: --no-memory-check."
        )  # fmt: skip
    return result
