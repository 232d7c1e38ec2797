"""The run directory's life: may a run start or resume here, the final model written atomically, data
digests. (The files in it, as types: tunery/run/files.py. Torch is imported inside functions: the CLI
checks a run directory before loading it.)

DIR/checkpoints/     step-N/ directories (training/checkpoint.py)
DIR/final/           the trained adapter or weights, the tokenizer, tunery.yaml (what it is, base model)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tunery.errors import TuneryError
from tunery.run.config import build_config
from tunery.run.files import is_finished, read_config
from tunery.training.io import atomic_write_yaml

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

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
    saved = read_config(run_dir)
    for field, recorded in (("data", saved and saved.data_sha256), ("valid", saved and saved.valid_sha256)):
        if recorded and file_digest(getattr(cfg, field)) != recorded:
            raise TuneryError(
                f"cannot resume {run_dir}: {getattr(cfg, field)} changed since the run started; "
                "restore it, or start a new run with --out"
            )


# what a run writes before its config.yaml (screening): a directory holding only these never started
# training, so there is nothing to resume and a new run may take it over
LOCK = ".lock"  # held (flock) by the process training into the directory, for as long as it runs
_BEFORE_CONFIG = {"screening.json", "screened", LOCK}
_held: dict[Path, int] = {}  # this process's locks: run directory -> its open lock file

log = logging.getLogger("tunery")


def lock_run_dir(run_dir: Path, wait: float = 30.0) -> None:
    """Hold RUN_DIR/.lock for the rest of this process, so two processes never train into one directory
    at once: a second `tunery train --out` of the same directory, or a service replica's late start while
    another resumes the job. The kernel releases the lock when the process ends, however it ends. Waits up
    to `wait` seconds for a holder to exit (one being stopped checkpoints first), then raises. Held once
    per process: a run resumed in the process that started it takes it again at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.resolve() in _held:
        return
    try:  # not through a symlink: the pid written below would truncate whatever it points to
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise TuneryError(
            f"{run_dir / LOCK} cannot be opened as the run's lock file ({e.strerror}); remove it"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TuneryError(f"{run_dir / LOCK} is not a regular file; remove it")
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            if time.monotonic() >= deadline:
                os.close(fd)
                raise TuneryError(
                    f"{run_dir} is in use by another training process (pid {holder}); wait for it to end or "
                    "stop it, or train into another --out"
                ) from None
            if not said:
                log.warning(
                    "%s is in use by another training process (pid %s); waiting for it", run_dir, holder
                )
                said = True
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir.resolve()] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Release `lock_run_dir`'s lock (the run has ended; the process goes on, e.g. to the next trial)."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Whether `run_dir` may take a new run (or be resumed), without touching it; True when it holds files
    to clear first. Raises with what to do:

    - resuming: it must hold a config.yaml (the run got past its set-up) and not be finished;
    - a directory left by a run that stopped before training (only its screening): taken over silently;
    - a Tunery run: refused unless `overwrite`, suggesting --resume only when there is something to resume;
    - a directory holding anything else: refused, even with `overwrite` (it is not ours to delete).
    """
    started = (run_dir / "config.yaml").is_file()
    if resume:
        if not started:
            what = "does not exist" if not run_dir.exists() else "never started training (no config.yaml)"
            raise TuneryError(
                f"cannot resume {run_dir}: it {what}; start it again without --resume "
                f"(the same command with --out {run_dir})"
            )
        if is_finished(run_dir):
            raise TuneryError(
                f"{run_dir} has finished: its model is in {run_dir / 'final'} and nothing is left to resume "
                f"(to evaluate it again: tunery eval all --adapter {run_dir}; to train again: the same "
                "command with --overwrite instead of --resume)"
            )
        return False
    if run_dir.exists() and not run_dir.is_dir():
        raise TuneryError(f"--out {run_dir} is a file; give a directory for the run")
    contents = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if contents and not started and not contents <= _BEFORE_CONFIG:
        raise TuneryError(
            f"--out {run_dir} is a directory that is not a Tunery run and is not empty "
            f"({', '.join(sorted(contents)[:5])}{', ...' if len(contents) > 5 else ''}); "
            "give a new or empty directory for the run"
        )
    if started and not overwrite:
        if is_finished(run_dir):
            raise TuneryError(
                f"{run_dir} already holds a finished run (its model is in {run_dir / 'final'}); "
                "pass --overwrite to train it again from scratch, or choose another --out"
            )
        raise TuneryError(
            f"{run_dir} holds a run that did not finish; continue it with --resume {run_dir}, "
            "or pass --overwrite to start over"
        )
    return bool(contents)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, lock: bool = True) -> None:
    """`check_run_dir`, take the directory's lock (`lock_run_dir`), then check again (another process may
    have changed it while this one waited) and clear what a new run replaces."""
    check_run_dir(run_dir, resume, overwrite)  # refused before anything is created
    if lock:
        lock_run_dir(run_dir)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    if check_run_dir(run_dir, resume, overwrite):
        for child in run_dir.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def resumed_config(cls: type[C], resume_dir: str) -> C:
    """The config a run was started with, to continue it."""
    check_run_dir(Path(resume_dir), resume=True, overwrite=False)
    saved = read_config(Path(resume_dir))
    if saved is None:
        raise TuneryError(f"cannot resume {resume_dir}: its config.yaml does not parse; start a new run")
    fields = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return build_config(
        cls, None, {k: v for k, v in saved.fields.items() if k in fields} | {"out": resume_dir}
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_final(
    run_dir: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    meta: dict[str, Any],
    base_adapter: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write DIR/final atomically. `base_adapter` (an adapter merged into the base before training, e.g.
    the SFT adapter under a DPO run) is copied in, so the final directory loads on its own. `weights`: a
    full fine-tuning's whole weights, when `model` holds only its shards (--shard)."""
    from peft import PeftModel

    from tunery.training.checkpoint import save_trainable

    final_dir = run_dir / "final"
    tmp_dir = run_dir / ".tmp-final"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if isinstance(model, PeftModel) or hasattr(model, "lm"):  # an adapter, or a head over an LM
        save_trainable(model, tmp_dir, weights)
    else:
        model.save_pretrained(tmp_dir, state_dict=weights)  # type: ignore[operator]
    tokenizer.save_pretrained(tmp_dir)
    if base_adapter is not None:
        shutil.copytree(base_adapter, tmp_dir / "base_adapter")
    atomic_write_yaml(tmp_dir / "tunery.yaml", meta)
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp_dir.rename(final_dir)
    return final_dir
