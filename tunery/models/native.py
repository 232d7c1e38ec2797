"""Native kernels for the decoding engine's step, compiled on first use with the machine's C compiler.

`kernels/decode.c` (bf16, AVX-512 BF16): attention over the cache, RMS norm with the residual add before
it, SwiGLU's silu(gate) * up, and the rotary embedding with the new key and value stored into the cache.
With the weights packed, a step of SmolLM2-135M was the linear layers plus ~600 small torch operators:
SDPA given one query per head read the cache at ~7 GB/s (batch 16, 200 keys: ~330 us a layer, a third of
the step), `F.rms_norm` ran ~30 operators (12-20 us a call against 1.4-4 us here) and the rotation four.
Each kernel computes in fp32 and rounds to bf16 once; the engine's logits stay as close to fp32 as with
torch's operators (a test compares both). Numbers in bench/RESULTS.md.

The shared library is built once per source, compiler flags and CPU (it is compiled for this CPU, with
`-march=native`) into `$TUNERY_HOME/native/`, written atomically, and loaded with ctypes. It links the
OpenMP runtime torch has already loaded (libgomp.so.1), so its threads are torch's and
`torch.set_num_threads` applies to it. Wherever it cannot be had (no AVX-512 BF16, no C compiler, a build
that fails, an unwritable home) or `TUNERY_NATIVE_KERNELS=0` is set, `decode_kernels()` is None and the
engine runs torch's operators, as on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tunery.models.locate import tunery_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "decode.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
MAX_GROUP = 16  # queries per key/value head (the kernel's MAX_GROUP)



def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    """The compiled library for this source, flags and CPU, building it if it is not there yet."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()
    target = tunery_home() / "native" / f"decode-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".decode-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", partial, str(SOURCE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(partial, target)  # whole or not at all, whichever process builds it first
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


class Kernels:
    """The compiled library's kernels, each checking that its tensors are laid out as it reads them (a
    mistake is an error, never a read out of bounds)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._attend = library.tunery_decode_attention
        self._attend.restype = ctypes.c_int
        self._attend.argtypes = [pointer, size, pointer, pointer, size, size, pointer, size, pointer]
        self._attend.argtypes += [size] * 5
        self._norm = library.tunery_add_rms_norm
        self._norm.restype = None
        self._norm.argtypes = [pointer, pointer, pointer, pointer, size, size, ctypes.c_float]
        self._silu_mul = library.tunery_silu_mul
        self._silu_mul.restype = None
        self._silu_mul.argtypes = [pointer, pointer, size, size]
        self._rope = library.tunery_rope_store
        self._rope.restype = None
        self._rope.argtypes = [pointer] * 5 + [size] * 6

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attention of one query per head (B, kv, group, D) over keys and values (B, kv, n, D) with an
        additive fp32 mask (B, 1, 1, n); the layouts `fits` accepts."""
        if not fits(queries, keys, values, bias):
            raise ValueError("native attention: tensors not laid out as the kernel reads them")
        batch, kv_heads, group, dim = queries.shape
        n = keys.shape[2]
        out = torch.empty(batch, kv_heads, group, dim, dtype=torch.bfloat16)
        status = self._attend(
            queries.data_ptr(),
            queries.stride(0),
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(0),
            keys.stride(1),
            bias.data_ptr(),
            bias.stride(0),
            out.data_ptr(),
            batch,
            kv_heads,
            group,
            dim,
            n,
        )
        if status != 0:
            raise RuntimeError(f"native attention failed ({status}) for {tuple(queries.shape)}, {n} keys")
        return out

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMS norm of each row of `x` (rows, width) by `weight`; with `delta`, `x += delta` first, in place."""
        rows, width = x.shape
        tensors = [x, weight] + ([delta] if delta is not None else [])
        if not (
            all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu" for t in tensors)
            and weight.shape == (width,)
            and (delta is None or delta.shape == x.shape)
        ):
            raise ValueError("native RMS norm: tensors not laid out as the kernel reads them")
        out = torch.empty_like(x)
        self._norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for `gate_up` (rows, 2 x width), gate first."""
        rows, double = gate_up.shape
        if not (gate_up.dtype == torch.bfloat16 and gate_up.is_contiguous() and gate_up.device.type == "cpu" and double % 2 == 0):
            raise ValueError("native SwiGLU: tensor not laid out as the kernel reads it")
        out = torch.empty(rows, double // 2, dtype=torch.bfloat16)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, double // 2)
        return out


    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """A step's rotary embedding: `qkv` (B, heads + 2 kv, 1, D) holds queries, keys and values; `cos`
        and `sin` (B, D) the rows' tables (sin signed: -sin on the first half). The rotated keys and the
        values go into `slot` (B, 2 kv, 1, D, a view of the cache); returns the rotated queries (B, heads, D)."""
        batch, width, one, dim = qkv.shape
        kv_heads = slot.shape[1] // 2
        heads = width - 2 * kv_heads
        if not (
            all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (qkv, cos, sin, slot))
            and qkv.is_contiguous()
            and cos.is_contiguous()
            and sin.is_contiguous()
            and one == 1
            and dim % 2 == 0
            and heads > 0
            and cos.shape == sin.shape == (batch, dim)
            and slot.shape == (batch, 2 * kv_heads, 1, dim)
            and slot.stride(3) == 1
        ):
            raise ValueError("native rotary embedding: tensors not laid out as the kernel reads them")
        queries = torch.empty(batch, heads, dim, dtype=torch.bfloat16)
        self._rope(
            qkv.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            queries.data_ptr(),
            slot.data_ptr(),
            slot.stride(0),
            slot.stride(1),
            batch,
            heads,
            kv_heads,
            dim,
        )
        return queries


@functools.cache
def decode_kernels() -> Kernels | None:
    """The native kernels, or None where they cannot run here (see the module docstring)."""
    if os.environ.get("TUNERY_NATIVE_KERNELS", "1") == "0":
        return None
    checker = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not (checker and checker()) or compiler is None:
        return None
    try:
        return Kernels(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"")[-500:].decode(errors="replace")
        log.info("the decoding engine stays on torch's operators: its native kernels could not be built (%s) %s", exc, detail)
        return None


def fits(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the attention kernel takes these tensors as laid out: bf16 on the CPU, each query, key and
    value row contiguous, a group's queries together, keys and values laid out alike, a contiguous fp32
    mask row."""
    batch, kv_heads, group, dim = queries.shape
    return (
        queries.device.type == keys.device.type == values.device.type == bias.device.type == "cpu"
        and queries.dtype == keys.dtype == values.dtype == torch.bfloat16
        and bias.dtype == torch.float32
        and dim % 32 == 0
        and 1 <= group <= MAX_GROUP
        and keys.shape == values.shape == (batch, kv_heads, keys.shape[2], dim)
        and keys.shape[2] >= 1
        and keys.stride() == values.stride()
        and keys.stride(3) == 1
        and keys.stride(2) == dim
        and queries.stride(3) == 1
        and queries.stride(2) == dim
        and queries.stride(1) == group * dim
        and bias.shape == (batch, 1, 1, keys.shape[2])
        and bias.stride(3) == 1
    )
