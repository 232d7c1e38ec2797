"""PyTorch's elementwise math kernels run once in one thread before a model is used (`warm_math_kernels`)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def warm_math_kernels() -> None:
    """Run PyTorch's elementwise math kernels once each on a few values in this thread, before any of them
    runs on several threads at once. Seen here (torch 2.13, MKL 2024.2): the first `cos` of a fresh process
    over a tensor big enough to be split between two threads came back inaccurate on the main thread's half
    (560-600 of 32,768 values a bf16 step off the float64 result) in about 1 of 180 processes on a loaded
    host, never in 50,000 later calls within a process. In the decoding engine's rotary tables that changed
    sampled tokens, so a PPO run resumed in a new process was not the run it continued. This is a
    mitigation on the assumption that only the first, concurrent call is at fault (not proven: the fault is
    too rare to show its absence). A tensor this small stays on one thread."""
    probe = torch.linspace(0.1, 0.9, 16)
    for dtype in (torch.float32, torch.float64):
        x = probe.to(dtype)
        for op in (torch.cos, torch.sin, torch.exp, torch.log, torch.tanh, torch.sigmoid, torch.erf,
                   torch.sqrt, torch.rsqrt, torch.log1p, torch.expm1, torch.atan, torch.reciprocal):  # fmt: skip
            op(x)
        torch.pow(x, x)
