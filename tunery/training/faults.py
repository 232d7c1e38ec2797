"""Fault injection for resume tests: `TUNERY_FAULT=after_step:3` SIGKILLs the process at that point,
`TUNERY_FAULT=after_step:3:SIGTERM` sends it SIGTERM (the graceful-stop path) instead.

Tests use it to stop a run at an exact place (between steps, or halfway through writing a checkpoint)
instead of racing a timer. It costs one environment lookup per call and is inert when unset.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str, step: int) -> None:
    spec = os.environ.get("TUNERY_FAULT", "")
    where, _, signame = spec.partition(f"{name}:{step}")
    if spec and not where and (not signame or signame.startswith(":")):
        os.kill(os.getpid(), getattr(signal, signame[1:] or "SIGKILL"))
