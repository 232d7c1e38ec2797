"""The real bundled model (SmolLM2-135M-Instruct). Slow: run with `make test-slow` or `pytest -m slow`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.unit.test_masks import MULTI, example, trained_text
from tunery.data.template import prompt_ids, tokenize_chat
from tunery.models.load import BUNDLED, load_model, load_tokenizer
from tunery.models.sampling import SamplingParams, sample
from tunery.recipes import sft
from tunery.run.files import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def real_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the user's model cache: converting the GGUF takes ~20 s and is shared with `make demo`."""
    monkeypatch.setenv(
        "TUNERY_HOME", os.environ.get("TUNERY_HOME_REAL", str(Path.home() / ".cache" / "tunery"))
    )


def test_masks_with_the_real_chat_template() -> None:
    tokenizer = load_tokenizer(BUNDLED)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    chat = tokenize_chat(tokenizer, example(MULTI))
    assert trained_text(tokenizer, chat) == "Hello! How can I help?<|im_end|>Within 30 days.<|im_end|>"


def test_greedy_sampling_matches_transformers_generate() -> None:
    model, tokenizer = load_model(BUNDLED)
    model.eval()
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    ours = sample(model, tokenizer, [ids], SamplingParams(max_new_tokens=16))[0]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[
            0, len(ids) :
        ].tolist()
    theirs = [t for t in theirs if t != tokenizer.eos_token_id]
    assert ours.token_ids == theirs[: len(ours.token_ids)]
    assert "Paris" in ours.text


def test_short_sft_run_on_the_bundled_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join((REPO / "examples/support/train.jsonl").read_text().splitlines(keepends=True)[:32])
    )
    sft.run(
        None,
        {
            "model": BUNDLED,
            "data": str(data),
            "valid": str(REPO / "examples/support/valid.jsonl"),
            "out": str(out),
            "epochs": 2,
            "batch_size": 8,
            "lr": 1e-3,
            "eval_examples": 8,
        },
    )
    steps = [r for r in read_metrics(out) if "train_loss" in r]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_gguf_round_trip_of_a_fine_tuned_bundled_model(tmp_path: Path) -> None:
    """A LoRA-tuned bundled model exported at f16 and q8_0 reads back (transformers; llama.cpp when installed)
    with the same tokens and, at f16, the same next token everywhere."""
    from tests.conftest import nudged_lora
    from tunery.models.gguf_export import compare_logits, export_gguf
    from tunery.models.ollama import modelfile

    model, tokenizer = load_model(BUNDLED)
    merged = nudged_lora(model).merge_and_unload().eval()  # weights off the bundled file's Q4_1 grid
    for quant, top1, mean in (("f16", 0.99, 0.05), ("q8_0", 0.9, 0.5)):
        path = tmp_path / f"smol-{quant}.gguf"
        export_gguf(merged, tokenizer, path, quant, "smollm2-135m-tuned")
        for agreement in compare_logits(path, merged, tokenizer).readers:
            assert agreement.same_tokens is not False, agreement.line()
            assert agreement.top1 >= top1 and agreement.mean_abs < mean, (quant, agreement.line())
    assert 'PARAMETER stop "<|im_end|>"' in modelfile("smol-f16.gguf", tokenizer)
