"""A torchrun rank for the tests: `tunery` as `python -m tunery` runs it, after registering a dump of every
thread's stack on SIGUSR1 into a file of this rank's own (`$TUNERY_TEST_STACKS/rank<RANK>.txt`). On a hang
the harness (conftest.run_torchrun) signals each rank and reads which rank waited where; dumps through one
shared stderr interleave and cannot be told apart."""

from __future__ import annotations

import faulthandler
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, as for `python -m tunery`
stacks = os.environ.get("TUNERY_TEST_STACKS")
if stacks:
    dump = (Path(stacks) / f"rank{os.environ.get('RANK', '0')}.txt").open("w")  # open until the process ends
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
runpy.run_module("tunery", run_name="__main__", alter_sys=True)
