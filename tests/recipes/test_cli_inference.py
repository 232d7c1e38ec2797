"""chat, generate, compare and models commands on tiny-random, with an adapter trained in the test."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.recipes.test_sft import config
from tunery.cli import main
from tunery.recipes import sft


@pytest.fixture
def run_dir(chat_files, tmp_path: Path) -> Path:
    train, valid = chat_files
    out = tmp_path / "run"
    sft.run(None, config(train, valid, out, epochs=1))
    return out


def test_generate_writes_one_completion_per_prompt(run_dir: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"messages": [{"role": "user", "content": "Where is my order?"}]},
            {"prompt": "Can I return a bike?"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "dropped"}]},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-random",
                "--adapter",
                str(run_dir),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--max-tokens",
                "5",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert all(r["completion_tokens"] <= 5 for r in rows)
    assert rows[2]["messages"] == [{"role": "user", "content": "Hi"}]  # completes the last user turn


def test_generate_rejects_bad_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "no messages"}])
    assert (
        main(["generate", "--model", "tiny-random", "--prompts", str(prompts), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "line 1: expected" in capsys.readouterr().err


def test_chat_streams_and_keeps_history(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["Where is my order?", "/reset", "Thanks", ""])
    monkeypatch.setattr(builtins, "input", lambda _prompt="": next(answers))
    assert main(["chat", "--model", "tiny-random", "--adapter", str(run_dir), "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_compare_prints_both_models_and_metrics(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "Hours?"}]}])
    assert (
        main(
            [
                "compare",
                "--model",
                "tiny-random",
                "--adapter",
                str(run_dir / "final"),
                "--prompts",
                str(prompts),
                "--max-tokens",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "base: tiny-random" in out and "full_valid_loss" in out and "Hours?" in out


def test_models_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "tiny-random" in out


def test_inference_models_hold_every_weight_in_the_fast_dtype(tmp_path) -> None:
    """chat / generate / compare load through this: a weight left in fp32 is cast on every matmul of every
    decoding step by autocast (that made batch-1 sampling 2.4x slower)."""
    import torch

    from tunery.models.load import load_for_inference, load_model
    from tunery.models.lora import apply_lora, bf16_is_fast
    from tunery.training.checkpoint import save_adapter

    model, _ = load_model("tiny-random")
    save_adapter(apply_lora(model, 4, 8, 0.0, "all-linear"), tmp_path / "adapter")
    for adapter in (None, str(tmp_path / "adapter")):
        loaded, _ = load_for_inference("tiny-random", adapter)
        params = list(loaded.parameters())
        assert not any(p.requires_grad for p in params)
        if bf16_is_fast(torch.device("cpu")):
            assert {p.dtype for p in params} == {torch.bfloat16}
