"""The CUDA paths, for a machine with a GPU: `scripts/gpu-check` runs these (`pytest -m gpu tests/gpu`).

Tunery is developed on CPU; these check what only a GPU exercises: training on `cuda` in bf16, the decoding
engine on `cuda` against the model's own forward, an adapter served beside its base on `cuda`, a quantized base (bitsandbytes' CUDA kernels) under
LoRA, the memory check reading the GPU's free memory, and --shard over NCCL with two GPUs. Each skips,
saying why, where there is no GPU (or only one, for the sharded test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import BLUE_LINES, chat_lines, nudged_lora, run_torchrun, write_jsonl
from tunery.models.load import load_model
from tunery.models.sampling import SamplingParams, sample
from tunery.recipes import sft
from tunery.run.files import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def sft_config(tmp_path: Path, out: str, **extra: object) -> dict:
    train = write_jsonl(tmp_path / "blue.jsonl", BLUE_LINES * 3)
    return {"model": "tiny-random", "data": str(train), "out": str(tmp_path / out), "max_steps": 8,
            "batch_size": 4, "lr": 2e-2, "lora_rank": 8, "safety_evals": "none", "track_energy": False,
            **extra}  # fmt: skip


def test_sft_trains_on_the_gpu_in_bf16(tmp_path: Path) -> None:
    torch.cuda.reset_peak_memory_stats()
    summary = sft.run(None, sft_config(tmp_path, "gpu", precision="auto"))
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "gpu") if "train_loss" in r]
    assert losses[-1] < losses[0] / 2, losses
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU
    assert "bf16" in (tmp_path / "gpu" / "config.yaml").read_text() or not torch.cuda.is_bf16_supported()
    assert summary["steps"] == 8


def test_decoding_engine_on_the_gpu_matches_the_model() -> None:
    from tunery.models.decode import decode_model_for
    from tunery.models.sampling import _sample_generic

    model, tokenizer = load_model("tiny-random")
    peft = nudged_lora(model).to("cuda").eval()
    assert decode_model_for(peft) is not None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (21, 4, 13)]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, ignore_eos=True)
    fast, slow = sample(peft, tokenizer, prompts, params), _sample_generic(peft, tokenizer, prompts, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    for f, s in zip(fast, slow, strict=True):
        assert torch.allclose(torch.tensor(f.logprobs), torch.tensor(s.logprobs), atol=1e-3)


def test_an_adapter_beside_the_base_on_the_gpu_answers_as_the_merged_model(tmp_path: Path) -> None:
    """The service's way of serving many adapters on one base (decode.py's LoraFactors), on `cuda`."""
    from tests.unit.test_shared_base_adapters import save_adapter
    from tunery.models.decode import decode_model_for
    from tunery.models.lora import load_adapter, read_lora

    adapter = save_adapter("tiny-random", tmp_path / "a", "all-linear", seed=1)
    base, tokenizer = load_model("tiny-random")
    base = base.to("cuda").eval()
    merged = load_adapter(load_model("tiny-random")[0], adapter).to("cuda").eval()
    engine, updates = decode_model_for(base), read_lora(adapter)
    assert engine is not None and not isinstance(updates, str)
    factors = engine.adapter(updates)
    assert not isinstance(factors, str) and factors.layers[0]["qkv"][0].device.type == "cuda"
    prompts = [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Hello there", "Bikes", "A b c d")
    ]
    params = SamplingParams(max_new_tokens=16)
    got = sample(base, tokenizer, prompts, params, adapter=factors)
    expected = sample(merged, tokenizer, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-3)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_base_trains_on_the_gpu(kind: str, tmp_path: Path) -> None:
    sft.run(None, sft_config(tmp_path, kind, quantize=kind, precision="bf16"))
    losses = [r["train_loss"] for r in read_metrics(tmp_path / kind) if "train_loss" in r]
    assert losses[-1] < losses[0] / 2, losses


def test_memory_check_reads_the_gpu() -> None:
    from tunery.training.fit import free_memory

    free = free_memory(torch.device("cuda", 0))
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--shard over NCCL needs two GPUs")
def test_sharded_full_fine_tuning_over_nccl(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_lines(24))
    common = {"model": "tiny-random", "data": str(train), "epochs": 1, "batch_size": 4, "lr": 2e-3,
              "lora_rank": 0, "precision": "fp32", "safety_evals": "none", "seed": 0}  # fmt: skip
    sft.run(None, {**common, "out": str(tmp_path / "one")})
    args = ["train", "sft", *(a for k, v in {**common, "out": str(tmp_path / "two"), "shard": True}.items()
                              for a in ("--set", f"{k}={v}"))]  # fmt: skip
    proc = run_torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r["train_loss"] for r in read_metrics(tmp_path / "one") if "train_loss" in r]
    two = [r["train_loss"] for r in read_metrics(tmp_path / "two") if "train_loss" in r]
    assert one == pytest.approx(two, rel=1e-3)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
