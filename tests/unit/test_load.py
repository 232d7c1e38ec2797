"""Model loading (models/load.py): what every `from_pretrained` of Tunery's gets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tunery.models.load import load_model

REPO = Path(__file__).resolve().parents[2]


def test_a_loaded_model_keeps_transformers_own_layers(tmp_path: Path) -> None:
    """transformers 5 kernelizes every model it loads with hub kernels unless told not to (a download
    where there is a network); Tunery's loads say no, and load where `kernels` is hidden (the CLI's
    process, `_imports.hide_hub_kernels`) as where it is installed."""
    model, tokenizer = load_model("tiny-random")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(str(tmp_path / "model"))
    assert loaded.use_kernels is False
    script = f"""
from tunery._imports import hide_hub_kernels
hide_hub_kernels()
from tunery.models.load import load_model
model, _ = load_model({str(tmp_path / "model")!r})
print("loaded:", type(model).__name__, model.use_kernels)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: LlamaForCausalLM False" in done.stdout


def test_the_first_math_operators_of_a_process_run_on_one_thread() -> None:
    """torch's first `cos` of a fresh process, split between two threads, was seen inaccurate on one half
    (models/warmup.py); Tunery's first call of each runs on a few values (one thread) before a model is
    loaded or the engine builds its rotary tables over 65,536 values."""
    script = """
import torch
sizes = []
for owner, name in ((torch, "cos"), (torch.Tensor, "cos"), (torch, "sin"), (torch.Tensor, "sin")):
    real = getattr(owner, name)
    def recorded(x, *args, _real=real, _name=name, **kwargs):
        sizes.append((_name, x.numel()))
        return _real(x, *args, **kwargs)
    setattr(owner, name, recorded)
from tunery.data.template import prompt_ids
from tunery.models.load import load_model
from tunery.models.sampling import SamplingParams, sample
model, tokenizer = load_model("tiny-random")
sample(model, tokenizer, [prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])], SamplingParams(max_new_tokens=2))
for name in ("cos", "sin"):
    calls = [n for op, n in sizes if op == name]
    print(name, calls[0], max(calls))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stdout.splitlines():
        name, first, largest = line.split()
        assert int(first) <= 16 < int(largest), line  # the warm-up first, then the engine's tables
    assert len(done.stdout.splitlines()) == 2, done.stdout


def test_a_bf16_model_for_inference_loads_in_bf16_with_the_casts_weights(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`load_for_inference` in bf16 without an adapter asks the loader for bf16 (half the memory while
    loading) and holds what loading in fp32 and casting held, to the bit, buffers included; with an adapter
    the loader gives fp32 weights for the adapter to be applied to."""
    import torch

    from tunery.models import load
    from tunery.models.lora import apply_lora, cast_frozen

    asked: list[torch.dtype] = []
    real = load.load_model

    def recording(name: str, dtype: torch.dtype = torch.float32, empty: bool = False):  # type: ignore[no-untyped-def]
        asked.append(dtype)
        return real(name, dtype, empty)

    monkeypatch.setattr(load, "load_model", recording)
    for name in ("tiny-random", "tiny-random-gemma2"):
        model, _ = load.load_for_inference(name, precision="bf16")
        reference, _ = real(name)
        reference.requires_grad_(False)
        cast_frozen(reference, torch.bfloat16)
        ours, theirs = model.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    load.load_for_inference("tiny-random", precision="fp32")
    apply_lora(real("tiny-random")[0], 4, 8, 0.0, "all-linear").save_pretrained(tmp_path / "adapter")
    model, _ = load.load_for_inference("tiny-random", str(tmp_path / "adapter"), precision="bf16")
    assert asked == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
