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
    size, why = chat_batch(mean_tokens=130, row_tokens=1024)(191)  # the bundled support data
    assert size == 8 and "OpenAI's rule gives 1" in why and "1024-token" in why
    assert chat_batch(130, 1024)(40)[0] == 2  # at most 1/16 of the examples: an epoch keeps ~16 steps
    assert chat_batch(4000, 1024)(500)[0] == 1  # long conversations fill a row alone: OpenAI's rule
    assert chat_batch(10, 1024)(100_000) == (200, "OpenAI's rule, 0.2% of 100000 examples")
    assert chat_batch(10, 1024)(5000)[0] == 32  # never more than 32 for speed alone
    assert pair_batch(100) == (8, "OpenAI's rule gives 1 for 100 examples; preference steps take at least 8")


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
