"""`--quantize int8|int4`: a quantized frozen base under LoRA (models/quantize.py, on bitsandbytes)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import BLUE_LINES, metric_series, nudged_lora, pair_lines, tunery_here, write_jsonl
from tunery.errors import TuneryError
from tunery.models.decode import unsupported_reason
from tunery.models.load import load_model
from tunery.models.quantize import quantize_base
from tunery.models.sampling import SamplingParams, sample
from tunery.run.config import check_quantize

REPO = Path(__file__).resolve().parents[2]


def linear_bytes(model: torch.nn.Module) -> int:
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if "proj" in name  # every projection of every layer (the embeddings and norms stay as they were)
    )


@pytest.mark.parametrize(("kind", "ratio", "error"), [("int8", 4, 0.02), ("int4", 8, 0.12)])
def test_the_base_is_stored_quantized_and_computes_close_to_the_original(
    kind: str, ratio: float, error: float
) -> None:
    """Each projection held in 8 or 4 bits; each computes its full-precision output to within the format's
    error (measured: int8 ~1%, NF4 ~9% of the output's norm on these random weights)."""
    model, _ = load_model("tiny-random")
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("proj")}
    full_bytes = linear_bytes(model)
    assert quantize_base(model, kind, torch.float32) == len(originals) == 2 * 7  # q k v o gate up down
    # int8: a byte per weight (+ a scale per row); int4: half a byte (+ a quantized scale per 64)
    assert linear_bytes(model) < full_bytes / ratio * 1.1
    assert not any(p.is_floating_point() for n, p in model.named_parameters() if "proj.weight" in n)
    assert model.lm_head.weight.dtype == torch.float32  # the output layer stays full precision
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in originals.items():
            x_in = torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0))
            want = x_in @ weight.T
            relative = (modules[name](x_in) - want).norm() / want.norm()
            assert relative < error, (name, relative)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_sampling_uses_the_weights_the_trainer_uses(kind: str) -> None:
    """RL rollouts on a quantized base: the sampler's log-probabilities are those of the training forward
    through the same quantized layers with the adapter on (the decoding engine, which packs full-precision
    weights, declines such a model)."""
    model, tokenizer = load_model("tiny-random")
    quantize_base(model, kind, torch.float32)
    peft = nudged_lora(model)
    peft.eval()
    assert "quantized" in (unsupported_reason(peft) or "")
    prompt = [5, 17, 42, 99, 7]
    [completion] = sample(peft, tokenizer, [prompt], SamplingParams(max_new_tokens=8, temperature=1.0,
                                                                    seed=1, ignore_eos=True))  # fmt: skip
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logps = peft(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    chosen = logps.gather(-1, ids[0, len(prompt) :, None])[:, 0]
    assert torch.allclose(chosen, torch.tensor(completion.logprobs), atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_fused_lora_path_over_a_quantized_layer_equals_peft_s(kind: str) -> None:
    """Tunery's LoRA function over bitsandbytes layers (less working memory) computes peft's own loss and
    gradients."""
    model, _ = load_model("tiny-random")
    quantize_base(model, kind, torch.float32)
    peft = nudged_lora(model)
    ids = torch.randint(5, 200, (2, 30), generator=torch.Generator().manual_seed(0))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        peft.zero_grad()
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}

    layers = [m for m in peft.modules() if type(m).__module__ == "peft.tuners.lora.bnb"]
    assert layers and all("_quantized_lora_forward" in str(m.forward) for m in layers)
    fused_loss, fused = step()
    for m in layers:  # peft's own forward
        m.forward = type(m).forward.__get__(m)
    own_loss, own = step()
    assert torch.allclose(fused_loss, own_loss) and fused.keys() == own.keys() and len(own) == 28
    for name, grad in own.items():
        assert torch.allclose(fused[name], grad, rtol=1e-4, atol=1e-7), name


def test_quantize_needs_lora_and_a_known_kind(tmp_path: Path) -> None:
    with pytest.raises(TuneryError, match="full fine-tuning"):
        check_quantize("int4", 0)
    with pytest.raises(TuneryError, match="none, int8, int4"):
        check_quantize("nf4", 16)
    proc = subprocess.run(
        [sys.executable, "-m", "tunery", "train", "sft", "--model", "tiny-random", "--data",
         str(write_jsonl(tmp_path / "t.jsonl", pair_lines(2))), "--out", str(tmp_path / "run"), "--full", "--quantize", "int8"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "full fine-tuning" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_sft_and_dpo_learn_on_a_quantized_base(kind: str, tmp_path: Path) -> None:
    """SFT learns a fixed answer and `tunery chat` (full-precision base + the adapter) gives it; DPO's
    reference (the adapter switched off over the same quantized base) makes its loss start at ln 2."""
    data = write_jsonl(tmp_path / "train.jsonl", BLUE_LINES)
    tunery_here(["train", "sft", "--model", "tiny-random", "--data", str(data), "--out", str(tmp_path / "sft"),
         "--epochs", "3", "--batch-size", "4", "--lr", "0.02", "--safety-evals", "none", "--quantize", kind])  # fmt: skip
    losses = metric_series(tmp_path / "sft", "train_loss")
    assert losses[-1] < losses[0] / 2, losses
    chat = tunery_here(["chat", "--model", "tiny-random", "--adapter", str(tmp_path / "sft"), "--max-tokens", "8"],
                     stdin="Colour number 99?\n/exit\n")  # fmt: skip
    assert "Blue." in chat

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_lines(16))
    tunery_here(["train", "dpo", "--model", "tiny-random", "--data", str(pairs), "--out", str(tmp_path / "dpo"),
         "--epochs", "3", "--batch-size", "4", "--lr", "0.01", "--safety-evals", "none", "--quantize", kind])  # fmt: skip
    losses = metric_series(tmp_path / "dpo", "train_loss")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3) and sum(losses[-3:]) / 3 < 0.5, losses
    config = (tmp_path / "dpo" / "config.yaml").read_text()
    assert f"quantize: {kind}" in config


def test_bitsandbytes_is_imported_without_asking_the_hub_for_a_kernel() -> None:
    """On AVX-512 BF16 CPUs bitsandbytes calls `kernels.get_kernel` (a hub download) when imported; after
    `import tunery` that call cannot happen and leaves no warning, and `kernels` is itself again after."""
    pytest.importorskip("bitsandbytes")
    script = """
import sys, types
fake = types.ModuleType("kernels")
def get_kernel(*args, **kwargs):
    print("ASKED THE HUB", args)
    raise RuntimeError("no network")
fake.get_kernel = get_kernel
sys.modules["kernels"] = fake
import tunery
import bitsandbytes
print("kernels restored:", sys.modules["kernels"] is fake)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ASKED THE HUB" not in done.stdout and "kernels-community" not in done.stderr
    assert "kernels restored: True" in done.stdout


def test_the_cli_imports_bitsandbytes_only_for_a_quantized_run(tmp_path: Path) -> None:
    """`tunery` (its `entry`) leaves bitsandbytes unimported through a run that does not quantize (peft
    would import it, for about a second), and transformers' hub kernels out of it; a quantized run after it
    in the same process still gets bitsandbytes, and peft's LoRA layers for bitsandbytes' quantized ones."""
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "train.jsonl", BLUE_LINES[:12])
    script = f"""
import sys
from tunery.cli import entry, main
common = ["--model", "tiny-random", "--data", {str(data)!r}, "--epochs", "1", "--batch-size", "4",
          "--safety-evals", "none"]
sys.argv = ["tunery", "train", "sft", "--out", {str(tmp_path / "plain")!r}, *common]
try:
    entry()
except SystemExit as done:
    assert done.code == 0, done.code
print("after a plain run:", sys.modules.get("bitsandbytes"), "peft" in sys.modules)
from transformers.utils import is_kernels_available
print("hub kernels:", sys.modules.get("kernels"), is_kernels_available())
assert main(["train", "sft", "--out", {str(tmp_path / "int8")!r}, "--quantize", "int8", *common]) == 0
print("after a quantized run:", type(sys.modules.get("bitsandbytes")).__name__,
      "peft.tuners.lora.bnb" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after a plain run: None True" in done.stdout
    # transformers sees no `kernels` either (hide_hub_kernels)
    assert "hub kernels: None False" in done.stdout
    assert "after a quantized run: module True" in done.stdout
    assert "quantize int8: 14 linear layers" in done.stderr
