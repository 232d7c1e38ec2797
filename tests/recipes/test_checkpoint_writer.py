"""Checkpoints written in the background (training/checkpoint.py's CheckpointWriter): the same files as a
checkpoint written on the spot (`background=False`), holding the step they were asked for even though training goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tunery.models.heads import RewardModel
from tunery.models.lora import apply_lora
from tunery.training.checkpoint import CheckpointWriter, load_checkpoint


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "shape"):  # numpy's RNG state
        return bool((a == b).all())
    return bool(a == b)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()


@pytest.mark.parametrize("with_head", [False, True], ids=["lora", "reward-model"])
def test_background_checkpoint_is_the_step_it_was_asked_for(tiny, tmp_path: Path, with_head: bool) -> None:
    model, _ = tiny
    model = apply_lora(model, 4, 8, 0.0, "all-linear")
    if with_head:
        model = RewardModel(model, model.config.hidden_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, optimizer)

    torch.manual_seed(3)
    CheckpointWriter(background=False).save(
        tmp_path / "now", 1, model, optimizer, {"tokens": 10}, {"lr": 0.01}
    )
    now = tmp_path / "now" / "checkpoints" / "step-1"
    torch.manual_seed(3)
    writer = CheckpointWriter()
    writer.save(tmp_path / "later", 1, model, optimizer, {"tokens": 10}, {"lr": 0.01})
    step(model, optimizer)  # the next step changes weights and optimizer state while the write may run
    writer.wait()

    later = tmp_path / "later" / "checkpoints" / "step-1"
    written = sorted(p.relative_to(now) for p in now.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(later) for p in later.rglob("*") if p.is_file())
    for name in written:
        if name.suffix == ".pt":
            assert same(
                torch.load(now / name, weights_only=False), torch.load(later / name, weights_only=False)
            )
        else:
            assert (now / name).read_bytes() == (later / name).read_bytes(), name

    # and it restores the step it was asked for, not the one after
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    load_checkpoint(later, model, optimizer)
    restored = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert not all(torch.equal(saved[n], restored[n]) for n in saved)
    load_checkpoint(now, model, optimizer)
    assert all(torch.equal(restored[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_a_failed_background_write_is_raised_by_the_next_wait(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    model = apply_lora(model, 4, 8, 0.0, "all-linear")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    writer = CheckpointWriter()
    writer.save(blocker, 1, model, optimizer, {}, {})
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # raised once
