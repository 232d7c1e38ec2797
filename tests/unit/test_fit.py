"""Will it fit? (training/fit.py): the estimate against measured peaks, and the refusal before loading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import write_jsonl
from tunery.errors import TuneryError
from tunery.models.load import load_tokenizer
from tunery.training import fit

REPO = Path(__file__).resolve().parents[2]
GB = 1e9


def llama_dir(path: Path, hidden: int, mlp: int, layers: int, weights: bool = True) -> Path:
    """A Llama-shaped model directory with the tiny byte-level tokenizer; random weights, or config only."""
    tokenizer = load_tokenizer("tiny-random")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    path.mkdir()
    if weights:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.system  # trains a 134M-parameter model twice: ~50 s
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(full: bool, tmp_path: Path) -> None:
    """A 134M-parameter model (its weights 0.5 GB in fp32) trained on rows of ~1000 tokens: the estimate
    of the run's peak memory against the peak the run measured (summary.json)."""
    model = llama_dir(tmp_path / "model", hidden=1024, mlp=4096, layers=8)
    lines = [
        {"messages": [{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * 10},
                      {"role": "assistant", "content": "Because air scatters blue light the most. " * 6}]}
        for i in range(10)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "run"
    args = ["--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size",
            "2", "--micro-batch-tokens", "1024", "--precision", "fp32", "--safety-evals", "none",
            "--no-track-energy", *(["--full"] if full else [])]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "tunery", "train", "sft", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads((out / "summary.json").read_text())["peak_memory_mb"] * 2**20
    shape = fit.model_shape(str(model))
    assert shape is not None and shape.parameters > 130e6
    estimated = fit.estimate(shape, fit.Setup(0 if full else 16, "none", "fp32", 1024)).peak
    assert "GB at peak" in proc.stderr  # the run logs its estimate
    print(f"estimate {estimated / GB:.2f} GB, measured {measured / GB:.2f} GB")
    assert 0.75 < estimated / measured < 1.25, (estimated / GB, measured / GB)


def test_a_run_that_cannot_fit_is_refused_before_loading_with_options(tmp_path: Path) -> None:
    """An 8B-shaped model (config only: nothing could be loaded) fully fine-tuned needs ~16 bytes per
    parameter: refused at once, exit status 2 (a usage error), with the estimate and the options, and no run directory."""
    model = llama_dir(tmp_path / "model8b", hidden=4096, mlp=14336, layers=32, weights=False)
    data = write_jsonl(tmp_path / "train.jsonl", 10 * [{"messages": [{"role": "user", "content": "hi"},
                                                                     {"role": "assistant", "content": "hello"}]}])  # fmt: skip
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tunery", "train", "sft", "--model", str(model), "--data", str(data),
         "--out", str(out), "--full"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "will not fit in memory" in proc.stderr and "GB at peak" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    assert "--no-memory-check" in proc.stderr


def test_the_options_offered_are_the_ones_that_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = llama_dir(tmp_path / "model8b", hidden=4096, mlp=14336, layers=32, weights=False)
    shape = fit.model_shape(str(model))
    assert shape is not None and 7e9 < shape.parameters < 8e9
    setup = fit.Setup(16, "none", "fp32", 2048)
    int4 = fit.estimate(shape, fit.Setup(16, "int4", "fp32", 2048)).peak
    monkeypatch.setattr(fit, "free_memory", lambda device: int4 + 0.1 * GB)  # int4 fits, int8 does not
    with pytest.raises(TuneryError) as refused:
        fit.check_fit(str(model), setup, torch.device("cpu"))
    message = str(refused.value)
    # int4 fits as it is; int8 only with a shorter micro-batch; every option offered is under the free memory
    assert "; --quantize int4 (~" in message and "--quantize int8 (~" not in message
    assert "--quantize int8 --micro-batch-tokens 1024 (~" in message
    offered = [float(x) for x in re.findall(r"\(~([0-9.]+) GB\)", message.split("Options that fit:")[1])]
    assert offered and all(x <= (int4 + 0.1 * GB) / GB + 0.05 for x in offered), message
    assert fit.estimate(shape, fit.Setup(16, "int8", "fp32", 2048)).peak > int4
    monkeypatch.setattr(fit, "free_memory", lambda device: 1e15)
    assert fit.check_fit(str(model), setup, torch.device("cpu")) is not None


def test_sharding_is_offered_for_full_fine_tuning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--shard divides the decoder layers' weights, gradients and Adam moments by the processes (the
    embedding stays whole): the fewest processes whose estimate fits is offered, and no more."""
    model = llama_dir(tmp_path / "model8b", hidden=4096, mlp=14336, layers=32, weights=False)
    shape = fit.model_shape(str(model))
    assert shape is not None
    full = fit.Setup(0, "none", "fp32", 1024)
    peaks = {n: fit.estimate(shape, fit.Setup(0, "none", "fp32", 1024, shards=n)).peak for n in (1, 2, 4, 8)}
    assert peaks[1] > peaks[2] > peaks[4] > peaks[8]
    state = shape.parameters * fit.ADAM  # fp32 weights, gradients and two moments, all in one process
    assert 0.35 < (peaks[1] - peaks[2]) / state < 0.5  # half the decoder's, less two layers being gathered
    assert peaks[8] - fit.estimate(shape, full).activations > state / 8  # the embedding stays whole
    monkeypatch.setattr(fit, "free_memory", lambda device: peaks[4] + 0.1 * GB)
    with pytest.raises(TuneryError) as refused:
        fit.check_fit(str(model), full, torch.device("cpu"))
    message = str(refused.value)
    assert f"--shard over 4 processes, one per GPU or machine (~{peaks[4] / GB:.1f} GB)" in message
    assert "--shard over 2" not in message and "--shard over 8" not in message


def test_sampling_methods_count_the_engines_copy_of_the_weights(tmp_path: Path) -> None:
    """GRPO and PPO sample on the decoding engine, which keeps a whole copy of the weights in their
    precision (fp32 for full fine-tuning, the frozen base's for LoRA); a quantized base samples on its own
    layers. The configs say which methods sample."""
    from tunery.recipes.configs import DPOConfig, GRPOConfig

    model = llama_dir(tmp_path / "model1b", hidden=2048, mlp=8192, layers=16, weights=False)
    shape = fit.model_shape(str(model))
    assert shape is not None
    grpo = fit.Setup.of(GRPOConfig(data="t.jsonl", out="o", grader="g.json", lora_rank=0), "fp32")
    dpo = fit.Setup.of(DPOConfig(data="t.jsonl", out="o", lora_rank=0), "fp32")
    assert grpo.samples and not dpo.samples
    plain = replace(grpo, samples=False)
    assert fit.estimate(shape, grpo).weights - fit.estimate(shape, plain).weights == 4 * shape.parameters
    lora = replace(grpo, lora_rank=16, precision="bf16")
    copy = fit.estimate(shape, lora).weights - fit.estimate(shape, replace(lora, samples=False)).weights
    assert copy == 2 * shape.parameters
    int4 = replace(lora, quantize="int4")
    assert fit.estimate(shape, int4).weights == fit.estimate(shape, replace(int4, samples=False)).weights


def test_a_runs_peak_memory_is_its_own_not_its_parents() -> None:
    """Linux carries getrusage's ru_maxrss across exec: a run started by a large process (the test runner,
    `tunery serve`) would report its parent's size as its peak. The run's own high-water mark does not."""
    held = bytearray(600 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touched: resident
    code = "from tunery.training.memory import peak_memory_mb; import resource; " \
           "print(peak_memory_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    own, inherited = map(float, proc.stdout.split())
    assert inherited > 600  # what ru_maxrss says: at least the parent's 600 MB
    assert own < 300, own  # a Python process that imported one module
    del held


def test_a_bf16_lora_run_loads_its_base_in_bf16(tmp_path: Path) -> None:
    """The base of a LoRA run in bf16 stays frozen in bf16, so it loads in bf16: half of the fp32 load an
    8B model's estimate counted before (32 GB). fp32 runs, full fine-tuning and a run merging a starting
    adapter first (its update goes into the fp32 weights) still load in fp32; a quantized base in bf16."""
    model = llama_dir(tmp_path / "model8b", hidden=4096, mlp=14336, layers=32, weights=False)
    shape = fit.model_shape(str(model))
    assert shape is not None and not shape.file_bytes  # no weights file: the load term is the weights alone

    def load(*args: object, **kwargs: object) -> float:
        return fit.estimate(shape, fit.Setup(*args, **kwargs)).load / shape.parameters  # type: ignore[arg-type]

    assert load(16, "none", "bf16", 2048) == 2
    assert load(16, "none", "fp32", 2048) == 4
    assert load(16, "none", "bf16", 2048, adapter=True) == 4
    assert load(0, "none", "bf16", 2048) == 4
    assert load(16, "int4", "fp32", 2048) == load(16, "int4", "bf16", 2048, adapter=True) == 2


@pytest.mark.parametrize(
    ("lora_rank", "precision", "loaded"),
    [(8, "bf16", torch.bfloat16), (8, "fp32", torch.float32), (0, "bf16", torch.float32)],
    ids=["lora-bf16", "lora-fp32", "full-bf16"],
)
def test_a_run_loads_its_base_as_the_estimate_says(
    lora_rank: int, precision: str, loaded: torch.dtype, tmp_path: Path
) -> None:
    """`open_run` loads the model in the precision `fit.loads_in_bf16` gives, the rotary frequencies in fp32."""
    from tunery.recipes.configs import SFTConfig
    from tunery.run import lifecycle

    data = tmp_path / "train.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    write_jsonl(data, [chat, chat])
    cfg = SFTConfig(model="tiny-random", data=str(data), out=str(tmp_path / "run"), lora_rank=lora_rank,
                    precision=precision, safety_evals="none", track_energy=False)  # fmt: skip
    opened = lifecycle.open_run(cfg, resume=False, overwrite=False)
    assert {p.dtype for p in opened.model.parameters()} == {loaded}
    assert {b.dtype for b in opened.model.buffers()} == {torch.float32}
