"""The run directory every recipe writes: set-up, resume checks, the final model and the summary.

DIR/config.yaml      the resolved config (every `auto` filled in)
DIR/metrics.jsonl    one JSON object per optimizer step (and the final evaluation)
DIR/checkpoints/     step-N/ directories (training/checkpoint.py)
DIR/final/           the trained adapter or weights, the tokenizer, tunery.yaml (what it is, base model)
DIR/summary.json     wall time, throughput, peak memory, final metrics
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from tunery.errors import TuneryError
from tunery.training.checkpoint import save_trainable
from tunery.training.config import build_config
from tunery.training.io import atomic_write_yaml

C = TypeVar("C")


def file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_same_data(run_dir: Path, cfg: Any) -> None:
    """A resumed run must see the data it started with, or its data order and results silently change."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for field in ("data", "valid"):
        recorded = saved.get(f"{field}_sha256")
        if recorded and file_digest(getattr(cfg, field)) != recorded:
            raise TuneryError(
                f"cannot resume {run_dir}: {getattr(cfg, field)} changed since the run started; "
                "restore it, or start a new run with --out"
            )


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise TuneryError(f"cannot resume: {run_dir} is not a Tunery run directory (no config.yaml)")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise TuneryError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                "or pass --overwrite to start over"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def resumed_config(cls: type[C], resume_dir: str) -> C:
    """The config a run was started with, to continue it."""
    path = Path(resume_dir) / "config.yaml"
    if not path.is_file():
        raise TuneryError(f"cannot resume: {resume_dir} has no config.yaml")
    saved = yaml.safe_load(path.read_text())
    fields = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return build_config(cls, None, {k: v for k, v in saved.items() if k in fields} | {"out": resume_dir})


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_final(
    run_dir: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    meta: dict[str, Any],
    base_adapter: str | None = None,
) -> Path:
    """Write DIR/final atomically. `base_adapter` (an adapter merged into the base before training, e.g.
    the SFT adapter under a DPO run) is copied in, so the final directory loads on its own."""
    final_dir = run_dir / "final"
    tmp_dir = run_dir / ".tmp-final"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if isinstance(model, PeftModel) or hasattr(model, "lm"):  # an adapter, or a head over an LM
        save_trainable(model, tmp_dir)
    else:
        model.save_pretrained(tmp_dir)  # type: ignore[operator]
    tokenizer.save_pretrained(tmp_dir)
    if base_adapter is not None:
        shutil.copytree(base_adapter, tmp_dir / "base_adapter")
    atomic_write_yaml(tmp_dir / "tunery.yaml", meta)
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp_dir.rename(final_dir)
    return final_dir


def last_metrics(run_dir: Path, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The most recent value of every metric whose name starts with one of `prefixes`."""
    last: dict[str, Any] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        last.update({k: v for k, v in json.loads(line).items() if k.startswith(prefixes)})
    return last
