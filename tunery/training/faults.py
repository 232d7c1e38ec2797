"""Fault injection for resume tests: `TUNERY_FAULT=after_step:3` SIGKILLs the process at that point.

Tests use it to kill a run at an exact place (between steps, or halfway through writing a checkpoint)
instead of racing a timer. It costs one environment lookup per call and is inert when unset.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str, step: int) -> None:
    if os.environ.get("TUNERY_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
