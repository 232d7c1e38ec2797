from __future__ import annotations

import math

import pytest

from tunery.training.auto import auto_batch_size, auto_epochs, chat_batch, pair_batch, total_steps
from tunery.training.schedule import lr_at


@pytest.mark.parametrize(
    ("n", "epochs"), [(10, 10), (20, 5), (33, 3), (100, 3), (8333, 3), (8334, 2), (30000, 1)]
)
def test_auto_epochs_follow_openai_heuristic(n: int, epochs: int) -> None:
    assert auto_epochs(n) == epochs


def test_auto_batch_size_and_step_count() -> None:
    assert auto_batch_size(100) == 1
    assert auto_batch_size(5000) == 10
    assert auto_batch_size(10**6) == 256
    assert total_steps(10, 4, 3) == 9  # ceil(10 / 4) * 3, as OpenAI counts steps


def test_auto_chat_batch_fills_a_packed_row_on_small_data_and_says_why() -> None:
    choice = chat_batch(mean_tokens=109, row_tokens=1024)(191)  # the bundled support data
    assert choice.size == 10 and "OpenAI's rule gives 1" in choice.why and "1024-token" in choice.why
    assert choice.lr_scale == 10  # the learning rate follows the batch (measured: auto.py's docstring)
    assert chat_batch(130, 1024)(40).size == 2  # at most 1/16 of the examples: an epoch keeps ~16 steps
    assert chat_batch(4000, 1024)(500).size == 1  # long conversations fill a row alone: OpenAI's rule
    big = chat_batch(10, 1024)(100_000)
    assert (big.size, big.why, big.lr_scale) == (200, "OpenAI's rule, 0.2% of 100000 examples", 1.0)
    assert chat_batch(10, 1024)(5000).size == 32  # never more than 32 for speed alone
    assert chat_batch(10, 1024)(5000).lr_scale == 3.2  # 32 / OpenAI's 10
    assert chat_batch(10, 1024)(1000).lr_scale == 10  # 32 / 2, capped
    pairs = pair_batch(100)
    assert (pairs.size, pairs.lr_scale) == (8, 1.0)  # preference methods' rates are set for their batches


def test_auto_learning_rate_follows_an_auto_batch_only(chat_files) -> None:
    from tunery.recipes.configs import SFTConfig
    from tunery.run.lifecycle import resolve_run
    from tunery.training import distributed

    train, _ = chat_files
    world = distributed.World()
    rule = chat_batch(mean_tokens=109, row_tokens=1024)
    assert SFTConfig.BASE_LR_LORA == 2e-4
    auto = resolve_run(SFTConfig(data=str(train), out="x"), 191, world, rule)
    assert auto.batch_size == 10 and auto.lr == pytest.approx(2e-3)
    given = resolve_run(SFTConfig(data=str(train), out="x", batch_size=10), 191, world, rule)
    assert given.lr == pytest.approx(2e-4)  # a batch size the user chose keeps the base rate
    mult = resolve_run(SFTConfig(data=str(train), out="x", learning_rate_multiplier=2.0), 191, world, rule)
    assert mult.batch_size == 10 and mult.lr == pytest.approx(4e-4)


def test_warmup_then_cosine_and_linear() -> None:
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(55, 100, 1.0, 10, "linear") == pytest.approx(0.5)
    assert lr_at(99, 100, 1.0, 0, "constant") == 1.0


def test_teardown_exits_when_leaving_the_process_group_hangs(tmp_path) -> None:
    """gloo's destroy_process_group can block forever; the rank must still end (with its files written)."""
    import subprocess
    import sys

    script = tmp_path / "hang.py"
    script.write_text(
        "import time, torch.distributed as dist\n"
        "from tunery.training import distributed\n"
        "dist.is_initialized = lambda: True\n"
        "dist.destroy_process_group = lambda: time.sleep(3600)\n"
        "distributed.teardown(distributed.World(rank=1, size=2), grace=0.5)\n"
        "print('returned')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "returned" not in proc.stdout, proc.stderr[-2000:]
    assert "exiting without it" in proc.stderr


def test_the_fused_optimizer_updates_as_the_loop_does_and_advances_the_weights_versions() -> None:
    """The run's AdamW on torch's fused kernel: the same update as torch's loop to float rounding, and each
    step advances the updated weights' version counters (the fused kernel alone does not), which the
    decoding engine reads to know that the policy it samples from changed."""
    import torch

    from tunery.models.decode import weights_version
    from tunery.run.lifecycle import adamw

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in model[0].parameters()]
    ours = adamw([p for p in model.parameters() if p.requires_grad], 1e-2, 0.01)
    theirs = torch.optim.AdamW(twin, lr=1e-2, weight_decay=0.01, foreach=False)
    assert ours.defaults["fused"]
    frozen = model[1].weight._version
    for step in range(3):
        before = weights_version(model)
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) for p in twin]
        for p, t, g in zip(model[0].parameters(), twin, grads, strict=True):
            p.grad, t.grad = g.clone(), g.clone()
        ours.step(), theirs.step()
        assert weights_version(model) != before
        for p, t in zip(model[0].parameters(), twin, strict=True):
            assert torch.allclose(p, t, rtol=1e-6, atol=1e-7)
    assert model[1].weight._version == frozen  # not stepped
